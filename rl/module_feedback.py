"""Module feedback: a spatial ControlNet strength that pushes only the modules still wrong.

Why this exists (measured on the toy, docs/demo.md "Module feedback"): a strength that is the
same everywhere pays art on every module, including the many the art already gets right. The
minimal pixel edit that decodes (``bench/frontier.py``) only moves the wrong ones. The sampler
knows which ones those are while it runs: every step predicts the clean image ``D``. So step
``k + 1`` multiplies the ControlNet's residuals by a map built from step ``k``'s prediction:

    margin_m = (luma_m − t) · (+1 light module / −1 dark module),  t = midpoint of the
               light and the dark modules' mean luma
    wrong_m  = sigmoid((margin − margin_m) / softness)
    map_m    = low + (high − low) · wrong_m

``low`` is the gain where a module is already on its side by ``margin``, ``high`` where it is
not. At the demo strength 0.5 a hand-set (low 0.8, high 2) decodes 66% at art 0.845, where
the uniform strength 0.6 decodes 53% at art 0.859 and 0.7 69% at 0.807. Low and high are
two more numbers for :mod:`rl.schedule_policy` to learn per sample, next to the per-step curve.

The first step has no prediction yet and runs at gain 1. The map is on the module grid; it is
resized to each residual's resolution by area averaging (:func:`scale_residual`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import QRRLError


@dataclass(frozen=True)
class ModuleFeedback:
    """Gains for right (``low``) and wrong (``high``) modules, the target ``margin`` (luma, 0–1)
    and the ``softness`` of the right/wrong split."""

    low: float = 0.8
    high: float = 2.0
    margin: float = 0.05
    softness: float = 0.03

    def __post_init__(self) -> None:
        check_feedback(self.low, self.high, self.margin, self.softness)

    def gains(self) -> tuple[float, float]:
        return self.low, self.high


def check_feedback(low: float, high: float, margin: float, softness: float) -> None:
    """Refuse gains and margins that cannot work (shared by the dataclass and the CLI)."""
    for name, v in (("low", low), ("high", high), ("margin", margin), ("softness", softness)):
        if not math.isfinite(v):
            raise QRRLError(f"module feedback {name} must be a finite number, got {v}")
    if low < 0 or high < 0:
        raise QRRLError(f"module feedback gains must be >= 0, got low {low}, high {high}")
    if not 0 <= margin < 0.5:
        raise QRRLError(f"module feedback margin is a luma difference in [0, 0.5), got {margin}")
    if softness <= 0:
        raise QRRLError(f"module feedback softness must be > 0, got {softness}")


def light_grids(codes: Sequence) -> torch.Tensor:
    """The codes' module grids with quiet zone, float ``[B, N, N]``, 1 = light module."""
    import numpy as np

    grids = [torch.from_numpy((~c.module_grid()).astype(np.float32)) for c in codes]
    if len({g.shape for g in grids}) != 1:
        raise QRRLError("module feedback needs codes of one size in a batch (same version and border)")
    return torch.stack(grids)


def module_luma(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean luma of every module cell of images ``[B,3,H,W]`` in [0,1] (code aligned with the
    image): ``[B,N,N]``. Whole cells, not centres: at the toy's 2.6 pixels per module a cell's mean
    also sees its neighbours' bleed, which the scanners see too; measured on the toy at strength
    0.5, centres flag fewer modules and reach a lower decode rate at the same art."""
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None].float()
    return F.adaptive_avg_pool2d(luma, grid)[:, 0]


def wrong_modules(images: torch.Tensor, light: torch.Tensor, margin: float, softness: float) -> torch.Tensor:
    """Soft "this module is not yet on its side by ``margin``" in [0, 1], ``[B,N,N]``."""
    lum = module_luma(images, light.shape[-1])
    lt = light.to(lum)
    # threshold halfway between what the light and the dark modules look like now (a median would
    # sit on the light side whenever most modules are light, quiet zone included)
    mean_light = (lum * lt).flatten(1).sum(1) / lt.flatten(1).sum(1).clamp_min(1.0)
    mean_dark = (lum * (1 - lt)).flatten(1).sum(1) / (1 - lt).flatten(1).sum(1).clamp_min(1.0)
    thr = (0.5 * (mean_light + mean_dark)).view(-1, 1, 1)
    signed = (lum - thr) * (2.0 * lt - 1.0)
    return torch.sigmoid((margin - signed) / softness)


def strength_map(images: torch.Tensor, light: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float,
                 margin: float, softness: float, size: int) -> torch.Tensor:
    """The gain map ``[B,1,size,size]`` for the next step from the predicted clean ``images``.

    ``low`` and ``high`` are floats or one value per sample ``[B]`` (exploration draws them).
    """
    b = images.shape[0]
    lo = torch.as_tensor(low, dtype=torch.float32).reshape(-1).expand(b).view(-1, 1, 1)
    hi = torch.as_tensor(high, dtype=torch.float32).reshape(-1).expand(b).view(-1, 1, 1)
    gain = lo + (hi - lo) * wrong_modules(images, light, margin, softness)
    n = light.shape[-1]
    # nearest to whole-module blocks at a multiple of the grid, then area: module edges fall
    # between latent pixels exactly as they do in the image
    up = F.interpolate(gain[:, None], size=(n * math.ceil(size / n) * 2,) * 2, mode="nearest")
    return F.interpolate(up, size=(size, size), mode="area")


def scale_residual(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``residual × scale`` with ``scale`` per sample ``[B]`` or a map ``[B,1,h,w]`` (area-resized)."""
    if scale.ndim == 1:
        return residual * scale.view(-1, 1, 1, 1).to(residual.dtype)
    if scale.shape[-2:] != residual.shape[-2:]:
        scale = F.interpolate(scale, size=residual.shape[-2:], mode="area")
    return residual * scale.to(residual.dtype)
