"""Luma-only control: the ControlNet may change each step's prediction only in brightness.

Why (measured on the toy, docs/demo.md "Luma-only control"): scanners read a QR code from
luminance alone, but a QR ControlNet weaves the code in black and white, so it also pulls the
art's colours toward grey, and the art reward sees colours. So every step predicts the clean
image twice, with and without the ControlNet, and keeps only the luma of the difference:

    D = D_art + Y(D_cn − D_art),   Y(Δ) = (0.299 ΔR + 0.587 ΔG + 0.114 ΔB) · (1, 1, 1) per pixel

The code's light/dark pattern is the ControlNet's, the hue and saturation are the art's. It
costs one more UNet pass per step (without the ControlNet). Module feedback and the strength
curve act inside ``D_cn`` unchanged.

The projection needs the latent's colours to be linear in it. They are for the toy (its latent
is the image folded 2×2 into channels); for a VAE latent it would need an approximate
latent→RGB map, which is not built (docs/demo.md, "Open problems"). Shards record which
projection was used (:func:`projection_meta`), and the trainer rebuilds it from there
(:func:`projection_from_meta`), so its log-probabilities are those of what was sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .errors import QRRLError

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luma_only(delta_rgb: torch.Tensor) -> torch.Tensor:
    """An RGB change ``[B,3,H,W]`` with its colour removed: the same luma change, grey."""
    if delta_rgb.ndim != 4 or delta_rgb.shape[1] != 3:
        raise QRRLError(f"luma_only needs RGB images [B,3,H,W], got {tuple(delta_rgb.shape)}")
    w = torch.tensor(LUMA_WEIGHTS, dtype=delta_rgb.dtype, device=delta_rgb.device).view(1, 3, 1, 1)
    return (delta_rgb * w).sum(1, keepdim=True).expand_as(delta_rgb)


def folded_luma_projection(factor: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`luma_only` for latents that are RGB images folded ``factor × factor`` into channels
    (pixel unshuffle: the toy model's lossless stand-in for a VAE). Exact, because unfolding is linear."""
    if factor < 1:
        raise QRRLError(f"fold factor must be >= 1, got {factor}")

    def project(delta: torch.Tensor) -> torch.Tensor:
        if delta.ndim != 4 or delta.shape[1] != 3 * factor * factor:
            raise QRRLError(f"a latent folded {factor}×{factor} from RGB has {3 * factor * factor} channels, "
                            f"got {tuple(delta.shape)}")
        return F.pixel_unshuffle(luma_only(F.pixel_shuffle(delta, factor)), factor)

    return project


def projection_meta(factor: int) -> dict[str, Any]:
    """What a shard records for :func:`folded_luma_projection` (``meta["luma_control"]``)."""
    return {"kind": "folded_luma", "factor": int(factor)}


def projection_from_meta(spec: Mapping[str, Any] | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The projection a shard was sampled with (None: the plain ControlNet)."""
    if not spec:
        return None
    if not isinstance(spec, Mapping) or spec.get("kind") != "folded_luma" or not isinstance(spec.get("factor"), int):
        raise QRRLError(f"unknown luma control in the shard's metadata: {spec!r} (this version replays "
                        "{'kind': 'folded_luma', 'factor': N}); collect it again with this version")
    return folded_luma_projection(spec["factor"])
