"""The curriculum loop in-process (toy backend): config handling, curriculum, lock, bad export
folder, and resume after ``kill -9`` inside and between phases (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_collect import TOY_PROMPT, tiny_toy  # noqa: F401 - session fixture

from rl.errors import QRRLError
from rl.loop import LoopConfig, loop_trainer, next_strength, run_lock, run_loop
from rl.schedule import Curriculum

REPO = Path(__file__).resolve().parents[1]


def _cfg(toy: Path, run_dir: Path, **kw) -> LoopConfig:
    base = dict(backend="local", toy_model=str(toy), run_dir=str(run_dir), rounds=2, prompts=[TOY_PROMPT],
                payloads=["QR-RL"], seeds=4, batch=2, steps=3, train=loop_trainer(epochs=1, cpu=True),
                start_strength=1.0, end_strength=0.5, threads=1, progress=False)
    base.update(kw)
    return LoopConfig(**base)


def _args(cfg: LoopConfig) -> list[str]:
    return ["--backend", "local", "--toy-model", cfg.toy_model, "--run-dir", cfg.run_dir, "--rounds", str(cfg.rounds),
            "--prompt", TOY_PROMPT, "--payload", "QR-RL", "--seeds", "4", "--batch", "2", "--steps", "3",
            "--train-epochs", "1", "--start-strength", "1.0", "--end-strength", "0.5", "--threads", "1", "--no-progress",
            "--train-cpu"]


# ---------------------------------------------------------------- config


def test_unknown_config_keys_are_named(tmp_path, capsys):
    from rl.cli import main

    cfg = tmp_path / "loop.toml"
    cfg.write_text('name = "x"\nrounds = 2\nlearning_rate = 0.1\nsevers = ["http://a"]\n')
    with pytest.raises(QRRLError) as e:
        LoopConfig.from_mapping(LoopConfig.load_toml(cfg), str(cfg))
    assert "['learning_rate', 'severs']" in str(e.value) and "servers" in str(e.value) and "lr" in str(e.value)
    assert main(["loop", "--config", str(cfg)]) == 2
    assert "unknown keys" in capsys.readouterr().err
    cfg.write_text("rounds = [")
    with pytest.raises(QRRLError, match="not valid TOML"):
        LoopConfig.load_toml(cfg)


def test_flags_override_config_and_example_parses(tmp_path):
    from rl.cli import build_parser
    from rl.commands.loop import config_from_args

    cfg = tmp_path / "loop.toml"
    cfg.write_text('[loop]\nname = "qr"\nrounds = 4\nservers = ["http://a:1"]\n')
    args = build_parser().parse_args(["loop", "--config", str(cfg), "--rounds", "6", "--server", "http://b:2",
                                      "--server", "http://c:3", "--no-progress"])
    c = config_from_args(args)
    assert (c.name, c.rounds, c.servers, c.progress) == ("qr", 6, ["http://b:2", "http://c:3"], False)
    example = LoopConfig.from_mapping(LoopConfig.load_toml(REPO / "configs" / "loop.toml"))
    example.validate()
    assert example.backend == "comfy" and example.rounds >= 2


def test_config_validation_messages(tmp_path):
    with pytest.raises(QRRLError, match="--controlnet"):
        LoopConfig(backend="comfy", checkpoint="x.safetensors", comfyui_dir=str(tmp_path)).validate()
    with pytest.raises(QRRLError, match="backend"):
        LoopConfig(backend="cloud").validate()
    with pytest.raises(QRRLError, match="high → low"):
        LoopConfig(backend="local", start_strength=0.5, end_strength=1.0).validate()
    with pytest.raises(QRRLError, match="lora, full, zero_convs"):
        LoopConfig(backend="local", train=loop_trainer(mode="zero-convs")).validate()
    with pytest.raises(QRRLError, match="step-weighting"):
        LoopConfig(backend="local", train=loop_trainer(step_weighting="sigma")).validate()
    LoopConfig(backend="local", train=loop_trainer(mode="zero_convs", step_weighting="none")).validate()
    with pytest.raises(QRRLError, match="anchor-decay"):
        LoopConfig(backend="local", train=loop_trainer(mode="lora", anchor_decay=0.1)).validate()
    with pytest.raises(QRRLError, match="anchor-decay"):
        LoopConfig(backend="local", train=loop_trainer(mode="full", anchor_decay=-0.1)).validate()
    LoopConfig(backend="local", train=loop_trainer(mode="zero_convs", anchor_decay=0.05)).validate()


def test_trainer_settings_nest_and_the_flat_keys_still_work(tmp_path, capsys):
    """The trainer's settings live in ``train`` ([train] / --train-<key>); the flat keys and flags of
    earlier releases map onto them with a warning naming the new key, and flags win over the file."""
    from rl.cli import build_parser
    from rl.commands.loop import config_from_args

    cfg = tmp_path / "loop.toml"
    cfg.write_text('rounds = 2\nlr = 3e-4\ntrain_batch_size = 4\n[train]\nmode = "full"\n')
    c = config_from_args(build_parser().parse_args(["loop", "--config", str(cfg), "--train-epochs", "3"]))
    assert (c.train.lr, c.train.batch_size, c.train.mode, c.train.epochs) == (3e-4, 4, "full", 3)
    err = capsys.readouterr().err
    assert "'lr' is deprecated: set 'train.lr'" in err and "'train_batch_size' is deprecated: set 'train.batch_size'" in err
    c = config_from_args(build_parser().parse_args(["loop", "--config", str(cfg), "--lr", "5e-4", "--cpu",
                                                    "--epochs", "1"]))
    assert (c.train.lr, c.train.cpu, c.train.epochs) == (5e-4, True, 1)  # the flag wins over the file
    err = capsys.readouterr().err
    assert "--lr is deprecated: use --train-lr" in err and "--cpu is deprecated: use --train-cpu" in err
    assert LoopConfig().train.epochs == 2 and LoopConfig().train.lr == loop_trainer().lr  # the loop's own default
    with pytest.raises(QRRLError, match="unknown trainer keys .*'rate'"):
        LoopConfig.from_mapping({"train": {"rate": 1}})


# ---------------------------------------------------------------- curriculum


def test_adaptive_steps_down_only_when_target_met():
    cur = Curriculum(kind="adaptive", start=1.6, end=0.8, rounds=5, target_decode_rate=0.8)
    done = [{"metrics": {"decode_rate": v}} for v in (0.5, 0.85, 0.79, 0.9, 0.95, 1.0, 1.0)]
    got = [next_strength(cur, done, r) for r in range(len(done) + 1)]
    assert got[:3] == [1.6, 1.6, pytest.approx(1.4)]  # round 0 missed the target: hold; round 1 met it
    assert got[3] == pytest.approx(1.4)  # 0.79 < 0.8: hold
    assert got[4] == pytest.approx(1.2) and got[5] == pytest.approx(1.0)
    assert got[6] == pytest.approx(0.8) and got[7] == pytest.approx(0.8)  # never below the end
    assert next_strength(cur, [{"metrics": {"decode_rate": None}}], 1) == 1.6  # unknown rate: hold


# ---------------------------------------------------------------- guards


def test_lock_and_unwritable_controlnet_folder(tiny_toy, tmp_path):  # noqa: F811
    cfg = _cfg(tiny_toy, tmp_path / "run")
    with run_lock(Path(cfg.run_dir)):
        with pytest.raises(QRRLError, match="another qr-rl loop is using"):
            run_loop(cfg)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permissions; /proc/self is a folder nobody can create files in
        ro = Path("/proc/self")
    else:
        ro.chmod(0o500)
    with pytest.raises(QRRLError, match="cannot write into the ControlNet folder"):
        run_loop(_cfg(tiny_toy, tmp_path / "run2", controlnet_dir=str(ro)))
    assert not (tmp_path / "run2" / "state.json").exists()  # refused before any work
    with pytest.raises(QRRLError, match="does not exist"):
        run_loop(_cfg(tiny_toy, tmp_path / "run3", controlnet_dir=str(tmp_path / "missing")))


# ---------------------------------------------------------------- resume after kill -9


def _start(cfg: LoopConfig) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rl", "loop", *_args(cfg)], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``cond()`` holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("condition not reached in time")


def _state(run: Path) -> dict:
    try:
        return json.loads((run / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _entries(run: Path, r: int) -> list[dict]:
    p = run / "rounds" / f"r{r:03d}" / "manifest.json"
    try:
        return json.loads(p.read_text())["entries"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_resume_after_kill9_inside_and_between_phases(tiny_toy, tmp_path):  # noqa: F811
    from safetensors import safe_open

    cfg = _cfg(tiny_toy, tmp_path / "run")
    run = Path(cfg.run_dir)
    kills = []
    # 1) inside collect: after the first of two jobs of round 0 is in the manifest
    kills.append(_kill_when(_start(cfg), lambda: len(_entries(run, 0)) == 1))
    # 2) between collect and train / inside train of round 0
    kills.append(_kill_when(_start(cfg), lambda: (_state(run).get("rounds") or [{}])[0].get("phase") == "train"))
    # 3) between rounds: round 0 exported, round 1 just started
    kills.append(_kill_when(_start(cfg), lambda: len(_state(run).get("rounds") or []) == 2))
    assert kills[0] and kills[1], "the loop finished before it could be killed"
    proc = _start(cfg)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out

    state = _state(run)
    assert [r["phase"] for r in state["rounds"]] == ["done", "done"]
    # the curriculum reached the configured final strength
    assert [r["strength"] for r in state["rounds"]] == [1.0, 0.5]
    cn_dir = run / "controlnets"
    assert sorted(p.name for p in cn_dir.glob("*.safetensors")) == ["qr-rl-r0.safetensors", "qr-rl-r1.safetensors"]
    assert not list(cn_dir.glob(".*.tmp"))
    for p in cn_dir.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as fh:  # complete, readable files
            assert len(list(fh.keys())) > 10
    assert state["rounds"][1]["controlnet"] == "qr-rl-r0.safetensors"  # round 1 sampled with round 0's export
    for r in (0, 1):
        entries = _entries(run, r)
        keys = [e["key"] for e in entries]
        assert len(keys) == 2 and len(set(keys)) == 2  # nothing lost, nothing twice
        shards = sorted((run / "rounds" / f"r{r:03d}" / "shards").glob("*.safetensors"))
        assert [s.name for s in shards] == sorted(Path(e["path"]).name for e in entries)
        assert sorted(state["rounds"][r]["shards"]) == sorted(str(s) for s in shards)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["strength"] == 0.5
    assert all(0 <= r["module_accuracy"] <= 1 and r["decode_rate"] is not None for r in rows)
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("round,strength,decode_rate")
    assert (run / "report.png").stat().st_size > 5000
    # running the finished loop again does nothing
    again = run_loop(cfg)
    assert again.finished and len(again.rounds) == 2
