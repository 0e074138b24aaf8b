"""Module feedback: a spatial ControlNet strength that pushes only the modules still wrong.

Why this exists (measured on the toy, docs/research-log.md "Module feedback"): a strength that is the
same everywhere pays art on every module, including the many the art already gets right. The
minimal pixel edit that decodes (``bench/frontier.py``) only moves the wrong ones. The sampler
knows which ones those are while it runs: every step predicts the clean image ``D``. So step
``k + 1`` multiplies the ControlNet's residuals by a map built from step ``k``'s prediction:

    margin_m = (luma_m − t) · (+1 light module / −1 dark module),  t = midpoint of the
               light and the dark modules' mean luma
    wrong_m  = sigmoid((margin − margin_m) / softness)
    map_m    = low + (high − low) · wrong_m

``low`` is the gain where a module is already on its side by ``margin``, ``high`` where it is
not. On the toy a hand-set (low 0.8, high 2) decodes more than a uniform strength that costs
the same art (docs/research-log.md, "Module feedback"). Low and high are two more numbers for
:mod:`rl.schedule_policy` to learn per sample, next to the per-step curve.

The first step has no prediction yet and runs at gain 1. The map is on the module grid; it is
resized to each residual's resolution by area averaging (:func:`scale_residual`).

The contrast ``high − low`` ramps over the run: at progress ``p = k / (K − 1)`` it is scaled by
``(ramp + 1) · p^ramp`` (mean 1 over the run; ``ramp`` 0 is a constant contrast). Early
predictions are blurry and most modules look wrong, so an early push lands everywhere and costs
art; late the wrong modules are few and pinned down. On the toy the ramp decodes clearly more
than a constant contrast at about the same art, and a feedback on the running mean of wrongness
(an integral term) did worse (the numbers: docs/research-log.md, "Module feedback").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import QRRLError
from .luma_control import LUMA_WEIGHTS


@dataclass(frozen=True)
class ModuleFeedback:
    """Gains for right (``low``) and wrong (``high``) modules, the target ``margin`` (luma, 0–1)
    and the ``softness`` of the right/wrong split."""

    low: float = 0.8
    high: float = 2.0
    margin: float = 0.05
    softness: float = 0.03
    ramp: float = 1.0

    def __post_init__(self) -> None:
        check_feedback(self.low, self.high, self.margin, self.softness, self.ramp)

    def gains(self) -> tuple[float, float]:
        return self.low, self.high

    def contrast(self, k: int, steps: int) -> float:
        """The factor on ``high − low`` at step ``k`` of ``steps``: ``(ramp + 1) · p^ramp``."""
        p = k / max(steps - 1, 1)
        return (self.ramp + 1.0) * p**self.ramp


def check_feedback(low: float, high: float, margin: float, softness: float, ramp: float = 0.0) -> None:
    """Refuse gains and margins that cannot work (shared by the dataclass and the CLI)."""
    for name, v in (("low", low), ("high", high), ("margin", margin), ("softness", softness), ("ramp", ramp)):
        if not math.isfinite(v):
            raise QRRLError(f"module feedback {name} must be a finite number, got {v}")
    if low < 0 or high < 0:
        raise QRRLError(f"module feedback gains must be >= 0, got low {low}, high {high}")
    if not 0 <= margin < 0.5:
        raise QRRLError(f"module feedback margin is a luma difference in [0, 0.5), got {margin}")
    if softness <= 0:
        raise QRRLError(f"module feedback softness must be > 0, got {softness}")
    if not 0 <= ramp <= 10:
        raise QRRLError(f"module feedback ramp is an exponent in [0, 10] (0 = constant contrast), got {ramp}")


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
    wr, wg, wb = LUMA_WEIGHTS
    luma = (wr * images[:, 0] + wg * images[:, 1] + wb * images[:, 2])[:, None].float()
    return F.adaptive_avg_pool2d(luma, grid)[:, 0]


def signed_margins(lum: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """How far each module's luma ``[B,N,N]`` is past the light/dark midpoint, toward its own side
    (positive = readable). The midpoint is halfway between what the light and the dark modules look
    like now (a median would sit on the light side whenever most modules are light, quiet zone
    included); it is held fixed (detached), so a gradient moves modules, not the threshold."""
    lt = light.to(lum)
    mean_light = (lum * lt).flatten(1).sum(1) / lt.flatten(1).sum(1).clamp_min(1.0)
    mean_dark = (lum * (1 - lt)).flatten(1).sum(1) / (1 - lt).flatten(1).sum(1).clamp_min(1.0)
    thr = (0.5 * (mean_light + mean_dark)).detach().view(-1, 1, 1)
    return (lum - thr) * (2.0 * lt - 1.0)


def wrong_modules(images: torch.Tensor, light: torch.Tensor, margin: float, softness: float) -> torch.Tensor:
    """Soft "this module is not yet on its side by ``margin``" in [0, 1], ``[B,N,N]``."""
    signed = signed_margins(module_luma(images, light.shape[-1]), light)
    return torch.sigmoid((margin - signed) / softness)


def strength_map(images: torch.Tensor, light: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float,
                 margin: float, softness: float, size: int, contrast: float = 1.0) -> torch.Tensor:
    """The gain map ``[B,1,size,size]`` for the next step from the predicted clean ``images``.

    ``low`` and ``high`` are floats or one value per sample ``[B]`` (exploration draws them);
    ``contrast`` scales ``high − low`` (:meth:`ModuleFeedback.contrast`).
    """
    b = images.shape[0]
    dev = images.device
    lo = torch.as_tensor(low, dtype=torch.float32).to(dev).reshape(-1).expand(b).view(-1, 1, 1)
    hi = torch.as_tensor(high, dtype=torch.float32).to(dev).reshape(-1).expand(b).view(-1, 1, 1)
    gain = (lo + contrast * (hi - lo) * wrong_modules(images, light, margin, softness)).clamp_min(0.0)
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


def latent_rgb(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor | None = None,
               clamp: bool = True) -> torch.Tensor:
    """A latent ``[B,C,h,w]`` seen through a linear latent→RGB map (``factors`` ``[C,3]``, ``bias`` ``[3]``):
    images ``[B,3,h,w]`` in [0, 1], the way ComfyUI draws its fast previews.

    Why linear and not the VAE: the map is rebuilt every step, and a VAE decode per step would
    cost as much as the UNet. Module feedback only compares modules against each other (the
    threshold is the light/dark midpoint), so an affine approximation of luma is enough."""
    f = torch.as_tensor(factors, dtype=torch.float32)
    if latents.ndim != 4 or f.shape != (latents.shape[1], 3):
        raise QRRLError(f"latent→RGB factors must be [C={latents.shape[1]}, 3] for latents [B,C,h,w]; "
                        f"got factors {tuple(f.shape)}, latents {tuple(latents.shape)}")
    rgb = torch.einsum("bchw,cd->bdhw", latents.float(), f.to(latents.device))
    if bias is not None:
        rgb = rgb + torch.as_tensor(bias, dtype=torch.float32, device=latents.device).view(1, 3, 1, 1)
    rgb = (rgb + 1.0) / 2.0
    # unclamped for scan guidance: a clamped pixel has no gradient, and latents often overshoot the preview's range
    return rgb.clamp(0.0, 1.0) if clamp else rgb


class LatentFeedback:
    """Module feedback for a latent-space sampler (the ComfyUI node): call :meth:`observe` with
    each step's prediction; :attr:`map` is then the gain map ``[B,1,h,w]`` for the next step
    (``None`` before the first observation, i.e. gain 1 on step 1, as in :func:`rl.toy.model.sample`).

    ``light`` ``[B,N,N]`` is the code's module grid with quiet zone, aligned with the whole
    (square) latent; ``wrong_fraction`` logs, per observed step, the mean share of modules not
    yet on their side by ``margin`` -- what the sampler's report shows."""

    def __init__(self, feedback: ModuleFeedback, light: torch.Tensor, rgb_factors, rgb_bias=None):
        if light.ndim != 3 or light.shape[-1] != light.shape[-2]:
            raise QRRLError(f"module grid must be [B,N,N], got {tuple(light.shape)}")
        self.feedback = feedback
        self.light = light.float()
        self.rgb_factors = torch.as_tensor(rgb_factors, dtype=torch.float32)
        self.rgb_bias = None if rgb_bias is None else torch.as_tensor(rgb_bias, dtype=torch.float32)
        self.map: torch.Tensor | None = None
        self.wrong_fraction: list[float] = []
        self.used: list[torch.Tensor] = []

    def begin_step(self, latents: torch.Tensor) -> None:
        """Log the map the step about to run on ``latents`` will use (ones before the first
        observation): :meth:`recorded` gives the trainer what it must replay."""
        b, _, h, w = latents.shape
        m = self.map if self.map is not None else torch.ones(b, 1, h, w)
        self.used.append(m.detach().float().cpu())

    def recorded(self) -> torch.Tensor:
        """Every step's map, ``[B,K,1,h,w]`` (a shard's ``strength_map``)."""
        if not self.used:
            raise QRRLError("module feedback recorded no steps")
        return torch.stack(self.used, dim=1)

    def observe(self, denoised: torch.Tensor, k: int, steps: int) -> None:
        """Build the map for step ``k + 1`` of ``steps`` from step ``k``'s predicted clean latent ``[B,C,h,w]``."""
        b, _, h, w = denoised.shape
        if h != w:
            raise QRRLError(f"module feedback needs a square latent (the QR code fills it), got {w}x{h}")
        if b != self.light.shape[0]:
            raise QRRLError(f"module feedback has {self.light.shape[0]} module grids for a batch of {b}")
        images = latent_rgb(denoised.detach(), self.rgb_factors, self.rgb_bias)
        fb = self.feedback
        light = self.light.to(images.device)
        self.wrong_fraction.append(float((wrong_modules(images, light, fb.margin, fb.softness) > 0.5).float().mean()))
        self.map = strength_map(images, light, fb.low, fb.high, fb.margin, fb.softness, h, fb.contrast(k + 1, steps))
