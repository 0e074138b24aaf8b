"""One round of the recipe, whoever samples it.

    base strength (the curriculum) ─► each sample draws its own strength curve around the learned
    one (rl.schedule_policy) ─► jobs collected through a Backend (rl.collect: shards + manifest;
    the backend samples and scores) ─► the shards' rewards ─► the curve's update (group
    advantages, PGPE) ─► the ControlNet trained on the shards (rl.train)

Why one module: ``qr-rl demo`` (the toy model in-process) and ``qr-rl loop`` (headless ComfyUI,
or the toy backend) must run the recipe the benchmark measures, and only the
:class:`rl.collect.Backend` may differ between them. The steps are separate functions because
the loop stops after each phase and resumes from its state file, while the demo runs them back
to back. This module never imports the toy wing (tests/test_house.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QRRLError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .collect import Job
    from .ddpo import Advantages
    from .schedule import Curriculum
    from .schedule_policy import SchedulePolicy
    from .train import TrainConfig


# --------------------------------------------------------------------------------------------
# 1. base strength


def base_strength(curriculum: Curriculum | None, r: int, history: Sequence[float], end: float,
                  hold_from: int | None = None) -> float:
    """Round ``r``'s base strength: the curriculum's (``history``: the decode rates of the rounds
    before, which an adaptive curriculum reads), or ``end`` without one and from round
    ``hold_from`` on (the demo's final rounds at its own strength)."""
    if curriculum is None or (hold_from is not None and r >= hold_from):
        return float(end)
    return float(curriculum.strength_for_round(r, list(history)))


# --------------------------------------------------------------------------------------------
# 2. each sample's strength curve


@dataclass
class CurveDraw:
    """Each sample's strength curve around the round's base strength."""

    strengths: torch.Tensor  # [N,K] per-sample, per-step strengths
    delta: torch.Tensor  # [N,d] offsets in the learned numbers: what the update needs
    keyframes: list[str]  # one keyframes line per sample: what a Backend's sampler follows
    mirrored: bool
    log_gain: list[float]  # the mean the curves were drawn around

    def record(self) -> dict[str, Any]:
        """JSON-able (a run's state file keeps it, so a resumed collect plans the same jobs)."""
        return {"delta": self.delta.tolist(), "keyframes": list(self.keyframes), "mirrored": self.mirrored,
                "log_gain": list(self.log_gain), "mean_strength": float(self.strengths.mean())}


def draw_curves(policy: SchedulePolicy, n: int, strength: float, rng: np.random.Generator, mirrored: bool,
                step_percents: Sequence[float] | None) -> CurveDraw:
    """``n`` curves around ``policy``'s mean at base ``strength``, each as a keyframes line: one
    keyframe per step at its ComfyUI percent where the backend knows them (exact), else the
    curve's two ends at progress 0 and 1 (linear between)."""
    from .collect import keyframes_line

    strengths, delta = policy.draw(n, strength, rng, mirrored=mirrored)
    if step_percents:
        if len(step_percents) != strengths.shape[1]:
            raise QRRLError(f"the backend samples {len(step_percents)} steps, the strength curve has "
                            f"{strengths.shape[1]}")
        lines = [keyframes_line(step_percents, row) for row in strengths.tolist()]
    else:
        lines = [keyframes_line([0.0, 1.0], [row[0], row[-1]]) for row in strengths.tolist()]
    return CurveDraw(strengths, delta, lines, bool(mirrored), [float(v) for v in policy.log_gain])


def per_sample(jobs: Sequence[Job], keyframes: Sequence[str] | None = None,
               feedback_gains: Sequence[Sequence[float]] | None = None) -> list[Job]:
    """``jobs`` with each sample's keyframes line (and module-feedback gains), in job order."""
    n = sum(len(j.seeds) for j in jobs)
    for what, values in (("strength curves", keyframes), ("feedback gains", feedback_gains)):
        if values is not None and len(values) != n:
            raise QRRLError(f"{len(values)} drawn {what} for {n} samples; the run's sampling settings changed "
                            "since it started")
    out, i = [], 0
    for j in jobs:
        k = len(j.seeds)
        kw: dict[str, Any] = {}
        if keyframes is not None:
            kw["keyframes"] = tuple(keyframes[i:i + k])
        if feedback_gains is not None:
            kw["feedback_gains"] = tuple(tuple(float(g) for g in row) for row in feedback_gains[i:i + k])
        out.append(dataclasses.replace(j, **kw))
        i += k
    return out


# --------------------------------------------------------------------------------------------
# 3. read back what the backend collected and scored (rl.collect.collect: shards + manifest)


@dataclass
class RoundSamples:
    """What a round's shards say, one entry per sample in job order (the order the curves were drawn)."""

    reward: torch.Tensor  # [N] float64, NaN where the reward is not finite
    components: dict[str, torch.Tensor]  # [N] each (a component some shard lacks: NaN there)
    keys: list[Any]  # each sample's advantage group (rl.ddpo.group_key)
    shards: list[Path]  # one per job
    meta: list[dict[str, Any]] = field(default_factory=list)  # each shard's metadata

    def mean(self, name: str) -> float:
        t = self.reward if name == "reward" else self.components[name]
        t = t[t.isfinite()]
        return float(t.mean()) if t.numel() else float("nan")


def read_round(round_dir: str | os.PathLike[str], jobs: Sequence[Job]) -> RoundSamples:
    """Rewards, reward components and group keys of ``jobs`` from the round's manifest and shards."""
    import torch

    from .collect import Manifest
    from .ddpo import group_key
    from .trajectory import read_shard

    manifest = Manifest(Path(round_dir) / "manifest.json")
    by_key = {e["key"]: e for e in manifest.entries}
    rewards, keys, shards, metas = [], [], [], []
    parts: list[dict[str, torch.Tensor]] = []
    for job in jobs:
        if job.key not in by_key:
            raise QRRLError(f"round {job.round}: job {job.index} has no shard in {manifest.path}; run again to "
                            "collect it")
        path = manifest.resolve(by_key[job.key]["path"])
        traj = read_shard(path)
        rewards.append(torch.where(traj.reward_finite, traj.reward.double(), torch.tensor(float("nan"),
                                                                                          dtype=torch.float64)))
        parts.append({k: v.double().reshape(-1) for k, v in traj.reward_components.items()})
        keys.extend(group_key(job.prompt, job.payload, float(job.strength)) for _ in job.seeds)
        shards.append(path)
        metas.append(traj.meta)
    names = sorted({k for p in parts for k in p})
    comps = {k: torch.cat([p.get(k, torch.full((len(r),), float("nan"), dtype=torch.float64))
                           for p, r in zip(parts, rewards)]) for k in names}
    return RoundSamples(torch.cat(rewards) if rewards else torch.zeros(0, dtype=torch.float64), comps, keys, shards,
                        metas)


# --------------------------------------------------------------------------------------------
# 4. the curve's update


def advantages(samples: RoundSamples, min_group_size: int) -> Advantages:
    """Each sample's advantage within its (prompt, payload, strength) group."""
    from .ddpo import compute_advantages

    return compute_advantages(samples.reward, samples.keys, min_group_size=min_group_size)


def update_curve(policy: SchedulePolicy, delta: torch.Tensor, adv: Advantages,
                 learn: Sequence[bool] | None = None) -> dict[str, float]:
    """One PGPE step of ``policy``'s mean from the drawn offsets and the samples' advantages."""
    import torch

    delta = torch.as_tensor(delta, dtype=torch.float32)
    if delta.shape[0] != adv.values.shape[0]:
        raise QRRLError(f"{delta.shape[0]} drawn curves for {adv.values.shape[0]} samples in the shards")
    return policy.update(delta, adv.values, adv.mask, learn=learn)


# --------------------------------------------------------------------------------------------
# 5. train the ControlNet


def _train_default(name: str) -> Any:
    from .train import TrainConfig

    f = TrainConfig.__dataclass_fields__[name]
    return f.default


@dataclass
class TrainerSettings:
    """The trainer's settings a round takes from its user (a subset of :class:`rl.train.TrainConfig`,
    with its defaults); the round adds the files, the seed and the run folder."""

    objective: str = field(default_factory=lambda: _train_default("objective"))
    awr_beta: float = field(default_factory=lambda: _train_default("awr_beta"))
    mode: str = field(default_factory=lambda: _train_default("mode"))
    lora_rank: int = field(default_factory=lambda: _train_default("lora_rank"))
    lr: float = field(default_factory=lambda: _train_default("lr"))
    epochs: int = field(default_factory=lambda: _train_default("epochs"))
    clip_range: float = field(default_factory=lambda: _train_default("clip_range"))
    timestep_fraction: float = field(default_factory=lambda: _train_default("timestep_fraction"))
    steps_from: float = field(default_factory=lambda: _train_default("steps_from"))
    step_weighting: str = field(default_factory=lambda: _train_default("step_weighting"))
    kl_coef: float = field(default_factory=lambda: _train_default("kl_coef"))
    anchor_decay: float = field(default_factory=lambda: _train_default("anchor_decay"))
    batch_size: int = field(default_factory=lambda: _train_default("batch_size"))
    grad_accum: int = field(default_factory=lambda: _train_default("grad_accum"))
    mixed_precision: str = field(default_factory=lambda: _train_default("mixed_precision"))
    export_dtype: str = field(default_factory=lambda: _train_default("export_dtype"))
    seed: int = field(default_factory=lambda: _train_default("seed"))
    cpu: bool = field(default_factory=lambda: _train_default("cpu"))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        """What can be checked before the first round samples (the files come later)."""
        from .objectives import OBJECTIVES
        from .train import check_training_options

        if self.objective not in OBJECTIVES:
            raise QRRLError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.awr_beta > 0:
            raise QRRLError(f"--awr-beta must be > 0, got {self.awr_beta}")
        check_training_options(self.mode, self.step_weighting, self.anchor_decay, self.steps_from)


def train_config(settings: TrainerSettings, r: int, *, shards: Sequence[str | os.PathLike[str]],
                 checkpoint: str | os.PathLike[str], controlnet: str | os.PathLike[str],
                 out: str | os.PathLike[str], anchor: str | os.PathLike[str] | None = None,
                 **round_fields: Any) -> TrainConfig:
    """Round ``r``'s :class:`rl.train.TrainConfig`: ``settings``, seed ``settings.seed + r``, the anchor
    (the run's starting ControlNet) when ``anchor_decay`` pulls toward it, and ``round_fields``
    (files, run folder, carried optimizer, ...)."""
    from .train import TrainConfig

    base = dataclasses.asdict(settings)
    base["seed"] = settings.seed + r
    if settings.anchor_decay > 0 and anchor is not None:
        base["anchor_controlnet"] = anchor
    return TrainConfig(trajectories=[str(s) for s in shards], checkpoint=checkpoint, controlnet=controlnet, out=out,
                       round=r, **(base | round_fields))
