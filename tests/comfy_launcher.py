"""Start a real ComfyUI (``$COMFYUI_PATH/main.py``) on a CPU-only test machine.

Usage: ``python tests/comfy_launcher.py --cpu --listen 127.0.0.1 --port 8188 ...`` (any
ComfyUI arguments). ``COMFYUI_PATH`` names the checkout (default ``~/ComfyUI``).

Why this exists: the test machines have a CPU build of torch, but the package index only
carries CUDA builds of torchvision and torchaudio. Their compiled extensions cannot load there:

- ``import torchvision`` dies on ``torchvision::nms does not exist``; the pack's
  ``rl._compat.ensure_torchvision_importable()`` declares the two operator schemas so the
  pure-Python parts (all ComfyUI uses) import.
- ``import torchaudio`` raises ``OSError: libc10_cuda.so`` from ``_load_lib``. ComfyUI only
  tolerates that in some places (``comfy_api.latest._ui`` has a bare ``except``; other modules
  import it unguarded). We make torchaudio's extension loader report "no extension" instead of
  raising, so torchaudio imports as pure Python -- the same state as a CPU install without the
  compiled libraries. Only this process is affected; nothing on disk is modified.

On a normal GPU install (matching torch/torchvision/torchaudio wheels) none of this is needed:
run ``python main.py`` as usual. Both fixes are no-ops when the real libraries load.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TorchvisionFix(importlib.abc.MetaPathFinder):
    """Run ``rl._compat.ensure_torchvision_importable()`` just before the first
    ``import torchvision``: ComfyUI's main.py must import torch itself (it sets up the
    environment first and warns if torch is already loaded)."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "torchvision" or self._busy:
            return None
        self._busy = True
        try:
            sys.meta_path.remove(self)
            _ensure_torchvision()
        finally:
            self._busy = False
        return None  # the normal finders import the (now importable) torchvision


def _ensure_torchvision() -> None:
    # The repo root has a ``nodes/`` package that would shadow ComfyUI's ``nodes.py``: put it
    # on sys.path only long enough to import ``rl._compat``.
    sys.path.insert(0, REPO_ROOT)
    try:
        from rl._compat import ensure_torchvision_importable

        ensure_torchvision_importable()
    finally:
        sys.path.remove(REPO_ROOT)


def _guard_torchaudio() -> None:
    # Importing rl._compat does not import torch, so this is safe before main.py runs.
    sys.path.insert(0, REPO_ROOT)
    try:
        from rl._compat import ensure_torchaudio_importable
    finally:
        sys.path.remove(REPO_ROOT)
    ensure_torchaudio_importable()


def main(argv: list[str]) -> None:
    comfy = os.path.abspath(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/ComfyUI")))
    main_py = os.path.join(comfy, "main.py")
    if not os.path.isfile(main_py):
        sys.exit(f"comfy_launcher: no main.py in {comfy!r}; set COMFYUI_PATH to a ComfyUI checkout")
    sys.meta_path.insert(0, _TorchvisionFix())
    _guard_torchaudio()
    # Same state as ``cd $COMFYUI_PATH && python main.py ...``.
    os.chdir(comfy)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, comfy)
    sys.argv = [main_py, *argv]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
