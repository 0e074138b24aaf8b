"""``qr-rl loop``: rounds of curriculum strength → collect → train → export (docs/design.md §6).

Why every option is also a flag: a TOML file keeps a run reproducible, and a flag overrides
one value without editing it. Unknown TOML keys are an error naming the valid ones.
"""

from __future__ import annotations

import argparse

from ._flags import Option, add_options, given

#: (LoopConfig field, flag, argparse keywords), one row per setting (rl/commands/_flags.py).
OPTIONS: list[Option] = [
    ("name", "--name", dict(help="run name: ControlNets are exported as <name>-r<k>.safetensors (default qr-rl)")),
    ("run_dir", "--run-dir", dict(
     help="run folder holding state, shards, metrics and the report (default runs/qr-rl)")),
    ("rounds", "--rounds", dict(type=int, help="number of curriculum rounds (default 3)")),
    ("curriculum", "--curriculum", dict(help="strength curriculum: constant, linear, cosine, exponential or adaptive")),
    ("start_strength", "--start-strength", dict(type=float, help="ControlNet strength of round 0 (default 1.6)")),
    ("end_strength", "--end-strength", dict(type=float, help="strength of the last round (default 0.8)")),
    ("target_decode_rate", "--target-decode-rate", dict(type=float,
     help="adaptive curriculum: step down after a round whose decode rate reaches this (default 0.8)")),
    ("curriculum_step", "--curriculum-step", dict(type=float,
     help="adaptive curriculum: strength step down (default (start-end)/(rounds-1))")),
    ("prompts", "--prompt", dict(action="append", help="a prompt to sample (repeatable)")),
    ("prompts_file", "--prompts-file", dict(help="text file with one prompt per line")),
    ("payloads", "--payload", dict(action="append", help="a QR payload (repeatable)")),
    ("payloads_file", "--payloads-file", dict(help="text file with one payload per line")),
    ("seeds", "--seeds", dict(type=int, help="samples (seeds) per prompt × payload per round (default 4)")),
    ("seed_start", "--seed-start", dict(type=int, help="first seed (default 0); seeds never repeat across rounds")),
    ("batch", "--batch", dict(type=int, help="at most this many samples per job/shard (default: --seeds)")),
    ("negative", "--negative", dict(help="negative prompt (default: the workflow's)")),
    ("curve", "--curve", dict(
     help="per-step strength curve inside a sample: constant (default), linear, cosine, exponential, step")),
    ("end_ratio", "--end-ratio", dict(type=float,
     help="with a non-constant --curve: end strength = round strength × this")),
    ("learn_schedule", "--learn-schedule", dict(action="store_true",
     help="learn the strength curve (level and tilt) as the demo does: each sample follows its own curve "
          "around the round's strength (keyframes_per_sample)")),
    ("schedule_sigma", "--schedule-sigma", dict(type=float,
     help="--learn-schedule: log-gain exploration of the curve (default 0.2)")),
    ("schedule_lr", "--schedule-lr", dict(type=float,
     help="--learn-schedule: natural-gradient step of the curve's mean log-gain (default 2.0)")),
    ("backend", "--backend", dict(help="comfy (ComfyUI servers, default) or local (in-process toy model)")),
    ("servers", "--server", dict(action="append", help="ComfyUI URL (repeatable; default http://127.0.0.1:8188)")),
    ("per_server_concurrency", "--per-server-concurrency", dict(type=int,
     help="jobs in flight per server (default 1)")),
    ("workflow", "--workflow", dict(help="API-format workflow (default workflows/api/qr_rl_collect.json)")),
    ("set", "--set", dict(action="append",
     help="extra workflow override 'Title.input=value' (repeatable, e.g. 'RL Sampler.steps=20')")),
    ("job_timeout", "--job-timeout", dict(type=float,
     help="seconds one job may take before it is interrupted (default 1800)")),
    ("comfyui_dir", "--comfyui-dir", dict(
     help="ComfyUI folder (its models/controlnet receives each round's ControlNet)")),
    ("controlnet_dir", "--controlnet-dir", dict(
     help="ControlNet folder to export into (default <comfyui-dir>/models/controlnet)")),
    ("checkpoint", "--checkpoint", dict(
     help="SD1.5 checkpoint: a name in models/checkpoints or a path (the trainer loads it)")),
    ("controlnet", "--controlnet", dict(help="ControlNet to start from: a name in models/controlnet or a path")),
    ("unet_config", "--unet-config", dict(help="diffusers UNet config folder for a non-standard checkpoint")),
    ("controlnet_config", "--controlnet-config", dict(
     help="diffusers ControlNet config folder for a non-standard ControlNet")),
    ("toy_model", "--toy-model", dict(help="--backend local: toy model folder (default: the shipped one)")),
    ("steps", "--steps", dict(type=int, help="sampling steps (sets 'RL Sampler.steps' for ComfyUI)")),
    ("mode", "--mode", dict(help="training mode: lora (default), full or zero_convs (output projections only)")),
    ("lora_rank", "--lora-rank", dict(type=int, help="LoRA rank (default 8)")),
    ("lr", "--lr", dict(type=float, help="learning rate (default 1e-4)")),
    ("epochs", "--epochs", dict(type=int, help="training epochs per round (default 2)")),
    ("train_batch_size", "--train-batch-size", dict(type=int, help="trainer micro-batch (sample·steps, default 8)")),
    ("grad_accum", "--grad-accum", dict(type=int, help="gradient accumulation steps (default 1)")),
    ("clip_range", "--clip-range", dict(type=float, help="PPO clip range (default 0.02)")),
    ("timestep_fraction", "--timestep-fraction", dict(type=float,
     help="fraction of steps trained per sample (default 0.5)")),
    ("steps_from", "--steps-from", dict(type=float,
     help="train only steps from this fraction of the trajectory on (default 0: all)")),
    ("step_weighting", "--step-weighting", dict(help="per-step loss weights: none (default) or std")),
    ("kl_coef", "--kl-coef", dict(type=float, help="KL penalty to the round's starting policy (default 0)")),
    ("anchor_decay", "--anchor-decay", dict(type=float,
     help="per-step pull of the trained weights toward the loop's starting ControlNet, 0-1 (default 0 = off)")),
    ("mixed_precision", "--mixed-precision", dict(help="no, bf16 or fp16 (GPU)")),
    ("export_dtype", "--export-dtype", dict(help="dtype of the exported ControlNet: fp16 (default), bf16, fp32")),
    ("train_seed", "--train-seed", dict(type=int, help="trainer seed (round k uses seed + k)")),
    ("cpu", "--cpu", dict(action="store_true", help="train on CPU even when a GPU exists")),
    ("threads", "--threads", dict(type=int, help="torch CPU threads (default: torch's)")),
    ("progress", "--no-progress", dict(action="store_false", help="hide progress bars")),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "loop",
        help="curriculum RL loop: collect on ComfyUI (or in-process), train, export, repeat",
        description=(
            "Rounds of: curriculum strength → collect shards (ComfyUI servers or --backend local) → train "
            "(offline DDPO) → export <name>-r<k>.safetensors into ComfyUI's models/controlnet → the next round "
            "samples with it. The run folder keeps the state: run the same command again to resume after a crash."
        ),
    )
    p.add_argument("--config", default=None, help="TOML file with any of the options below (flags override it)")
    add_options(p, OPTIONS)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..loop import LoopConfig

    data: dict = LoopConfig.load_toml(args.config) if args.config else {}
    cfg_keys = {k.replace("-", "_") for k in data}
    unknown = sorted(cfg_keys - set(LoopConfig.keys()))
    if unknown:
        from ..errors import QRRLError

        raise QRRLError(f"{args.config}: unknown keys {unknown}; valid keys: {', '.join(LoopConfig.keys())}")
    merged = {k.replace("-", "_"): v for k, v in data.items()}
    merged.update(given(args, OPTIONS))
    return LoopConfig.from_mapping(merged, source=args.config or "options")


def run(args: argparse.Namespace) -> int:
    from ..cli import require_extra
    from ..loop import run_loop

    require_extra("train")  # every round trains: refuse before the first collection

    result = run_loop(config_from_args(args))
    return 0 if result.finished else 1
