"""Kept for imports that predate :mod:`rl.files`, the home of the one cached file hash."""

from .files import cache_info, clear_cache, sha256_file

__all__ = ["cache_info", "clear_cache", "sha256_file"]
