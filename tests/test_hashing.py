"""rl/hashing.py: file sha256 with a (path, size, mtime) cache."""

from __future__ import annotations

import hashlib
import os

import pytest

from rl.errors import QRRLError
from rl.hashing import cache_info, clear_cache, sha256_file


def test_digest_matches_hashlib_and_is_cached(tmp_path):
    clear_cache()
    f = tmp_path / "w.safetensors"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert cache_info() == 1
    assert sha256_file(f) == hashlib.sha256(data).hexdigest() and cache_info() == 1


def test_rewritten_file_is_hashed_again(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    first = sha256_file(f)
    f.write_bytes(b"b" * 100)  # same size: the mtime tells them apart
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(f) == hashlib.sha256(b"b" * 100).hexdigest() != first


def test_symlink_shares_the_cache_entry(tmp_path):
    clear_cache()
    f = tmp_path / "real.bin"
    f.write_bytes(b"xyz")
    link = tmp_path / "link.bin"
    link.symlink_to(f)
    assert sha256_file(link) == sha256_file(f) and cache_info() == 1


def test_missing_file_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(QRRLError, match="no such file"):
        sha256_file(tmp_path / "nope.safetensors")
    with pytest.raises(QRRLError, match="not a regular file"):
        sha256_file(tmp_path)
