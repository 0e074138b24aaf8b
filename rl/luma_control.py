"""Luma-only control: the ControlNet may change each step's prediction only in brightness.

Why (measured on the toy, docs/research-log.md "Luma-only control"): scanners read a QR code from
luminance alone, but a QR ControlNet weaves the code in black and white, so it also pulls the
art's colours toward grey, and the art reward sees colours. So every step predicts the clean
image twice, with and without the ControlNet, and keeps only the luma of the difference:

    D = D_art + Y(D_cn − D_art),   Y(Δ) = (0.299 ΔR + 0.587 ΔG + 0.114 ΔB) · (1, 1, 1) per pixel

The code's light/dark pattern is the ControlNet's, the hue and saturation are the art's. It
costs one more UNet pass per step (without the ControlNet). Module feedback and the strength
curve act inside ``D_cn`` unchanged.

The projection needs the latent's colours to be linear in it. They are exactly for the toy (its
latent is the image folded 2×2 into channels: :func:`folded_luma_projection`). A VAE latent is
not, so :func:`latent_luma_projection` works through the model's *approximate* latent→RGB map,
the linear one ComfyUI draws its fast previews with (``latent_format.latent_rgb_factors``, the
map module feedback reads): it keeps the latent change whose preview is grey with the preview
luma of the ControlNet's change. Through that linear map it leaks no colour (float error,
:func:`projection_leak`); through the real VAE decoder the leak is whatever the linear map gets
wrong, which cannot be measured without real VAE weights. Shards record which projection was
used (:func:`projection_meta`, :func:`latent_projection_meta`), and the trainer rebuilds it from
there (:func:`projection_from_meta`), so its log-probabilities are those of what was sampled.
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


def _luma_matrix(factors, bias=None) -> torch.Tensor:
    """The ``[C,C]`` matrix of :func:`latent_luma_projection` (float64; checks the map)."""
    if factors is None:
        raise QRRLError("luma-only control needs the model's latent→RGB approximation (latent_rgb_factors), and "
                        "this model has none")
    f = torch.as_tensor(factors, dtype=torch.float64)
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] < 3 or not bool(torch.isfinite(f).all()):
        raise QRRLError(f"latent→RGB factors must be a finite [C, 3] table with C >= 3, got shape {tuple(f.shape)}")
    if bias is not None:
        b = torch.as_tensor(bias, dtype=torch.float64)
        if b.shape != (3,) or not bool(torch.isfinite(b).all()):
            raise QRRLError(f"latent→RGB bias must be 3 finite numbers, got {bias!r}")
    to_rgb = f.T  # [3,C]: rgb = to_rgb @ z (+ bias, which cancels in a difference)
    if int(torch.linalg.matrix_rank(to_rgb)) < 3:
        raise QRRLError("the latent→RGB factors have rank < 3: no latent change gives a grey preview")
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    readout = to_rgb.T @ luma  # [C]: preview luma of a latent change
    grey = torch.linalg.pinv(to_rgb) @ torch.ones(3, dtype=torch.float64)  # [C]: least-norm latent with preview (1,1,1)
    return torch.outer(grey, readout)  # rank 1; idempotent because readout · grey = luma · (1,1,1) = 1


def latent_luma_projection(factors, bias=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`luma_only` for VAE latents, through a linear latent→RGB map (``factors`` ``[C,3]``).

    A latent change ``Δ`` ``[B,C,H,W]`` has the preview change ``Δrgb = Fᵀ Δ`` per pixel; its luma
    is ``ΔY = (F w) · Δ``. The projection returns the least-norm latent change whose preview is
    grey ``ΔY · (1,1,1)``: ``pinv(Fᵀ) 1 ΔY``, i.e. the rank-1 matrix ``P = pinv(Fᵀ) 1 (F w)ᵀ``
    per pixel (idempotent: ``P² = P``). What the preview cannot see (the latent directions
    ``Fᵀ`` maps to zero) is dropped with the colour. ``bias`` cancels in a difference; it is
    checked and recorded only so the shard names the whole map.
    """
    matrix = _luma_matrix(factors, bias)
    channels = matrix.shape[0]

    def project(delta: torch.Tensor) -> torch.Tensor:
        if delta.ndim != 4 or delta.shape[1] != channels:
            raise QRRLError(f"this latent→RGB map has {channels} channels, got a latent change {tuple(delta.shape)}")
        m = matrix.to(device=delta.device, dtype=delta.dtype)
        return torch.einsum("dc,bchw->bdhw", m, delta)

    project.matrix = matrix  # type: ignore[attr-defined]  # for tests and measurements
    return project


def latent_projection_meta(factors, bias=None) -> dict[str, Any]:
    """What a shard records for :func:`latent_luma_projection` (``meta["luma_control"]``)."""
    _luma_matrix(factors, bias)
    f = [[float(v) for v in row] for row in torch.as_tensor(factors, dtype=torch.float64).tolist()]
    b = None if bias is None else [float(v) for v in torch.as_tensor(bias, dtype=torch.float64).tolist()]
    return {"kind": "latent_luma", "factors": f, "bias": b}


def projection_leak(project: Callable[[torch.Tensor], torch.Tensor], factors, samples: int = 4096,
                    seed: int = 0) -> dict[str, float]:
    """How well ``project`` keeps luma and drops colour, measured through the linear map ``factors``
    on random latent changes: ``chroma_leak`` is the RMS colour (RGB minus its luma) of the
    projected preview change over the RMS preview change before projection, ``luma_error`` the RMS
    luma difference over the RMS luma, ``chroma_removed`` the share of the preview change's
    energy that was colour (what luma-only control takes away from a random change)."""
    f = torch.as_tensor(factors, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(samples, f.shape[0], 1, 1, generator=g, dtype=torch.float64)
    w = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)

    def rgb(z):
        return torch.einsum("bchw,cd->bdhw", z, f)[:, :, 0, 0]

    before, after = rgb(delta), rgb(project(delta))
    y_before, y_after = before @ w, after @ w
    chroma_after = after - y_after[:, None]
    chroma_before = before - y_before[:, None]

    def rms(t):
        return float(t.pow(2).mean().sqrt())

    return {"chroma_leak": rms(chroma_after) / rms(before), "luma_error": rms(y_after - y_before) / rms(y_before),
            "chroma_removed": float(chroma_before.pow(2).sum() / before.pow(2).sum())}


def projection_from_meta(spec: Mapping[str, Any] | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The projection a shard was sampled with (None: the plain ControlNet)."""
    if not spec:
        return None
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind == "folded_luma" and isinstance(spec.get("factor"), int):
        return folded_luma_projection(spec["factor"])
    if kind == "latent_luma" and isinstance(spec.get("factors"), list):
        return latent_luma_projection(spec["factors"], spec.get("bias"))
    raise QRRLError(f"unknown luma control in the shard's metadata: {spec!r} (this version replays "
                    "{'kind': 'folded_luma', 'factor': N} and {'kind': 'latent_luma', 'factors': [[r, g, b], ...], "
                    "'bias': [r, g, b] or null}); collect it again with this version")
