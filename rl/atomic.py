"""Kept for imports that predate :mod:`rl.files`, the one home of the atomic writers."""

from .files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
