"""Image normalisation: everything the rewards accept becomes uint8 RGB ``[H, W, 3]``.

Why one place: images arrive as ComfyUI tensors (``[B, H, W, C]`` float 0..1), numpy arrays
from PIL or cv2 (uint8, gray/RGB/RGBA), or files. Decoders and module sampling want one
layout, and converting here keeps every reward consistent (RGBA is composited on white, the
way a phone would see a transparent PNG on a white page).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import QRRLError


def _as_numpy(img: Any) -> np.ndarray:
    if hasattr(img, "detach") and hasattr(img, "cpu"):  # torch tensor, without importing torch
        img = img.detach().cpu()
        if str(getattr(img, "dtype", "")) == "torch.bfloat16":
            img = img.float()
        img = img.numpy()
    return np.asarray(img)


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """[H,W], [H,W,C] or [C,H,W] (only when unambiguous) -> [H,W,C]."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise QRRLError(f"expected an image of shape [H,W], [H,W,C] or [B,H,W,C], got shape {tuple(arr.shape)}")
    if arr.shape[-1] in (1, 3, 4):
        return arr
    if arr.shape[0] in (1, 3, 4):
        return np.moveaxis(arr, 0, -1)
    raise QRRLError(f"cannot tell the channel axis of an image of shape {tuple(arr.shape)}: use 1, 3 or 4 channels")


def to_uint8_rgb(img: Any) -> np.ndarray:
    """One image (numpy/torch; gray, RGB or RGBA; uint8 or float 0..1) -> uint8 ``[H, W, 3]``."""
    arr = _as_numpy(img)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    arr = _channels_last(arr)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise QRRLError(f"image is empty (shape {tuple(arr.shape)})")
    if arr.dtype == np.uint8:
        f = None
    elif arr.dtype == np.bool_:
        f = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        f = None
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        f = arr.astype(np.float32)
        if not np.isfinite(f).all():
            raise QRRLError("image contains NaN or infinite values")
    if f is not None:
        arr = (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return (rgb + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_batch(images: Any) -> list[np.ndarray]:
    """A batch (``[B,H,W,C]``/``[B,C,H,W]`` array or tensor, or a list of images) -> list of uint8 RGB."""
    if isinstance(images, (list, tuple)):
        return [to_uint8_rgb(im) for im in images]
    arr = _as_numpy(images)
    if arr.ndim == 4:
        return [to_uint8_rgb(a) for a in arr]
    return [to_uint8_rgb(arr)]


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB; a missing or unreadable file is a ``QRRLError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise QRRLError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA"):
                return to_uint8_rgb(np.asarray(im.convert("RGBA")))
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise QRRLError(f"{p}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 RGB/gray as PNG atomically (:func:`rl.files.atomic_write`)."""
    from PIL import Image

    from .files import atomic_write

    pil = Image.fromarray(np.asarray(image))
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))



def save_figure(fig, path: str | Path, dpi: int = 80) -> Path:  # noqa: ANN001 - matplotlib Figure
    """Write a matplotlib figure as PNG atomically and close it (reports are redrawn while read)."""
    import matplotlib.pyplot as plt

    from .files import atomic_write

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
