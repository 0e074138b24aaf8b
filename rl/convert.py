"""Kept for imports that predate :mod:`rl.weights` (load, convert and export model weights)."""

from .files import sha256_file as file_sha256  # noqa: F401 - the identity shards record as base_sha256
from .weights import *  # noqa: F403
