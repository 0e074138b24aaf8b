"""Offline fine-tuning of the ControlNet on recorded trajectory shards — the whole loop in one place.

Two objectives (``rl.objectives``): ``rwr``, reward-weighted regression of the plain ControlNet
onto the predictions the sampler recorded (it distils the sampler's tricks into the weights,
weighted toward the samples that worked), and ``ddpo``, PPO-clip on the steps' log-probabilities.

Why offline: trajectories are sampled inside ComfyUI (any workflow, any sampler settings) and
written as shards; this module only needs the base UNet, the ControlNet and the shards. It
recomputes log π_old itself with the same denoiser (``rl.policy.Policy.denoise``) and the
same step formulas (``rl.sampling``), so the recorded log-probs are only a drift check -- unless
the recording is verified to be this policy's own (``_old_pass``: same model files, recomputed
predictions equal to the recorded ones on a spot check of every shard), when log π_old is
computed from the recorded predictions and the no-grad pass over every unit is skipped.

Recipe, per run (one curriculum round):
 1. read shards (bad ones skipped and named), refuse another base model unless allowed, drop
    samples with non-finite rewards (counted), refuse UNet patches we cannot reproduce;
 2. group-normalised advantages (``rl.ddpo.StatTracker``);
 3. ``ddpo``: a no-grad pass over every trainable unit (sample, step) with the *initial* policy:
    log π_old (and D_old for the KL term) plus drift against the recording (``old_log_probs``:
    ``"auto"`` takes D_old from the recording where a spot check proves it exact); ``rwr``: per-sample
    weights ``exp(A/β)`` (its targets are the recorded predictions, so it needs no such pass);
 4. per epoch: pick a random ``timestep_fraction`` of each sample's stochastic steps inside
    the ControlNet's active range (std > 0 and strength > 0), shuffle the units, micro-batches
    of ``batch_size`` units, ``grad_accum`` micro-batches per AdamW step, grad-norm clip; each
    unit's PPO term optionally weighted by its step's std (``rl.ddpo.step_weights``); the AdamW
    state can come from the previous round's run (``optimizer_from``: one optimizer for a loop);
    metrics line + PNG curves + atomic checkpoint;
 5. export the ControlNet (LoRA merged) that ComfyUI's ControlNetLoader loads, and the adapter.

Randomness per epoch is derived from ``(seed, epoch)``, so a resumed run picks the same units
as an uninterrupted one. Multi-GPU: HF Accelerate (``accelerate launch -m rl train ...``); each
optimizer step's micro-batches are split between the processes and weighted so that DDP's
gradient mean is one process's sum (N processes train what one does), only the main process
writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ddpo import (
    STEP_WEIGHTINGS,
    StatTracker,
    gaussian_kl,
    group_key,
    ppo_clip_loss,
    ppo_diagnostics,
    step_weights,
)
from .errors import QRRLError
from .files import atomic_save_safetensors, atomic_write_json, atomic_write_text
from .image_io import save_figure
from .objectives import OBJECTIVES, advantage_weights, regression_loss
from .policy import TRAINING_MODES
from .sampling import gaussian_log_prob, step_mean

RUN_STATE_VERSION = 1
EXPORT_FORMAT = "qr-rl-controlnet"


def check_training_options(mode: str, step_weighting: str, anchor_decay: float, steps_from: float = 0.0) -> None:
    """The trainer options that ``qr-rl train``, ``qr-rl loop`` and ``qr-rl demo`` share, checked
    in one place so that the loop and the demo fail before their first collection."""
    if mode not in TRAINING_MODES:
        raise QRRLError(f"--mode must be one of {', '.join(TRAINING_MODES)}, got {mode!r}")
    if step_weighting not in STEP_WEIGHTINGS:
        raise QRRLError(f"--step-weighting must be one of {', '.join(STEP_WEIGHTINGS)}, got {step_weighting!r}")
    if not 0 <= anchor_decay < 1:
        raise QRRLError(f"--anchor-decay must be in [0, 1), got {anchor_decay}")
    if anchor_decay > 0 and mode == "lora":
        raise QRRLError("--anchor-decay needs --mode full or zero_convs (a LoRA adapter's rank already limits its drift)")
    if not 0 <= steps_from < 1:
        raise QRRLError(f"--steps-from must be in [0, 1) (the fraction of the trajectory before the first trained "
                        f"step), got {steps_from}")


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI maps its flags 1:1 onto these fields."""

    trajectories: Sequence[str | os.PathLike[str]]
    checkpoint: str | os.PathLike[str]
    controlnet: str | os.PathLike[str]
    out: str | os.PathLike[str]
    unet_config: str | os.PathLike[str] | dict | None = None
    controlnet_config: str | os.PathLike[str] | dict | None = None
    objective: str = "ddpo"  # "ddpo" | "rwr" (rl.objectives)
    awr_beta: float = 1.0  # rwr: temperature of the advantage weights exp(A/β) (small: only the best count)
    target_strength: float | None = None  # rwr: train the plain ControlNet at this strength (None: each step's recorded one)
    optimizer_from: str | os.PathLike[str] | None = None  # a previous run folder: carry its AdamW state (one optimizer for a loop)
    mode: str = "lora"  # "lora" | "full" | "zero_convs"
    lora_rank: int = 8
    lora_alpha: float | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    epochs: int = 4
    clip_range: float = 0.02
    timestep_fraction: float = 0.5
    steps_from: float = 0.0  # train only steps k with k / K >= steps_from (the late, detail-setting steps)
    step_weighting: str = "none"  # "none" | "std" (rl.ddpo.step_weights; std puts much of the update on step 1)
    kl_coef: float = 0.0
    anchor_decay: float = 0.0  # per-step pull toward anchor_controlnet (rl.anchor); 0 = off
    anchor_controlnet: str | os.PathLike[str] | None = None  # default: the starting --controlnet
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    old_log_probs: str = "auto"  # ddpo π_old: "auto" (the recording where a spot check proves it exact) | "recompute"
    gradient_checkpointing: bool = False
    resume: bool = False
    allow_base_mismatch: bool = False
    seed: int = 0
    min_group_size: int = 4
    adv_clip: float = 5.0
    stat_buffer: int = 0
    stats_from: str | os.PathLike[str] | None = None
    run_dir: str | os.PathLike[str] | None = None
    run_name: str | None = None
    round: int | None = None
    export_dtype: str = "fp16"  # "fp16" | "bf16" | "fp32"
    export_layout: str = "auto"  # "auto" | "diffusers" | "ldm"
    cpu: bool = False
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise QRRLError(msg)

        need(bool(self.trajectories), "give at least one --trajectories folder")
        need(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        need(self.awr_beta > 0 and math.isfinite(self.awr_beta), f"--awr-beta must be > 0, got {self.awr_beta}")
        need(self.target_strength is None or (math.isfinite(self.target_strength) and self.target_strength > 0),
             f"--target-strength must be > 0, got {self.target_strength}")
        need(self.objective != "rwr" or self.kl_coef == 0,
             "--kl-coef is a ddpo option; rwr stays near the recorded predictions by construction (use --anchor-decay)")
        need(self.optimizer_from is None or (Path(self.optimizer_from) / "checkpoint.safetensors").is_file(),
             f"--optimizer-from {self.optimizer_from}: no checkpoint.safetensors there (give a previous run folder)")
        check_training_options(self.mode, self.step_weighting, self.anchor_decay, self.steps_from)
        need(self.lora_rank >= 1, f"--lora-rank must be >= 1, got {self.lora_rank}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(0 < self.clip_range < 1, f"--clip-range must be in (0, 1), got {self.clip_range}")
        need(0 < self.timestep_fraction <= 1, f"--timestep-fraction must be in (0, 1], got {self.timestep_fraction}")
        need(self.kl_coef >= 0, f"--kl-coef must be >= 0, got {self.kl_coef}")
        need(self.anchor_controlnet is None or Path(self.anchor_controlnet).is_file(),
             f"--anchor-controlnet {self.anchor_controlnet} not found (the ControlNet the anchor pulls toward)")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.old_log_probs in ("auto", "recompute"),
             f"old_log_probs must be auto or recompute, got {self.old_log_probs!r}")
        need(self.mixed_precision in ("no", "bf16", "fp16"),
             f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        need(self.export_dtype in ("fp16", "bf16", "fp32"), f"export dtype must be fp16/bf16/fp32, got {self.export_dtype!r}")
        need(self.export_layout in ("auto", "diffusers", "ldm"),
             f"export layout must be auto/diffusers/ldm, got {self.export_layout!r}")
        need(str(self.out).endswith(".safetensors"), f"--out must end in .safetensors, got {self.out}")


@dataclass
class TrainResult:
    """What a run produced (paths) and measured (per-epoch metrics, data summary)."""

    out: Path
    adapter: Path | None
    run_dir: Path
    epochs_done: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    already_finished: bool = False
    message: str = ""


# --------------------------------------------------------------------------------------------
# data


@dataclass
class _Sample:
    """One trajectory kept for training (views into its shard's tensors)."""

    x: torch.Tensor  # [K+1,C,H,W]
    log_prob: torch.Tensor  # [K] as recorded
    denoised: torch.Tensor  # [K,C,H,W] as recorded
    sigma: torch.Tensor
    timestep: torch.Tensor
    std: torch.Tensor
    mean_coef: torch.Tensor
    strength: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    hint: torch.Tensor  # uint8 [3,8H,8W]
    cfg: float
    apply_to_uncond: bool
    reward: float
    active: list[int]  # steps with std > 0 and strength > 0
    bucket: tuple  # context shapes: samples in one micro-batch must share them
    strength_map: torch.Tensor | None = None  # [K,1,h,w]: module feedback's gain map per step
    hint_embedding: torch.Tensor | None = None  # the ControlNet's embedding of hint, when it is frozen
    shard: int = 0  # index of its shard (the π_old spot check covers every shard)


def _load_data(config: TrainConfig, base_sha: str, controlnet_sha: str, log) -> tuple[list[_Sample], list, dict]:
    from .policy import check_model_patches
    from .trajectory import TrajectoryDataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = TrajectoryDataset(list(config.trajectories))
    for w in caught:
        log(f"warning: {w.message}")
    ds.latent_shape  # noqa: B018 - raises QRRLError on mixed latent sizes
    samples: list[_Sample] = []
    keys: list = []
    dropped = 0
    unknown_base = 0
    other_cn = 0
    same_models = bool(base_sha) and bool(controlnet_sha)  # every shard names this base and this ControlNet
    comps: dict[str, list[float]] = {}
    lumas: list = []
    for shard_index, traj in enumerate(ds):
        meta = traj.meta
        check_model_patches(meta.get("model_patches") or [], traj.path)
        luma = meta.get("luma_control") or None  # rl.luma_control: the trainer must replay it too
        if meta.get("scan_guidance") and config.objective == "ddpo":
            raise QRRLError(f"{traj.path} was sampled with scan guidance, which edits each guided step's prediction "
                            "depending on the sample itself: ddpo's log-probabilities cannot replay that. Train it with "
                            "--objective rwr (which distils the guided predictions), or collect without scan guidance")
        if lumas and luma != lumas[0]:
            raise QRRLError(f"{traj.path} was sampled with luma control {luma!r}, an earlier shard with "
                            f"{lumas[0]!r}; train on shards from one sampler setting")
        lumas.append(luma)
        if meta.get("module_feedback") and traj.strength_map is None:
            raise QRRLError(f"{traj.path} was sampled with module feedback but does not record its gain maps "
                            "('strength_map'), so its log-probabilities cannot be "
                            "replayed; collect it again with this version")
        shard_base = meta.get("base_sha256")
        if shard_base is None:
            unknown_base += 1
        elif base_sha and shard_base != base_sha and not config.allow_base_mismatch:
            raise QRRLError(
                f"{traj.path} was sampled with base model sha256 {shard_base[:12]}… but --checkpoint is "
                f"{base_sha[:12]}…; train with the checkpoint the shards were recorded with, or pass "
                "--allow-base-mismatch (its log-probs will be off-policy)"
            )
        if meta.get("controlnet_sha256") not in (None, controlnet_sha):
            other_cn += 1
        same_models = same_models and shard_base == base_sha and meta.get("controlnet_sha256") == controlnet_sha
        # per-step strength; a [B,K] shard (one schedule per sample) counts a step if any sample used it
        step_strength = traj.strength if traj.strength.ndim == 1 else traj.strength.amax(0)
        first = math.ceil(config.steps_from * traj.num_steps - 1e-9)
        # ddpo trains stochastic steps only; rwr also the last, deterministic one (it sets the image)
        active = [k for k in range(first, traj.num_steps)
                  if (traj.std[k] > 0 or config.objective == "rwr") and step_strength[k] > 0]
        bucket = (tuple(traj.cond.shape[1:]), tuple(traj.uncond.shape[1:]),
                  None if traj.strength_map is None else tuple(traj.strength_map.shape[-2:]))
        peak = float(traj.strength.max())
        for s in traj.samples():
            if not s.reward_finite:
                dropped += 1
                continue
            for name, v in s.components.items():
                comps.setdefault(name, []).append(v)
            samples.append(_Sample(
                x=s.x, log_prob=s.log_prob, denoised=s.denoised, sigma=s.sigma, timestep=s.timestep,
                std=s.std, mean_coef=s.mean_coef, strength=s.strength, cond=s.cond, uncond=s.uncond,
                hint=s.hint, cfg=float(meta["cfg"]), apply_to_uncond=bool(meta["apply_to_uncond"]),
                reward=s.reward, active=active, bucket=bucket, strength_map=s.strength_map, shard=shard_index,
            ))
            keys.append(group_key(s.prompt, s.payload, peak))
    if not samples:
        raise QRRLError(f"every sample in {len(ds)} shards has a NaN/inf reward ({dropped} dropped); nothing to train on")
    rewards = np.array([s.reward for s in samples])
    info = {
        "shards": len(ds), "shards_skipped": len(ds.skipped), "skipped_files": [str(p) for p, _ in ds.skipped],
        "samples": len(samples), "dropped_nonfinite_reward": dropped, "shards_unknown_base": unknown_base,
        "shards_other_controlnet": other_cn, "shards_same_models": same_models, "latent_shape": list(ds.latent_shape),
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "luma_control": lumas[0] if lumas else None,
    }
    for name, vals in comps.items():
        info[f"{name}_mean"] = float(np.mean(vals))
    if dropped:
        log(f"dropped {dropped} samples with NaN/inf rewards")
    if unknown_base:
        log(f"warning: {unknown_base} shards do not record their base model hash; assuming --checkpoint")
    if other_cn:
        log(f"note: {other_cn} shards were sampled with another ControlNet file; π_old is recomputed, "
            "so PPO stays consistent, but the recorded log-probs will drift")
    return samples, keys, info


def _batch(samples: list[_Sample], units: Sequence[tuple[int, int]], device) -> dict[str, torch.Tensor]:
    """Stack the tensors of units (sample index, step) for one forward."""
    ss = [samples[n] for n, _ in units]
    ks = [k for _, k in units]

    def col(name: str) -> torch.Tensor:
        return torch.stack([getattr(s, name)[k] for s, k in zip(ss, ks)]).to(device, torch.float32)

    strength = col("strength")
    # one micro-batch is one bucket, and the bucket includes the map size: all samples have maps or none
    gain_map = None if ss[0].strength_map is None else torch.stack(
        [s.strength_map[k] for s, k in zip(ss, ks)]).to(device, torch.float32)
    return {
        "strength_map": gain_map,
        "x": torch.stack([s.x[k] for s, k in zip(ss, ks)]).to(device, torch.float32),
        "x_next": torch.stack([s.x[k + 1] for s, k in zip(ss, ks)]).to(device, torch.float32),
        "recorded_denoised": torch.stack([s.denoised[k] for s, k in zip(ss, ks)]).to(device, torch.float32),
        "recorded_log_prob": col("log_prob"),
        "sigma": col("sigma"), "timestep": col("timestep"), "std": col("std"), "mean_coef": col("mean_coef"),
        "strength": strength,
        "strength_uncond": strength * torch.tensor([float(s.apply_to_uncond) for s in ss], device=device),
        "cfg": torch.tensor([s.cfg for s in ss], device=device, dtype=torch.float32),
        "cond": torch.stack([s.cond for s in ss]).to(device, torch.float32),
        "uncond": torch.stack([s.uncond for s in ss]).to(device, torch.float32),
        "hint": torch.stack([s.hint for s in ss]).to(device).float() / 255.0,
        "hint_embedding": None if ss[0].hint_embedding is None else torch.stack(
            [s.hint_embedding for s in ss]).to(device),
    }


def _step_tensors(samples: list[_Sample], units: Sequence[tuple[int, int]], device) -> dict[str, torch.Tensor]:
    """What ``_log_prob`` needs of units, with the recorded D (no hints, no contexts: no forward)."""
    ss = [samples[n] for n, _ in units]
    ks = [k for _, k in units]

    def col(name: str, offset: int = 0) -> torch.Tensor:
        return torch.stack([getattr(s, name)[k + offset] for s, k in zip(ss, ks)]).to(device, torch.float32)

    return {"x": col("x"), "x_next": col("x", 1), "recorded_denoised": col("denoised"),
            "std": col("std"), "mean_coef": col("mean_coef")}


def _embed_hints(policy, samples: list[_Sample], device, accelerator=None, size: int = 16) -> None:
    """Cache each sample's hint embedding (``Policy.embed_hint``) when the hint encoder is frozen.

    Why: the encoder runs on the full-resolution hint and costs more than the rest of the
    ControlNet, yet its output is the same at every step of a sample and in both CFG branches.
    Kept on the CPU with the other per-sample tensors (``_batch`` moves it), computed under the
    training autocast so the cached numbers are the uncached ones."""
    if not policy.hint_embedding_frozen():
        return
    ac = accelerator.autocast() if accelerator is not None else _null()
    with torch.no_grad(), ac:
        for i in range(0, len(samples), size):
            chunk = samples[i:i + size]
            emb = policy.embed_hint(torch.stack([s.hint for s in chunk]).to(device)).cpu()
            for s, e in zip(chunk, emb):
                s.hint_embedding = e


def _denoise(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(b["x"], b["sigma"], b["timestep"], b["cond"], b["uncond"], b["hint"], b["strength"], b["cfg"],
                 strength_uncond=b["strength_uncond"], strength_map=b["strength_map"],
                 hint_embedding=b.get("hint_embedding"))


def _plain_denoise(model, b: dict[str, torch.Tensor], target_strength: float | None) -> torch.Tensor:
    """rwr: the ControlNet as a stock sampler runs it (one strength per step, no gain map; the
    policy has no luma projection in this objective)."""
    strength = b["strength"] if target_strength is None else torch.full_like(b["strength"], float(target_strength))
    uncond = strength * (b["strength_uncond"] > 0).float() if target_strength is not None else b["strength_uncond"]
    return model(b["x"], b["sigma"], b["timestep"], b["cond"], b["uncond"], b["hint"], strength, b["cfg"],
                 strength_uncond=uncond, strength_map=None, hint_embedding=b.get("hint_embedding"))


def _objective_loss(config: TrainConfig, model, b: dict[str, torch.Tensor], idx: list[int], advantages: torch.Tensor,
                    sample_weights: torch.Tensor | None, old_log_prob: torch.Tensor | None, std_ref: float,
                    autocast=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss for ``config.objective`` (training and the gradient check share it).

    rwr: the weighted regression onto the recorded predictions (diagnostics: ``err`` per unit).
    ddpo: PPO-clip against ``old_log_prob`` (None: ratio 1, the first step of a round);
    diagnostics ``log_prob`` and ``mean`` (for the KL term)."""
    ctx = autocast or _null
    if config.objective == "rwr":
        with ctx():
            d = _plain_denoise(model, b, config.target_strength)
        loss, err = regression_loss(d, b["recorded_denoised"], sample_weights[idx].to(d.device))
        return loss, {"err": err}
    with ctx():
        d = _denoise(model, b)
    lp, mean = _log_prob(b, d)
    old = lp.detach() if old_log_prob is None else old_log_prob
    w = step_weights(b["std"], std_ref, config.step_weighting)
    loss, _ = ppo_clip_loss(lp, old, advantages[idx].to(lp.device), config.clip_range, w)
    return loss, {"log_prob": lp, "mean": mean}


def _log_prob(b: dict[str, torch.Tensor], denoised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    view = (-1, 1, 1, 1)
    mean = step_mean(b["x"], denoised.float(), b["mean_coef"].view(view))
    return gaussian_log_prob(b["x_next"], mean, b["std"].view(view)), mean


def _micro_batches(samples: list[_Sample], units: list[tuple[int, int]], size: int, rng) -> list[list[tuple[int, int]]]:
    by_bucket: dict[tuple, list[tuple[int, int]]] = {}
    for u in units:
        by_bucket.setdefault(samples[u[0]].bucket, []).append(u)
    out = [group[i:i + size] for group in by_bucket.values() for i in range(0, len(group), size)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# --------------------------------------------------------------------------------------------
# files


def _save_checkpoint(path: Path, policy, optimizer, state: dict) -> None:
    tensors = {f"param.{k}": v for k, v in policy.trainable_state_dict().items()}
    opt = optimizer.state_dict()
    for idx, fields in opt["state"].items():
        for name, value in fields.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
    meta = {"state": json.dumps({**state, "param_groups": opt["param_groups"]})}
    atomic_save_safetensors(tensors, path, meta)


def _read_checkpoint(path: Path, what: str) -> tuple[dict, dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """A run checkpoint's (state, ``param.*`` tensors, AdamW state by parameter index)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            state = json.loads((fh.metadata() or {})["state"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise QRRLError(f"{what} {path} is unreadable ({e})") from None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    return state, params, opt_state


def _check_same_objective(path: Path, config: TrainConfig, what: str) -> None:
    """Refuse to continue a run checkpoint ``path`` under another objective. Why: AdamW's moments are
    the running scale of one loss's gradients (rwr's regression and ddpo's policy gradient differ by
    orders of magnitude), and a resumed run must be the run it was; mixing them is never what was meant."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            state = json.loads((fh.metadata() or {}).get("state", "{}"))
    except Exception as e:
        raise QRRLError(f"{what} {path} is unreadable ({e})") from None
    was = (state.get("config") or {}).get("objective", "ddpo")  # runs before objectives existed were ddpo
    if was != config.objective:
        raise QRRLError(f"{what} {path} was trained with --objective {was}, this run has --objective "
                        f"{config.objective}: one run (and one optimizer) trains one objective; use --objective {was}, "
                        "or start a fresh run without it")


def _load_optimizer_state(path: Path, optimizer, lr: float) -> int:
    """Carry a previous run's AdamW moments into this run's optimizer (its learning rate stays
    this run's). Why: a fresh AdamW every round makes its first steps ≈ lr·sign(g) per weight,
    whatever the gradient, a random walk the loop would pay every round. Returns the step count."""
    state, _, opt_state = _read_checkpoint(path, "--optimizer-from:")
    groups = state["param_groups"]
    own = optimizer.state_dict()["param_groups"]
    if len(groups) != len(own) or any(len(g["params"]) != len(o["params"]) for g, o in zip(groups, own)):
        raise QRRLError(f"--optimizer-from: {path} trained other parameters (another --mode or ControlNet); "
                        "start without it")
    for g, o in zip(groups, own):
        g.update({"lr": lr, "params": o["params"]})
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, RuntimeError) as e:
        raise QRRLError(f"--optimizer-from: {path} does not fit this run's parameters ({e})") from None
    steps = [float(v["step"]) for v in opt_state.values() if "step" in v]
    return int(max(steps)) if steps else 0


def _load_checkpoint(path: Path, policy, optimizer) -> dict:
    state, params, opt_state = _read_checkpoint(path, "checkpoint (delete it to restart the run)")
    if state.get("version") != RUN_STATE_VERSION:
        raise QRRLError(f"checkpoint {path} has run-state version {state.get('version')}, expected {RUN_STATE_VERSION}")
    policy.load_trainable_state_dict(params)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["loss", "clip_fraction", "approx_kl", "ratio_mean", "grad_norm", "kl"]
    names = [n for n in names if any(n in m for m in metrics)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        xs = [m["epoch"] for m in metrics if name in m]
        ax.plot(xs, [m[name] for m in metrics if name in m], marker="o")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# export


def export_controlnet(policy, out: Path, controlnet_config: dict, metadata: dict[str, Any],
                      dtype: str = "fp16", layout: str = "auto") -> tuple[Path, Path | None]:
    """Write the merged ControlNet (what ComfyUI's ControlNetLoader loads) and the adapter.

    ``layout="auto"``: diffusers keys for the standard SD1.5 config (like QR Code Monster),
    the original ``control_model.*`` keys otherwise (ComfyUI only recognises diffusers-layout
    ControlNets of the sizes it knows). Metadata values are JSON strings.
    """
    from .weights import SD15_CONTROLNET_CONFIG, controlnet_to_ldm, load_config

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    sd = policy.merged_controlnet_state_dict()
    if layout == "auto":
        std = load_config(None, SD15_CONTROLNET_CONFIG)
        same = all(controlnet_config.get(k) == std[k] for k in ("block_out_channels", "layers_per_block",
                                                                 "cross_attention_dim", "down_block_types"))
        layout = "diffusers" if same else "ldm"
    if layout == "ldm":
        sd = controlnet_to_ldm(sd, controlnet_config)
    sd = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    meta = {k: json.dumps(v) for k, v in {**metadata, "format": EXPORT_FORMAT, "layout": layout}.items()}
    atomic_save_safetensors(sd, out, meta)
    adapter = None
    if policy.mode == "lora":
        adapter = out.with_name(out.name[: -len(".safetensors")] + ".adapter.safetensors")
        lora_meta = {"rank": policy.lora.rank, "alpha": policy.lora.alpha if policy.lora.alpha is not None
                     else policy.lora.rank, "target_modules": policy.lora_targets}
        atomic_save_safetensors(policy.adapter_state_dict(), adapter,
                                {**meta, "format": json.dumps("qr-rl-controlnet-lora"), "lora": json.dumps(lora_meta)})
    return out, adapter


def _distill_gap(policy, samples: list[_Sample], units: list[tuple[int, int]], device, accelerator,
                 config: TrainConfig, n: int = 64) -> dict[str, float]:
    """rwr: how far the plain ControlNet's predictions are from the recorded ones, on up to ``n``
    units (rmse, and the recorded predictions' rms as its scale). Zero means nothing to distil."""
    pick = [units[i] for i in np.random.default_rng(0).permutation(len(units))[:n]]
    errs, scale = [], []
    with torch.no_grad():
        for sub in _micro_batches(samples, pick, 2 * config.batch_size, np.random.default_rng(0)):
            b = _batch(samples, sub, device)
            with accelerator.autocast():
                d = _plain_denoise(policy, b, config.target_strength)
            errs.append((d.float() - b["recorded_denoised"]).pow(2).flatten(1).mean(1).cpu())
            scale.append(b["recorded_denoised"].pow(2).flatten(1).mean(1).cpu())
    return {"distill_rmse": float(torch.cat(errs).mean().sqrt()), "distill_scale": float(torch.cat(scale).mean().sqrt())}


OLD_LOG_PROB_TOLERANCE = 1e-6  # |log π_old from the recording − recomputed| allowed on the spot check
# |recorded D − recomputed D| / max(|D|, 1) allowed there: fp32 results move ~1e-6 with the batch's
# composition (sampler batch vs trainer micro-batch); another model or setting moves them by far more
DENOISED_TOLERANCE = 1e-5


def _spot_check_units(samples: list[_Sample], units: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """At least one unit of every shard (a random sample and step), topped up to ``size`` units."""
    rng = np.random.default_rng(0)
    order = [units[i] for i in rng.permutation(len(units))]
    picked: dict[int, tuple[int, int]] = {}
    for u in order:
        picked.setdefault(samples[u[0]].shard, u)
    chosen = set(picked.values())
    for u in order:
        if len(chosen) >= size:
            break
        chosen.add(u)
    return sorted(chosen)


def _recompute(config: TrainConfig, policy, samples: list[_Sample], units: list[tuple[int, int]], device,
               accelerator, on_batch) -> None:
    """No-grad forward of the current policy over ``units``; ``on_batch(sub, b, D, log_prob, mean)``."""
    size = 2 * config.batch_size
    with torch.no_grad():
        for chunk in (units[i:i + size] for i in range(0, len(units), size)):
            for sub in _micro_batches(samples, chunk, size, np.random.default_rng(0)):
                b = _batch(samples, sub, device)
                with accelerator.autocast():
                    d = _denoise(policy, b)
                lp, mean = _log_prob(b, d)
                on_batch(sub, b, d, lp, mean)


def _old_pass(config: TrainConfig, policy, samples: list[_Sample], units: list[tuple[int, int]], device,
              accelerator, data: dict, say) -> tuple[dict, dict]:
    """ddpo: log π_old (and the old means for the KL term) of the initial policy, plus the drift
    of both against the recording.

    Why two ways: π_old needs D of the initial policy at every unit, a no-grad forward over all
    of them (about a sixth of a round's time). When the shards were sampled with this very policy
    -- every shard names this base model and this ControlNet file, and training has not moved a
    weight yet (LoRA starts at zero, the other modes from the file) -- the recorded predictions
    *are* that D. ``old_log_probs="auto"`` then recomputes D only on a spot check (one unit of
    every shard, at least one micro-batch) and, if log π_old from the recorded D is within
    ``OLD_LOG_PROB_TOLERANCE`` of the recomputed one there (and D within ``DENOISED_TOLERANCE``),
    computes log π_old and the old means for every unit from the recorded D with the trainer's
    own formulas: no forward. Anything that makes the recording differ (another precision,
    sampler, ComfyUI's model code, a replay setting) fails the check, and the full pass runs.
    Drift diagnostics are then over the checked units.
    """
    old_lp: dict[tuple[int, int], float] = {}
    old_mean: dict[tuple[int, int], torch.Tensor] = {}
    mean_dtype = torch.float16 if device.type == "cuda" else torch.float32
    lp_drift: list[torch.Tensor] = []
    d_drift: list[torch.Tensor] = []
    d_scale: list[torch.Tensor] = []
    rec_gap: list[torch.Tensor] = []  # |log π_old from the recorded D − recomputed|

    def check(sub, b, d, lp, mean) -> None:
        lp_drift.append((lp - b["recorded_log_prob"]).abs().cpu())
        d_drift.append((d.float() - b["recorded_denoised"]).abs().flatten(1).max(1).values.cpu())
        d_scale.append(b["recorded_denoised"].abs().flatten(1).max(1).values.cpu())
        rec_gap.append((_log_prob(b, b["recorded_denoised"])[0] - lp).abs().cpu())

    def keep(sub, lp, mean) -> None:
        for j, u in enumerate(sub):
            old_lp[u] = float(lp[j])
            if config.kl_coef > 0:
                old_mean[u] = mean[j].detach().to("cpu", mean_dtype)

    t0 = time.perf_counter()
    source = "recomputed"
    if config.old_log_probs == "auto" and data.get("shards_same_models"):
        checked = _spot_check_units(samples, units, 2 * config.batch_size)
        _recompute(config, policy, samples, checked, device, accelerator, check)
        gap = float(torch.cat(rec_gap).max())
        d_rel = float((torch.cat(d_drift) / torch.cat(d_scale).clamp(min=1.0)).max())  # relative to max(|D|, 1)
        if gap <= OLD_LOG_PROB_TOLERANCE and d_rel <= DENOISED_TOLERANCE:
            source = "recorded"
            data["old_log_prob_checked_units"] = len(checked)
            data["old_log_prob_check_gap"] = gap
            for i in range(0, len(units), 64):
                sub = units[i:i + 64]
                b = _step_tensors(samples, sub, device)
                lp, mean = _log_prob(b, b["recorded_denoised"])
                keep(sub, lp, mean)
        else:
            say(f"π_old: the recording is not this policy's on the spot check (log-prob gap {gap:.1e}, "
                f"limit {OLD_LOG_PROB_TOLERANCE:g}; D {d_rel:.1e}, limit {DENOISED_TOLERANCE:g}); recomputing every unit")
            for kept in (lp_drift, d_drift, d_scale, rec_gap):
                kept.clear()
    if source == "recomputed":
        def both(sub, b, d, lp, mean) -> None:
            check(sub, b, d, lp, mean)
            keep(sub, lp, mean)

        _recompute(config, policy, samples, units, device, accelerator, both)
    lp_drift_t, d_drift_t = torch.cat(lp_drift), torch.cat(d_drift)
    data.update({
        "units": len(units), "old_pass_s": time.perf_counter() - t0, "old_log_probs": source,
        "logp_drift_mean_abs": float(lp_drift_t.mean()), "logp_drift_max_abs": float(lp_drift_t.max()),
        "denoised_drift_max_abs": float(d_drift_t.max()),
        "denoised_drift_max_rel": float((d_drift_t / torch.cat(d_scale).clamp(min=1e-6)).max()),
    })
    say(f"{data['samples']} samples from {data['shards']} shards ({data['shards_skipped']} skipped, "
        f"{data['dropped_nonfinite_reward']} NaN/inf rewards dropped), {len(units)} trainable steps; "
        f"reward {data['reward_mean']:.4f} ± {data['reward_std']:.4f}; log-prob drift vs recording "
        f"mean {data['logp_drift_mean_abs']:.2e} max {data['logp_drift_max_abs']:.2e}; π_old {source}"
        + (f" (spot check of {data['old_log_prob_checked_units']} units)" if source == "recorded" else ""))
    if data["logp_drift_max_abs"] > 1e-2:
        say("warning: recorded log-probs differ from recomputed ones by more than 1e-2: the shards were "
            "probably sampled with another model, ControlNet, sampler setting or precision")
    return old_lp, old_mean


# --------------------------------------------------------------------------------------------
# the loop


def train(config: TrainConfig, log=None) -> TrainResult:
    """Run (or resume) one offline DDPO round; see the module docstring for the recipe."""
    config.validate()
    from accelerate import Accelerator

    from .weights import ensure_model_imports

    ensure_model_imports()
    from .luma_control import projection_from_meta
    from .policy import LoraSettings, load_policy

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    main = accelerator.is_main_process

    def say(msg: str) -> None:
        if main:
            (log or (lambda m: print(f"qr-rl train: {m}", flush=True)))(msg)

    out = Path(config.out)
    run_dir = Path(config.run_dir) if config.run_dir else out.with_name(out.name[: -len(".safetensors")] + ".run")
    ckpt_path, result_path = run_dir / "checkpoint.safetensors", run_dir / "result.json"
    metrics_path, plot_path = run_dir / "metrics.jsonl", run_dir / "curves.png"

    # ---- run-folder state: never clobber a finished or half-done run by accident
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if config.resume:
            msg = (f"run {run_dir} already finished ({done.get('epochs_done')} epochs, output {done.get('out')}); "
                   "nothing to do")
            say(msg)
            adapter = done.get("adapter")
            return TrainResult(out=Path(done["out"]), adapter=Path(adapter) if adapter else None, run_dir=run_dir,
                               epochs_done=int(done.get("epochs_done", 0)), data=done.get("data", {}),
                               already_finished=True, message=msg)
        raise QRRLError(f"{run_dir} holds a finished run; choose another --out (or --run-dir), or delete that folder")
    if ckpt_path.is_file() and not config.resume:
        raise QRRLError(f"{run_dir} holds an unfinished run; pass --resume to continue it, or delete that folder")
    if config.resume and ckpt_path.is_file():
        _check_same_objective(ckpt_path, config, "--resume: the unfinished run's checkpoint")
    if config.optimizer_from:
        _check_same_objective(Path(config.optimizer_from) / "checkpoint.safetensors", config, "--optimizer-from:")

    # ---- policy and data
    torch.manual_seed(config.seed)  # LoRA init is random: same seed, same run (resume equals uninterrupted)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    loaded = load_policy(config.checkpoint, config.controlnet, unet_config=config.unet_config,
                         controlnet_config=config.controlnet_config, mode=config.mode,
                         lora=LoraSettings(config.lora_rank, config.lora_alpha),
                         gradient_checkpointing=config.gradient_checkpointing, autocast_dtype=autocast)
    policy = loaded.policy
    samples, keys, data = _load_data(config, loaded.base_sha256, loaded.controlnet_sha256, say)
    # ddpo replays the sampler's luma-only control, if it had one (rl.luma_control); rwr trains the
    # plain ControlNet (the recorded predictions, tricks included, are its targets)
    policy.control_projection = projection_from_meta(data["luma_control"]) if config.objective == "ddpo" else None
    tracker = StatTracker(buffer_size=config.stat_buffer, min_group_size=config.min_group_size, clip=config.adv_clip)
    if config.stats_from:
        tracker.load_state_dict(json.loads(Path(config.stats_from).read_text())["stat_tracker"])
    resume_state = None
    if config.resume and ckpt_path.is_file():
        from safetensors import safe_open

        with safe_open(str(ckpt_path), framework="pt") as fh:
            resume_state = json.loads((fh.metadata() or {}).get("state", "{}"))
        tracker.load_state_dict(resume_state["stat_tracker_before"])
    tracker_before = tracker.state_dict()
    adv = tracker.update(keys, np.array([s.reward for s in samples]))
    data.update(adv.summary())
    units = [(n, k) for n, s in enumerate(samples) if adv.mask[n] for k in s.active]
    if not units:
        raise QRRLError(
            "no trainable steps: every sample is in a zero-variance reward group, or every step has std 0 "
            "(eta = 0 or s_noise = 0) or ControlNet strength 0; record with eta > 0 and varied seeds"
        )
    device = accelerator.device
    policy.to(device)
    _embed_hints(policy, samples, device, accelerator)
    std_ref = float(torch.stack([samples[n].std[k] for n, k in units]).float().mean())
    data["step_std_mean"] = std_ref
    data["objective"] = config.objective
    if config.objective == "rwr":
        sample_weights = advantage_weights(adv.values, adv.mask, config.awr_beta)
        data.update({"units": len(units), "awr_beta": config.awr_beta,
                     "weight_max": float(sample_weights.max()),
                     "effective_samples": float(sample_weights.sum() ** 2 / (sample_weights**2).sum().clamp_min(1e-12))})
        data.update(_distill_gap(policy, samples, units, device, accelerator, config))
        say(f"{data['samples']} samples from {data['shards']} shards ({data['shards_skipped']} skipped), "
            f"{len(units)} steps to regress; reward {data['reward_mean']:.4f} ± {data['reward_std']:.4f}; "
            f"weights exp(A/{config.awr_beta:g}): {data['effective_samples']:.1f} effective samples; "
            f"plain ControlNet vs recorded predictions: rmse {data['distill_rmse']:.3g}")
        if data["distill_rmse"] <= 1e-3 * data["distill_scale"]:
            say("warning: rwr has nothing to distil: the recorded predictions are this ControlNet's own (a plain "
                "sampler, this ControlNet, this strength), so the regression has no gradient; record with the "
                "sampler's tricks (module feedback, luma-only control, a strength curve) or use --objective ddpo")
    else:
        old_lp, old_mean = _old_pass(config, policy, samples, units, device, accelerator, data, say)

    # ---- optimiser, accelerate, resume
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps)
    model, optimizer = accelerator.prepare(policy, optimizer)
    raw = accelerator.unwrap_model(model)
    if config.optimizer_from and not (config.resume and ckpt_path.is_file()):
        carried = _load_optimizer_state(Path(config.optimizer_from) / "checkpoint.safetensors", optimizer, config.lr)
        data["optimizer_from"] = str(config.optimizer_from)
        say(f"AdamW state carried from {config.optimizer_from} (step {carried})")
    anchor = None
    if config.anchor_decay > 0:  # after prepare: the reference lives on the parameters' device
        from .anchor import WeightAnchor
        from .weights import load_controlnet

        ref_path = config.anchor_controlnet or config.controlnet
        anchor = WeightAnchor.build(raw.controlnet, load_controlnet(ref_path, loaded.controlnet_config))
        say(f"weight anchor: decay {config.anchor_decay} per step toward {ref_path}")
    metrics: list[dict[str, Any]] = []
    start_epoch, global_step = 0, 0
    if resume_state is not None:
        state = _load_checkpoint(ckpt_path, raw, optimizer)
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        if metrics_path.is_file():
            metrics = [m for m in map(json.loads, metrics_path.read_text().splitlines())
                       if m.get("epoch", 0) <= start_epoch and "epoch" in m]
        say(f"resuming after epoch {start_epoch} (step {global_step})")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    procs, rank = accelerator.num_processes, accelerator.process_index
    if procs > 1:
        say(f"{procs} processes: each optimizer step's micro-batches are split between them")
    for epoch in range(start_epoch, config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        chosen: list[tuple[int, int]] = []
        for n, s in enumerate(samples):
            if not adv.mask[n] or not s.active:
                continue
            m = max(1, round(config.timestep_fraction * len(s.active)))
            chosen.extend((n, int(k)) for k in rng.choice(s.active, size=m, replace=False))
        mbs = _micro_batches(samples, chosen, config.batch_size, rng)
        model.train()
        t_ep = time.perf_counter()
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "grad_norm": [], "rmse": []}
        new_lps, old_lps = [], []
        bar = tqdm(total=len(mbs), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (main and config.progress),
                   leave=False)
        for g0 in range(0, len(mbs), config.grad_accum):
            group = mbs[g0:g0 + config.grad_accum]
            # several processes split the step's micro-batches; DDP averages their gradients, so each
            # loss is weighted by `procs` to give one process's sum. A process with no share runs a
            # zero-weight pass: DDP needs every process in every step. One process: the whole group.
            mine = group[rank::procs] or group[:1]
            weight = procs if group[rank::procs] else 0
            for j, mb in enumerate(mine):
                b = _batch(samples, mb, device)
                sync = j == len(mine) - 1
                ctx = accelerator.no_sync(model) if not sync else _null()
                with ctx:
                    idx = [n for n, _ in mb]
                    old = None if config.objective == "rwr" else torch.tensor([old_lp[u] for u in mb], device=device)
                    loss, diag = _objective_loss(config, model, b, idx, adv.values,
                                                sample_weights if config.objective == "rwr" else None, old, std_ref,
                                                accelerator.autocast)
                    if config.objective == "rwr":
                        stats["rmse"].append(float(diag["err"].mean().sqrt()))
                    else:
                        if config.kl_coef > 0:
                            ref = torch.stack([old_mean[u] for u in mb]).to(device, torch.float32)
                            kl = gaussian_kl(diag["mean"], ref, b["std"]).mean()
                            loss = loss + config.kl_coef * kl
                            stats["kl"].append(float(kl.detach()))
                        new_lps.append(diag["log_prob"].detach().cpu())
                        old_lps.append(old.cpu())
                    accelerator.backward(loss / len(group) * weight)
                stats["loss"].append(float(loss.detach()))
                bar.update(1)
            gn = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            stats["grad_norm"].append(float(gn) if gn is not None else math.nan)
            optimizer.step()
            if anchor is not None:
                anchor.pull(config.anchor_decay)
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
        bar.close()
        diag = ppo_diagnostics(torch.cat(new_lps), torch.cat(old_lps), config.clip_range) if new_lps else {}
        row: dict[str, Any] = {
            "epoch": epoch + 1, "step": global_step, "units": len(chosen), "micro_batches": len(mbs),
            "seconds": time.perf_counter() - t_ep, "lr": config.lr,
            "reward_mean": data["reward_mean"], "reward_std": data["reward_std"],
            **({"decode_rate": data["decoded_mean"]} if "decoded_mean" in data else {}),
            **{k: float(np.mean(v)) for k, v in stats.items() if v}, **diag,
            **({"anchor_distance": anchor.distance()} if anchor is not None else {}),
        }
        row["samples_steps_per_s"] = len(mbs) and sum(len(mb) for mb in mbs) / row["seconds"]
        metrics.append(row)
        say(f"epoch {epoch + 1}: loss {row.get('loss', math.nan):+.4f} clip {row.get('clip_fraction', math.nan):.3f} "
            f"approx_kl {row.get('approx_kl', math.nan):.2e} ratio [{row.get('ratio_min', math.nan):.4f}, "
            f"{row.get('ratio_max', math.nan):.4f}] grad {row.get('grad_norm', math.nan):.3g} "
            f"({row['samples_steps_per_s']:.1f} samples·steps/s)")
        accelerator.wait_for_everyone()
        if main:
            atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in [{"data": data}] + metrics))
            _plot(metrics, plot_path)
            _save_checkpoint(ckpt_path, raw, optimizer, {
                "version": RUN_STATE_VERSION, "epoch": epoch + 1, "global_step": global_step,
                "stat_tracker_before": tracker_before, "config": _config_summary(config),
            })

    # ---- export
    accelerator.wait_for_everyone()
    adapter_path = None
    if main:
        meta = {
            "base_sha256": loaded.base_sha256, "source_controlnet_sha256": loaded.controlnet_sha256,
            "training_run": config.run_name or run_dir.name, "round": config.round, "epochs": config.epochs,
            "mode": config.mode, "lora_rank": config.lora_rank if config.mode == "lora" else None,
            "samples": data["samples"], "reward_mean": data["reward_mean"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out, adapter_path = export_controlnet(raw, out, loaded.controlnet_config, meta,
                                              config.export_dtype, config.export_layout)
        atomic_write_json(run_dir / "stat_tracker.json", {"stat_tracker": tracker.state_dict()})
        atomic_write_json(result_path, {"out": str(out), "adapter": str(adapter_path) if adapter_path else None,
                                  "epochs_done": config.epochs, "data": data, "finished": True})
        say(f"wrote {out}" + (f" and {adapter_path}" if adapter_path else ""))
    accelerator.wait_for_everyone()
    return TrainResult(out=out, adapter=adapter_path, run_dir=run_dir, epochs_done=config.epochs,
                       metrics=metrics, data=data)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _config_summary(config: TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    return {k: (str(v) if isinstance(v, os.PathLike) else [str(x) for x in v] if k == "trajectories" else v)
            for k, v in d.items() if not isinstance(v, dict)}


def objective_gradients(config: TrainConfig, subsets: Sequence[Sequence[int]], log=None) -> list[torch.Tensor]:
    """The flattened gradient of ``config.objective`` at the starting weights over each subset of
    samples (indices into the shards' samples, in reading order): the gradient-quality check of
    ``bench/gradient_check.py``. Why: before a long learning run, two disjoint halves of a batch
    should give updates that agree (cosine well above 0); if they do not, the update is noise.

    Advantages are normalised over all samples once (as a training run would); ddpo's gradient is
    taken at ratio 1 (the first step of a round), rwr's with its weights ``exp(A/β)``."""
    config.validate()
    from .weights import ensure_model_imports

    ensure_model_imports()
    from .luma_control import projection_from_meta
    from .policy import LoraSettings, load_policy

    say = log or (lambda m: None)
    torch.manual_seed(config.seed)
    loaded = load_policy(config.checkpoint, config.controlnet, unet_config=config.unet_config,
                         controlnet_config=config.controlnet_config, mode=config.mode,
                         lora=LoraSettings(config.lora_rank, config.lora_alpha))
    policy = loaded.policy
    samples, keys, data = _load_data(config, loaded.base_sha256, loaded.controlnet_sha256, say)
    policy.control_projection = projection_from_meta(data["luma_control"]) if config.objective == "ddpo" else None
    tracker = StatTracker(min_group_size=config.min_group_size, clip=config.adv_clip)
    adv = tracker.update(keys, np.array([s.reward for s in samples]))
    weights = advantage_weights(adv.values, adv.mask, config.awr_beta)
    params = [p for p in policy.parameters() if p.requires_grad]
    _embed_hints(policy, samples, "cpu")
    std_ref = float(torch.stack([s.std[k] for s in samples for k in s.active]).float().mean())
    out = []
    for subset in subsets:
        bad = [n for n in subset if not 0 <= n < len(samples)]
        if bad:
            raise QRRLError(f"sample indices {bad[:3]} are outside the {len(samples)} samples of the shards")
        units = [(n, k) for n in subset if adv.mask[n] for k in samples[n].active]
        for p in params:
            p.grad = None
        for mb in _micro_batches(samples, units, config.batch_size, np.random.default_rng(0)):
            b = _batch(samples, mb, "cpu")
            loss, _ = _objective_loss(config, policy, b, [n for n, _ in mb], adv.values, weights, None, std_ref)
            (loss * len(mb) / max(1, len(units))).backward()
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).clone())
    return out
