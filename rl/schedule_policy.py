"""A learned per-step ControlNet strength schedule, trained by policy gradient in parameter space.

Why this exists (measured on the toy, docs/research-log.md "Where the strength goes"): where in the
denoising the ControlNet acts matters more than how hard: on the toy, raising the strength at
the second-to-last of 10 steps alone decodes clearly more than raising it at every step for the
same art. DDPO cannot find that lever. Its score function
``ε/std · ∂μ/∂θ`` learns from the step's own noise, and the late steps, where the code gets
its sharp edges, have the smallest noise. So their credit drowns, and per-step gains trained
that way moved the wrong way.

This policy therefore explores in the schedule itself (PGPE: Sehnke et al. 2010). Each sample
draws its own log-gains ``δ ~ N(0, σ²)`` per step. Its strength at step k is
``base_k · exp(μ_k + δ_k)``, and the sampler records it per sample (``strength`` ``[B,K]``
in the shard). The mean ``μ`` moves along the natural gradient of the Gaussian,
``Δμ = η · mean(A · δ)``, with the group-normalised advantages DDPO already computes. There
are only K numbers to learn, and the noise is exactly where the effect is, so 64 samples a
round are plenty.

Shapes (``shape``): ``"per_step"`` explores and learns each step's log-gain on its own (K
numbers); ``"level_slope"`` learns two, a level and a tilt from the first step to the last
(``log-gain_k = a + b·(2p_k − 1)``, ``p_k = k/(K−1)``). Why two: PGPE's noise per learned
number is ``lr·σ/√n`` whatever their count, but a per-step number only sees a tenth of the
curve's effect. On the toy benchmark the ten per-step gains ended as noise (0.35–0.64 around
0.5, no two seeds alike) and the runs landed below the flat curve they started from.

The learned schedule is a plain strength curve. :meth:`keyframes` writes it in the format the
``QR Scheduled ControlNet Apply`` node's ``keyframes`` curve takes, so it applies to any
ComfyUI graph.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import QRRLError
from .files import atomic_write_text


@dataclass
class SchedulePolicy:
    """Mean log-gain per sampling step (``μ``), exploration ``sigma`` and step size ``lr``."""

    steps: int
    sigma: float = 0.2
    lr: float = 1.0
    max_strength: float = 3.0  # strengths are clamped to [0, max_strength]
    log_gain: torch.Tensor = field(default=None)  # type: ignore[assignment]  # the mean log-gain per step [K]
    updates: int = 0
    shape: str = "per_step"  # "per_step" (K numbers) | "level_slope" (2: level and tilt) | "level" (1)

    def __post_init__(self) -> None:
        check_schedule_options(self.sigma, self.lr)
        if self.steps < 1:
            raise QRRLError(f"a strength schedule needs at least one step, got {self.steps}")
        if self.shape not in SHAPES:
            raise QRRLError(f"unknown schedule shape {self.shape!r}: use {', '.join(SHAPES)}")
        if self.log_gain is None:
            self.log_gain = torch.zeros(self.steps)
        self.log_gain = torch.as_tensor(self.log_gain, dtype=torch.float32).reshape(-1).clone()
        if self.log_gain.numel() != self.steps:
            raise QRRLError(f"log_gain has {self.log_gain.numel()} values for {self.steps} steps")

    def averaged(self, log_gains: Sequence[torch.Tensor]) -> SchedulePolicy:
        """A copy whose mean is the average of ``log_gains`` (earlier means of this policy).

        Why: the art budget is a primal-dual game, and the price and the policy circle each
        other. The last iterate stops wherever the circle happens to be; the average of the
        iterates is what primal-dual methods converge to. On the toy benchmark the averaged
        curve was the steadier result across seeds (docs/research-log.md).
        """
        if not log_gains:
            raise QRRLError("nothing to average: no earlier log-gains given")
        stacked = torch.stack([torch.as_tensor(g, dtype=torch.float32).reshape(-1) for g in log_gains])
        if stacked.shape[1] != self.steps:
            raise QRRLError(f"log-gains have {stacked.shape[1]} values for {self.steps} steps")
        return SchedulePolicy(self.steps, sigma=self.sigma, lr=self.lr, max_strength=self.max_strength,
                              log_gain=stacked.mean(0), updates=self.updates, shape=self.shape)

    def basis(self) -> torch.Tensor:
        """How the explored and learned numbers map onto the per-step log-gains: ``[K, d]``."""
        k = self.steps
        if self.shape == "per_step":
            return torch.eye(k)
        level = torch.ones(k, 1)
        if self.shape == "level":
            return level
        tilt = torch.linspace(-1.0, 1.0, k)[:, None] if k > 1 else torch.zeros(1, 1)
        return torch.cat([level, tilt], 1)

    @property
    def dims(self) -> int:
        """How many numbers the policy explores and learns (``d``)."""
        return self.basis().shape[1]

    def gains(self) -> torch.Tensor:
        """The mean schedule's multiplier per step, ``exp(μ)`` [K]."""
        return self.log_gain.exp()

    def schedule(self, base: float | Sequence[float]) -> torch.Tensor:
        """The mean schedule: ``base · exp(μ)`` per step, clamped (what evaluation and export use)."""
        return (torch.as_tensor(base, dtype=torch.float32) * self.gains()).clamp(0.0, self.max_strength)

    def draw(self, n: int, base: float | Sequence[float], rng: np.random.Generator,
             mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` exploring schedules: (strengths [n,K], their offsets δ [n,d] in the learned numbers;
        ``d = K`` for the per-step shape, where δ is each step's log-gain offset).

        ``mirrored`` draws the offsets in pairs ``+δ, −δ`` (samples 2i and 2i+1; ``n`` even):
        PGPE's symmetric sampling. Given the same seed, a pair differs only by its offset, so
        what the seed does to the reward cancels in ``Σ A δ`` (why: docs/research-log.md, "Mirrored pairs").
        """
        if mirrored:
            if n % 2:
                raise QRRLError(f"mirrored draws come in pairs: n must be even, got {n}")
            half = torch.from_numpy(rng.normal(0.0, self.sigma, (n // 2, self.dims))).float()
            delta = torch.stack([half, -half], dim=1).reshape(n, self.dims)
        else:
            delta = torch.from_numpy(rng.normal(0.0, self.sigma, (n, self.dims))).float()
        strengths = torch.as_tensor(base, dtype=torch.float32) * (self.log_gain[None] + delta @ self.basis().T).exp()
        return strengths.clamp(0.0, self.max_strength), delta

    def update(self, delta: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None,
               learn: Sequence[bool] | None = None) -> dict[str, float]:
        """One natural-gradient step of ``μ`` from the drawn offsets and their advantages.

        ``Δμ = lr · Σ A_i δ_i / n`` over the samples in ``mask``: the Gaussian policy's gradient
        ``Σ A δ / σ²`` times its inverse Fisher ``σ²``, so the step does not blow up as σ shrinks.
        ``learn`` (one flag per learned number) leaves the unflagged ones where they are: the
        demo sets the level from the art budget instead (:class:`rl.art_budget.LevelBudget`).
        """
        adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
        if delta.shape != (adv.numel(), self.dims):
            raise QRRLError(f"delta must be [{adv.numel()}, {self.dims}], got {tuple(delta.shape)}")
        m = torch.ones_like(adv) if mask is None else torch.as_tensor(mask, dtype=torch.float32).reshape(-1)
        n = float(m.sum())
        if n == 0:
            return {"schedule_step": 0.0, "schedule_mean_gain": float(self.gains().mean())}
        theta_step = self.lr * ((adv * m)[:, None] * delta).sum(0) / n
        if learn is not None:
            if len(learn) != self.dims:
                raise QRRLError(f"learn needs one flag per learned number ({self.dims}), got {len(learn)}")
            theta_step = theta_step * torch.tensor([float(bool(f)) for f in learn])
        step = self.basis() @ theta_step
        self.log_gain = self.log_gain + step
        self.updates += 1
        return {"schedule_step": float(step.abs().max()), "schedule_mean_gain": float(self.gains().mean())}

    def shift_level(self, step: float) -> None:
        """Add ``step`` to every step's log-gain (scale the whole curve by ``exp(step)``)."""
        if not math.isfinite(step):
            raise QRRLError(f"level step must be finite, got {step}")
        self.log_gain = self.log_gain + float(step)

    # ---- export / persistence
    def keyframes(self, base: float, positions: Sequence[float] | None = None) -> str:
        """The mean schedule as the scheduled-ControlNet node's keyframes (``"0:0.41, 0.11:0.38, …"``).

        ``positions`` is each step's progress as the node measures it (for SD-style discrete
        models ``1 − timestep/999``); without them step k of K sits at ``k / (K − 1)``. The node
        interpolates between keyframes, so other step counts get the same curve resampled.
        """
        from .schedule import format_keyframes

        sched = self.schedule(base).tolist()
        k = len(sched)
        pos = list(positions) if positions is not None else [i / (k - 1) if k > 1 else 0.0 for i in range(k)]
        if len(pos) != k:
            raise QRRLError(f"need one keyframe position per step: {len(pos)} for {k} steps")
        return format_keyframes([(round(float(p), 4), round(float(v), 4)) for p, v in zip(pos, sched)])

    def to_dict(self, base: float | None = None, positions: Sequence[float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "sigma": self.sigma, "lr": self.lr, "max_strength": self.max_strength,
                               "log_gain": [round(float(v), 6) for v in self.log_gain], "updates": self.updates,
                               "shape": self.shape}
        if base is not None:
            out |= {"base_strength": float(base), "schedule": [round(float(v), 4) for v in self.schedule(base)],
                    "mean_strength": float(self.schedule(base).mean()), "keyframes": self.keyframes(base, positions)}
        return out

    def save(self, path: str | os.PathLike[str], base: float | None = None,
             positions: Sequence[float] | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the schedule as JSON (``extra`` adds keys, e.g. the learned module feedback)."""
        data = self.to_dict(base, positions) | (extra or {})
        return atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SchedulePolicy:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            return cls(steps=int(data["steps"]), sigma=float(data["sigma"]), lr=float(data["lr"]),
                       max_strength=float(data.get("max_strength", 3.0)), log_gain=torch.tensor(data["log_gain"]),
                       updates=int(data.get("updates", 0)), shape=str(data.get("shape", "per_step")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QRRLError(f"{p} is not a strength-schedule file written by qr-rl ({exc})") from exc


SHAPES = ("per_step", "level_slope", "level")


def check_schedule_options(sigma: float, lr: float) -> None:
    """Refuse settings that cannot learn (shared by the policy, the demo and its CLI flags)."""
    if not (math.isfinite(sigma) and 0 < sigma <= 1):
        raise QRRLError(f"--schedule-sigma must be in (0, 1] (log-gain exploration), got {sigma}")
    if not (math.isfinite(lr) and lr >= 0):
        raise QRRLError(f"--schedule-lr must be >= 0, got {lr}")
