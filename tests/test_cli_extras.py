"""``pip install comfyui-qr-rl`` without an extra: every command that needs one names it, with no
traceback (issue 23, defect 4). The extra's modules are blocked in a subprocess through
``sys.modules[name] = None``, which makes ``import name`` fail exactly as when it is absent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl.cli import CORE_DIST, EXTRAS, missing_module_message

REPO = Path(__file__).resolve().parents[1]
HINT = 'pip install "comfyui-qr-rl[train]"'


def _run_blocked(tmp_path: Path, blocked: list[str], commands: list[list[str]]) -> list[dict]:
    """Run ``rl.cli.main`` on each command with ``blocked`` modules unimportable; rc + stderr of each."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from rl.cli import main
        out = []
        for argv in {commands!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except BaseException as e:  # a traceback would escape here
                    rc = repr(e)
            out.append({{"rc": rc, "err": err.getvalue()}})
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=180, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_commands_name_the_missing_extra(tmp_path):
    commands = [
        ["train", "--trajectories", str(tmp_path), "--checkpoint", "base.safetensors", "--controlnet",
         "cn.safetensors", "--out", str(tmp_path / "out.safetensors")],
        ["demo", "--quick", "--out", str(tmp_path / "demo")],
        ["loop", "--backend", "local", "--rounds", "1", "--run-dir", str(tmp_path / "run")],
        ["collect", "--backend", "local", "--out", str(tmp_path / "collect")],
        ["toy", "pretrain", "--out", str(tmp_path / "toy")],
    ]
    for argv, res in zip(commands, _run_blocked(tmp_path, list(EXTRAS["train"]), commands)):
        assert res["rc"] == 2, (argv, res)
        assert HINT in res["err"] and "Traceback" not in res["err"], (argv, res)
        assert res["err"].count("\n") == 1, res["err"]  # one line
    assert not (tmp_path / "run").exists()  # the loop refused before any work


def test_one_missing_module_is_named(tmp_path):
    """With only accelerate missing, train names it (the import inside the trainer is the last guard)."""
    [res] = _run_blocked(tmp_path, ["accelerate"], [["train", "--trajectories", str(tmp_path), "--checkpoint", "b",
                                                     "--controlnet", "c", "--out", str(tmp_path / "o.safetensors")]])
    assert res["rc"] == 2 and "'accelerate'" in res["err"] and HINT in res["err"], res


def test_missing_module_messages():
    assert HINT in missing_module_message(ModuleNotFoundError("x", name="peft.tuners"))
    assert "opencv-python-headless" in missing_module_message(ModuleNotFoundError("x", name="cv2"))
    assert missing_module_message(ModuleNotFoundError("x", name="rl.nope")) is None  # our bug: a traceback


def test_extras_table_matches_pyproject():
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}

    for extra, modules in EXTRAS.items():
        assert names(extras[extra]) == set(modules), extra  # import names equal pip names for these
        assert set(modules) <= names(extras["test"]), "the test extra covers the train extra"
    assert names(project["dependencies"]) == {d.lower() for d in CORE_DIST.values()}


@pytest.mark.parametrize("command", ["encode", "scan"])
def test_core_commands_need_no_extra(tmp_path, command):
    argv = ["encode", "QR-RL", "--out", str(tmp_path / "qr.png")] if command == "encode" else ["scan", "--help"]
    [res] = _run_blocked(tmp_path, list(EXTRAS["train"]), [argv])
    assert res["rc"] in (0, "SystemExit(0)"), res
