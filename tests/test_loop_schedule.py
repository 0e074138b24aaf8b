"""``qr-rl loop --learn-schedule`` on the toy backend: each sample follows its own strength curve
(one keyframes line per sample), the curve (level and tilt) is updated from the round's shards,
saved in the run folder, and reused on resume; the ComfyUI backend sends the same lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_collect import TOY_PROMPT, tiny_toy  # noqa: F401 - session fixture

from rl.collect import Job, keyframes_line, keyframes_table
from rl.loop import LoopConfig, loop_backend, loop_trainer, round_jobs, run_loop
from rl.schedule_policy import SchedulePolicy
from rl.trajectory import read_shard


def _cfg(toy: Path, run_dir: Path, **kw) -> LoopConfig:
    base = dict(backend="local", toy_model=str(toy), run_dir=str(run_dir), rounds=2, prompts=[TOY_PROMPT],
                payloads=["QR-RL"], seeds=4, batch=2, steps=3, train=loop_trainer(epochs=1, cpu=True),
                start_strength=1.0, end_strength=0.5, threads=1, progress=False, learn_schedule=True,
                schedule_sigma=0.3)
    base.update(kw)
    return LoopConfig(**base)


def test_keyframes_line_round_trips_per_step_strengths():
    percents = [0.0, 1 - 500 / 999, 1.0]
    strengths = [1.23456789, 0.7, 2.5]
    table = keyframes_table([keyframes_line(percents, strengths)], percents)
    assert table[0] == pytest.approx(strengths, abs=1e-8)


def test_learned_curve_per_sample_update_and_resume(tiny_toy, tmp_path):  # noqa: F811
    cfg = _cfg(tiny_toy, tmp_path / "run")
    run_dir = Path(cfg.run_dir)
    run_loop(cfg, log=lambda m: None, stop_after="collect")
    state = json.loads((run_dir / "state.json").read_text())
    rec = state["rounds"][0]
    draw = rec["schedule_draw"]
    assert draw["mirrored"] and len(draw["keyframes"]) == 4
    assert draw["delta"][0] == pytest.approx([-d for d in draw["delta"][1]])  # a ±δ pair ...
    assert rec["schedule"]["used_samples"] >= 0 and (run_dir / "rounds" / "r000" / "schedule.json").is_file()

    # the jobs carry one line per sample; mirrored pairs share a seed
    backend = loop_backend(cfg)
    jobs = round_jobs(cfg, backend, rec, 0, [TOY_PROMPT], ["QR-RL"])
    assert [len(j.keyframes) for j in jobs] == [2, 2] and all(j.seeds[0] == j.seeds[1] for j in jobs)  # ... on one seed
    percents = backend.step_percents()
    assert len(percents) == 3 and percents[0] == 0.0 and percents[-1] == 1.0
    manifest = json.loads((run_dir / "rounds" / "r000" / "manifest.json").read_text())
    by_key = {e["key"]: e for e in manifest["entries"]}
    for job in jobs:
        traj = read_shard(run_dir / "rounds" / "r000" / by_key[job.key]["path"])
        want = torch.tensor(keyframes_table(job.keyframes, percents))
        assert traj.strength.shape == (2, 3)
        assert torch.allclose(traj.strength.float(), want, atol=1e-6)
        assert by_key[job.key]["keyframes"] == list(job.keyframes)
    # the lines are the drawn curves: base · exp(level ± tilt), one keyframe per step
    policy0 = SchedulePolicy(3, sigma=0.3, shape="level_slope")
    delta = torch.tensor(draw["delta"])
    drawn = (1.0 * (policy0.log_gain[None] + delta @ policy0.basis().T).exp()).clamp(0, 3)
    got = torch.tensor([row for j in jobs for row in keyframes_table(j.keyframes, percents)])
    assert torch.allclose(got, drawn, atol=1e-6)

    # the update moved the curve off the flat start and saved it
    after0 = SchedulePolicy.load(run_dir / "rounds" / "r000" / "schedule.json")
    assert after0.updates == 1 and after0.shape == "level_slope"
    assert not torch.equal(after0.log_gain, torch.zeros(3))
    assert rec["schedule"]["log_gain"] == pytest.approx(after0.log_gain.tolist(), abs=1e-6)

    # resume: round 1 draws around the saved curve (not a fresh one) and updates it again
    result = run_loop(cfg, log=lambda m: None)
    assert result.finished
    state = json.loads((run_dir / "state.json").read_text())
    r1 = state["rounds"][1]
    assert state["rounds"][0]["schedule"] == rec["schedule"]  # round 0 was not updated twice
    assert r1["schedule_draw"]["log_gain"] == pytest.approx(after0.log_gain.tolist(), abs=1e-6)
    after1 = SchedulePolicy.load(run_dir / "rounds" / "r001" / "schedule.json")
    assert after1.updates == 2
    assert json.loads((run_dir / "schedule.json").read_text())["log_gain"] == after1.to_dict()["log_gain"]
    # one AdamW for the run: round 1's trainer starts from round 0's moments (rl.rounds, as the demo)
    run1 = json.loads((run_dir / "rounds" / "r001" / "train" / "run" / "result.json").read_text())
    assert Path(run1["data"]["optimizer_from"]) == run_dir / "rounds" / "r000" / "train" / "run"


def test_comfy_backend_sends_one_line_per_sample(tmp_path):
    from rl.comfy_backend import DEFAULT_WORKFLOW, ComfyBackend, with_input
    from rl.comfy_client import find_node

    wf = json.loads(DEFAULT_WORKFLOW.read_text())
    backend = ComfyBackend(wf, ["http://127.0.0.1:1"])
    lines = ("0:1.2, 1:0.9", "0:0.8, 1:1.1")
    api = backend.prompt_for(Job(0, 0, "a cat", "X", (5, 6), 1.0, "cn.safetensors", lines))
    node = api[find_node(api, "RL Sampler")]["inputs"]
    assert node["keyframes_per_sample"].splitlines() == list(lines) and node["seed"] == 5
    plain = backend.prompt_for(Job(0, 0, "a cat", "X", (5, 6), 1.0, "cn.safetensors"))
    assert plain[find_node(plain, "RL Sampler")]["inputs"].get("keyframes_per_sample", "") == ""
    assert with_input(wf, "RL Sampler.keyframes_per_sample", "x") is not wf


def test_linear_form_without_step_percents(tmp_path):
    """Where the backend cannot know each step's percent (ComfyUI), each curve is its two ends."""
    from rl.loop import draw_schedule

    cfg = LoopConfig(backend="comfy", learn_schedule=True, seeds=4, batch=2, steps=20, prompts=["p"], payloads=["q"],
                     controlnet="cn.safetensors", checkpoint="ck.safetensors", comfyui_dir=str(tmp_path))
    backend = loop_backend(cfg)
    rec = {"strength": 1.0, "controlnet": "cn.safetensors"}
    jobs = round_jobs(cfg, backend, rec, 0, ["p"], ["q"])
    draw = draw_schedule(cfg, backend, tmp_path, 0, 1.0, jobs)
    assert not draw["mirrored"] and len(draw["keyframes"]) == 4  # one ComfyUI batch = one seed: no pairs
    policy = SchedulePolicy(20, sigma=cfg.schedule_sigma, shape="level_slope")
    for line, d in zip(draw["keyframes"], draw["delta"]):
        full = (policy.log_gain + policy.basis() @ torch.tensor(d)).exp()
        assert keyframes_table([line], [0.0, 1.0])[0] == pytest.approx([float(full[0]), float(full[-1])], abs=1e-6)


@pytest.mark.comfyui
def test_learned_curve_over_real_comfyui(comfy_server, tmp_path):
    """One round over a real ComfyUI (tiny SD1.5, CPU): the RL sampler follows each sample's
    line (its two ends, linear between, at the step's percent) and the curve updates."""
    from comfy_helpers import CKPT, CONTROLNET
    from test_comfy_client import TINY, tiny_workflow

    run_dir = tmp_path / "run"
    cfg = LoopConfig(backend="comfy", servers=[comfy_server.url], workflow=str(tiny_workflow(tmp_path)),
                     run_dir=str(run_dir), name="sched", rounds=2, prompts=["a lighthouse"], payloads=["HELLO"],
                     seeds=2, start_strength=1.4, end_strength=0.7, comfyui_dir=str(comfy_server.base_dir),
                     checkpoint=CKPT, controlnet=CONTROLNET, set=list(TINY), job_timeout=300, progress=False,
                     learn_schedule=True, schedule_sigma=0.3)
    run_loop(cfg, log=lambda m: None, stop_after="collect")
    rec = json.loads((run_dir / "state.json").read_text())["rounds"][0]
    lines = rec["schedule_draw"]["keyframes"]
    assert len(lines) == 2 and lines[0] != lines[1] and not rec["schedule_draw"]["mirrored"]
    [entry] = json.loads((run_dir / "rounds" / "r000" / "manifest.json").read_text())["entries"]
    traj = read_shard(run_dir / "rounds" / "r000" / entry["path"])
    ends = torch.tensor(keyframes_table(lines, [0.0, 1.0]))  # each line: its curve's two ends
    got = traj.strength.double()
    assert got.shape == (2, 3)
    assert torch.allclose(got[:, [0, -1]], ends.double(), atol=1e-5)  # first step at 0 %, last at 100 %
    # the middle step: each sample on its own line, at one progress (ComfyUI's percent of that sigma)
    implied = (got[:, 1] - ends[:, 0]) / (ends[:, 1] - ends[:, 0])
    assert 0.0 < float(implied[0]) < 1.0 and float(implied[0]) == pytest.approx(float(implied[1]), abs=1e-4)
    assert SchedulePolicy.load(run_dir / "rounds" / "r000" / "schedule.json").updates == 1
