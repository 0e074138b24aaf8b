"""The README's two set-up commands stay true: one runs the main job on the embedded default, one
runs the tests, and the latter is exactly what CI runs; every relative link it makes resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_gives_the_main_job_and_the_test_command_ci_runs():
    assert "## Quick start" in README and "## Install into ComfyUI" in README
    assert "bash scripts/install.sh && .venv/bin/qr-rl demo" in README
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert ci_command == ".venv/bin/python -m pytest -q"
    assert f"bash scripts/install.sh && {ci_command}" in README


def test_relative_links_resolve():
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README):
        if "://" not in target and not (ROOT / target).exists():
            missing.append(target)
    assert missing == []
