"""What a user hits on day one with the pack in a real ComfyUI (issue 23), each checked the way
the user meets it: the template browser's requests, a recorder fed straight by the scan reward,
a bad run name at queue time, and a prompt whose recorder ComfyUI drops (HTTP 200 with
``node_errors``) refused by the tests' own helper, ``qr-rl collect`` and ``qr-rl loop``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from comfy_helpers import CKPT, CONTROLNET, load_api, node_id, set_inputs, shard_paths, tiny_collect
from conftest import PACK_FOLDER, ComfyError

from rl.comfy_client import ComfyClient, ComfyNodeError
from rl.trajectory import read_shard

pytestmark = pytest.mark.comfyui
REPO = Path(__file__).resolve().parents[1]


def _get(server, path: str) -> requests.Response:
    return requests.get(server.url + path, timeout=60)


def test_every_listed_template_loads(comfy_server):
    """The template browser lists ``/api/workflow_templates`` and fetches each one as
    ``/api/workflow_templates/<pack>/<name>.json`` (ComfyUI front end 1.35)."""
    listing = _get(comfy_server, "/api/workflow_templates")
    assert listing.status_code == 200
    ours = listing.json().get(PACK_FOLDER)
    shipped = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert sorted(ours or []) == shipped, listing.json()
    for name in ours:
        r = _get(comfy_server, f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
        assert r.status_code == 200, f"{name}: HTTP {r.status_code}"
        wf = r.json()
        assert wf == json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert wf["nodes"] and wf["links"]  # a UI workflow the canvas can load


def test_scan_reward_straight_into_recorder(comfy_server):
    """No Combine Rewards in between: the scan reward's total and scan_score both reach the shard."""
    wf = tiny_collect(batch=2, steps=2, seed=4242, run_name="scan-direct")
    wf[node_id(wf, "Recorder")]["inputs"]["reward"] = [node_id(wf, "Scan Reward"), 0]
    del wf[node_id(wf, "Combine Rewards")]
    entry = comfy_server.run(wf, timeout=300)
    [shard] = shard_paths(entry, comfy_server.base_dir)
    traj = read_shard(shard)
    assert traj.batch_size == 2 and set(traj.reward_components) == {"decoded", "module_accuracy", "scan_score"}
    assert traj.reward.tolist() == traj.reward_components["scan_score"].tolist()


@pytest.mark.parametrize("name", ["../../x", ".hidden", ""])
def test_bad_run_name_refused_at_queue_time(comfy_server, name):
    wf = tiny_collect(steps=2, run_name=name)
    t0 = time.monotonic()
    with pytest.raises(ComfyNodeError) as e:
        ComfyClient(comfy_server.url).submit(wf)
    assert time.monotonic() - t0 < 10  # no sampling happened
    msg = str(e.value)
    assert "node 15 'Recorder' (QRTrajectoryRecorder)" in msg and "run_name" in msg and "run name" in msg, msg
    with pytest.raises(ComfyError, match="run name"):
        comfy_server.queue(wf)


def _clip_weights_missing() -> dict:
    """The shipped collect workflow on the tiny models, CLIP branch kept: its weights are not
    installed, so ComfyUI drops the recorder (node 12's dependent) and queues only Save."""
    wf = load_api()
    set_inputs(wf, "Checkpoint", ckpt_name=CKPT)
    set_inputs(wf, "ControlNet", control_net_name=CONTROLNET)
    set_inputs(wf, "Latent", width=64, height=64, batch_size=1)
    set_inputs(wf, "RL Sampler", ckpt_name=CKPT, control_net_name=CONTROLNET, steps=2, seed=777)
    return wf


def test_dropped_recorder_is_never_a_success(comfy_server, tmp_path):
    wf = _clip_weights_missing()
    raw = requests.post(f"{comfy_server.url}/prompt", json={"prompt": wf}, timeout=60)
    body = raw.json()
    assert raw.status_code == 200 and "12" in body["node_errors"]  # what ComfyUI 0.8.0 answers
    requests.post(f"{comfy_server.url}/queue", json={"delete": [body["prompt_id"]]}, timeout=30)
    # the tests' helper
    with pytest.raises(ComfyError, match="node_errors"):
        comfy_server.run(wf, timeout=60)
    # the client under collect and loop
    with pytest.raises(ComfyNodeError, match="node 12 'CLIP Scorer'"):
        ComfyClient(comfy_server.url).submit(wf)
    queue = ComfyClient(comfy_server.url).queue_state()
    assert not queue["queue_pending"], "the remnant of a refused prompt stays off the queue"


def test_loop_refuses_dropped_recorder(comfy_server, tiny_sd_files, tmp_path):
    """``qr-rl loop`` on two server addresses: the first round stops at once, naming node 12."""
    from rl.cli import main

    wf = tmp_path / "collect_with_clip.json"
    wf.write_text(json.dumps(_clip_weights_missing()))
    port = comfy_server.url.rsplit(":", 1)[1]
    run = tmp_path / "run"
    argv = ["loop", "--backend", "comfy", "--server", comfy_server.url, "--server", f"http://localhost:{port}",
            "--workflow", str(wf), "--run-dir", str(run), "--name", "refused", "--rounds", "2", "--prompt", "x",
            "--payload", "Y", "--seeds", "2", "--batch", "1", "--comfyui-dir", str(comfy_server.base_dir),
            "--checkpoint", CKPT, "--controlnet", CONTROLNET, "--no-progress", "--job-timeout", "120"]
    t0 = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - t0 < 60
    state = json.loads((run / "state.json").read_text())
    assert [r["phase"] for r in state["rounds"]] == ["collect"]
    assert json.loads((run / "rounds" / "r000" / "manifest.json").read_text())["entries"] == []
