"""Every file the package writes, and the one file hash.

Why one module: runs are resumed after crashes and ``kill -9``, so every state, manifest,
shard, checkpoint, image and report must be either the old version or the new one, never
half written. One durability level for all of them: a hidden temp file in the target folder,
flush + fsync, ``os.replace``, then fsync of the folder so the rename itself survives a power
loss. Hidden temp names end in ``.tmp`` (collectors sweep ``.*.tmp`` after a crash).

Why a cached hash: every recorded shard names its base checkpoint and ControlNet by content
hash (the trainer refuses trajectories from another model). Hashing a 2 GB checkpoint takes
seconds, so the digest is computed once per file version and reused while path, size and
mtime agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QRRLError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------------
# durability primitives


def temp_path(path: PathLike) -> Path:
    """The hidden, unique temp name next to ``path`` (same folder: ``os.replace`` stays atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: PathLike) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_move(src: PathLike, dst: PathLike) -> Path:
    """Rename a finished (already fsynced) file onto ``dst`` in the same file system, durably."""
    dst = Path(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temp)`` to fill a hidden temp file, then publish it at ``path`` atomically.

    The one writer behind every helper below (creates the parent folder). On any failure the
    temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        atomic_move(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# writers


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """Sorted, indented JSON with a final newline, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """A ``.safetensors`` file (tensors copied to contiguous CPU memory), atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def atomic_copy(src: PathLike, dst: PathLike) -> str:
    """Copy ``src`` to ``dst`` atomically; return the sha256, checked against the source.

    Why the check: an exported ControlNet that differs from the trained file (a bad disk, a
    file changed underneath) must fail loudly, not be sampled from for a whole round.
    """
    src, dst = Path(src), Path(dst)
    digest: list[str] = []

    def write(tmp: Path) -> None:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
        digest.append(sha256_file(tmp, use_cache=False))
        if digest[0] != sha256_file(src, use_cache=False):
            raise QRRLError(f"copy of {src} to {dst} is corrupt (sha256 differs); check the disk")

    atomic_write(dst, write)
    return digest[0]


@contextlib.contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Fill a hidden temp folder next to ``final``; on success it is renamed to ``final``.

    For a set of files that must appear together (a cache entry): readers see all or nothing.
    ``final`` must not exist yet (callers hold a lock and check first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the file hash

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


def sha256_file(path: PathLike, use_cache: bool = True) -> str:
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
