"""``qr-rl encode``: write a QR hint image for a payload.

Why a command: the hint a ControlNet sees must be reproducible outside ComfyUI (for the
trainer, for ``qr-rl scan``, for bug reports); the options mirror the QR Code Encode node.
"""

from __future__ import annotations

import argparse
import json

from ..errors import QRRLError


def _auto_int(low: int, high: int, what: str):
    def parse(text: str) -> int | None:
        if text.strip().lower() == "auto":
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be 'auto' or an integer {low}-{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be 'auto' or an integer {low}-{high}, got {value}")
        return value

    return parse


def add_qr_options(parser: argparse.ArgumentParser) -> None:
    """The encode options, shared with ``qr-rl scan`` (which re-encodes the payload)."""
    parser.add_argument("--ecc", default=None, choices=["L", "M", "Q", "H", "l", "m", "q", "h"],
                        help="error-correction level (default H: survives the most artistic damage)")
    parser.add_argument("--version", dest="qr_version", type=_auto_int(1, 40, "version"), default=None,
                        metavar="auto|1-40", help="QR version (symbol size); default auto = smallest that fits")
    parser.add_argument("--mask", type=_auto_int(0, 7, "mask"), default=None, metavar="auto|0-7",
                        help="mask pattern; default auto = the encoder's best-scoring mask")
    parser.add_argument("--module-px", type=int, default=16, help="pixels per module in the hint (default 16)")
    parser.add_argument("--border", type=int, default=4, help="quiet zone in modules (default 4, the standard)")
    parser.add_argument("--dark", default="#000000", help='dark module colour: "#RRGGBB", "#RGB", "r,g,b" or a name')
    parser.add_argument("--light", default="#FFFFFF",
                        help='light colour (use "#808080" / gray for QR Code Monster v2)')


def code_from_args(args: argparse.Namespace, payload: str):
    from ..qr import encode

    return encode(payload, ecc=(args.ecc or "H"), version=args.qr_version, mask=args.mask,
                  module_px=args.module_px, border=args.border, dark=args.dark, light=args.light)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode a payload as a QR hint image (PNG)",
        description="Encode PAYLOAD as a QR code and write the ControlNet hint image as a PNG.",
    )
    p.add_argument("payload", metavar="PAYLOAD", help="text or URL to encode")
    p.add_argument("--out", "-o", required=True, help="output PNG path (written atomically)")
    add_qr_options(p)
    p.add_argument("--json", action="store_true", help="print the QR metadata as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..image_io import save_png

    if not args.out.lower().endswith(".png"):
        raise QRRLError(f"--out {args.out!r}: the hint is written as PNG, give a path ending in .png")
    code = code_from_args(args, args.payload)
    path = save_png(args.out, code.render())
    if args.json:
        meta = code.to_metadata()
        meta["path"] = str(path)
        meta["image_size"] = code.image_size
        print(json.dumps(meta))
    else:
        print(
            f"{path}: QR version {code.version} ({code.size}x{code.size} modules), ECC {code.ecc}, "
            f"mask {code.mask}, {code.image_size}x{code.image_size} px ({code.module_px} px/module, "
            f"border {code.border})"
        )
    return 0
