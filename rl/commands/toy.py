"""``qr-rl toy pretrain`` / ``calibrate``: train the embedded toy QR-art model, re-measure its strength dial.

Why a command: the shipped weights in ``rl/toy/assets`` are made by exactly this command, so
anyone can reproduce (or retune) them on a CPU in under half an hour.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "toy",
        help="the embedded toy QR-art model (pretrain, calibrate)",
        description="Tools for the embedded toy model that `qr-rl demo` fine-tunes.",
    )
    sub = p.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    pre = sub.add_parser(
        "pretrain",
        help="train the toy model from scratch (~20-30 CPU-minutes with the defaults)",
        description=(
            "Train the toy world's text encoder + UNet (base art only), then a QR ControlNet (QR codes "
            "woven into the art, visibility growing with strength), then a tiny CLIP for the art reward; "
            "calibrate the demo/high strengths and write a model folder (safetensors + JSON)."
        ),
    )
    pre.add_argument("--out", required=True, help="output folder for the model (created; files are replaced)")
    pre.add_argument("--seed", type=int, default=0, help="random seed (the shipped model uses 0)")
    pre.add_argument("--unet-steps", type=int, default=None, help="UNet + text encoder training steps (default 1000)")
    pre.add_argument("--controlnet-steps", type=int, default=None, help="ControlNet training steps (default 400)")
    pre.add_argument("--clip-steps", type=int, default=None, help="tiny CLIP training steps (default 300)")
    pre.add_argument("--steps", type=int, default=None,
                     help="shortcut: set all three step counts to this value (for smoke tests)")
    pre.add_argument("--batch-size", type=int, default=None, help="training batch size (default 16)")
    pre.add_argument("--calibrate-samples", type=int, default=None,
                     help="samples per strength for calibrating the demo/high strengths (default 128; 0 = skip)")
    pre.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=run_pretrain)
    cal = sub.add_parser(
        "calibrate",
        help="re-measure a toy model's strength dial and reset its demo/high strengths",
        description=(
            "Sample the ControlNet at strengths 0 ... 1.2 on N fixed items, record decode rate, module accuracy "
            "and art similarity in toy.json, and set the demo strength (the highest whose decode rate is <= 30%%) "
            "and the high strength (the lowest with >= 90%%). Only toy.json is rewritten; the weights are untouched."
        ),
    )
    cal.add_argument("--model", required=True, help="toy model folder (e.g. one written by `qr-rl toy pretrain`)")
    cal.add_argument("--samples", type=int, default=128, help="samples per strength (default 128)")
    cal.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    cal.set_defaults(func=run_calibrate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_pretrain(args: argparse.Namespace) -> int:
    from ..cli import require_extra

    require_extra("train")  # the toy model is a diffusers UNet + ControlNet
    from ..errors import QRRLError
    from ..toy.model import PretrainConfig, pretrain

    kw = {}
    if args.steps is not None:
        kw.update(unet_steps=args.steps, controlnet_steps=args.steps, clip_steps=args.steps)
    for name in ("unet_steps", "controlnet_steps", "clip_steps", "batch_size", "calibrate_samples", "threads"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    for name in ("unet_steps", "controlnet_steps", "clip_steps", "batch_size"):
        if name in kw and kw[name] < 1:
            raise QRRLError(f"--{name.replace('_', '-')} must be >= 1, got {kw[name]}")
    pretrain(PretrainConfig(out=args.out, seed=args.seed, **kw), progress=not args.no_progress)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from ..cli import require_extra

    require_extra("train")
    import torch

    from ..files import atomic_write_json
    from ..toy.model import CONFIG_FILE, ToyModel, recalibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ToyModel.load(args.model)  # validates the folder before the long measurement
    strengths = recalibrate(model, args.samples, lambda m: print(f"qr-rl toy: {m}", flush=True))
    atomic_write_json(model.folder / CONFIG_FILE, model.info)
    print(f"qr-rl toy: wrote {model.folder / CONFIG_FILE}: demo strength {strengths['demo']}, "
          f"high strength {strengths['high']}")
    return 0
