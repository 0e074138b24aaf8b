"""``qr-rl demo``: RL + curriculum make the embedded toy model's QR art scan, on a CPU.

Why this exists: it is the README's first command. A newcomer with no GPU and no network sees
the whole loop of the real system run end to end -- and see it work -- in minutes:

  pretrained toy ControlNet ─► [round r (rl.rounds, as ``qr-rl loop``): base strength s_r (the demo
      strength, or a curriculum high → demo) ─► each sample draws a per-step strength curve around
      the learned one (rl.schedule_policy) ─► the toy backend (rl.toy.backend) samples with
      recording (rl.sampling + Policy.denoise, module feedback: rl.module_feedback, luma-only
      control: rl.luma_control) and scores: scan reward (rl.scan) + art reward (tiny CLIP via
      rl.clip_score) + the art budget (rl.art_budget) ─► shards (rl.trajectory) and a manifest
      (rl.collect) ─► curve update, price update, and the ControlNet trained offline on the
      shards (rl.train.train; rwr by default) ─► next round]
  ─► before/after at the demo strength: decode rate, module accuracy, art similarity.

Nothing here re-implements the algorithm: the demo only orchestrates the same modules the
ComfyUI loop uses, with the toy model of :mod:`rl.toy` standing in for SD1.5.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QRRLError
from ..files import atomic_copy, atomic_write_text
from ..image_io import save_figure
from ..rounds import TrainerSettings
from . import world

#: Where the demo's trainer defaults differ from ``qr-rl train``'s: the measured recipe (rwr on every
#: weight of the ControlNet, one pass over each round's shards, a random half of each trajectory's steps at
#: twice the step size: the same student as every step at lr 1e-4 in half the training time; research log).
DEMO_TRAINER = {"objective": "rwr", "mode": "full", "lora_rank": 4, "epochs": 1, "clip_range": 0.2,
                "timestep_fraction": 0.5, "batch_size": 16, "lr": 2e-4}
#: The flat trainer keys of earlier releases → their key in ``DemoConfig.train`` (deprecated aliases).
DEPRECATED_TRAIN_KEYS = {"objective": "objective", "awr_beta": "awr_beta", "mode": "mode", "lora_rank": "lora_rank",
                         "lr": "lr", "anchor_decay": "anchor_decay", "epochs": "epochs", "clip_range": "clip_range",
                         "timestep_fraction": "timestep_fraction", "steps_from": "steps_from",
                         "step_weighting": "step_weighting", "train_batch_size": "batch_size",
                         "grad_accum": "grad_accum"}
#: Trainer settings the demo fixes (it exports for the report and trains on the CPU).
DEMO_FIXED = ("mixed_precision", "export_dtype", "seed", "cpu", "kl_coef")


def demo_trainer(**settings: Any) -> TrainerSettings:
    """The demo's :class:`rl.rounds.TrainerSettings`: the trainer's defaults, ``DEMO_TRAINER``, ``settings``."""
    return TrainerSettings(**(DEMO_TRAINER | settings))


def _deprecation(message: str) -> None:
    import sys

    print(f"qr-rl demo: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI maps its flags onto these)."""

    out: str | os.PathLike[str]
    model: str | os.PathLike[str] | None = None  # toy model folder; None = shipped
    rounds: int = 10  # a round costs ≈ 45 s on one CPU thread (luma control: two UNet passes per step)
    curriculum: str = "none"  # none (every round at the demo strength: measured best) | linear | cosine | exponential | adaptive: high (curriculum_start) → demo strength
    start_strength: float | None = None  # default: the model's curriculum_start
    strength: float | None = None  # the demo (end) strength; default: the model's
    hold_rounds: int = 3  # final rounds spent at the demo strength
    groups: int = 8  # (prompt, payload) groups per round
    group_size: int = 8  # seeds per group (advantages are normalised inside a group)
    eval_samples: int = 64
    clip_weight: float = 0.5
    teacher: str = "pretrained"  # which ControlNet the rounds sample with: pretrained (a fixed teacher) | current
    train_controlnet: bool = True  # fine-tune the ControlNet's weights on each round's shards (rl.train)
    # the trainer's settings (rl.rounds.TrainerSettings); the demo's defaults in DEMO_TRAINER
    train: TrainerSettings = field(default_factory=lambda: demo_trainer())
    # rwr: the strength the plain student is trained at: "recorded" (each step's, the teacher's own curve: the
    # student learns what the tricks add at that strength) | "base" (the round's base strength: the student also
    # absorbs the learned curve; measured weaker, research log)
    rwr_strength: str = "recorded"
    learn_schedule: bool = True  # learn the strength curve (rl.schedule_policy, docs/research-log.md)
    schedule_shape: str = "level_slope"  # what the curve learns: level_slope (2 numbers) | level | per_step (rl.schedule_policy)
    schedule_sigma: float = 0.2  # log-gain exploration per learned number
    schedule_lr: float = 2.0  # natural-gradient step of the schedule's mean log-gain
    mirrored: bool = True  # explore in pairs ±δ on one seed (PGPE symmetric sampling): the seed's luck cancels
    module_feedback: bool = True  # spatial strength from each step's prediction (rl.module_feedback)
    luma_control: bool = True  # the ControlNet changes only the luma of each prediction (rl.luma_control)
    scan_guidance: bool = False  # nudge each late prediction toward a readable code (rl.scan_guidance)
    guidance_scale: float = 1.0  # fraction of the Gauss-Newton step that puts wrong modules on the margin
    guidance_margin: float = 0.05  # luma margin past the light/dark midpoint
    guidance_start: float = 0.95  # guided steps: progress ≥ this (0.95 of 10 steps = the last one)
    learn_feedback: bool = False  # learn the two feedback gains too (docs/research-log.md: on the toy they drifted the wrong way)
    feedback_low: float = 0.8  # gain on modules already right (the start, with learn_feedback)
    feedback_high: float = 2.0  # gain on modules still wrong (the start, with learn_feedback)
    feedback_margin: float = 0.05
    feedback_softness: float = 0.03
    feedback_ramp: float = 1.0  # the wrong-module push grows over the run (ModuleFeedback.contrast)
    art_floor: float = 0.95  # the art budget's floor, a fraction of the pretrained ControlNet's art (0 = off)
    art_floor_weight: float = 10.0  # per-sample hinge slope, used with art_budget "price" and art_price_lr = 0
    art_budget: str = "level"  # "level": the curve's level holds the budget (rl.art_budget.LevelBudget) | "price": PI price
    art_price_lr: float = 100.0  # art_budget "price": the floor holds the *mean* art, priced by a Lagrange multiplier
    art_price_kp: float = 500.0  # the price's proportional term (rl.art_budget: why)
    average_last: float = 0.25  # the result averages the learned curve and gains over this fraction of the last rounds
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    keep_shards: bool = True

    @classmethod
    def toml_settings(cls, path: str | os.PathLike[str],
                      warn: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Settings from a TOML file (``configs/demo.toml`` documents every key; a ``[demo]`` table or
        top-level keys, dashes accepted for underscores; the trainer's in ``[demo.train]`` / ``[train]``,
        returned as ``{"train": {...}}``). The flat trainer keys of earlier releases still work, each with
        a warning naming its new key. Unknown keys are refused."""
        from ..loop import LoopConfig

        say = warn or _deprecation
        data = LoopConfig.load_toml(path)
        if set(data) == {"demo"} and isinstance(data["demo"], dict):
            data = data["demo"]
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        data.pop("loop", None)
        train = data.pop("train", None) or {}
        if not isinstance(train, dict):
            raise QRRLError(f"{path}: 'train' must be a table of trainer settings ([demo.train]), got {train!r}")
        train = {str(k).replace("-", "_"): v for k, v in train.items()}
        for old in [k for k in data if k in DEPRECATED_TRAIN_KEYS]:
            new = DEPRECATED_TRAIN_KEYS[old]
            say(f"{path}: '{old}' is deprecated: set it as '{new}' in the [demo.train] table")
            train.setdefault(new, data.pop(old))
        known = {f.name for f in fields(cls)} - {"out", "train"}
        unknown = sorted(set(data) - known)
        allowed = set(TrainerSettings.keys()) - set(DEMO_FIXED)
        unknown += [f"train.{k}" for k in sorted(set(train) - allowed)]
        if unknown:
            raise QRRLError(f"{path}: unknown demo settings {unknown}; see configs/demo.toml for every key")
        return data | ({"train": train} if train else {})

    @classmethod
    def quick(cls, out: str | os.PathLike[str], **kw: Any) -> DemoConfig:
        """The ≤ 2-minute settings the tests use (2 rounds × 8 samples, 8 eval samples; the linear
        curriculum, so that path runs too)."""
        base = {"rounds": 2, "hold_rounds": 1, "groups": 2, "group_size": 4, "eval_samples": 8,
                "curriculum": "linear"}
        base.update(kw)
        return cls(out=out, **base)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise QRRLError(msg)

        need(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        need(0 <= self.hold_rounds <= self.rounds, f"--hold-rounds must be in [0, rounds={self.rounds}]")
        need(self.groups >= 1 and self.group_size >= 2, "need --groups >= 1 and --group-size >= 2")
        need(not self.explores_in_pairs or self.group_size % 2 == 0,
             f"mirrored exploration pairs samples: --group-size must be even, got {self.group_size} (or --no-mirrored)")
        need(self.eval_samples >= 1, f"--eval-samples must be >= 1, got {self.eval_samples}")
        need(self.clip_weight >= 0, f"--clip-weight must be >= 0, got {self.clip_weight}")
        need(self.curriculum in ("none", "constant", "linear", "cosine", "exponential", "adaptive"),
             f"unknown --curriculum {self.curriculum!r}: use none, linear, cosine, exponential or adaptive")
        need(0 <= self.art_floor < 1, f"--art-floor must be in [0, 1) (a fraction of the pretrained art similarity), got {self.art_floor}")
        need(self.art_price_lr >= 0, f"--art-price-lr must be >= 0, got {self.art_price_lr}")
        need(self.art_budget in ("level", "price"), f"unknown --art-budget {self.art_budget!r}: use level or price")
        need(self.art_price_kp >= 0, f"--art-price-kp must be >= 0, got {self.art_price_kp}")
        need(0 < self.average_last <= 1, f"--average-last must be in (0, 1] (a fraction of the rounds), got {self.average_last}")
        need(self.art_floor_weight >= 0, f"--art-floor-weight must be >= 0, got {self.art_floor_weight}")
        need(self.train_controlnet or self.learn_schedule,
             "nothing to learn: --no-learn-schedule needs --train-controlnet")
        self.train.validate()
        need(self.teacher in ("pretrained", "current"), f"teacher must be pretrained or current, got {self.teacher!r}")
        need(self.rwr_strength in ("recorded", "base"),
             f"rwr_strength must be recorded or base, got {self.rwr_strength!r}")
        from ..module_feedback import check_feedback
        from ..schedule_policy import SHAPES, check_schedule_options

        check_schedule_options(self.schedule_sigma, self.schedule_lr)
        need(self.schedule_shape in SHAPES,
             f"unknown --schedule-shape {self.schedule_shape!r}: use {', '.join(SHAPES)}")
        check_feedback(self.feedback_low, self.feedback_high, self.feedback_margin, self.feedback_softness,
                       self.feedback_ramp)
        from ..scan_guidance import check_guidance

        check_guidance(self.guidance_scale, self.guidance_margin, self.guidance_start, 1.0, 1)

    @property
    def explores_in_pairs(self) -> bool:
        """Mirrored pairs need something to mirror: a learned curve (learned feedback gains, which
        exist only alongside it, are drawn in the same pairs)."""
        return self.mirrored and self.learn_schedule

    def guidance(self):
        """The :class:`rl.scan_guidance.ScanGuidance` of the sampler's tricks, or None when off."""
        from ..scan_guidance import ScanGuidance

        if not self.scan_guidance:
            return None
        return ScanGuidance(scale=self.guidance_scale, margin=self.guidance_margin, start=self.guidance_start)

    def feedback(self):
        """The :class:`rl.module_feedback.ModuleFeedback` at the starting gains, or None when off."""
        from ..module_feedback import ModuleFeedback

        if not self.module_feedback:
            return None
        return ModuleFeedback(self.feedback_low, self.feedback_high, self.feedback_margin, self.feedback_softness,
                              self.feedback_ramp)


@dataclass
class DemoResult:
    """Paths written and the numbers measured (also in ``summary.json``)."""

    out: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _strength_plan(cfg: DemoConfig, high: float, low: float):
    """Curriculum over the first ``rounds - hold_rounds`` rounds, then ``hold_rounds`` at ``low``."""
    from ..schedule import Curriculum

    if cfg.curriculum == "none" or high <= low:
        return None
    ramp = cfg.rounds - cfg.hold_rounds
    if ramp < 1:
        return None
    # rounds=ramp+1: round `ramp` (the first held round) is where the curve reaches `low`
    return Curriculum(kind=cfg.curriculum, start=high, end=low, rounds=ramp + 1, target_decode_rate=0.8)


def round_items(cfg: DemoConfig, tag: int, r: int) -> tuple[list[str], list[str], list[int]]:
    """``groups × group_size`` training items: random world prompts, the payloads in turn, fresh seeds
    (with ``cfg.explores_in_pairs``, each seed twice in a row: a mirrored pair's two samples)."""
    from .model import DEMO_PAYLOADS

    rng = np.random.default_rng([cfg.seed, tag])
    specs = world.all_specs()
    prompts, payloads, seeds = [], [], []
    for g in range(cfg.groups):
        spec = specs[int(rng.integers(0, len(specs)))]
        payload = DEMO_PAYLOADS[(r * cfg.groups + g) % len(DEMO_PAYLOADS)]
        for i in range(cfg.group_size):
            prompts.append(spec.prompt)
            payloads.append(payload)
            seeds.append(seeds[-1] if cfg.explores_in_pairs and i % 2 else int(rng.integers(0, 2**31 - 1)))
    return prompts, payloads, seeds


def reference_art(model, strength: float, cfg: DemoConfig, scorer) -> float:
    """Mean art similarity of the pretrained ControlNet at ``strength`` on a batch drawn like the
    training rounds: the hinge's floor, and the budget's nominal floor in ``summary.json`` (the
    budget itself is paired per sample). Why not the evaluation set's: the rounds use other
    prompts, which judge art differently (0.861 vs 0.888 at 0.5)."""
    from .model import sample

    prompts, payloads, seeds = round_items(replace(cfg, mirrored=False), 900, 0)  # a reference: every seed distinct
    codes = [world.toy_code(p) for p in payloads]
    images = sample(model, prompts, codes, seeds, strength, record=False).images
    base = sample(model, prompts, None, seeds, 0.0, record=False).images
    return float(model.art_reward(images, prompts, base, scorer).components["clip_image"].mean())


def demo_jobs(cfg: DemoConfig, r: int, strength: float, controlnet: str) -> list[Any]:
    """Round ``r``'s jobs: one :class:`rl.collect.Job` per (prompt, payload) group of ``round_items``."""
    from ..collect import Job

    prompts, payloads, seeds = round_items(cfg, 1000 + r, r)
    k = cfg.group_size
    return [Job(g, r, prompts[g * k], payloads[g * k], tuple(seeds[g * k:(g + 1) * k]), float(strength), controlnet)
            for g in range(cfg.groups)]


def collect_round(model, controlnet, controlnet_path: Path, strength: float, r: int, cfg: DemoConfig,
                  round_dir: Path, scorer, base_sha: str | None = None, schedule=None, art_floor: float | None = None,
                  budget=None, feedback_gains=None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Round ``r`` through the round pipeline (rl.rounds) and the toy backend: ``groups × group_size``
    samples at base ``strength``, scored, one shard per group in ``round_dir/shards``
    (``round_dir/manifest.json`` lists them). ``base_sha`` is ignored (kept for callers that pass it:
    the backend hashes the model files itself, cached).

    Returns the round's row and, with a :class:`rl.schedule_policy.SchedulePolicy`, what its
    update needs: each sample drew its own per-step strengths around the schedule (recorded
    ``[B,K]``), so ``{"delta": the drawn log-gain offsets, "advantages": the group advantages}``.
    With module feedback (``cfg.module_feedback``) each sample also draws its (low, high) gains
    around ``feedback_gains`` (a two-value ``SchedulePolicy``; None = the config's fixed gains);
    their offsets are ``"feedback_delta"``.
    With ``art_floor``, art similarity below it is penalised (:func:`rl.reward.floor_penalty`);
    with ``budget`` (:class:`rl.art_budget.ArtBudget`), art is rewarded at the budget's price,
    against paired floors: ``cfg.art_floor`` × the art of the pretrained ControlNet at
    the round's ``strength`` for the same prompt, payload and seed: with a curriculum the budget
    follows it down, so a high-strength round is allowed the art that strength costs the
    pretrained ControlNet (docs/research-log.md, "The curriculum under an art budget").
    """
    from .. import rounds
    from ..collect import collect
    from .backend import LocalToyBackend, ToyScoring

    feedback = cfg.feedback()
    backend = LocalToyBackend(
        model=model, controlnet=controlnet_path if controlnet is not None else None, controlnet_module=controlnet,
        feedback=feedback, luma_control=cfg.luma_control, guidance=cfg.guidance(), scorer=scorer,
        scoring=ToyScoring(clip_weight=cfg.clip_weight, art_floor=art_floor, art_floor_weight=cfg.art_floor_weight,
                           budget=budget, budget_fraction=cfg.art_floor),
        extra_meta={"policy_version": r} | ({} if schedule is None else
                                           {"schedule_exploration": schedule.to_dict(strength)}))
    jobs = demo_jobs(cfg, r, strength, Path(controlnet_path).name)
    n = sum(len(j.seeds) for j in jobs)
    draw = gains = fb_delta = None
    if schedule is not None:
        draw = rounds.draw_curves(schedule, n, strength, np.random.default_rng([cfg.seed, 2000 + r]),
                                  cfg.explores_in_pairs, backend.step_percents())
    if feedback is not None and feedback_gains is not None:
        gains, fb_delta = feedback_gains.draw(n, list(feedback.gains()), np.random.default_rng([cfg.seed, 3000 + r]),
                                              mirrored=cfg.explores_in_pairs)
    jobs = rounds.per_sample(jobs, None if draw is None else draw.keyframes, None if gains is None else gains.tolist())
    collect(jobs, backend, round_dir, progress=False, log=lambda m: None)
    got = rounds.read_round(round_dir, jobs)
    comp = got.components
    row: dict[str, Any] = {}
    exploration = None
    if draw is not None:
        exploration = {"delta": draw.delta, "feedback_delta": fb_delta, "decoded": comp["decoded"],
                       "margin": comp["art_margin"] if budget is not None else None,
                       "advantages": rounds.advantages(got, min_group_size=cfg.group_size)}
        row["mean_strength"] = float(draw.strengths.mean())
    if budget is not None:  # each sample's paired floor is its art less its margin
        row["art_floor"] = float((comp["clip_image"] - comp["art_margin"]).mean())
    return row | {
        "round": r, "strength": float(strength), "samples": n, "shard": str(got.shards[0]),
        "shards": str(round_dir / "shards"),
        "decode_rate": got.mean("decoded"), "module_accuracy": got.mean("module_accuracy"),
        "art_similarity": got.mean("clip_image"), "text_similarity": got.mean("clip_text"),
        "reward": got.mean("reward"),
        "art_shortfall": got.mean("art_shortfall") if "art_shortfall" in comp else 0.0,
    }, exploration


def trainer_settings(cfg: DemoConfig) -> TrainerSettings:
    """``cfg.train`` with what the demo fixes: fp32 export, the CPU, seed ``100 × seed`` (round r adds r)."""
    return replace(cfg.train, export_dtype="fp32", cpu=True, seed=cfg.seed * 100, mixed_precision="no", kl_coef=0.0)


def train_round(model, shard_folder: Path, controlnet_path: Path, out: Path, r: int, cfg: DemoConfig,
                log: Callable[[str], None], strength: float,
                optimizer_from: Path | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """One offline training round on this round's shards (rl.train.train; ``cfg.train.objective``;
    rwr trains the plain ControlNet at each step's recorded strength, or at the round's base ``strength``
    with ``cfg.rwr_strength = "base"``; the AdamW state carried over
    from ``optimizer_from``, the previous round's run folder). Returns the new ControlNet and its run folder."""
    from .. import rounds
    from ..train import train

    settings = trainer_settings(cfg)
    tc = rounds.train_config(
        settings, r, shards=[shard_folder], checkpoint=model.unet_path, controlnet=controlnet_path, out=out,
        anchor=model.controlnet_path,
        target_strength=float(strength) if settings.objective == "rwr" and cfg.rwr_strength == "base" else None,
        optimizer_from=optimizer_from, unet_config=model.unet_config_path,
        controlnet_config=model.controlnet_config_path, run_name="demo", export_layout="diffusers", progress=False,
        min_group_size=cfg.group_size)
    res = train(tc, log=log)
    last = res.metrics[-1] if res.metrics else {}
    keep = ("loss", "rmse", "clip_fraction", "approx_kl", "ratio_mean", "grad_norm")
    return Path(res.out), res.run_dir, {k: float(last[k]) for k in keep if k in last} | {
        "logp_drift_max_abs": float(res.data.get("logp_drift_max_abs", math.nan))}


def _evaluate(model, controlnet, strength, cfg: DemoConfig, scorer, base_images, feedback=None,
              luma_control: bool = False, guidance=None) -> dict[str, Any]:
    """The fixed evaluation set at ``strength``; both art judges (the trained-on CLIP similarity and
    the held-out structure similarity, rl.art_judge)."""
    from ..art_judge import structure_similarity
    from .model import measure

    seeds = list(range(50_000 + 1000 * cfg.seed, 50_000 + 1000 * cfg.seed + cfg.eval_samples))
    m = measure(model, strength, seeds, controlnet=controlnet, scorer=scorer, base_images=base_images,
                feedback=feedback, luma_control=luma_control, guidance=guidance)
    m["art_heldout"] = float(structure_similarity(m["images"], m["base_images"]).mean())
    return m


#: What summary.json reports for each evaluation.
REPORT_KEYS = ("decode_rate", "module_accuracy", "art_similarity", "art_heldout", "text_similarity")


def aim_met(plain: dict[str, dict[str, float]]) -> bool:
    """The demo's aim: the tuned ControlNet in a plain sampler decodes >= 80% where the pretrained one
    decodes <= 35%, with both art judges >= 95% of the pretrained one's."""
    b, a = plain["before"], plain["after"]
    return (a["decode_rate"] >= 0.80 and b["decode_rate"] <= 0.35
            and a["art_similarity"] >= 0.95 * b["art_similarity"] and a["art_heldout"] >= 0.95 * b["art_heldout"])


def learned_feedback(cfg: DemoConfig, feedback_gains=None):
    """The module feedback to evaluate with: the config's, at the learned mean (low, high) if learned."""
    fb = cfg.feedback()
    if fb is None or feedback_gains is None:
        return fb
    low, high = (float(v) for v in feedback_gains.schedule(list(fb.gains())))
    return replace(fb, low=low, high=high)


def comfyui_settings(keyframes: str, feedback=None, luma_control: bool = False) -> dict[str, Any]:
    """What ``schedule.json`` tells a ComfyUI user: the learned module feedback, and the exact
    widget values of the ``QR ControlNet Sampler (RL)`` node that apply the learned curve and gains
    (and, with ``luma_control``, its ``luma_control`` switch: rl.luma_control)."""
    inputs: dict[str, Any] = {"curve": "keyframes", "keyframes": keyframes, "start_percent": 0.0, "end_percent": 1.0}
    out: dict[str, Any] = {}
    if feedback is not None:
        out["module_feedback"] = asdict(feedback)
        inputs |= {"feedback_low": round(feedback.low, 4), "feedback_high": round(feedback.high, 4),
                   "feedback_margin": feedback.margin, "feedback_ramp": feedback.ramp,
                   "qr_code": "connect QR Code Encode's qr_code output; record off"}
    out["comfyui_inputs"] = {"node": "QRControlNetSamplerRL", "inputs": inputs}
    if luma_control:
        out["luma_control"] = True
        inputs["luma_control"] = True
        out["comfyui_inputs"]["note"] = ("the demo sampled with luma-only control (rl.luma_control); the node's "
                                         "luma_control keeps luma through the model's latent preview colours, an "
                                         "approximation of the toy's exact RGB latent")
    return out


def run_demo(cfg: DemoConfig, log: Callable[[str], None] | None = None) -> DemoResult:
    """The whole demo; writes the report folder and returns the summary."""
    cfg.validate()
    from tqdm.auto import tqdm

    from ..rounds import base_strength, update_curve
    from ..weights import load_controlnet
    from .model import ToyModel, eval_prompts_codes, sample

    say = log or (lambda m: tqdm.write(f"qr-rl demo: {m}"))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise QRRLError(f"{out} is not empty; choose another --out (the demo never overwrites a report)")
    out.mkdir(parents=True, exist_ok=True)
    model = ToyModel.load(cfg.model)
    low = float(cfg.strength if cfg.strength is not None else model.demo_strength)
    high = float(cfg.start_strength if cfg.start_strength is not None else model.curriculum_start)
    plan = _strength_plan(cfg, high, low)
    scorer = model.clip_scorer()
    plan_text = f"curriculum {cfg.curriculum} {high} → {low}" if plan is not None else "no curriculum"
    say(f"toy model {model.folder} (demo strength {low}, {plan_text}); "
        f"{cfg.rounds} rounds × {cfg.groups * cfg.group_size} samples")

    # ---- before
    prompts, _, _ = eval_prompts_codes(cfg.eval_samples)
    seeds = list(range(50_000 + 1000 * cfg.seed, 50_000 + 1000 * cfg.seed + cfg.eval_samples))
    base_images = sample(model, prompts, None, seeds, 0.0, record=False).images
    before = _evaluate(model, None, low, cfg, scorer, base_images)
    say(f"pretrained ControlNet at strength {low}: decode {before['decode_rate']:.0%}, module accuracy "
        f"{before['module_accuracy']:.3f}, art {before['art_similarity']:.3f} (held-out judge {before['art_heldout']:.3f})")
    art_floor, budget = None, None
    level_budget = (cfg.art_budget == "level" and cfg.learn_schedule and cfg.schedule_shape != "per_step"
                    and cfg.art_floor > 0)
    if level_budget:
        from ..art_budget import LevelBudget

        say(f"art budget: each round's mean art similarity >= {cfg.art_floor:g} × the pretrained ControlNet's at "
            f"{low} on the same prompts and seeds, held by the strength curve's level")
        budget = LevelBudget(floor=cfg.art_floor * reference_art(model, low, cfg, scorer), art_weight=cfg.clip_weight)
    elif cfg.art_floor > 0 and cfg.art_price_lr > 0:
        from ..art_budget import ArtBudget

        if cfg.art_budget == "level":
            say("art budget: no learned curve level to hold it (per-step curve or no curve), so it is priced instead")
        say(f"art budget: each round's mean art similarity >= {cfg.art_floor:g} × the pretrained ControlNet's at "
            f"{low} on the same prompts and seeds, priced")
        budget = ArtBudget(floor=cfg.art_floor * reference_art(model, low, cfg, scorer), lr=cfg.art_price_lr,
                           kp=cfg.art_price_kp)
    elif cfg.art_floor > 0:
        ref = reference_art(model, low, cfg, scorer)
        art_floor = cfg.art_floor * ref
        say(f"art floor: art similarity per sample (hinge) >= {art_floor:.3f} ({cfg.art_floor:g} × {ref:.3f}, the "
            f"pretrained ControlNet at {low} on training prompts)")
    schedule, feedback_gains = None, None
    if cfg.learn_schedule:
        from ..schedule_policy import SchedulePolicy

        schedule = SchedulePolicy(model.steps, sigma=cfg.schedule_sigma, lr=cfg.schedule_lr, shape=cfg.schedule_shape)
        if cfg.module_feedback and cfg.learn_feedback:  # (low, high) learned the same way as the curve
            feedback_gains = SchedulePolicy(2, sigma=cfg.schedule_sigma, lr=cfg.schedule_lr, max_strength=10.0)

    # ---- rounds
    cn_path = model.controlnet_path
    controlnet = None
    run_dir: Path | None = None  # the previous training round's folder: its AdamW state carries over
    rounds: list[dict[str, Any]] = []
    history: list[float] = []
    curve_means: list[torch.Tensor] = []  # the learned means after each round, for the averaged result
    feedback_means: list[torch.Tensor] = []
    bar = tqdm(total=cfg.rounds, desc="RL rounds", unit="round", disable=not cfg.progress)
    for r in range(cfg.rounds):
        strength = base_strength(plan, r, history, low, hold_from=cfg.rounds - cfg.hold_rounds)
        round_dir = out / "rounds" / f"r{r:03d}"
        t0 = time.perf_counter()
        # the rounds sample with the pretrained ControlNet (a fixed teacher whose tricks the trainer distils) or
        # with the one trained so far; a current teacher drifted weaker round by round on the toy (research log)
        fixed = cfg.teacher == "pretrained"
        row, exploration = collect_round(model, None if fixed else controlnet, model.controlnet_path if fixed else cn_path,
                                         strength, r, cfg, round_dir, scorer,
                                         schedule=schedule, art_floor=art_floor, budget=budget,
                                         feedback_gains=feedback_gains)
        row["collect_s"] = round(time.perf_counter() - t0, 1)
        history.append(row["decode_rate"])
        round_shards = Path(row["shard"]).parent
        t0 = time.perf_counter()
        if cfg.train_controlnet:
            new_path, run_dir, train_stats = train_round(model, round_shards, cn_path, out / "rounds" / f"r{r:03d}" /
                                                         "controlnet.safetensors", r, cfg, lambda m: None,
                                                         strength=strength, optimizer_from=run_dir)
            row.update(train_stats)
            cn_path = new_path
            controlnet = load_controlnet(cn_path, model.controlnet_config_path).requires_grad_(False)
        if schedule is not None and exploration is not None:
            adv = exploration["advantages"]
            learn = None
            if level_budget:  # the level follows the budget; PGPE learns the tilt (and the gains below)
                learn = [False] + [True] * (schedule.dims - 1)
                level = budget.observe(exploration["delta"][:, 0].numpy(), exploration["margin"], exploration["decoded"])
                schedule.shift_level(level["level_step"])
                row.update(level)
            row.update(update_curve(schedule, exploration["delta"], adv, learn=learn))
            row["schedule_gains"] = [round(float(g), 4) for g in schedule.gains()]
            curve_means.append(schedule.log_gain.clone())
            if feedback_gains is not None:
                update_curve(feedback_gains, exploration["feedback_delta"], adv)
                feedback_means.append(feedback_gains.log_gain.clone())
                row["feedback_gains"] = [round(float(g), 4) for g in learned_feedback(cfg, feedback_gains).gains()]
        if budget is not None and not level_budget:
            row.update(budget.update(row["art_similarity"], row["art_floor"]))
        row["train_s"] = round(time.perf_counter() - t0, 1)
        rounds.append(row)
        bar.update(1)
        bar.set_postfix(strength=f"{strength:.2f}", decode=f"{row['decode_rate']:.0%}", art=f"{row['art_similarity']:.2f}")
        price = f", art price {row['art_price']:.1f}" if "art_price" in row else ""
        say(f"round {r + 1}/{cfg.rounds}: strength {strength:.2f}, decode {row['decode_rate']:.0%}, module accuracy "
            f"{row['module_accuracy']:.3f}, art {row['art_similarity']:.3f}, reward {row['reward']:.3f}{price} "
            f"(collect {row['collect_s']} s, train {row['train_s']} s)")
    bar.close()
    final_cn = out / "controlnet.safetensors"
    if cfg.train_controlnet:  # never a copy of the untouched pretrained file that looks trained
        atomic_copy(cn_path, final_cn)
    if not cfg.keep_shards:  # after the copy: the last round's ControlNet lives in rounds/
        shutil.rmtree(out / "rounds", ignore_errors=True)

    # ---- after: the trained ControlNet, with the learned strength curve when there is one,
    # averaged over the last rounds (SchedulePolicy.averaged: why)
    keep = max(1, math.ceil(cfg.average_last * cfg.rounds))
    if schedule is not None and curve_means:
        schedule = schedule.averaged(curve_means[-keep:])
    if feedback_gains is not None and feedback_means:
        feedback_gains = feedback_gains.averaged(feedback_means[-keep:])
    after_strength: Any = low if schedule is None else schedule.schedule(low).tolist()
    after_feedback = learned_feedback(cfg, feedback_gains)
    # the tuned file as anyone gets it (a stock sampler at the demo strength), and with the sampler's tricks;
    # "tricks before" is the untrained sampler with the starting curve and gains
    plain_after = _evaluate(model, controlnet, low, cfg, scorer, base_images) if cfg.train_controlnet else before
    tricks_before = _evaluate(model, None, low, cfg, scorer, base_images, cfg.feedback(), cfg.luma_control,
                              cfg.guidance())
    after = _evaluate(model, controlnet, after_strength, cfg, scorer, base_images, after_feedback, cfg.luma_control,
                      cfg.guidance())
    positions = None
    if schedule is not None:  # the node measures progress as 1 − timestep/999 (ComfyUI's percent)
        from .model import sampling_schedule

        positions = [1.0 - float(t) / 999.0 for t in sampling_schedule(model.steps)[1]]
        schedule.save(out / "schedule.json", base=low, positions=positions,
                      extra=comfyui_settings(schedule.to_dict(low, positions)["keyframes"], after_feedback,
                                             cfg.luma_control))
    wall = time.perf_counter() - t_start
    def pick(m: dict[str, Any]) -> dict[str, float]:
        return {k: float(m[k]) for k in REPORT_KEYS}

    plain = {"before": pick(before), "after": pick(plain_after)}
    summary: dict[str, Any] = {
        "model": str(model.folder), "demo_strength": low, "start_strength": high, "curriculum": cfg.curriculum,
        "strengths": [row["strength"] for row in rounds], "rounds": cfg.rounds,
        "samples_per_round": cfg.groups * cfg.group_size, "eval_samples": cfg.eval_samples,
        "trained_controlnet": cfg.train_controlnet, "objective": cfg.train.objective if cfg.train_controlnet else None,
        "plain": plain, "tricks": {"before": pick(tricks_before), "after": pick(after)},
        "aim_met": aim_met(plain) if cfg.train_controlnet else False,
        "art_floor": budget.floor if budget is not None else art_floor,
        "art_price": budget.price if budget is not None else None,
        "averaged_rounds": keep if schedule is not None else 0,
        "schedule": None if schedule is None else schedule.to_dict(low, positions),
        "module_feedback": None if after_feedback is None else asdict(after_feedback),
        "after_mean_strength": float(np.mean(after_strength)),
        "art_similarity_change": (plain_after["art_similarity"] - before["art_similarity"]) / max(1e-9, before["art_similarity"]),
        "wall_time_s": round(wall, 1), "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "threads": torch.get_num_threads(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in asdict(cfg).items()},
        "files": ({"controlnet": str(final_cn)} if cfg.train_controlnet else {})
                 | {"curves": str(out / "curves.png"), "samples": str(out / "samples.png"),
                  "table": str(out / "table.md"), "rounds": str(out / "rounds.jsonl")}
                 | ({"schedule": str(out / "schedule.json")} if schedule is not None else {}),
    }
    atomic_write_text(out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in rounds))
    atomic_write_text(out / "table.md", before_after_table(summary))
    plot_curves(rounds, before, plain_after, out / "curves.png", summary["art_floor"])
    sample_grid([("no ControlNet", base_images), ("pretrained", before["images"]),
                 ("tuned, plain sampler", plain_after["images"]), ("tuned + tricks", after["images"])],
                out / "samples.png")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(screen_summary(summary), flush=True)
    return DemoResult(out=out, summary=summary, rounds=rounds)


# --------------------------------------------------------------------------------------------
# report


_ROWS = (("decode rate", "decode_rate", "{:.0%}"), ("module accuracy", "module_accuracy", "{:.3f}"),
         ("art similarity (CLIP, trained on)", "art_similarity", "{:.3f}"),
         ("art structure (SSIM, held out)", "art_heldout", "{:.3f}"),
         ("prompt similarity (CLIP)", "text_similarity", "{:.3f}"))
_COLUMNS = (("pretrained", "plain", "before"), ("tuned", "plain", "after"),
            ("pretrained + tricks", "tricks", "before"), ("tuned + tricks", "tricks", "after"))


def before_after_table(summary: dict[str, Any]) -> str:
    """Markdown table: the ControlNet before/after in a plain sampler and with the sampler's tricks."""
    lines = [f"At ControlNet strength {summary['demo_strength']} ({summary['eval_samples']} fixed evaluation samples). "
             "Plain: a stock sampler, as anyone loading the file gets it. Tricks: module feedback, luma-only control "
             "and the strength curve (learned, for the tuned column).", "",
             "| metric | " + " | ".join(c[0] for c in _COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for label, key, fmt in _ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(summary[blk][side][key]) for _, blk, side in _COLUMNS) + " |")
    sched = summary.get("schedule")
    if sched:
        lines += ["", f"With tricks the tuned ControlNet runs on the learned strength curve (mean "
                  f"{summary['after_mean_strength']:.3f}; per step {', '.join(f'{v:.2f}' for v in sched['schedule'])}). "
                  f"Keyframes for the QR Scheduled ControlNet Apply node: `{sched['keyframes']}`"]
    if not summary.get("trained_controlnet"):
        lines += ["", "The ControlNet's weights were not trained in this run (--no-train-controlnet)."]
    return "\n".join(lines) + "\n"


def screen_summary(summary: dict[str, Any]) -> str:
    first, last = summary["strengths"][0], summary["strengths"][-1]
    strengths = f"base strength {first:.2f} → {last:.2f}" if first != last else f"base strength {first:.2f}"
    width = 24 + 13 * len(_COLUMNS)
    heads = (("pretrained", "plain"), ("tuned", "plain"), ("pretrained", "+ tricks"), ("tuned", "+ tricks"))
    lines = ["", "=" * width,
             f" QR-RL demo: {summary['rounds']} rounds, curriculum {summary['curriculum']}, {strengths}, "
             f"ControlNet {'trained (' + str(summary.get('objective')) + ')' if summary.get('trained_controlnet') else 'not trained'}",
             f" evaluated at the demo strength {summary['demo_strength']} on {summary['eval_samples']} fixed samples",
             "-" * width,
             f" {'':22s}" + "".join(f"{h[0]:>13s}" for h in heads),
             f" {'':22s}" + "".join(f"{h[1]:>13s}" for h in heads)]
    for label, key, fmt in _ROWS:
        short = {"art_similarity": "art (CLIP)", "art_heldout": "art (SSIM, held out)"}.get(key, label.split(" (")[0])
        lines.append(f" {short:22s}" + "".join(f"{fmt.format(summary[blk][side][key]):>13s}" for _, blk, side in _COLUMNS))
    if summary.get("schedule"):
        lines.append(" learned strength per step (tricks): " + " ".join(f"{v:.2f}" for v in summary["schedule"]["schedule"]))
    if summary.get("trained_controlnet"):
        lines.append(f" aim (plain: >= 80% decode from <= 35%, both art judges >= 95%): "
                     f"{'met' if summary.get('aim_met') else 'not met'}")
    files = ["summary.json", "table.md", "curves.png", "samples.png"]
    files += ["controlnet.safetensors"] if summary.get("trained_controlnet") else []
    files += ["schedule.json"] if summary.get("schedule") else []
    lines += ["-" * width,
              f" wall time {summary['wall_time_s'] / 60:.1f} min; report in {Path(summary['files']['table']).parent}",
              "   " + ", ".join(files), "=" * width]
    return "\n".join(lines)


def plot_curves(rounds: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any], path: Path,
                art_floor: float | None = None) -> None:
    """Per-round decode rate / module accuracy / art similarity / strength of the collected samples,
    with the art budget's floor on the art panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] + 1 for r in rounds]
    panels = [("decode_rate", "decode rate"), ("module_accuracy", "module accuracy"),
              ("art_similarity", "art similarity"), ("reward", "reward"), ("strength", "ControlNet strength")]
    gains = [r["schedule_gains"] for r in rounds if "schedule_gains" in r]
    fig, axes = plt.subplots(1, len(panels) + bool(gains), figsize=(3.0 * (len(panels) + bool(gains)), 2.8))
    if gains:  # the learned curve: strength multiplier per sampling step, first and last round
        ax = axes[-1]
        steps = range(1, len(gains[0]) + 1)
        ax.plot(steps, [1.0] * len(gains[0]), color="gray", ls="--", lw=1, label="start")
        ax.plot(steps, gains[-1], marker="o", color="green", label="learned")
        ax.set_title("strength gain per step")
        ax.set_xlabel("sampling step")
        ax.legend(fontsize=7)
    for ax, (key, title) in zip(axes, panels):
        ax.plot(xs, [r[key] for r in rounds], marker="o", label="base" if key == "strength" else "training samples")
        if key == "strength" and gains:
            ax.plot(xs, [r.get("mean_strength", r[key]) for r in rounds], marker=".", label="mean over steps, drawn")
            ax.legend(fontsize=7)
        if key in before and key != "strength":
            ax.axhline(before[key], color="gray", ls="--", lw=1, label="before (eval)")
            ax.axhline(after[key], color="green", ls="--", lw=1, label="after (eval)")
        if key == "art_similarity" and any("art_floor" in r for r in rounds):  # paired floors, per round
            ax.plot(xs, [r.get("art_floor", math.nan) for r in rounds], color="red", ls=":", lw=1, label="art floor")
            ax.legend(fontsize=7)
        elif key == "art_similarity" and art_floor is not None:
            ax.axhline(art_floor, color="red", ls=":", lw=1, label="art floor")
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("round")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def sample_grid(rows: list[tuple[str, torch.Tensor]], path: Path, n: int = 8, scale: int = 2) -> Path:
    """PNG: one row per ``(label, images [B,3,H,W])`` (e.g. no ControlNet / pretrained / tuned / tuned +
    tricks), the first ``n`` evaluation samples each; the labels are in ``table.md``'s order."""
    from ..image_io import save_png
    from .model import images_hwc_uint8

    n = min(n, rows[0][1].shape[0])
    strips = []
    for _, imgs in rows:
        arr = images_hwc_uint8(imgs[:n])
        strips.append(np.concatenate([np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255) for a in arr], axis=1))
    grid = np.kron(np.concatenate(strips, axis=0), np.ones((scale, scale, 1), dtype=np.uint8))
    return save_png(path, grid)
