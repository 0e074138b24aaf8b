"""Import-time fixes for two third-party traps seen on CPU-only machines.

Why: the package index only has CUDA builds of torchvision. On a CPU torch its C extension
cannot load, and ``import torchvision`` then dies on ``torchvision::nms does not exist`` --
which takes down open_clip, timm and even ``diffusers`` model imports. open_clip only needs
torchvision's pure-Python transforms, so we declare the two operator schemas that
torchvision's meta registrations expect. On a normal (GPU) install the real library loads
and this does nothing.

The same wheels' torchaudio raises ``OSError: libc10_cuda.so`` at import, and transformers
(reached from diffusers' model imports through peft) imports torchaudio whenever it is
installed. We make its extension loader report "no extension" instead, leaving the pure-Python
package, which is all transformers and ComfyUI need.

pyzbar 0.1.9 declares ``zbar_symbol_get_orientation`` unsigned, so libzbar 0.23's "unknown"
orientation (-1) arrives as 2**32-1 and raises ``ValueError``; we map it back to signed.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TORCHVISION_DONE = False
_PYZBAR_DONE = False


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` (and torchaudio) work on CPU torch with CUDA wheels."""
    global _TORCHVISION_DONE
    ensure_torchaudio_importable()
    if _TORCHVISION_DONE or "torchvision" in sys.modules:
        _TORCHVISION_DONE = True
        return
    _TORCHVISION_DONE = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    if _torchvision_ops_registered(torch):
        return
    for lib in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


_KEEP: list[object] = []


def _torchvision_ops_registered(torch_mod) -> bool:
    try:
        torch_mod._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return True
    except RuntimeError:
        return False


class _TorchaudioLoaderGuard(importlib.abc.MetaPathFinder):
    """Wraps ``torchaudio._extension.utils._load_lib`` as that module is first imported."""

    target = "torchaudio._extension.utils"

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:  # noqa: ANN001
            exec_module(module)
            _guard_torchaudio_loader(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _guard_torchaudio_loader(module) -> None:  # noqa: ANN001
    load = module._load_lib
    if getattr(load, "_qr_rl_guarded", False):
        return

    def guarded(lib: str) -> bool:
        try:
            return load(lib)
        except OSError:
            return False

    guarded._qr_rl_guarded = True  # type: ignore[attr-defined]
    module._load_lib = guarded


def ensure_torchaudio_importable() -> None:
    """Let ``import torchaudio`` succeed when its compiled extension cannot load."""
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is None:
        return
    loaded = sys.modules.get(_TorchaudioLoaderGuard.target)
    if loaded is not None:  # a previous failed ``import torchaudio`` left it behind
        _guard_torchaudio_loader(loaded)
    elif not any(isinstance(f, _TorchaudioLoaderGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchaudioLoaderGuard())


def ensure_pyzbar_orientation_fix() -> None:
    """Patch pyzbar so libzbar's signed 'unknown orientation' does not raise."""
    global _PYZBAR_DONE
    if _PYZBAR_DONE:
        return
    _PYZBAR_DONE = True
    try:
        from pyzbar import pyzbar as _pz
    except ImportError:
        return
    original = getattr(_pz, "zbar_symbol_get_orientation", None)
    if original is None or getattr(original, "_qr_rl_signed", False):
        return

    def signed_orientation(symbol):  # noqa: ANN001 - ctypes pointer
        value = original(symbol)
        return value - 2**32 if value >= 2**31 else value

    signed_orientation._qr_rl_signed = True  # type: ignore[attr-defined]
    _pz.zbar_symbol_get_orientation = signed_orientation
