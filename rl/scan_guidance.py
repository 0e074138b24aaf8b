"""Scan guidance: nudge each step's predicted clean image until every module sits on its side.

Why: module feedback (:mod:`rl.module_feedback`) can only turn the ControlNet up where modules
are wrong, and the ControlNet paints whole code blocks, so each fix also repaints art that was
fine. What a scanner needs is narrower: each module's mean luma on its side of the light/dark
midpoint by a margin. That is a differentiable function of the picture, so the sampler can
follow its gradient, the training-free idea of DiffQRCoder (WACV 2025), here applied to the
*prediction* ``D`` of each step rather than through the UNet:

    signed_m = (luma_m − t) · (+1 light module / −1 dark module)     (as module feedback)
    loss     = ½ Σ_m relu(margin − signed_m)²                        (only wrong modules count)
    D ← D − scale · α ∇_D loss,   α = ‖∇loss‖² / (∇loss)ᵀ H ∇loss  (the Gauss-Newton step)

With modules that do not share pixels this ``α`` is ``1 / ‖∇_D luma_m‖²``: ``scale`` 1 moves each
wrong module exactly to the margin, in the linear part of the decoder, by the smallest change to ``D`` that does so
(pixels of modules already right are untouched), which is what "stay close to the unguided
prediction" means for a least-squares hinge; ``scale`` < 1 goes part of the way. Later steps
then denoise from the nudged prediction, so the edit is re-drawn in the model's own style.

Cost: per guided step, ``iterations`` decodes and backward passes of the decoder (no UNet
pass). For the toy the decoder is a pixel shuffle (free); for an SD latent it is the model's
linear latent→RGB preview (:func:`rl.module_feedback.latent_rgb`), also free next to the UNet.

Recording: the sampler records the guided ``D`` (the prediction each step used). ``--objective
rwr`` distils exactly that into the ControlNet; ddpo cannot replay an edit that depends on the
sample, so it refuses shards that carry ``"scan_guidance"`` metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .errors import QRRLError
from .module_feedback import module_luma, signed_margins


@dataclass(frozen=True)
class ScanGuidance:
    """How hard (``scale``), how far past the midpoint (``margin``, luma 0–1), over which part of
    the run (``start``..``end`` as fractions of the steps) and with how many Gauss-Newton
    ``iterations`` per step."""

    scale: float = 1.0
    margin: float = 0.05
    start: float = 0.9  # the last steps: guiding earlier cost more art for the same decode on the toy
    end: float = 1.0
    iterations: int = 2

    def __post_init__(self) -> None:
        check_guidance(self.scale, self.margin, self.start, self.end, self.iterations)

    def active(self, k: int, steps: int) -> bool:
        """Whether step ``k`` of ``steps`` is guided: its progress ``k / (steps − 1)`` is in the window."""
        p = k / max(steps - 1, 1)
        return self.scale > 0 and self.start - 1e-9 <= p <= self.end + 1e-9

    def to_meta(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def check_guidance(scale: float, margin: float, start: float, end: float, iterations: int) -> None:
    """Refuse settings that cannot work (shared by the dataclass, the demo's config and the node)."""
    for name, v in (("scale", scale), ("margin", margin), ("start", start), ("end", end)):
        if not math.isfinite(v):
            raise QRRLError(f"scan guidance {name} must be a finite number, got {v}")
    if not 0 <= scale <= 4:
        raise QRRLError(f"scan guidance scale is a fraction of a Gauss-Newton step in [0, 4] (1 = reach the margin), got {scale}")
    if not 0 <= margin < 0.5:
        raise QRRLError(f"scan guidance margin is a luma difference in [0, 0.5), got {margin}")
    if not 0 <= start <= end <= 1:
        raise QRRLError(f"scan guidance window must satisfy 0 <= start <= end <= 1 (fractions of the steps), "
                        f"got start {start}, end {end}")
    if int(iterations) != iterations or not 1 <= iterations <= 16:
        raise QRRLError(f"scan guidance iterations must be a whole number in [1, 16], got {iterations}")


def margin_loss(images: torch.Tensor, light: torch.Tensor, margin: float) -> torch.Tensor:
    """``½ Σ_m relu(margin − signed_m)²`` per image ``[B]``: zero once every module is on its
    side of the light/dark midpoint by ``margin``. Differentiable in ``images`` ``[B,3,H,W]``;
    the midpoint is held fixed (detached) so the gradient moves wrong modules, not the threshold."""
    signed = signed_margins(module_luma(images, light.shape[-1]), light)
    return 0.5 * torch.relu(margin - signed).pow(2).flatten(1).sum(1)


def _newton_step(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, g: torch.Tensor,
                 light: torch.Tensor, guidance: ScanGuidance) -> torch.Tensor:
    """Per image, the step ``α = ‖g‖² / gᵀHg`` that minimises the Gauss-Newton model of the loss
    along ``−g`` (the wrong modules held fixed). ``Hg`` comes from the decoder's response to ``g``:
    exact for a linear decoder, and whatever the modules' cells share (a latent pixel can cover
    several modules), so the step never overshoots the way a fixed step would."""
    with torch.no_grad():
        grid = light.shape[-1]
        before, after = decode(z), decode(z + g)
        lum0, lum1 = module_luma(before, grid), module_luma(after, grid)
        wrong = (guidance.margin - signed_margins(lum0, light)) > 0
        curv = ((lum1 - lum0).pow(2) * wrong).flatten(1).sum(1)
        norm = g.pow(2).flatten(1).sum(1)
        if not (torch.isfinite(curv).all() and torch.isfinite(norm).all()):
            raise QRRLError(f"scan guidance made the latent non-finite (scale {guidance.scale}): the decoder's "
                            "response overflowed; lower the scale or the margin")
        alpha = torch.where(curv > 0, norm / curv.clamp_min(1e-30), torch.zeros_like(norm))
    return alpha.view(-1, *([1] * (g.ndim - 1))).to(g)


def guide(denoised: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], light: torch.Tensor,
          guidance: ScanGuidance) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided prediction and each image's margin loss after guidance ``[B]``.

    ``decode`` maps a predicted clean latent ``[B,C,h,w]`` to images ``[B,3,H,W]`` in [0, 1]
    (code aligned with the whole image); ``light`` ``[B,N,N]`` is 1 on light modules. Raises when
    a step would make the latent non-finite, naming the setting to lower, instead of returning a
    NaN image."""
    if light.ndim != 3 or light.shape[0] != denoised.shape[0]:
        raise QRRLError(f"scan guidance has module grids {tuple(light.shape)} for a batch of {denoised.shape[0]}; "
                        "give one QR code per image")
    if denoised.shape[-1] != denoised.shape[-2]:
        raise QRRLError(f"scan guidance needs a square latent (the QR code fills it), got "
                        f"{denoised.shape[-1]}x{denoised.shape[-2]}")
    # ComfyUI runs nodes under inference mode, whose tensors cannot enter a graph: work on copies
    with torch.inference_mode(False), torch.enable_grad():
        z = denoised.detach().float().clone()
        if not torch.isfinite(z).all():
            raise QRRLError("the prediction is already non-finite (NaN/inf) before scan guidance: the model or an "
                            "earlier setting diverged")
        light = light.detach().to(z.device).clone()
        for it in range(int(guidance.iterations)):
            zg = z.clone().requires_grad_(True)
            images = decode(zg)
            per_image = margin_loss(images, light, guidance.margin)
            (g,) = torch.autograd.grad(per_image.sum(), zg)
            alpha = _newton_step(decode, z, g, light, guidance)
            if it == 0 and bool(((per_image.detach() > 1e-6) & (alpha.flatten() == 0)).any()):
                raise QRRLError("scan guidance: the decoder does not respond to the latent (zero gradient); "
                                "this model's latent→RGB map cannot steer module luma")
            z = (z - guidance.scale * alpha * g).detach()
            if not torch.isfinite(z).all():
                raise QRRLError(f"scan guidance made the latent non-finite (scale {guidance.scale}); lower the scale")
        loss = margin_loss(decode(z), light, guidance.margin).detach().cpu()
    return z.to(denoised.dtype), loss
