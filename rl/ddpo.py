"""DDPO math on tensors: group-normalised advantages, the PPO-clip loss, KL, diagnostics.

Why a separate module: the trainer loop (``rl/train.py``) should read like a recipe; the
numbers it relies on live here, free of models and files, so each one is unit-tested with
hand-computed values.

Advantages (DESIGN §5): samples are grouped by ``(prompt, payload, strength)``; inside a group
``A = (r − mean) / std``, clipped to ``±clip``. A group whose rewards are all equal carries no
learning signal (every sample is as good as the others): its samples get ``A = 0`` and are
masked out. A group with fewer than ``min_group_size`` rewards is too small for its own
statistics and is normalised with the whole batch's mean and std instead.

The :class:`StatTracker` can keep a short per-group history across training rounds (a running
baseline) and saves/restores it, so a resumed or continued run normalises exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

GroupKey = tuple[str, str, float]


def group_key(prompt: str, payload: str, strength: float) -> GroupKey:
    """The advantage group of one sample; strength rounded so float noise cannot split a group."""
    return (str(prompt), str(payload), round(float(strength), 6))


@dataclass
class Advantages:
    """Per-sample advantages and the bookkeeping a run log wants.

    ``values`` [B] float32 (0 where masked); ``mask`` [B] bool (False: sample not trained on:
    non-finite reward or zero-variance group); ``fallback`` [B] bool (normalised with batch
    statistics because its group was small).
    """

    values: torch.Tensor
    mask: torch.Tensor
    fallback: torch.Tensor
    num_groups: int
    num_zero_variance_groups: int

    @property
    def num_used(self) -> int:
        return int(self.mask.sum())

    def summary(self) -> dict[str, float]:
        return {
            "adv_groups": float(self.num_groups),
            "adv_zero_var_groups": float(self.num_zero_variance_groups),
            "adv_used": float(self.num_used),
            "adv_fallback": float(self.fallback.sum()),
        }


class StatTracker:
    """Per-group reward statistics with an optional history; JSON-able state for resume.

    ``buffer_size``: how many past rewards per group are kept across :meth:`update` calls
    (``0`` = only the current batch, no memory). The current batch is always used in full,
    even when it alone exceeds the buffer.
    """

    def __init__(self, buffer_size: int = 0, min_group_size: int = 4, clip: float = 5.0, eps: float = 1e-6):
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        if min_group_size < 1:
            raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.buffer_size = int(buffer_size)
        self.min_group_size = int(min_group_size)
        self.clip = float(clip)
        self.eps = float(eps)
        self.history: dict[Hashable, list[float]] = {}

    def update(self, keys: Sequence[Hashable], rewards: np.ndarray | torch.Tensor | Sequence[float]) -> Advantages:
        """Normalise ``rewards`` [B] within their groups and remember them (if ``buffer_size``)."""
        r = _as_float64(rewards)
        if len(keys) != r.shape[0]:
            raise ValueError(f"{len(keys)} group keys for {r.shape[0]} rewards")
        finite = np.isfinite(r)
        values = np.zeros_like(r)
        mask = np.zeros(r.shape, dtype=bool)
        fallback = np.zeros(r.shape, dtype=bool)
        batch = r[finite]
        b_mean = float(batch.mean()) if batch.size else 0.0
        b_std = float(batch.std()) if batch.size else 0.0
        groups: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            if finite[i]:
                groups.setdefault(key, []).append(i)
        zero_var = 0
        for key, idx in groups.items():
            current = [float(r[i]) for i in idx]
            pool = self.history.get(key, [])[-self.buffer_size:] if self.buffer_size else []
            pool = pool + current
            if self.buffer_size:
                self.history[key] = pool[-self.buffer_size:]
            if len(pool) >= self.min_group_size:
                mean, std = float(np.mean(pool)), float(np.std(pool))
            else:
                mean, std = b_mean, b_std
                fallback[idx] = True
            if std <= self.eps:
                zero_var += 1
                continue
            values[idx] = np.clip((r[idx] - mean) / std, -self.clip, self.clip)
            mask[idx] = True
        return Advantages(
            values=torch.from_numpy(values.astype(np.float32)),
            mask=torch.from_numpy(mask),
            fallback=torch.from_numpy(fallback),
            num_groups=len(groups),
            num_zero_variance_groups=zero_var,
        )

    def state_dict(self) -> dict:
        """JSON-able state (keys are stored as lists; tuples come back as tuples)."""
        return {
            "buffer_size": self.buffer_size,
            "min_group_size": self.min_group_size,
            "clip": self.clip,
            "eps": self.eps,
            "history": [[list(k) if isinstance(k, tuple) else k, list(v)] for k, v in self.history.items()],
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_group_size = int(state["min_group_size"])
        self.clip = float(state["clip"])
        self.eps = float(state.get("eps", 1e-6))
        self.history = {
            (tuple(k) if isinstance(k, list) else k): [float(x) for x in v] for k, v in state["history"]
        }


def compute_advantages(
    rewards: np.ndarray | torch.Tensor | Sequence[float],
    keys: Sequence[Hashable],
    min_group_size: int = 4,
    clip: float = 5.0,
) -> Advantages:
    """One-shot group normalisation (a fresh :class:`StatTracker` without history)."""
    return StatTracker(buffer_size=0, min_group_size=min_group_size, clip=clip).update(keys, rewards)


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------------------------
# PPO


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(w · max(−A·r, −A·clip(r, 1−ε, 1+ε)))`` and the ratio ``r = exp(logπ − logπ_old)``.

    All inputs have the same shape (one entry per sample·step); ``weights`` (default 1) are
    the per-step weights of :func:`step_weights`. The ratio is computed in float32 at least,
    whatever autocast did upstream.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    ratio = torch.exp(log_prob.to(dtype) - old_log_prob.to(dtype))
    adv = advantages.to(dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_unit = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_unit = per_unit * weights.to(dtype)
    return per_unit.mean(), ratio


STEP_WEIGHTINGS = ("std", "none")


def step_weights(std: torch.Tensor, reference: float, kind: str = "std") -> torch.Tensor:
    """Per-step loss weights: ``std / reference`` (``"std"``) or 1 (``"none"``).

    Why: the Gaussian policy's score is ``∇ log π = (x' − μ)/std² · ∇μ = ε/std · ∇μ``, so an
    unweighted sum over steps is dominated by the last, low-noise steps -- with Euler
    ancestral on the SD schedule the std falls from ≈6.6 to ≈0.03, a 200× larger gradient for a
    step whose noise barely changes whether the code scans. Weighting each step by its std
    turns every step's term into ``A · ε · ∇μ``: the same scale at every noise level, so the
    steps that lay out the code are heard. ``reference`` (the mean std of the trained steps)
    keeps the loss, and so the learning rate, on the unweighted scale. Each step's term keeps
    its sign, so this changes how the steps are mixed, not which way each one pushes.
    """
    if kind == "none":
        return torch.ones_like(std, dtype=torch.float32)
    if kind != "std":
        raise ValueError(f"step weighting must be one of {STEP_WEIGHTINGS}, got {kind!r}")
    if not reference > 0:
        raise ValueError(f"reference std must be > 0, got {reference}")
    return std.float() / float(reference)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``[B]``: KL(N(mean, σ²) ‖ N(ref_mean, σ²)) per element, averaged over non-batch dims.

    Exact for two Gaussians of equal std: ``(μ − μ_ref)² / (2σ²)``. Averaging (not summing)
    matches the mean-over-dims log-prob, so ``kl_coef`` and the PPO term share one scale.
    """
    diff = mean.float() - ref_mean.float()
    std_t = torch.as_tensor(std, dtype=torch.float32, device=diff.device)
    if std_t.ndim == 1 and diff.ndim > 1:
        std_t = std_t.view(-1, *([1] * (diff.ndim - 1)))
    kl = diff**2 / (2 * std_t**2)
    return kl.mean(dim=tuple(range(1, kl.ndim))) if kl.ndim > 1 else kl


@torch.no_grad()
def ppo_diagnostics(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> dict[str, float]:
    """Detached floats: clip fraction, two approx-KL estimators, ratio mean/min/max.

    ``approx_kl`` = mean((r − 1) − log r) (non-negative, unbiased for KL(old‖new));
    ``approx_kl_sq`` = ½·mean((Δ log π)²) (the estimator ddpo-pytorch logs).
    """
    delta = (log_prob.detach().double() - old_log_prob.detach().double()).reshape(-1)
    if delta.numel() == 0:
        return {"clip_fraction": math.nan, "approx_kl": math.nan, "approx_kl_sq": math.nan,
                "ratio_mean": math.nan, "ratio_min": math.nan, "ratio_max": math.nan}
    ratio = torch.exp(delta)
    return {
        "clip_fraction": float(((ratio - 1.0).abs() > clip_range).double().mean()),
        "approx_kl": float(((ratio - 1.0) - delta).mean()),
        "approx_kl_sq": float(0.5 * (delta**2).mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
    }
