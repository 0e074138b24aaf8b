"""``qr-rl encode`` / ``qr-rl scan`` through ``rl.cli.main`` and once as the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rl.cli import main
from rl.image_io import load_image
from rl.qr import encode

PAYLOAD = "https://example.com/cli"


def test_encode_writes_png_and_summary(tmp_path, capsys):
    out = tmp_path / "sub" / "qr.png"
    assert main(["encode", PAYLOAD, "--out", str(out), "--ecc", "Q", "--module-px", "4", "--border", "2"]) == 0
    line = capsys.readouterr().out.strip()
    code = encode(PAYLOAD, ecc="Q", module_px=4, border=2)
    assert f"version {code.version}" in line and "ECC Q" in line and f"mask {code.mask}" in line
    assert np.array_equal(load_image(out), code.render())
    assert not [p for p in out.parent.iterdir() if p.name != "qr.png"]  # no temp files left


def test_encode_json_and_options(tmp_path, capsys):
    out = tmp_path / "qr.png"
    args = ["encode", PAYLOAD, "-o", str(out), "--version", "6", "--mask", "3", "--light", "gray", "--json"]
    assert main(args) == 0
    meta = json.loads(capsys.readouterr().out)
    assert (meta["version"], meta["mask"], meta["ecc"], meta["light"]) == (6, 3, "H", "#808080")
    assert meta["path"] == str(out) and meta["image_size"] == (41 + 8) * 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x" * 200, "--version", "3"], "holds at most"),
        (["", ], "payload is empty"),
        (["hi", "--dark", "nope"], "#RRGGBB"),
        (["hi", "--module-px", "0"], "module_px"),
    ],
)
def test_encode_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["encode", *args, "--out", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("qr-rl encode: error:")


def _write(path: Path, img: np.ndarray) -> Path:
    from rl.image_io import save_png

    return save_png(path, img)


def test_scan_json_lines_with_hint_bad_files_and_overlays(tmp_path, capsys):
    hint = tmp_path / "hint.png"
    assert main(["encode", PAYLOAD, "--out", str(hint), "--module-px", "6", "--light", "gray"]) == 0
    code = encode(PAYLOAD, module_px=6, light="gray")
    noisy = tmp_path / "blank.png"
    _write(noisy, np.full((300, 300, 3), 128, np.uint8))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    capsys.readouterr()
    rc = main(["scan", str(hint), str(corrupt), str(tmp_path / "missing.png"), str(noisy),
               "--payload", PAYLOAD, "--hint", str(hint), "--json", "--overlay-dir", str(tmp_path / "ov")])
    assert rc == 2
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["hint.png", "blank.png"]
    good, blank = rows
    assert good["decoded"] and good["decoders"] == ["zxing", "zbar", "opencv"] and good["text"] == PAYLOAD
    assert good["module_accuracy"] == 1.0 and good["scan_score"] == 1.0 and good["reward"] == 1.0
    assert good["clip_text"] is None and good["clip_image"] is None
    assert not blank["decoded"] and blank["text"] is None and blank["scan_score"] < 0.6
    assert "corrupt.png" in captured.err and "missing.png" in captured.err
    assert Path(good["overlay"]).is_file() and load_image(good["overlay"]).shape == code.render().shape


def test_scan_table_with_qr_options(tmp_path, capsys):
    code = encode(PAYLOAD, ecc="M", module_px=5)
    img = _write(tmp_path / "img.png", code.render())
    assert main(["scan", str(img), "--payload", PAYLOAD, "--ecc", "M", "--module-px", "5",
                 "--decoders", "zbar"]) == 0
    out = capsys.readouterr().out
    assert "module_acc" in out.splitlines()[0] and "yes" in out and "zbar" in out
    assert main(["scan", str(img), "--payload", PAYLOAD, "--decoders", "zxing,bogus"]) == 2
    assert "valid decoders are" in capsys.readouterr().err


def test_scan_with_tiny_clip(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from rl._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip
    import torch
    from safetensors.torch import save_file

    arch = "qrrl-tiny-cli-test"
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{arch}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    sd = open_clip.create_model(arch, pretrained=None).state_dict()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(weights))
    code = encode(PAYLOAD, module_px=4)
    img = _write(tmp_path / "img.png", code.render())
    rc = main(["scan", str(img), "--payload", PAYLOAD, "--module-px", "4", "--prompt", "a castle",
               "--base", str(img), "--clip-arch", arch, "--clip-weights", str(weights), "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out)
    assert 0.0 <= row["clip_text"] <= 1.0 and 0.0 <= row["clip_image"] <= 1.0
    clip_total = (row["clip_text"] + row["clip_image"]) / 2
    assert row["reward"] == pytest.approx(row["scan_score"] + clip_total, abs=1e-5)
    assert main(["scan", str(img), "--payload", PAYLOAD, "--clip-arch", arch]) == 2
    assert "--clip-weights" in capsys.readouterr().err


def test_console_script(tmp_path):
    exe = shutil.which("qr-rl") or str(Path(sys.executable).with_name("qr-rl"))
    out = tmp_path / "qr.png"
    proc = subprocess.run([exe, "encode", "hello", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ECC H" in proc.stdout and out.is_file()
    proc = subprocess.run([exe, "scan", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--payload" in proc.stdout and "--overlay-dir" in proc.stdout
