"""The real-ComfyUI tier cannot be skipped silently (issue 23): with ``COMFYUI_PATH`` set (or a
ComfyUI found, or ``CI`` set), a skipped real-ComfyUI test is reported as a failure. Checked in a
subprocess pytest whose ``COMFYUI_PATH`` names no ComfyUI, so nothing is started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "CI")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=300, env={**base, **env})


def test_skipped_real_comfyui_test_fails(tmp_path):
    target = "tests/test_comfyui_pack.py::test_expected_nodes_registered"
    proc = _pytest(tmp_path, target, COMFYUI_PATH=str(tmp_path / "not-comfyui"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and ("1 failed" in out or "1 error" in out), out[-3000:]  # setup: an error
    assert "counts as a failure" in out and "not a ComfyUI checkout" in out
    # deselecting the tier on purpose is still possible
    proc = _pytest(tmp_path, target, "-m", "not comfyui", COMFYUI_PATH=str(tmp_path / "not-comfyui"))
    assert proc.returncode == 5 and "1 deselected" in proc.stdout, proc.stdout[-2000:]


def test_find_comfyui_order(tmp_path, monkeypatch):
    import conftest

    fake = tmp_path / "comfy"
    (fake / "comfy").mkdir(parents=True)
    (fake / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    assert conftest.find_comfyui()[0] == fake.resolve()
    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ComfyUI here
    found, why = conftest.find_comfyui()
    shared = REPO.parent / "shared" / "comfyui"
    if (shared / "main.py").is_file():
        assert found == shared.resolve() and why == "../shared/comfyui"
    else:
        assert found is None
    (tmp_path / "ComfyUI").symlink_to(fake)
    assert conftest.find_comfyui()[1] == "~/ComfyUI"
    script = subprocess.run(["bash", str(REPO / "scripts" / "find-comfyui.sh")], capture_output=True, text=True,
                            env={**os.environ, "HOME": str(tmp_path), "COMFYUI_PATH": ""})
    assert script.returncode == 0 and script.stdout.strip() == str(fake.resolve())
