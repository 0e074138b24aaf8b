"""``qr-rl scan``: score images for scannability (and optionally CLIP similarity).

Why a command: checking a folder of generated images, or a single bug-report image, should
not need ComfyUI. The numbers are exactly those the QR Scan Reward node gives the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import QRRLError
from .encode import add_qr_options, code_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "scan",
        help="score images: decode, module accuracy, scan score (+ optional CLIP)",
        description=(
            "Decode each IMAGE with real QR decoders and measure its modules against the QR code "
            "of --payload (from --hint, or re-encoded with the QR options). Prints one JSON "
            "object per image with --json, else a table."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to score")
    p.add_argument("--payload", required=True, help="the text the QR code must decode to (exact match)")
    p.add_argument("--hint", default=None, help="the hint PNG the images were made from (infers the QR options)")
    add_qr_options(p)
    p.add_argument("--decoders", default="zxing,zbar,opencv", help="comma-separated decoders (zxing, zbar, opencv)")
    p.add_argument("--prompt", default=None, help="prompt for the CLIP text similarity (needs --clip-*)")
    p.add_argument("--base", default=None, help="reference image for the CLIP image similarity (needs --clip-*)")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture, e.g. ViT-B-32 (with --clip-weights)")
    p.add_argument("--clip-weights", default=None, help="open_clip weights file (.safetensors) for --clip-arch")
    p.add_argument("--overlay-dir", default=None, help="write an error-overlay PNG per image into this folder")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=run)


def _load_clip(args: argparse.Namespace):
    if bool(args.clip_arch) != bool(args.clip_weights):
        raise QRRLError("give both --clip-arch and --clip-weights (or neither, to skip CLIP)")
    if not args.clip_arch:
        if args.prompt or args.base:
            print("qr-rl scan: note: --prompt/--base are ignored without --clip-arch/--clip-weights",
                  file=sys.stderr)
        return None
    from ..clip_score import ClipScorer

    return ClipScorer.load(args.clip_arch, args.clip_weights)


def run(args: argparse.Namespace) -> int:
    from ..image_io import load_image, save_png
    from ..qr import code_from_hint
    from ..reward import combine_rewards
    from ..scan import resolve_decoders, results_to_reward, scan_image

    decoders = resolve_decoders(args.decoders)
    if args.hint:
        code = code_from_hint(load_image(args.hint), args.payload, ecc=args.ecc)
    else:
        code = code_from_args(args, args.payload)
    scorer = _load_clip(args)
    base = load_image(args.base) if (scorer is not None and args.base) else None

    failed = 0
    names: list[str] = []
    images = []
    for name in args.images:
        try:
            images.append(load_image(name))
            names.append(name)
        except QRRLError as exc:
            print(f"qr-rl scan: error: {exc}", file=sys.stderr)
            failed += 1
    results = [scan_image(img, code, decoders, overlay=bool(args.overlay_dir), exhaustive=True) for img in images]

    clip_text = clip_image = None
    totals = [r.scan_score for r in results]
    if scorer is not None and images:
        from ..clip_score import clip_reward

        clip = clip_reward(scorer, images, args.prompt, base_images=[base] * len(images) if base is not None else None)
        combined = combine_rewards([results_to_reward(results), clip], [1.0, 1.0])
        totals = [float(t) for t in combined.total]
        clip_text = clip.components.get("clip_text")
        clip_image = clip.components.get("clip_image")

    used: set[str] = set()
    rows = []
    for i, (name, res) in enumerate(zip(names, results)):
        row = {
            "image": name,
            "decoded": res.decoded,
            "decoders": res.decoders,
            "text": res.text,
            "variant": res.variant,
            "module_accuracy": round(res.module_accuracy, 6),
            "region_accuracy": {k: round(v, 6) for k, v in res.region_accuracy.items()},
            "scan_score": round(res.scan_score, 6),
            "clip_text": None if clip_text is None else round(float(clip_text[i]), 6),
            "clip_image": None if clip_image is None else round(float(clip_image[i]), 6),
            "reward": round(float(totals[i]), 6),
        }
        if args.overlay_dir and res.overlay is not None:
            stem = Path(name).stem
            out_name = f"{stem}.overlay.png" if stem not in used else f"{stem}.{i}.overlay.png"
            used.add(stem)
            row["overlay"] = str(save_png(Path(args.overlay_dir) / out_name, res.overlay))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json and rows:
        _print_table(rows)
    return 2 if failed else 0


def _print_table(rows: list[dict]) -> None:
    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    header = ["image", "decoded", "decoders", "module_acc", "scan_score", "clip_text", "clip_image", "reward"]
    table = [
        [r["image"], "yes" if r["decoded"] else "no", ",".join(r["decoders"]) or "-", fmt(r["module_accuracy"]),
         fmt(r["scan_score"]), fmt(r["clip_text"]), fmt(r["clip_image"]), fmt(r["reward"])]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in rows:
        if not r["decoded"] and r["text"] is not None:
            print(f"note: {r['image']} decodes to {r['text']!r}, not the payload")
