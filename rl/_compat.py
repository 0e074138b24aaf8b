"""Import-time fixes for two third-party traps seen on CPU-only machines.

Why: the package index only has CUDA builds of torchvision. On a CPU torch its C extension
cannot load, and ``import torchvision`` then dies on ``torchvision::nms does not exist`` --
which takes down open_clip, timm and even ``diffusers`` model imports. open_clip only needs
torchvision's pure-Python transforms, so we declare the two operator schemas that
torchvision's meta registrations expect. On a normal (GPU) install the real library loads
and this does nothing.

pyzbar 0.1.9 declares ``zbar_symbol_get_orientation`` unsigned, so libzbar 0.23's "unknown"
orientation (-1) arrives as 2**32-1 and raises ``ValueError``; we map it back to signed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_TORCHVISION_DONE = False
_PYZBAR_DONE = False


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work on CPU torch with a CUDA torchvision wheel."""
    global _TORCHVISION_DONE
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
