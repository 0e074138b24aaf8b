"""``qr-rl train``: offline fine-tuning of the ControlNet on recorded trajectory shards, exported for ComfyUI."""

from __future__ import annotations

import argparse

from ._flags import Option, add_options, given

#: (TrainConfig field, flag, argparse keywords), one row per setting (rl/commands/_flags.py);
#: fields without a flag are listed in ``NO_FLAG``.
OPTIONS: list[Option] = [
    ("trajectories", "--trajectories", dict(nargs="+", required=True, metavar="DIR",
     help="folders (searched recursively) or .safetensors shard files to train on")),
    ("checkpoint", "--checkpoint", dict(required=True,
     help="base SD1.5 checkpoint .safetensors (single file or diffusers UNet)")),
    ("controlnet", "--controlnet", dict(required=True,
     help="ControlNet .safetensors to start from (diffusers or original layout)")),
    ("out", "--out", dict(required=True, help="output ControlNet .safetensors (the adapter goes next to it)")),
    ("unet_config", "--unet-config", dict(help="diffusers UNet config folder (default: shipped SD1.5)")),
    ("controlnet_config", "--controlnet-config", dict(help="diffusers ControlNet config folder (default: shipped SD1.5)")),
    ("objective", "--objective", dict(choices=("ddpo", "rwr"),
     help="ddpo (default): PPO-clip on the recorded steps' log-probabilities; rwr: reward-weighted "
          "regression of the plain ControlNet onto the recorded predictions (rl/objectives.py)")),
    ("awr_beta", "--awr-beta", dict(type=float,
     help="rwr: temperature of the sample weights exp(A/β); smaller keeps only the best (default 1)")),
    ("target_strength", "--target-strength", dict(type=float,
     help="rwr: train the ControlNet at this one strength, the one it will be used at (default: "
          "each step's recorded strength)")),
    ("optimizer_from", "--optimizer-from", dict(metavar="RUN_DIR",
     help="carry the AdamW state of a previous run folder (its checkpoint.safetensors): one "
          "optimizer across curriculum rounds")),
    ("mode", "--mode", dict(choices=("lora", "full", "zero_convs"),
     help="what trains: lora (default: a LoRA adapter), full (every ControlNet weight) or "
          "zero_convs (only the ControlNet's output projections: fewest parameters, learns from "
          "the fewest samples)")),
    ("lora_rank", "--lora-rank", dict(type=int, help="LoRA rank (default 8)")),
    ("lora_alpha", "--lora-alpha", dict(type=float, help="LoRA alpha (default: the rank, scale 1)")),
    ("lr", "--lr", dict(type=float, help="AdamW learning rate (default 1e-4)")),
    ("weight_decay", "--weight-decay", dict(type=float, help="AdamW weight decay (default 1e-4)")),
    ("epochs", "--epochs", dict(type=int, help="passes over the shards (default 4)")),
    ("clip_range", "--clip-range", dict(type=float,
     help="PPO clip range ε on the per-element ratio (default 0.02; watch clip_fraction in the log)")),
    ("timestep_fraction", "--timestep-fraction", dict(type=float,
     help="fraction of each trajectory's trainable steps used per epoch (default 0.5)")),
    ("steps_from", "--steps-from", dict(type=float,
     help="train only the steps from this fraction of the trajectory on, e.g. 0.7 = the last 30%% "
          "(default 0: all); where the ControlNet's late steps decide whether the code scans")),
    ("step_weighting", "--step-weighting", dict(choices=("std", "none"),
     help="ddpo: none (default): the plain mean over steps; std: weight each step's loss by its "
          "noise std (puts much of the update on the first, noisiest steps)")),
    ("kl_coef", "--kl-coef", dict(type=float, help="weight of the KL to the starting ControlNet (default 0)")),
    ("anchor_decay", "--anchor-decay", dict(type=float,
     help="after each optimizer step pull the weights this fraction of the way back toward "
          "--anchor-controlnet (default 0 = off; full and zero_convs modes)")),
    ("anchor_controlnet", "--anchor-controlnet", dict(
     help="the ControlNet the anchor pulls toward (default: --controlnet, the starting one)")),
    ("batch_size", "--batch-size", dict(type=int, help="(sample, step) units per forward (default 8)")),
    ("grad_accum", "--grad-accum", dict(type=int, help="micro-batches per optimizer step (default 1)")),
    ("max_grad_norm", "--max-grad-norm", dict(type=float, help="gradient-norm clip (default 1.0)")),
    ("mixed_precision", "--mixed-precision", dict(choices=("no", "bf16", "fp16"),
     help="autocast precision on GPU (default no; bf16 recommended on Ampere+)")),
    ("old_log_probs", "--old-log-probs", dict(choices=("auto", "recompute"),
     help="ddpo: π_old of each step; auto (default): the recorded predictions where a spot check proves "
          "them this policy's, else recomputed; recompute: always recompute them (one extra forward pass)")),
    ("gradient_checkpointing", "--gradient-checkpointing", dict(action="store_true",
     help="recompute activations in backward: much less memory for a second forward pass")),
    ("resume", "--resume", dict(action="store_true",
     help="continue the run in OUT's .run folder (no-op if finished)")),
    ("allow_base_mismatch", "--allow-base-mismatch", dict(action="store_true",
     help="train on shards recorded with another base checkpoint (off-policy; not recommended)")),
    ("seed", "--seed", dict(type=int, help="seed of the per-epoch step choice and shuffling (default 0)")),
    ("min_group_size", "--min-group-size", dict(type=int,
     help="smaller (prompt, payload, strength) groups use batch reward statistics (default 4)")),
    ("stats_from", "--stats-from", dict(help="stat_tracker.json of a previous round (running baseline)")),
    ("stat_buffer", "--stat-buffer", dict(type=int, help="past rewards per group kept across rounds (default 0)")),
    ("run_dir", "--run-dir", dict(help="run folder for metrics/checkpoints (default: OUT minus suffix + .run)")),
    ("run_name", "--run-name", dict(help="training run name recorded in the output metadata")),
    ("round", "--round", dict(type=int, help="curriculum round recorded in the output metadata")),
    ("export_dtype", "--export-dtype", dict(choices=("fp16", "bf16", "fp32"),
     help="output weight dtype (default fp16)")),
    ("export_layout", "--export-layout", dict(choices=("auto", "diffusers", "ldm"),
     help="auto (default): diffusers keys for standard SD1.5 sizes, original keys otherwise")),
    ("cpu", "--cpu", dict(action="store_true", help="train on the CPU even when a GPU is present")),
    ("progress", "--no-progress", dict(action="store_false", help="no progress bars")),
]
#: TrainConfig fields deliberately without a flag (library callers set them).
NO_FLAG = ("adam_eps", "adv_clip")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a ControlNet on recorded trajectory shards (reward-weighted regression or DDPO)",
        description="Offline fine-tuning on recorded steps: --objective rwr regresses the plain ControlNet onto "
                    "the recorded predictions, weighted by exp(advantage/β) (self-imitation of what scanned, and "
                    "distillation of the sampler's tricks); --objective ddpo is PPO-clip on the steps' "
                    "log-probabilities. Trains LoRA (default) or the full ControlNet, exports a ControlNet ComfyUI loads. "
                    "Works offline (HF_HUB_OFFLINE=1); multi-GPU with `accelerate launch -m rl train ...`.",
    )
    add_options(p, OPTIONS)
    p.add_argument("--full", dest="mode", action="store_const", const="full", default=argparse.SUPPRESS,
                   help="same as --mode full")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` of parsed flags: the given ones, the dataclass's defaults for the rest."""
    from ..train import TrainConfig

    return TrainConfig(**given(args, OPTIONS))


def run(args: argparse.Namespace) -> int:
    from ..cli import require_extra

    require_extra("train")
    from ..train import train

    result = train(config_from_args(args))
    if not result.already_finished:
        print(f"qr-rl train: done: {result.out}" + (f" (adapter {result.adapter})" if result.adapter else ""))
    return 0
