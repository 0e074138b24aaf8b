"""Collection without ComfyUI: job planning, workflow overrides and checks, the manifest, and
the in-process backend on a tiny random toy model (real sampler, rewards and shard writer)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from rl.collect import Manifest, collect, plan_jobs, shard_summary
from rl.comfy_backend import DEFAULT_WORKFLOW, parse_set
from rl.comfy_client import ComfyUnavailable, ServerPool, apply_overrides, check_workflow
from rl.errors import QRRLError

TOY_PROMPT = "yellow rings on dark blue"


def build_tiny_toy(folder: Path) -> Path:
    """A random toy model much smaller than the shipped one (same file layout, 3 sampling steps)."""
    import torch

    from rl.toy.model import FORMAT, FORMAT_VERSION, TEXT_WIDTH, ToyModel, ToyTextEncoder, _models, build_clip
    from rl.toy.world import LATENT_CHANNELS, LATENT_SIZE

    unet_cls, cn_cls = _models()
    torch.manual_seed(0)
    unet = unet_cls(sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=[8, 16], layers_per_block=1,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=TEXT_WIDTH,
                    attention_head_dim=4, norm_num_groups=4)
    cn = cn_cls.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 4, 4))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero "zero convs": strength must change the samples
        for layer in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "sampling": {"steps": 3, "eta": 1.0, "cfg": 1.0, "scheduler": "simple-sd"},
            "strengths": {"demo": 0.4, "high": 1.0}}
    ToyModel(unet=unet, controlnet=cn, text_encoder=ToyTextEncoder(), clip=build_clip(0), info=info).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    return build_tiny_toy(tmp_path_factory.mktemp("tiny_toy"))


def _wf() -> dict:
    return json.loads(DEFAULT_WORKFLOW.read_text())


# ---------------------------------------------------------------- planning


def test_plan_jobs_unique_seeds_across_rounds_and_batches():
    r0 = plan_jobs(["a", "b"], ["X", "Y"], seeds=5, seed_start=10, round_index=0, batch=2)
    r1 = plan_jobs(["a", "b"], ["X", "Y"], seeds=5, seed_start=10, round_index=1, batch=2)
    assert len(r0) == 2 * 2 * 3  # 5 seeds in batches of 2 → 3 jobs per prompt × payload
    seeds0 = [s for j in r0 for s in j.seeds]
    seeds1 = [s for j in r1 for s in j.seeds]
    assert len(seeds0) == 20 and len(set(seeds0)) == 20 and seeds0[0] == 10
    assert not set(seeds0) & set(seeds1)
    assert len({j.key for j in r0 + r1}) == len(r0) + len(r1)
    assert plan_jobs(["a"], ["X"], 2)[0].key == plan_jobs(["a"], ["X"], 2)[0].key  # stable
    with pytest.raises(QRRLError, match="no prompts"):
        plan_jobs([], ["X"], 2)
    with pytest.raises(QRRLError, match="--seeds"):
        plan_jobs(["a"], ["X"], 0)


def test_parse_set_values():
    assert parse_set(["RL Sampler.steps=20", "Prompt.value=a cat", "X.flag=true"]) == {
        "RL Sampler.steps": 20, "Prompt.value": "a cat", "X.flag": True}
    with pytest.raises(QRRLError, match="Title.input=value"):
        parse_set(["nonsense"])


# ---------------------------------------------------------------- overrides and checks


def test_overrides_by_title_and_id():
    wf = _wf()
    out = apply_overrides(wf, {"RL Sampler.seed": 42, "8.payload": "hello", "Prompt.value": "a castle"})
    assert out["9"]["inputs"]["seed"] == 42
    assert out["8"]["inputs"]["payload"] == "hello"
    assert out["2"]["inputs"]["value"] == "a castle"
    assert wf["9"]["inputs"]["seed"] == 0  # the original is untouched
    wf["2"]["_meta"]["title"] = "My.Prompt"  # titles may contain dots: the input is after the last one
    assert apply_overrides(wf, {"My.Prompt.value": "x"})["2"]["inputs"]["value"] == "x"


def test_override_errors_list_what_exists():
    wf = _wf()
    with pytest.raises(QRRLError) as e:
        apply_overrides(wf, {"Sampler.seed": 1})
    assert "no node titled or numbered 'Sampler'" in str(e.value) and "'RL Sampler'" in str(e.value)
    with pytest.raises(QRRLError) as e:
        apply_overrides(wf, {"RL Sampler.sed": 1})
    assert "has no input 'sed'" in str(e.value) and "seed" in str(e.value)
    with pytest.raises(QRRLError, match="Title.input"):
        apply_overrides(wf, {"seed": 1})
    wf["3"]["_meta"]["title"] = "Prompt"
    with pytest.raises(QRRLError, match="2 nodes titled 'Prompt'"):
        apply_overrides(wf, {"Prompt.value": "x"})


def test_check_workflow_recorder_and_missing_nodes():
    wf = _wf()
    info = {n["class_type"]: {} for n in wf.values()}
    assert check_workflow(wf, info) == ["15"]
    no_rec = {k: v for k, v in wf.items() if v["class_type"] != "QRTrajectoryRecorder"}
    with pytest.raises(QRRLError, match="no Trajectory Recorder"):
        check_workflow(no_rec, info)
    del info["QRControlNetSamplerRL"]
    with pytest.raises(QRRLError) as e:
        check_workflow(wf, info)
    assert "node 9 'RL Sampler' needs QRControlNetSamplerRL" in str(e.value) and "custom_nodes" in str(e.value)
    with pytest.raises(QRRLError, match="UI-format"):
        check_workflow({"nodes": [], "links": []})


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_servers_are_reported():
    url = _dead_url()
    pool = ServerPool([url], 2, retries=1, backoff=0.01, timeout=2)
    with pytest.raises(ComfyUnavailable) as e:
        pool.check(_wf())
    assert url in str(e.value) and "python main.py --listen 127.0.0.1" in str(e.value)
    # jobs: every server dead → the pool says so, no job is lost silently
    with pytest.raises(ComfyUnavailable, match="every server became unreachable"):
        pool.map([1, 2, 3], lambda client, job: client.object_info())


def test_node_errors_reported_in_node_order():
    """ComfyUI lists node_errors in traversal order, which varies; the client reports node order."""
    import http.server
    import threading

    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
            "node_errors": {nid: {"class_type": ct, "errors": [{"message": "Value not in list",
                                                             "extra_info": {"input_name": name}}]}
                            for nid, ct, name in (("9", "QRControlNetSamplerRL", "ckpt_name"),
                                                  ("7", "ControlNetLoader", "control_net_name"),
                                                  ("1", "CheckpointLoaderSimple", "ckpt_name"))}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = json.dumps(body).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from rl.comfy_client import ComfyClient, ComfyNodeError

        with pytest.raises(ComfyNodeError) as e:
            ComfyClient(f"http://127.0.0.1:{server.server_address[1]}").submit(_wf())
    finally:
        server.shutdown()
    assert (e.value.node_id, e.value.class_type, e.value.title) == ("1", "CheckpointLoaderSimple", "Checkpoint")
    msg = str(e.value)
    assert msg.index("node 1 ") < msg.index("node 7 ") < msg.index("node 9 ")


# ---------------------------------------------------------------- in-process backend


def test_local_backend_collects_resumes_and_recovers(tiny_toy, tmp_path):
    from rl.toy.backend import LocalToyBackend

    backend = LocalToyBackend(tiny_toy, steps=3)
    jobs = plan_jobs([TOY_PROMPT], ["QR-RL", "HELLO"], seeds=2, strength=0.9)
    rep = collect(jobs, backend, tmp_path, progress=False)
    assert rep.done == 2 and rep.skipped == 0
    man = Manifest(tmp_path / "manifest.json")
    assert len(man.entries) == 2
    for entry in man.entries:
        path = man.resolve(entry["path"])
        samples, metrics = shard_summary(path)  # a valid v1 shard
        assert samples == 2 and entry["samples"] == 2
        assert entry["strength"] == 0.9 and entry["round"] == 0 and len(entry["sha256"]) == 64
        assert {"decoded", "module_accuracy", "clip_text", "clip_image"} <= set(metrics)
        assert (tmp_path / entry["image"]).is_file()
    assert 0.0 <= rep.summary["module_accuracy"] <= 1.0

    # run again: nothing to do
    again = collect(jobs, backend, tmp_path, progress=False)
    assert again.done == 0 and again.skipped == 2

    # killed between "shard written" and "manifest entry written": the shard is adopted, not redone
    lost = man.entries.pop()
    man.save()
    rec = collect(jobs, backend, tmp_path, progress=False)
    assert rec.adopted == 1 and rec.done == 0
    assert sorted(e["key"] for e in Manifest(tmp_path / "manifest.json").entries) == sorted(j.key for j in jobs)
    # a truncated shard of an unfinished job is deleted and the job runs again
    man = Manifest(tmp_path / "manifest.json")
    victim = man.entries.pop()
    man.save()
    path = tmp_path / victim["path"]
    path.write_bytes(path.read_bytes()[:1000])
    rec = collect(jobs, backend, tmp_path, progress=False)
    assert rec.adopted == 0 and rec.done == 1
    assert len(Manifest(tmp_path / "manifest.json").entries) == 2
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 2
    assert lost["key"] in {e["key"] for e in Manifest(tmp_path / "manifest.json").entries}


def test_collect_cli_local(tiny_toy, tmp_path, capsys):
    from rl.cli import main

    rc = main(["collect", "--backend", "local", "--toy-model", str(tiny_toy), "--out", str(tmp_path / "c"),
               "--prompt", TOY_PROMPT, "--payload", "QR-RL", "--seeds", "2", "--steps", "3", "--no-progress"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["jobs_run"] == 1 and line["samples"] == 2
    # a prompt the toy world does not know is a one-line error, not a traceback
    rc = main(["collect", "--backend", "local", "--toy-model", str(tiny_toy), "--out", str(tmp_path / "d"),
               "--prompt", "a medieval castle", "--payload", "QR-RL", "--seeds", "1", "--no-progress"])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "d", ignore_errors=True)
