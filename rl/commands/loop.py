"""``qr-rl loop``: rounds of curriculum strength → collect → train → export (docs/design.md §6).

Why every option is also a flag: a TOML file keeps a run reproducible, and a flag overrides
one value without editing it. Unknown TOML keys are an error naming the valid ones.
"""

from __future__ import annotations

import argparse

#: (field, flag, kind, help). kind: str/int/float/list (repeatable)/bool (store_true)/nobool (store_false)
OPTIONS: list[tuple[str, str, str, str]] = [
    ("name", "--name", "str", "run name: ControlNets are exported as <name>-r<k>.safetensors (default qr-rl)"),
    ("run_dir", "--run-dir", "str", "run folder holding state, shards, metrics and the report (default runs/qr-rl)"),
    ("rounds", "--rounds", "int", "number of curriculum rounds (default 3)"),
    ("curriculum", "--curriculum", "str", "strength curriculum: constant, linear, cosine, exponential or adaptive"),
    ("start_strength", "--start-strength", "float", "ControlNet strength of round 0 (default 1.6)"),
    ("end_strength", "--end-strength", "float", "strength of the last round (default 0.8)"),
    ("target_decode_rate", "--target-decode-rate", "float",
     "adaptive curriculum: step down after a round whose decode rate reaches this (default 0.8)"),
    ("curriculum_step", "--curriculum-step", "float", "adaptive curriculum: strength step down (default (start-end)/(rounds-1))"),
    ("prompts", "--prompt", "list", "a prompt to sample (repeatable)"),
    ("prompts_file", "--prompts-file", "str", "text file with one prompt per line"),
    ("payloads", "--payload", "list", "a QR payload (repeatable)"),
    ("payloads_file", "--payloads-file", "str", "text file with one payload per line"),
    ("seeds", "--seeds", "int", "samples (seeds) per prompt × payload per round (default 4)"),
    ("seed_start", "--seed-start", "int", "first seed (default 0); seeds never repeat across rounds"),
    ("batch", "--batch", "int", "at most this many samples per job/shard (default: --seeds)"),
    ("negative", "--negative", "str", "negative prompt (default: the workflow's)"),
    ("curve", "--curve", "str", "per-step strength curve inside a sample: constant (default), linear, cosine, exponential, step"),
    ("end_ratio", "--end-ratio", "float", "with a non-constant --curve: end strength = round strength × this"),
    ("backend", "--backend", "str", "comfy (ComfyUI servers, default) or local (in-process toy model)"),
    ("servers", "--server", "list", "ComfyUI URL (repeatable; default http://127.0.0.1:8188)"),
    ("per_server_concurrency", "--per-server-concurrency", "int", "jobs in flight per server (default 1)"),
    ("workflow", "--workflow", "str", "API-format workflow (default workflows/api/qr_rl_collect.json)"),
    ("set", "--set", "list", "extra workflow override 'Title.input=value' (repeatable, e.g. 'RL Sampler.steps=20')"),
    ("job_timeout", "--job-timeout", "float", "seconds one job may take before it is interrupted (default 1800)"),
    ("comfyui_dir", "--comfyui-dir", "str", "ComfyUI folder (its models/controlnet receives each round's ControlNet)"),
    ("controlnet_dir", "--controlnet-dir", "str", "ControlNet folder to export into (default <comfyui-dir>/models/controlnet)"),
    ("checkpoint", "--checkpoint", "str", "SD1.5 checkpoint: a name in models/checkpoints or a path (the trainer loads it)"),
    ("controlnet", "--controlnet", "str", "ControlNet to start from: a name in models/controlnet or a path"),
    ("unet_config", "--unet-config", "str", "diffusers UNet config folder for a non-standard checkpoint"),
    ("controlnet_config", "--controlnet-config", "str", "diffusers ControlNet config folder for a non-standard ControlNet"),
    ("toy_model", "--toy-model", "str", "--backend local: toy model folder (default: the shipped one)"),
    ("steps", "--steps", "int", "sampling steps (sets 'RL Sampler.steps' for ComfyUI)"),
    ("mode", "--mode", "str", "training mode: lora (default), full or zero_convs (output projections only)"),
    ("lora_rank", "--lora-rank", "int", "LoRA rank (default 8)"),
    ("lr", "--lr", "float", "learning rate (default 1e-4)"),
    ("epochs", "--epochs", "int", "training epochs per round (default 2)"),
    ("train_batch_size", "--train-batch-size", "int", "trainer micro-batch (sample·steps, default 8)"),
    ("grad_accum", "--grad-accum", "int", "gradient accumulation steps (default 1)"),
    ("clip_range", "--clip-range", "float", "PPO clip range (default 0.02)"),
    ("timestep_fraction", "--timestep-fraction", "float", "fraction of steps trained per sample (default 0.5)"),
    ("steps_from", "--steps-from", "float", "train only steps from this fraction of the trajectory on (default 0: all)"),
    ("step_weighting", "--step-weighting", "str", "per-step loss weights: std (default) or none"),
    ("kl_coef", "--kl-coef", "float", "KL penalty to the round's starting policy (default 0)"),
    ("anchor_decay", "--anchor-decay", "float",
     "per-step pull of the trained weights toward the loop's starting ControlNet, 0-1 (default 0 = off)"),
    ("mixed_precision", "--mixed-precision", "str", "no, bf16 or fp16 (GPU)"),
    ("export_dtype", "--export-dtype", "str", "dtype of the exported ControlNet: fp16 (default), bf16, fp32"),
    ("train_seed", "--train-seed", "int", "trainer seed (round k uses seed + k)"),
    ("cpu", "--cpu", "bool", "train on CPU even when a GPU exists"),
    ("threads", "--threads", "int", "torch CPU threads (default: torch's)"),
    ("progress", "--no-progress", "nobool", "hide progress bars"),
]


def add_options(p: argparse.ArgumentParser) -> None:
    """Every LoopConfig field as a flag; defaults are SUPPRESS so config values show through."""
    for fld, flag, kind, help_text in OPTIONS:
        kw: dict = {"dest": fld, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            p.add_argument(flag, action="store_true", **kw)
        elif kind == "nobool":
            p.add_argument(flag, action="store_false", **kw)
        elif kind == "list":
            p.add_argument(flag, action="append", **kw)
        else:
            p.add_argument(flag, type={"str": str, "int": int, "float": float}[kind], **kw)


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
    add_options(p)
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
    for fld, _flag, _kind, _h in OPTIONS:
        if hasattr(args, fld):
            merged[fld] = getattr(args, fld)
    return LoopConfig.from_mapping(merged, source=args.config or "options")


def run(args: argparse.Namespace) -> int:
    from ..cli import require_extra
    from ..loop import run_loop

    require_extra("train")  # every round trains: refuse before the first collection

    result = run_loop(config_from_args(args))
    return 0 if result.finished else 1
