"""The art budget as a constraint on the *mean* art similarity, priced by a Lagrange multiplier.

Why: the benchmark's target is "decode as often as possible while the mean art similarity stays
within 5% of the pretrained ControlNet's". That is a constrained problem, and the standard way
to solve it with policy gradients is primal-dual: reward ``scan + λ·(art − floor)`` and move the
price λ ≥ 0 after each round by how far the round's mean art fell below the floor
(``λ ← max(0, λ + lr·(floor − mean art))``). The price rises while the policy overspends and
falls back to 0 when it stays inside, so the policy spends exactly the budget. A per-sample
hinge (:func:`rl.reward.floor_penalty`) instead punishes every sample whose own art happens to
fall below the floor, and the spread between images is larger than the budget: steep enough to
hold the mean, it also froze the strength curve (docs/research-log.md).

Paired floors: the demo gives each sample the floor ``0.95 × the art of the pretrained
ControlNet for the same prompt, payload and seed``. A round's mean art moves with its random
prompts alone, and a price chasing that noise swung the policy back and forth; the paired gap
cancels the prompts.

A proportional term (``kp``, PI control): the price is ``max(0, I + kp·gap)`` with the integral
``I ← max(0, I + lr·gap)``. Why: with a pure integral the price wound up far past its
equilibrium while the learned gains took rounds to follow, then sat at 0 while they recovered:
the runs circled the budget and under-spent it on average (the numbers: docs/research-log.md,
"Holding the budget with the level"). The proportional term answers this round's overspend at
once and lets the integral be slow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .reward import Reward


@dataclass
class ArtBudget:
    """A floor on the mean art similarity and its current price λ (reward per unit of similarity)."""

    floor: float
    lr: float = 100.0  # integral gain: price units per unit of mean-art shortfall, per round
    price: float = 0.0  # the current price, what reward() charges
    kp: float = 0.0  # proportional gain on the last round's shortfall
    integral: float | None = None  # the integral part; None = start from ``price``

    def __post_init__(self) -> None:
        if not math.isfinite(self.floor):
            raise ValueError(f"art floor must be finite, got {self.floor}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"art price lr must be >= 0, got {self.lr}")
        if not (self.price >= 0 and math.isfinite(self.price)):
            raise ValueError(f"art price must be >= 0, got {self.price}")
        if not (self.kp >= 0 and math.isfinite(self.kp)):
            raise ValueError(f"art price kp must be >= 0, got {self.kp}")
        if self.integral is None:
            self.integral = self.price

    def reward(self, art: np.ndarray | Sequence[float], name: str = "art_margin",
               floors: np.ndarray | Sequence[float] | None = None) -> Reward:
        """``λ·(art − floor)`` per sample; the margin ``art − floor`` is kept as component ``name``.

        ``floors`` gives each sample its own floor (a paired budget: a fraction of what the
        pretrained ControlNet draws for the same prompt and seed) instead of ``self.floor``.
        """
        a = np.asarray(art, dtype=np.float64).reshape(-1)
        f = self.floor if floors is None else np.asarray(floors, dtype=np.float64).reshape(-1)
        if floors is not None and f.shape != a.shape:
            raise ValueError(f"need one floor per sample: {f.size} floors for {a.size} samples")
        margin = a - f
        return Reward(total=self.price * margin, components={name: margin}, details=[{} for _ in margin])

    def update(self, mean_art: float, floor: float | None = None) -> dict[str, float]:
        """One dual (PI) step on a round's mean art (against ``floor``, default ``self.floor``: pass
        the round's mean paired floor); returns the new price and the gap it acted on."""
        if not math.isfinite(mean_art):
            raise ValueError(f"mean art similarity must be finite, got {mean_art}")
        gap = (self.floor if floor is None else float(floor)) - float(mean_art)
        self.integral = max(0.0, float(self.integral) + self.lr * gap)
        self.price = max(0.0, self.integral + self.kp * gap)
        return {"art_price": self.price, "art_gap": gap}


@dataclass
class LevelBudget(ArtBudget):
    """Hold the mean art on its floor with the strength curve's *level*, and price art for the
    rest of the policy at the rate the level trades it for decode.

    Why: a price that the policy has to learn to answer leaves two learned quantities chasing
    each other. On the toy, with the level and tilt learned by PGPE under a PI price, one seed's
    round decode swung back and forth over the run. The constraint is one number and the
    level is the one knob that moves art most directly, so the level is set by the constraint:
    a damped Newton step ``Δ log-level = −gain · gap / (∂art/∂log-level)`` per round, with the
    round's paired gap. What the level cannot say is where else art is better spent; that is
    the price, and at the optimum every knob trades decode for art at the same rate (KKT), so
    the price is the level's own rate ``(∂decode/∂log-level) / −(∂art/∂log-level)`` (less the
    reward's fixed art weight). Both slopes are regressions of each sample's decode and art
    margin on its level offset δ, smoothed across rounds.
    """

    gain: float = 0.7  # fraction of the Newton step toward the floor per round
    max_step: float = 0.2  # bound on |Δ log-level| per round
    art_slope: float = -0.14  # ∂ art / ∂ log-level: a prior (the toy's dial near 0.5), then estimated
    decode_slope: float = 0.5  # ∂ decode rate / ∂ log-level: a prior, then estimated
    memory: float = 0.5  # weight the estimates keep from earlier rounds
    art_weight: float = 0.0  # the reward's fixed art weight: the price adds only what it lacks
    max_price: float = 50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gain", "max_step", "memory"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 <= v <= (1 if name == "memory" else 10)):
                raise ValueError(f"level budget {name} out of range: {v}")
        if not self.art_slope < 0:
            raise ValueError(f"art must fall as the level rises: art_slope {self.art_slope} is not < 0")
        self.price = self._price()

    def _price(self) -> float:
        return float(min(self.max_price, max(0.0, self.decode_slope / -self.art_slope - self.art_weight)))

    def observe(self, level_delta: np.ndarray | Sequence[float], margins: np.ndarray | Sequence[float],
                decoded: np.ndarray | Sequence[float]) -> dict[str, float]:
        """Learn the slopes from a round (each sample's level offset, art − its floor, decoded 0/1),
        set the price, and return the level step that moves the mean margin to 0."""
        d = np.asarray(level_delta, dtype=np.float64).reshape(-1)
        m = np.asarray(margins, dtype=np.float64).reshape(-1)
        y = np.asarray(decoded, dtype=np.float64).reshape(-1)
        if not (d.shape == m.shape == y.shape) or d.size < 2:
            raise ValueError(f"need one level offset, margin and decode per sample, got {d.size}, {m.size}, {y.size}")
        if not (np.isfinite(d).all() and np.isfinite(m).all() and np.isfinite(y).all()):
            raise ValueError("level offsets, margins and decodes must be finite")
        dc = d - d.mean()
        var = float((dc * dc).sum())
        if var > 0:
            art = float((dc * (m - m.mean())).sum() / var)
            dec = float((dc * (y - y.mean())).sum() / var)
            self.art_slope = min(-0.02, self.memory * self.art_slope + (1 - self.memory) * art)
            self.decode_slope = max(0.0, self.memory * self.decode_slope + (1 - self.memory) * dec)
        gap = float(m.mean())  # > 0: inside the budget, room to spend
        step = float(np.clip(-self.gain * gap / self.art_slope, -self.max_step, self.max_step))
        self.price = self._price()
        return {"level_step": step, "art_price": self.price, "art_gap": -gap, "art_slope": self.art_slope,
                "decode_slope": self.decode_slope}
