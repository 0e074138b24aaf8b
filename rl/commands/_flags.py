"""The flag tables of ``qr-rl train`` and ``qr-rl loop``: one row per config field.

Why one style: a row is (config field, flag, argparse keywords) and its default is the config
dataclass's. Flags not given are left out of the namespace (``argparse.SUPPRESS``), so the
dataclass (or a TOML file under it) supplies the value; no default is typed twice
(tests/test_train_flags.py checks the help texts against the dataclasses).
"""

from __future__ import annotations

import argparse
from typing import Any

Option = tuple[str, str, dict[str, Any]]


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    """Every row as a flag whose value lands in ``dest=field``; absent unless given."""
    for field, flag, kw in options:
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, **kw)


def given(args: argparse.Namespace, options: list[Option]) -> dict[str, Any]:
    """``{field: value}`` of the flags given on the command line."""
    return {field: getattr(args, field) for field, _flag, _kw in options if hasattr(args, field)}
