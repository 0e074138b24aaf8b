"""rl/files.py: the atomic writers (old file or new file, never a torn one) and the cached sha256."""

from __future__ import annotations

import hashlib
import os

import pytest

from rl.errors import QRRLError
from rl.files import (
    atomic_copy,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    cache_info,
    clear_cache,
    sha256_file,
)


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


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "sub" / "state.json"
    atomic_write_json(f, {"round": 1})

    def torn(tmp):
        tmp.write_bytes(b'{"round": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(f, torn)
    assert f.read_text() == '{\n  "round": 1\n}\n' and _leftovers(f.parent) == []


def test_safetensors_and_copy_round_trip_with_a_checked_digest(tmp_path):
    import torch
    from safetensors.torch import load_file, safe_open

    src = atomic_save_safetensors({"w": torch.arange(6.0).view(2, 3).t()}, tmp_path / "a.safetensors", {"k": "v"})
    sha = atomic_copy(src, tmp_path / "out" / "b.safetensors")  # creates the folder
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest() == sha256_file(tmp_path / "out" / "b.safetensors")
    assert torch.equal(load_file(str(tmp_path / "out" / "b.safetensors"))["w"], torch.arange(6.0).view(2, 3).t())
    with safe_open(str(src), "pt") as fh:
        assert fh.metadata() == {"k": "v"}
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "out") == []


def test_atomic_dir_publishes_all_files_or_nothing(tmp_path):
    final = tmp_path / "cache" / "abc"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "one.bin").write_bytes(b"1")
            raise RuntimeError("build failed")
    assert not final.exists() and list((tmp_path / "cache").iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "one.bin").write_bytes(b"1")
        (tmp / "cfg").mkdir()
        (tmp / "cfg" / "two.json").write_text("{}")
    assert (final / "one.bin").read_bytes() == b"1" and (final / "cfg" / "two.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["abc"]


def test_png_and_figure_writers_leave_no_temp(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from rl.image_io import load_image, save_figure, save_png

    img = np.zeros((4, 5, 3), np.uint8)
    img[1, 2] = (255, 0, 7)
    assert (load_image(save_png(tmp_path / "a.png", img)) == img).all()
    fig = plt.figure(figsize=(1, 1))
    assert save_figure(fig, tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums() and _leftovers(tmp_path) == []
