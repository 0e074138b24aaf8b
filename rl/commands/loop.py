"""``qr-rl loop``: rounds of curriculum strength → collect → train → export (docs/design.md §6).

Why every option is also a flag: a TOML file keeps a run reproducible, and a flag overrides
one value without editing it. Unknown TOML keys are an error naming the valid ones.
"""

from __future__ import annotations

import argparse

from ._flags import Option, add_options, given

#: The loop's help where its trainer default or meaning differs from ``qr-rl train``'s.
_LOOP_TRAIN_HELP = {
    "epochs": "passes over each round's shards (default 2)",
    "anchor_decay": "after each optimizer step pull the weights this fraction of the way back toward the loop's "
                    "starting ControlNet (default 0 = off; full and zero_convs modes)",
    "seed": "trainer seed; round k trains with seed + k (default 0)",
}


def _train_options() -> list[Option]:
    """``--train-<key>`` for every :class:`rl.rounds.TrainerSettings` field (``dest`` ``train.<key>``),
    with ``qr-rl train``'s help text: one help per setting."""
    from dataclasses import fields

    from ..rounds import TrainerSettings
    from .train import OPTIONS as TRAIN_OPTIONS

    rows = {field: kw for field, _flag, kw in TRAIN_OPTIONS}
    out: list[Option] = []
    for f in fields(TrainerSettings):
        kw = dict(rows[f.name])
        if f.name in _LOOP_TRAIN_HELP:
            kw["help"] = _LOOP_TRAIN_HELP[f.name]
        if "action" not in kw and "choices" not in kw:
            kw["metavar"] = f.name.upper()
        out.append((f"train.{f.name}", "--train-" + f.name.replace("_", "-"), kw))
    return out


def _deprecated_options(train_rows: list[Option]) -> list[Option]:
    """The flat trainer flags of earlier releases (``--lr``, ``--mode``, ...), hidden from --help;
    ``LoopConfig.from_mapping`` warns about each one given and names its new flag."""
    from ..loop import DEPRECATED_TRAIN_KEYS

    new = {field: kw for field, _flag, kw in train_rows}
    out: list[Option] = []
    for old, key in DEPRECATED_TRAIN_KEYS.items():
        flag = "--" + old.replace("_", "-")
        if flag == "--train-" + key.replace("_", "-"):
            continue  # --train-batch-size and --train-seed kept their names
        kw = {k: v for k, v in new[f"train.{key}"].items() if k in ("type", "action", "choices")}
        out.append((old, flag, kw | {"help": argparse.SUPPRESS}))
    return out


#: (LoopConfig field, flag, argparse keywords), one row per setting (rl/commands/_flags.py); the
#: trainer's settings are ``train.<key>`` rows, ``--train-<key>`` flags.
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
    ("teacher", "--teacher", dict(choices=("current", "pretrained"),
     help="which ControlNet each round samples with: current (the one trained so far, what ddpo needs) or "
          "pretrained (the starting one every round, a fixed teacher whose tricks rwr distils into the trained "
          "one: the demo's recipe) (default current)")),
    ("module_feedback", "--module-feedback", dict(action=argparse.BooleanOptionalAction,
     help="module feedback in the RL sampler: more ControlNet on the modules each step's preview still gets "
          "wrong (links the sampler's qr_code input; default off)")),
    ("luma_control", "--luma-control", dict(action=argparse.BooleanOptionalAction,
     help="luma-only control in the RL sampler: the ControlNet changes only the luma of each prediction "
          "(one more model call per step; default off)")),
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
    ("threads", "--threads", dict(type=int, help="torch CPU threads (default: torch's)")),
    ("progress", "--no-progress", dict(action="store_false", help="hide progress bars")),
    *_train_options(),
]
#: The flat trainer flags of earlier releases, still accepted for one release (with a warning).
DEPRECATED: list[Option] = _deprecated_options(OPTIONS)


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
    add_options(p, DEPRECATED)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The TOML file (if any), then the flags given; ``train.<key>`` flags land in its ``train`` table."""
    from ..loop import DEPRECATED_TRAIN_KEYS, LoopConfig
    from ..loop import _deprecation as warn

    data: dict = dict(LoopConfig.load_toml(args.config)) if args.config else {}
    flat = {k.replace("-", "_"): v for k, v in data.items()}
    train = dict(flat.pop("train", None) or {})
    for old, value in given(args, DEPRECATED).items():
        new = DEPRECATED_TRAIN_KEYS[old]
        warn(f"--{old.replace('_', '-')} is deprecated: use --train-{new.replace('_', '-')} "
             f"(TOML: train.{new})")
        train[new] = value
    for key, value in given(args, OPTIONS).items():
        if key.startswith("train."):
            train[key.removeprefix("train.")] = value
        else:
            flat[key] = value
    return LoopConfig.from_mapping(flat | ({"train": train} if train else {}), source=args.config or "options")


def run(args: argparse.Namespace) -> int:
    from ..cli import require_extra
    from ..loop import run_loop

    require_extra("train")  # every round trains: refuse before the first collection

    result = run_loop(config_from_args(args))
    return 0 if result.finished else 1
