"""``qr-rl train``: offline fine-tuning of the ControlNet on recorded trajectory shards, exported for ComfyUI."""

from __future__ import annotations

import argparse


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
    p.add_argument("--trajectories", nargs="+", required=True, metavar="DIR",
                   help="folders (searched recursively) or .safetensors shard files to train on")
    p.add_argument("--checkpoint", required=True, help="base SD1.5 checkpoint .safetensors (single file or diffusers UNet)")
    p.add_argument("--controlnet", required=True, help="ControlNet .safetensors to start from (diffusers or original layout)")
    p.add_argument("--out", required=True, help="output ControlNet .safetensors (the adapter goes next to it)")
    p.add_argument("--unet-config", default=None, help="diffusers UNet config folder (default: shipped SD1.5)")
    p.add_argument("--controlnet-config", default=None, help="diffusers ControlNet config folder (default: shipped SD1.5)")
    p.add_argument("--objective", choices=("ddpo", "rwr"), default="ddpo",
                   help="ddpo (default): PPO-clip on the recorded steps' log-probabilities; rwr: reward-weighted "
                        "regression of the plain ControlNet onto the recorded predictions (rl/objectives.py)")
    p.add_argument("--awr-beta", type=float, default=1.0,
                   help="rwr: temperature of the sample weights exp(A/β); smaller keeps only the best (default 1)")
    p.add_argument("--target-strength", type=float, default=None,
                   help="rwr: train the ControlNet at this one strength, the one it will be used at (default: "
                        "each step's recorded strength)")
    p.add_argument("--optimizer-from", default=None, metavar="RUN_DIR",
                   help="carry the AdamW state of a previous run folder (its checkpoint.safetensors): one "
                        "optimizer across curriculum rounds")
    p.add_argument("--mode", choices=("lora", "full", "zero_convs"), default=None,
                   help="what trains: lora (default: a LoRA adapter), full (every ControlNet weight) or "
                        "zero_convs (only the ControlNet's output projections: fewest parameters, learns from "
                        "the fewest samples)")
    p.add_argument("--full", action="store_true", help="same as --mode full")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the shards (default 4)")
    p.add_argument("--clip-range", type=float, default=0.02,
                   help="PPO clip range ε on the per-element ratio (default 0.02; watch clip_fraction in the log)")
    p.add_argument("--timestep-fraction", type=float, default=0.5,
                   help="fraction of each trajectory's trainable steps used per epoch (default 0.5)")
    p.add_argument("--steps-from", type=float, default=0.0,
                   help="train only the steps from this fraction of the trajectory on, e.g. 0.7 = the last 30%% "
                        "(default 0: all); where the ControlNet's late steps decide whether the code scans")
    p.add_argument("--step-weighting", choices=("std", "none"), default="none",
                   help="ddpo: none (default): the plain mean over steps; std: weight each step's loss by its "
                        "noise std (puts much of the update on the first, noisiest steps)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="weight of the KL to the starting ControlNet (default 0)")
    p.add_argument("--anchor-decay", type=float, default=0.0,
                   help="after each optimizer step pull the weights this fraction of the way back toward "
                        "--anchor-controlnet (default 0 = off; full and zero_convs modes)")
    p.add_argument("--anchor-controlnet", default=None,
                   help="the ControlNet the anchor pulls toward (default: --controlnet, the starting one)")
    p.add_argument("--batch-size", type=int, default=8, help="(sample, step) units per forward (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast precision on GPU (default no; bf16 recommended on Ampere+)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade ~30%% time for much less memory")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT's .run folder (no-op if finished)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="train on shards recorded with another base checkpoint (off-policy; not recommended)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-epoch step choice and shuffling")
    p.add_argument("--min-group-size", type=int, default=4,
                   help="smaller (prompt, payload, strength) groups use batch reward statistics (default 4)")
    p.add_argument("--stats-from", default=None, help="stat_tracker.json of a previous round (running baseline)")
    p.add_argument("--stat-buffer", type=int, default=0, help="past rewards per group kept across rounds (default 0)")
    p.add_argument("--run-dir", default=None, help="run folder for metrics/checkpoints (default: OUT minus suffix + .run)")
    p.add_argument("--run-name", default=None, help="training run name recorded in the output metadata")
    p.add_argument("--round", type=int, default=None, help="curriculum round recorded in the output metadata")
    p.add_argument("--export-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="output weight dtype")
    p.add_argument("--export-layout", choices=("auto", "diffusers", "ldm"), default="auto",
                   help="auto: diffusers keys for standard SD1.5 sizes, original keys otherwise")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import require_extra

    require_extra("train")
    from ..train import TrainConfig, train

    config = TrainConfig(
        trajectories=args.trajectories, checkpoint=args.checkpoint, controlnet=args.controlnet, out=args.out,
        unet_config=args.unet_config, controlnet_config=args.controlnet_config, objective=args.objective,
        awr_beta=args.awr_beta, target_strength=args.target_strength, optimizer_from=args.optimizer_from,
        mode=args.mode or ("full" if args.full else "lora"), step_weighting=args.step_weighting, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lr=args.lr,
        weight_decay=args.weight_decay, epochs=args.epochs, clip_range=args.clip_range,
        timestep_fraction=args.timestep_fraction, steps_from=args.steps_from, kl_coef=args.kl_coef, anchor_decay=args.anchor_decay,
        anchor_controlnet=args.anchor_controlnet, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, resume=args.resume,
        allow_base_mismatch=args.allow_base_mismatch, seed=args.seed, min_group_size=args.min_group_size,
        stats_from=args.stats_from, stat_buffer=args.stat_buffer, run_dir=args.run_dir, run_name=args.run_name,
        round=args.round, export_dtype=args.export_dtype, export_layout=args.export_layout, cpu=args.cpu,
        progress=not args.no_progress,
    )
    result = train(config)
    if not result.already_finished:
        print(f"qr-rl train: done: {result.out}" + (f" (adapter {result.adapter})" if result.adapter else ""))
    return 0
