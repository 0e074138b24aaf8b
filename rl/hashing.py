"""sha256 of model files, cached by (path, size, mtime).

Why: every recorded shard names the exact base checkpoint and ControlNet by content hash (the
trainer refuses trajectories from another model). Hashing a 2 GB checkpoint takes seconds, so
the digest is computed once per file version and reused while path, size and mtime agree.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from .errors import QRRLError

CHUNK = 4 << 20
MAX_ENTRIES = 256

_cache: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_lock = threading.Lock()


def _key(path: Path) -> tuple[str, int, int]:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise QRRLError(f"cannot hash {path}: no such file") from None
    if not os.path.isfile(real):
        raise QRRLError(f"cannot hash {path}: not a regular file")
    return real, int(st.st_size), int(st.st_mtime_ns)


def sha256_file(path: str | os.PathLike[str], use_cache: bool = True) -> str:
    """Hex sha256 of a file's bytes; cached in memory by (real path, size, mtime_ns).

    A file rewritten in place gets a new mtime (or size) and is hashed again. The key is taken
    both before and after reading: if the file changed while it was hashed, the digest is not
    cached (and is recomputed once).
    """
    p = Path(path)
    key = _key(p)
    if use_cache:
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit
    for _attempt in range(2):
        digest = hashlib.sha256()
        with open(key[0], "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
        after = _key(p)
        if after == key:
            break
        key = after
    hexdigest = digest.hexdigest()
    if use_cache and after == key:
        with _lock:
            _cache[key] = hexdigest
            _cache.move_to_end(key)
            while len(_cache) > MAX_ENTRIES:
                _cache.popitem(last=False)
    return hexdigest


def cache_info() -> int:
    """Number of cached digests (tests, diagnostics)."""
    with _lock:
        return len(_cache)


def clear_cache() -> None:
    with _lock:
        _cache.clear()
