"""``qr-rl`` command line: one sub-command per module in ``rl/commands``.

Why discovery: each command lives next to the code it drives and registers itself, so adding
a command never means editing a central table.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from . import __version__, commands
from .errors import QRRLError

DIST = "comfyui-qr-rl"
#: The import names each extra of pyproject.toml's [project.optional-dependencies] brings
#: (a test keeps this in step with pyproject.toml).
EXTRAS: dict[str, tuple[str, ...]] = {"train": ("diffusers", "accelerate", "peft", "matplotlib")}
EXTRA_OF: dict[str, str] = {module: extra for extra, modules in EXTRAS.items() for module in modules}
#: Import name -> pip name of the core dependencies (a broken install, not a missing extra).
CORE_DIST: dict[str, str] = {"numpy": "numpy", "PIL": "pillow", "segno": "segno", "zxingcpp": "zxing-cpp",
                             "pyzbar": "pyzbar", "cv2": "opencv-python-headless", "safetensors": "safetensors",
                             "torch": "torch", "open_clip": "open_clip_torch", "tqdm": "tqdm",
                             "websocket": "websocket-client", "tomli": "tomli"}


def _extra_hint(modules: Sequence[str], extra: str) -> str:
    names = ", ".join(repr(m) for m in modules)
    return (f"this command needs {names}, not installed here; it comes with the {extra!r} extra: "
            f'pip install "{DIST}[{extra}]"')


def require_extra(extra: str) -> None:
    """Fail before any work when a module of ``extra`` is missing (no import: ``find_spec`` only)."""
    import importlib.util

    missing = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise QRRLError(_extra_hint(missing, extra))


def missing_module_message(exc: ModuleNotFoundError) -> str | None:
    """The one-line fix for a missing third-party module, or None for our own modules (a bug).

    Why: ``pip install comfyui-qr-rl`` leaves out the training stack (the ``train`` extra), so
    ``qr-rl train`` would otherwise die with a bare ``No module named 'accelerate'``.
    """
    name = (exc.name or "").split(".")[0]
    if not name or name in ("rl", "nodes"):
        return None
    if name in EXTRA_OF:
        return _extra_hint([name], EXTRA_OF[name])
    if name in CORE_DIST:
        return (f"{name!r} (pip package {CORE_DIST[name]}) is missing: the install is incomplete. Reinstall with "
                f'pip install "{DIST}" (on a CPU-only machine install torch first, see the README)')
    return f"the Python module {name!r} is missing; install it (pip install {name}) and run the command again"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qr-rl",
        description="Make AI QR-code art scan: encode, score, record, and fine-tune a QR ControlNet with RL.",
    )
    parser.add_argument("--version", action="version", version=f"qr-rl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QRRLError as exc:
        print(f"qr-rl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_module_message(exc)
        if message is None:
            raise
        print(f"qr-rl {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
