"""The ComfyUI client, collect and loop against a real ComfyUI on CPU (skipped without COMFYUI_PATH).

Uses the session server of conftest (tiny SD1.5 checkpoint + tiny ControlNet), plus one private
server of the same launcher for the "server dies midway" case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from comfy_helpers import CKPT, CONTROLNET, load_api, scan_only, set_inputs
from conftest import _free_port, comfy_command

from rl.collect import Manifest, collect, plan_jobs, shard_summary
from rl.comfy_backend import ComfyBackend
from rl.comfy_client import ComfyClient, ComfyNodeError, ComfyUnavailable, check_workflow
from rl.errors import QRRLError

pytestmark = pytest.mark.comfyui
REPO = Path(__file__).resolve().parents[1]
TINY = ["Latent.width=64", "Latent.height=64", "RL Sampler.steps=3"]


def tiny_workflow(tmp_path: Path) -> Path:
    """The shipped API workflow without the CLIP branch (no open_clip weights in CI)."""
    wf = scan_only(load_api())
    set_inputs(wf, "Latent", width=64, height=64)
    set_inputs(wf, "RL Sampler", steps=3)
    path = tmp_path / "collect_tiny.json"
    path.write_text(json.dumps(wf))
    return path


def backend(url: str, wf: Path, run: str, **kw) -> ComfyBackend:
    from rl.comfy_backend import parse_set

    return ComfyBackend(wf, [url], run_name=run, controlnet=CONTROLNET, checkpoint=CKPT,
                        overrides=parse_set(TINY), job_timeout=300, **kw)


def test_object_info_and_node_errors(comfy_server):
    client = ComfyClient(comfy_server.url)
    info = client.object_info()
    assert {"QRTrajectoryRecorder", "QRControlNetSamplerRL", "KSampler"} <= set(info)
    assert "QRCodeEncode" in client.object_info("QRCodeEncode")

    wf = load_api()
    wf["1"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    with pytest.raises(ComfyNodeError) as e:
        client.submit(wf)
    msg = str(e.value)
    assert "node 1 'Checkpoint' (CheckpointLoaderSimple)" in msg and "ckpt_name" in msg and "{" not in msg
    assert (e.value.node_id, e.value.class_type, e.value.title) == ("1", "CheckpointLoaderSimple", "Checkpoint")

    wf = load_api()
    wf["9"]["class_type"] = "NoSuchSampler"
    with pytest.raises(QRRLError, match="node 9 'RL Sampler' needs NoSuchSampler"):
        check_workflow(wf, info)
    with pytest.raises(ComfyNodeError, match="node 9 'RL Sampler' \\(NoSuchSampler\\): .*does not exist"):
        client.submit(wf)


def test_execution_error_in_plain_words(comfy_server, tmp_path):
    wf = json.loads(tiny_workflow(tmp_path).read_text())
    set_inputs(wf, "Checkpoint", ckpt_name=CKPT)
    set_inputs(wf, "ControlNet", control_net_name=CONTROLNET)
    # record off: the recorder gets no trajectory and refuses it while running
    set_inputs(wf, "RL Sampler", ckpt_name=CKPT, control_net_name=CONTROLNET, seed=123457, record=False)
    with pytest.raises(ComfyNodeError) as e:
        ComfyClient(comfy_server.url).run(wf, timeout=300)
    assert "node 15 'Recorder' (QRTrajectoryRecorder) failed" in str(e.value)
    assert "switch 'record' on" in str(e.value)


def test_collect_workflow_through_client(comfy_server, tmp_path):
    wf = tiny_workflow(tmp_path)
    events: list[dict] = []
    be = backend(comfy_server.url, wf, "collect-test")
    jobs = plan_jobs(["a lighthouse"], ["https://a.example", "B"], seeds=2, strength=1.2, controlnet=CONTROLNET)
    rep = collect(jobs, be, tmp_path / "c", progress=False)
    assert rep.done == 2
    man = Manifest(tmp_path / "c" / "manifest.json")
    assert sorted(e["payload"] for e in man.entries) == ["B", "https://a.example"]
    for e in man.entries:
        shard = man.resolve(e["path"])
        assert shard_summary(shard)[0] == 2
        from rl.trajectory import read_shard

        traj = read_shard(shard)
        assert traj.meta["payloads"] == [e["payload"]] * 2 and traj.meta["seeds"] == e["seeds"]
        assert traj.meta["prompts"] == ["a lighthouse"] * 2
        assert float(traj.strength.max()) == pytest.approx(1.2)
        assert e["server"] == comfy_server.url and e["prompt_id"]
    again = collect(jobs, be, tmp_path / "c", progress=False)
    assert again.done == 0 and again.skipped == 2
    # progress events arrive over the websocket
    ComfyClient(comfy_server.url).run(be.prompt_for(plan_jobs(["x"], ["y"], 1, seed_start=99)[0]),
                                      timeout=300, callback=events.append)
    assert any(ev["type"] == "progress" for ev in events)


def _start_private(base: Path, comfyui_path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    args, env = comfy_command(comfyui_path, base, port)
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=str(comfyui_path))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url + "/object_info", timeout=30).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("private ComfyUI did not start")


def test_server_stopped_midway_keeps_finished_shards(comfy_server, comfyui_path, tmp_path):
    proc, url = _start_private(comfy_server.base_dir, comfyui_path, tmp_path / "private.log")
    try:
        be = ComfyBackend(tiny_workflow(tmp_path), [url], run_name="stop-test", controlnet=CONTROLNET,
                          checkpoint=CKPT, overrides={"Latent.width": 64, "Latent.height": 64,
                                                      "RL Sampler.steps": 3}, job_timeout=300, retries=1)
        be.pool.clients[0].backoff = 0.05
        jobs = plan_jobs(["a tower"], [f"P{i}" for i in range(6)], seeds=1, strength=1.0)
        out: dict = {}

        def go():
            try:
                collect(jobs, be, tmp_path / "c", progress=False)
            except BaseException as e:  # noqa: BLE001
                out["error"] = e

        t = threading.Thread(target=go)
        t.start()
        deadline = time.monotonic() + 240
        while len(Manifest(tmp_path / "c" / "manifest.json").entries if (tmp_path / "c" / "manifest.json").is_file()
                   else []) < 1:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        t.join(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    err = out.get("error")
    assert isinstance(err, ComfyUnavailable), err
    assert url in str(err) and "run the same command again to resume" in str(err)
    man = Manifest(tmp_path / "c" / "manifest.json")
    assert 1 <= len(man.entries) < len(jobs)
    for e in man.entries:
        assert shard_summary(man.resolve(e["path"]))[0] == 1


def _loop_args(comfy_server, wf: Path, run: Path, tiny_sd_files) -> list[str]:
    args = ["--backend", "comfy", "--server", comfy_server.url, "--workflow", str(wf), "--run-dir", str(run),
            "--name", "e2e", "--rounds", "2", "--prompt", "a lighthouse", "--payload", "HELLO", "--seeds", "2",
            "--start-strength", "1.4", "--end-strength", "0.7", "--comfyui-dir", str(comfy_server.base_dir),
            "--checkpoint", CKPT, "--controlnet", CONTROLNET, "--unet-config", str(tiny_sd_files.config_dir / "unet"),
            "--controlnet-config", str(tiny_sd_files.config_dir / "controlnet"), "--epochs", "1", "--cpu",
            "--no-progress", "--threads", "1", "--job-timeout", "300"]
    for s in TINY:
        args += ["--set", s]
    return args


def test_loop_two_rounds_against_comfyui_resumes_after_kill9(comfy_server, tiny_sd_files, tmp_path):
    wf = tiny_workflow(tmp_path)
    run = tmp_path / "run"
    args = _loop_args(comfy_server, wf, run, tiny_sd_files)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rl", "loop", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state_path = run / "state.json"

    def phase() -> str:
        try:
            return json.loads(state_path.read_text())["rounds"][0]["phase"]
        except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):
            return ""

    deadline = time.monotonic() + 300
    while phase() != "train":
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc = subprocess.run([sys.executable, "-m", "rl", "loop", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads(state_path.read_text())
    assert [r["phase"] for r in state["rounds"]] == ["done", "done"]
    assert [r["strength"] for r in state["rounds"]] == [1.4, 0.7]
    assert state["rounds"][1]["controlnet"] == "e2e-r0.safetensors"
    cn_dir = comfy_server.base_dir / "models" / "controlnet"
    assert (cn_dir / "e2e-r0.safetensors").is_file() and (cn_dir / "e2e-r1.safetensors").is_file()
    # the exported ControlNet is one ComfyUI offers and the next round sampled with it
    names = ComfyClient(comfy_server.url).object_info("ControlNetLoader")["ControlNetLoader"]["input"]["required"][
        "control_net_name"]
    assert "e2e-r0.safetensors" in json.dumps(names)
    from rl.trajectory import read_shard

    r1 = Manifest(run / "rounds" / "r001" / "manifest.json")
    assert len(r1.entries) == 1
    assert read_shard(r1.resolve(r1.entries[0]["path"])).meta["controlnet_file"] == "e2e-r0.safetensors"
    assert len(Manifest(run / "rounds" / "r000" / "manifest.json").entries) == 1
    assert (run / "report.png").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == 2
