"""The art budget as a constraint on the *mean* art similarity, priced by a Lagrange multiplier.

Why: the benchmark's target is "decode as often as possible while the mean art similarity stays
within 5% of the pretrained ControlNet's". That is a constrained problem, and the standard way
to solve it with policy gradients is primal-dual: reward ``scan + λ·(art − floor)`` and move the
price λ ≥ 0 after each round by how far the round's mean art fell below the floor
(``λ ← max(0, λ + lr·(floor − mean art))``). The price rises while the policy overspends and
falls back to 0 when it stays inside, so the policy spends exactly the budget. A per-sample
hinge (:func:`rl.reward.floor_penalty`) instead punishes every sample whose own art happens to
fall below the floor, and the spread between images is larger than the budget: steep enough to
hold the mean, it also froze the strength curve (docs/demo.md).

Paired floors: the demo gives each sample the floor ``0.95 × the art of the pretrained
ControlNet for the same prompt, payload and seed``. A round's mean art moves by ±0.03 with its
random prompts alone, and a price chasing that noise swung the policy back and forth (seed 0,
module feedback: price 0 → 38 → 22, round art 0.78–0.87); the paired gap cancels the prompts.
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
    lr: float = 100.0
    price: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.floor):
            raise ValueError(f"art floor must be finite, got {self.floor}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"art price lr must be >= 0, got {self.lr}")
        if not (self.price >= 0 and math.isfinite(self.price)):
            raise ValueError(f"art price must be >= 0, got {self.price}")

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
        """One dual step on a round's mean art (against ``floor``, default ``self.floor``: pass the
        round's mean paired floor); returns the new price and the gap it acted on."""
        if not math.isfinite(mean_art):
            raise ValueError(f"mean art similarity must be finite, got {mean_art}")
        gap = (self.floor if floor is None else float(floor)) - float(mean_art)
        self.price = max(0.0, self.price + self.lr * gap)
        return {"art_price": self.price, "art_gap": gap}
