"""The ``QR_REWARD`` value: per-image reward components plus a total.

Why one small type: the scan reward, the CLIP reward, their combination, the trajectory
recorder and the trainer all pass rewards around; a single container with named ``[B]``
components keeps the shard format (``reward`` and ``reward.<component>``) and the node
outputs in agreement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Reward:
    """Per-image rewards for a batch of ``B`` images.

    ``components`` maps a name (``decoded``, ``module_accuracy``, ``scan_score``,
    ``clip_text``, ``clip_image``, ...) to a float64 array of shape ``[B]``; ``total`` is the
    scalar the trainer maximises. ``details`` holds one JSON-able dict per image (which
    decoder succeeded, the decoded text, ...), for reports and shard metadata.
    """

    total: np.ndarray
    components: Mapping[str, np.ndarray] = field(default_factory=dict)
    details: Sequence[Mapping[str, object]] = ()

    def __post_init__(self) -> None:
        total = np.asarray(self.total, dtype=np.float64).reshape(-1)
        comps = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.components.items()}
        for name, arr in comps.items():
            if arr.shape != total.shape:
                raise ValueError(
                    f"reward component {name!r} has {arr.shape[0]} values but the batch has {total.shape[0]}"
                )
        details = list(self.details) if self.details else [{} for _ in range(total.shape[0])]
        if len(details) != total.shape[0]:
            raise ValueError(f"reward details has {len(details)} entries but the batch has {total.shape[0]}")
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "components", comps)
        object.__setattr__(self, "details", details)

    @property
    def batch_size(self) -> int:
        return int(self.total.shape[0])

    def summary(self) -> dict[str, float]:
        """Batch means of the total and of every component (NaN-aware)."""
        out = {"reward": _nanmean(self.total)}
        out.update({name: _nanmean(arr) for name, arr in self.components.items()})
        return out

    def report(self) -> str:
        """One readable line per batch mean, for node UIs and the CLI."""
        parts = [f"{k}={v:.3f}" for k, v in self.summary().items()]
        return f"batch={self.batch_size} " + " ".join(parts)


def _nanmean(arr: np.ndarray) -> float:
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else math.nan


def combine_rewards(rewards: Sequence[Reward], weights: Sequence[float]) -> Reward:
    """Weighted sum of totals; components are merged (a name present twice must agree).

    ``total = sum_i w_i * total_i``. Weights are used as given (not renormalised) so that a
    user can express "decode matters twice as much as art" directly.
    """
    if not rewards:
        raise ValueError("combine_rewards needs at least one reward")
    if len(rewards) != len(weights):
        raise ValueError(f"got {len(rewards)} rewards but {len(weights)} weights")
    size = rewards[0].batch_size
    for r in rewards[1:]:
        if r.batch_size != size:
            raise ValueError(
                f"cannot combine rewards of batch sizes {size} and {r.batch_size}: "
                "score the same images in every reward node"
            )
    for w in weights:
        if not math.isfinite(float(w)):
            raise ValueError(f"reward weight must be finite, got {w}")
    total = np.zeros(size, dtype=np.float64)
    components: dict[str, np.ndarray] = {}
    details: list[dict[str, object]] = [{} for _ in range(size)]
    for reward, weight in zip(rewards, weights):
        total += float(weight) * reward.total
        for name, arr in reward.components.items():
            if name in components and not np.allclose(components[name], arr, equal_nan=True):
                raise ValueError(f"reward component {name!r} appears twice with different values")
            components[name] = arr
        for merged, extra in zip(details, reward.details):
            merged.update(extra)
    return Reward(total=total, components=components, details=details)


def floor_penalty(values: np.ndarray | Sequence[float], floor: float, name: str = "art_shortfall") -> Reward:
    """``−max(0, floor − value)`` per sample: a penalty only below ``floor``.

    Why: "keep the art within 5% of the pretrained model, then scan as often as possible" is a
    constraint, not a trade. A linear CLIP term of weight w charges every bit of visible code
    the same, so a policy that pays it still drifts off the art as long as decoding gains more.
    A hinge, weighted well above the scan reward, is flat inside the budget and steep outside
    it. The policy may then spend the budget wherever the code pays most. The shortfall is kept
    as a component ``name``.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not math.isfinite(float(floor)):
        raise ValueError(f"floor must be finite, got {floor}")
    shortfall = np.maximum(0.0, float(floor) - v)
    return Reward(total=-shortfall, components={name: shortfall}, details=[{} for _ in range(v.shape[0])])

