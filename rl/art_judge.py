"""A held-out art judge: structural similarity (SSIM) of the picture's blobs to the base image.

Why a second judge: the art reward (CLIP similarity to the base image) is what the trainer and
the sampler's art budget optimise, so a rise in decode rate "at equal art" may only mean the
optimiser found what that one CLIP does not see, e.g. a code pattern that takes over the
picture's structure while its embedding barely moves. Nothing in the project trains on this
judge, and it looks at something CLIP summarises away: where the light and dark regions and the
colour edges of the picture are.

It is SSIM (Wang et al. 2004, Gaussian window σ = 1.5 px) per RGB channel, after an area
downscale by ``downscale`` so that it compares the art's shapes rather than the code's
individual modules (a module-sized speckle changes SSIM at full resolution whatever its art
cost). Choose ``downscale`` so that one pixel spans more than a module: 4 for the toy's 64-px
images of a 25-module code. 1 = the same picture; unrelated pictures land near 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import QRRLError

_C1 = 0.01**2
_C2 = 0.03**2


def _gaussian_window(sigma: float = 1.5, radius: int = 3) -> torch.Tensor:
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(xs**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def structure_similarity(images: torch.Tensor, base: torch.Tensor, downscale: int = 4) -> torch.Tensor:
    """``[B]`` mean SSIM of ``images`` against ``base``, both ``[B,3,H,W]`` in [0, 1]."""
    if images.shape != base.shape or images.ndim != 4 or images.shape[1] != 3:
        raise QRRLError(f"structure_similarity needs two [B,3,H,W] batches of one shape; got {tuple(images.shape)} "
                        f"and {tuple(base.shape)}")
    if downscale < 1 or images.shape[-1] // downscale < 8 or images.shape[-2] // downscale < 8:
        raise QRRLError(f"downscale {downscale} leaves fewer than 8 pixels of a {tuple(images.shape[-2:])} image")
    x = images.float().clamp(0, 1)
    y = base.float().clamp(0, 1).to(x.device)
    if downscale > 1:
        x, y = F.avg_pool2d(x, downscale), F.avg_pool2d(y, downscale)
    c = x.shape[1]
    w = _gaussian_window().to(x.device).expand(c, 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (3, 3, 3, 3), mode="reflect"), w, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx**2
    vy = blur(y * y) - my**2
    cov = blur(x * y) - mx * my
    ssim = ((2 * mx * my + _C1) * (2 * cov + _C2)) / ((mx**2 + my**2 + _C1) * (vx + vy + _C2))
    return ssim.flatten(1).mean(1)
