"""``qr-rl loop`` runs the demo's recipe: a fixed teacher (every round samples with the starting
ControlNet, with the sampler's tricks) whose predictions rwr distils into a student that trains on
from round to round, at the round's base strength. On the toy backend and over a real ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_collect import TOY_PROMPT, tiny_toy  # noqa: F401 - session fixture

from rl.errors import QRRLError
from rl.files import sha256_file
from rl.loop import LoopConfig, loop_trainer, run_loop
from rl.trajectory import read_shard


def _recipe(**kw) -> dict:
    return dict(teacher="pretrained", module_feedback=True, luma_control=True,
                train=loop_trainer(objective="rwr", mode="full", epochs=1, cpu=True)) | kw


def _shards(run_dir: Path, r: int) -> list[Path]:
    return sorted((run_dir / "rounds" / f"r{r:03d}" / "shards").glob("*.safetensors"))


def _train_result(run_dir: Path, r: int) -> dict:
    """The round's trainer run: its result.json, with the config its checkpoint records."""
    from safetensors import safe_open

    run = run_dir / "rounds" / f"r{r:03d}" / "train" / "run"
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as fh:
        config = json.loads(fh.metadata()["state"])["config"]
    return json.loads((run / "result.json").read_text()) | {"config": config}


def test_a_fixed_teacher_samples_every_round_and_the_student_trains_on(tiny_toy, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    cfg = LoopConfig(backend="local", toy_model=str(tiny_toy), run_dir=str(run_dir), rounds=2, prompts=[TOY_PROMPT],
                     payloads=["QR-RL"], seeds=4, batch=4, steps=3, start_strength=1.0, end_strength=0.5, threads=1,
                     progress=False, **_recipe())
    run_loop(cfg, log=lambda m: None)
    rounds = json.loads((run_dir / "state.json").read_text())["rounds"]
    base = tiny_toy / "controlnet.safetensors"
    assert [r["controlnet"] for r in rounds] == [base.name, base.name]  # the teacher, both rounds
    assert rounds[1]["train_from"] == rounds[0]["exported"]  # the student carries on
    for r in (0, 1):
        traj = read_shard(_shards(run_dir, r)[0])
        assert traj.meta["controlnet_sha256"] == sha256_file(base)
        assert traj.meta["module_feedback"] and traj.meta["luma_control"] and traj.strength_map is not None
        res = _train_result(run_dir, r)
        assert res["config"]["target_strength"] is None  # the student at each step's recorded strength
        assert res["config"]["controlnet"] == rounds[r]["train_from"]
        # the tricks' predictions differ from the plain student's: there is something to distil
        assert res["data"]["distill_rmse"] > 1e-4
    assert _train_result(run_dir, 1)["data"]["optimizer_from"]  # one AdamW for the run


def test_the_recipe_settings_are_checked_before_any_work(tmp_path):
    ok = dict(backend="local", run_dir=str(tmp_path / "r"))
    LoopConfig(**ok, **_recipe()).validate()
    with pytest.raises(QRRLError, match="ddpo learns only from the policy's own samples"):
        LoopConfig(**ok, **_recipe(train=loop_trainer(objective="ddpo"))).validate()
    with pytest.raises(QRRLError, match="teacher must be current or pretrained"):
        LoopConfig(**ok, teacher="best").validate()
    assert not list(tmp_path.iterdir())


def test_the_shipped_config_runs_the_recipe_and_flags_switch_it():
    from rl.cli import build_parser
    from rl.commands.loop import config_from_args

    toml = str(Path(__file__).resolve().parents[1] / "configs" / "loop.toml")
    cfg = config_from_args(build_parser().parse_args(["loop", "--config", toml]))
    assert (cfg.teacher, cfg.module_feedback, cfg.train.objective) == ("pretrained", True, "rwr")
    cfg = config_from_args(build_parser().parse_args(["loop", "--config", toml, "--no-module-feedback", "--luma-control",
                                                      "--teacher", "current", "--train-objective", "ddpo"]))
    assert (cfg.teacher, cfg.module_feedback, cfg.luma_control, cfg.train.objective) == ("current", False, True, "ddpo")
    cfg.validate()


def test_comfy_backend_links_the_tricks_into_the_sampler():
    from rl.collect import Job
    from rl.comfy_backend import DEFAULT_WORKFLOW, ComfyBackend
    from rl.comfy_client import find_node

    wf = json.loads(DEFAULT_WORKFLOW.read_text())
    job = Job(0, 0, "a cat", "X", (5, 6), 1.0, "cn.safetensors")
    plain = ComfyBackend(wf, ["http://127.0.0.1:1"]).prompt_for(job)
    sampler = plain[find_node(plain, "RL Sampler")]["inputs"]
    assert "qr_code" not in sampler and not sampler.get("luma_control", False)
    api = ComfyBackend(wf, ["http://127.0.0.1:1"], module_feedback=True, luma_control=True).prompt_for(job)
    sampler = api[find_node(api, "RL Sampler")]["inputs"]
    assert sampler["qr_code"] == [find_node(api, "QR Payload"), 2] and sampler["luma_control"] is True
    assert api[find_node(api, "Recorder")]["inputs"]["qr_code"] == sampler["qr_code"]  # the code the reward scans


@pytest.mark.comfyui
def test_the_recipe_over_real_comfyui(comfy_server, tiny_sd_files, tmp_path):
    """Two rounds over a real ComfyUI (tiny SD1.5, CPU): both sample with the starting ControlNet, with
    module feedback and luma-only control recorded; rwr trains the student from round to round."""
    from comfy_helpers import CKPT, CONTROLNET
    from test_comfy_client import TINY, tiny_workflow

    run_dir = tmp_path / "run"
    cfg = LoopConfig(backend="comfy", servers=[comfy_server.url], workflow=str(tiny_workflow(tmp_path)),
                     run_dir=str(run_dir), name="recipe", rounds=2, prompts=["a lighthouse"], payloads=["HELLO"],
                     seeds=2, start_strength=1.4, end_strength=0.7, comfyui_dir=str(comfy_server.base_dir),
                     checkpoint=CKPT, controlnet=CONTROLNET, set=list(TINY), job_timeout=300, progress=False,
                     unet_config=str(tiny_sd_files.config_dir / "unet"), threads=1,
                     controlnet_config=str(tiny_sd_files.config_dir / "controlnet"),
                     **_recipe(train=loop_trainer(objective="rwr", mode="zero_convs", epochs=1, cpu=True)))
    run_loop(cfg, log=lambda m: None)
    rounds = json.loads((run_dir / "state.json").read_text())["rounds"]
    assert [r["controlnet"] for r in rounds] == [CONTROLNET, CONTROLNET]
    assert rounds[1]["train_from"] == rounds[0]["exported"]
    base_sha = sha256_file(Path(comfy_server.base_dir) / "models" / "controlnet" / CONTROLNET)
    for r in (0, 1):
        traj = read_shard(_shards(run_dir, r)[0])
        assert traj.meta["controlnet_sha256"] == base_sha
        assert traj.meta["module_feedback"] and traj.meta["luma_control"] and traj.strength_map is not None
        res = _train_result(run_dir, r)
        assert res["config"]["target_strength"] is None
        assert res["data"]["distill_rmse"] > 0
    assert Path(rounds[1]["exported"]).is_file()


def test_comfy_backend_refuses_per_sample_feedback_gains():
    from rl.collect import Job
    from rl.comfy_backend import DEFAULT_WORKFLOW, ComfyBackend

    backend = ComfyBackend(json.loads(DEFAULT_WORKFLOW.read_text()), ["http://127.0.0.1:1"], module_feedback=True)
    job = Job(0, 0, "a cat", "X", (5, 6), 1.0, "cn.safetensors", feedback_gains=((0.8, 2.0), (0.9, 1.8)))
    with pytest.raises(QRRLError, match="cannot take"):
        backend.prompt_for(job)
