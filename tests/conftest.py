"""Shared fixtures: tiny SD1.5 test weights and a real ComfyUI server (tier 2 of DESIGN §7).

Which ComfyUI (``find_comfyui``, same order as ``scripts/find-comfyui.sh``): ``COMFYUI_PATH``
(when set it must be a ComfyUI checkout), else ``~/ComfyUI``, else ``../shared/comfyui`` next to
the project root. The server runs through ``tests/comfy_launcher.py`` (CPU-machine import fixes)
with a throw-away ``--base-directory`` holding our pack (symlinked), the tiny checkpoint and
ControlNet, and every folder ComfyUI writes (user, temp, input, output); the database is in
memory and bytecode is not written, so the ComfyUI folder may be read-only (checked at teardown).

Real-ComfyUI tests are those marked ``comfyui`` or using the ``comfyui_path`` fixture. Without a
ComfyUI they skip, with the reason shown (``-ra``). When a ComfyUI is found, or ``CI`` is set, a
skipped real-ComfyUI test is reported as a *failure*: CI must run all of them. To leave them out
on purpose, deselect them: ``pytest -m "not comfyui"``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-qr-rl"
LAUNCHER = Path(__file__).resolve().parent / "comfy_launcher.py"
STARTUP_TIMEOUT_S = 120.0


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def find_comfyui() -> tuple[Path | None, str]:
    """``(folder, why)``: the ComfyUI the real-ComfyUI tests use, or ``(None, why not)``."""
    raw = os.environ.get("COMFYUI_PATH", "")
    if raw:
        path = Path(raw).expanduser()
        if _is_comfyui(path):
            return path.resolve(), f"COMFYUI_PATH={raw}"
        return None, f"COMFYUI_PATH={raw} is not a ComfyUI checkout (no main.py and comfy/)"
    for path, why in ((Path.home() / "ComfyUI", "~/ComfyUI"), (REPO_ROOT.parent / "shared" / "comfyui", "../shared/comfyui")):
        if _is_comfyui(path):
            return path.resolve(), why
    return None, "no ComfyUI found: set COMFYUI_PATH, or put one at ~/ComfyUI or ../shared/comfyui"


COMFYUI, COMFYUI_WHY = find_comfyui()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def skips_are_failures() -> bool:
    """A skipped real-ComfyUI test fails when a ComfyUI is available (or expected: ``CI`` set)."""
    return COMFYUI is not None or bool(os.environ.get("COMFYUI_PATH")) or _truthy(os.environ.get("CI"))


def _is_real_comfyui(item: pytest.Item) -> bool:
    return item.get_closest_marker("comfyui") is not None or "comfyui_path" in getattr(item, "fixturenames", ())


def pytest_report_header(config) -> str:
    where = f"{COMFYUI} ({COMFYUI_WHY})" if COMFYUI else COMFYUI_WHY
    mode = "skips fail" if skips_are_failures() else "skips allowed"
    return f"real ComfyUI: {where}; {mode}"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that use ``comfyui_path`` are real-ComfyUI tests even without the marker."""
    for item in items:
        if "comfyui_path" in getattr(item, "fixturenames", ()) and item.get_closest_marker("comfyui") is None:
            item.add_marker(pytest.mark.comfyui)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _is_real_comfyui(item) and skips_are_failures():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"real-ComfyUI test skipped, which counts as a failure here (ComfyUI: "
            f"{COMFYUI or 'none'}; {COMFYUI_WHY}; CI={os.environ.get('CI', '')!r}): {reason}"
        )


@pytest.fixture(scope="session")
def tiny_sd_files():
    """The tiny SD1.5 checkpoint, ControlNet and diffusers config folder (built once, cached
    in ``~/.cache/comfyui-qr-rl-tests/<fingerprint>/`` or ``$QR_RL_TEST_CACHE``)."""
    from rl.testing.tiny_sd import ensure_tiny_sd

    return ensure_tiny_sd()


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    if COMFYUI is None:
        pytest.skip(f"{COMFYUI_WHY}; needed by the real-ComfyUI tests")
    return COMFYUI


@pytest.fixture(scope="session")
def comfy_base_dir(comfyui_path: Path, tiny_sd_files, tmp_path_factory) -> Path:
    """A ``--base-directory`` for ComfyUI: our pack, the tiny models, empty input/output."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    # test-only nodes (graphs the tiny weights cannot make, e.g. a model without preview colours)
    (base / "custom_nodes" / "qr_rl_test_nodes").symlink_to(REPO_ROOT / "tests" / "comfy_test_nodes",
                                                              target_is_directory=True)
    for sub in ("models/checkpoints", "models/controlnet", "models/open_clip", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True)
    # Symlinks: the cached files are hundreds of MB; ComfyUI follows links when listing.
    (base / "models/checkpoints/tiny-sd15.safetensors").symlink_to(tiny_sd_files.checkpoint)
    (base / "models/controlnet/tiny-controlnet.safetensors").symlink_to(tiny_sd_files.controlnet)
    return base


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_command(comfyui_path: Path, base_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of a test ComfyUI: loopback, CPU, and nothing written outside
    ``base_dir`` (user, temp, input, output folders there; database in memory; no bytecode)."""
    args = [
        sys.executable, str(LAUNCHER), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
        "--base-directory", str(base_dir),
        "--user-directory", str(base_dir / "user"),
        "--temp-directory", str(base_dir / "temp"),
        "--fp32-text-enc",  # CPU fp16 text encoding is slow and lossy; match diffusers (fp32)
    ]
    env = {**os.environ, "COMFYUI_PATH": str(comfyui_path), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           # ComfyUI's folder may be read-only (../shared/comfyui): no __pycache__ written into it
           "PYTHONDONTWRITEBYTECODE": "1"}
    return args, env


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file and folder under ``root``."""
    out: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in (*dirs, *files):
            p = os.path.join(folder, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[os.path.relpath(p, root)] = (0 if name in dirs else st.st_size, st.st_mtime_ns)
    return out


def tree_changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


class ComfyError(RuntimeError):
    """A prompt was rejected or failed inside ComfyUI."""


@dataclass
class ComfyServer:
    """Handle on a running ComfyUI: HTTP helpers over ``requests``."""

    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    startup_s: float = 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def object_info(self, node: str | None = None) -> dict:
        import requests

        r = requests.get(f"{self.url}/object_info" + (f"/{node}" if node else ""), timeout=60)
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict) -> str:
        """POST an API-format prompt; return its id (raise with ComfyUI's node errors)."""
        import requests

        r = requests.post(
            f"{self.url}/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=60
        )
        if r.status_code != 200:
            raise ComfyError(f"prompt rejected ({r.status_code}): {r.text}")
        body = r.json()
        if body.get("node_errors"):
            # HTTP 200 with node_errors: ComfyUI dropped the failing outputs and queued the rest.
            # A test must never take that for success; the remnant is taken off the queue.
            requests.post(f"{self.url}/queue", json={"delete": [body["prompt_id"]]}, timeout=30)
            requests.post(f"{self.url}/interrupt", json={"prompt_id": body["prompt_id"]}, timeout=30)
            raise ComfyError(
                f"ComfyUI dropped outputs of the prompt (HTTP 200 with node_errors): "
                f"{json.dumps(body['node_errors'], indent=1)}"
            )
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll ``/history`` until the prompt finishes; return its history entry."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited ({self.process.returncode}); log tail:\n{self.log_tail()}")
            r = requests.get(f"{self.url}/history/{prompt_id}", timeout=30)
            r.raise_for_status()
            entry = r.json().get(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry and status.get("completed", False):
                return entry
            if entry and status.get("status_str") == "error":
                errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                text = "\n".join(
                    f"{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type')}: "
                    f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}"
                    for e in errors
                )
                raise ComfyError(f"prompt {prompt_id} failed:\n{text or json.dumps(status)}")
            time.sleep(0.25)
        raise ComfyError(
            f"prompt {prompt_id} did not finish in {timeout:.0f} s; log tail:\n{self.log_tail()}"
        )

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, entry: dict) -> list[Path]:
        """Files the prompt's output nodes reported (images, shards, ...), as paths."""
        found = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        folder = self.base_dir / item.get("type", "output")
                        found.append(folder / item.get("subfolder", "") / item["filename"])
        return found


@pytest.fixture(scope="session")
def comfy_server(comfyui_path: Path, comfy_base_dir: Path, tmp_path_factory):
    """A real ComfyUI on CPU (loopback, in-memory database), stopped at session end."""
    import requests

    port = _free_port()
    log_path = tmp_path_factory.mktemp("comfy_log") / "comfyui.log"
    args, env = comfy_command(comfyui_path, comfy_base_dir, port)
    before = tree_state(comfyui_path)
    start = time.monotonic()
    log = open(log_path, "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(comfyui_path))
    server = ComfyServer(f"http://127.0.0.1:{port}", comfy_base_dir, log_path, process)
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"ComfyUI exited ({process.returncode}) during startup; log tail:\n{server.log_tail()}"
                )
            try:
                if requests.get(f"{server.url}/object_info", timeout=30).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - start > STARTUP_TIMEOUT_S:
                pytest.fail(
                    f"ComfyUI did not answer in {STARTUP_TIMEOUT_S:.0f} s; log tail:\n{server.log_tail()}"
                )
            time.sleep(0.5)
        server.startup_s = time.monotonic() - start
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()
    changed = tree_changes(before, tree_state(comfyui_path))
    assert not changed, f"ComfyUI wrote into its own folder {comfyui_path} (must stay read-only): {changed[:20]}"
