"""rl.scan with the real decoders: round trips, module accuracy, score shape, inputs, errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from rl.errors import QRRLError
from rl.image_io import load_image, to_uint8_rgb
from rl.qr import ECC_LEVELS, MONSTER_V2_LIGHT, REGION_IDS, QRCode, encode
from rl.reward import Reward
from rl.scan import (
    DEFAULT_DECODERS,
    available_decoders,
    decode,
    scan_batch,
    scan_image,
    scan_reward,
)

PAYLOAD = "https://example.com/qr-rl?id=42"


def _payload_for(version: int, ecc: str) -> str:
    """A payload that needs exactly ``version`` at ``ecc`` (half-way between capacities)."""
    from rl.qr import capacity

    lo = capacity(version - 1, ecc) if version > 1 else 0
    n = max(1, (lo + capacity(version, ecc)) // 2 + 1)
    return (f"v{version}-{ecc}:" + "abcdefghijklmnopqrstuvwxyz" * 20)[:n]


def test_all_decoders_available():
    assert set(available_decoders()) == set(DEFAULT_DECODERS)


@pytest.mark.parametrize("decoder", DEFAULT_DECODERS)
def test_round_trip_versions_1_to_10_every_ecc(decoder):
    for version in range(1, 11):
        for ecc in ECC_LEVELS:
            payload = _payload_for(version, ecc)
            code = encode(payload, ecc=ecc, module_px=3, border=4)
            assert code.version == version
            res = decode(code.render(), payload, decoders=[decoder], module_px=3)
            assert res.decoded and res.text == payload and res.decoders == [decoder], (version, ecc)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("light", ["#FFFFFF", MONSTER_V2_LIGHT])
@pytest.mark.parametrize("size", [None, 512, 768, 300])
def test_clean_hint_is_perfect_at_any_size(light, size):
    code = encode(PAYLOAD, module_px=8, light=light)
    img = code.render() if size is None else _resize(code.render(), size)
    res = scan_image(img, code)
    assert res.decoded and res.decoders and res.variant == "native"
    assert res.module_accuracy == 1.0 and set(res.region_accuracy.values()) == {1.0}
    assert res.scan_score == pytest.approx(1.0)
    assert res.overlay.shape == img.shape and res.overlay.dtype == np.uint8


def _flip(img: np.ndarray, code: QRCode, cells: list[tuple[int, int]]) -> np.ndarray:
    """Paint the given modules with the opposite colour (hint-pixel geometry)."""
    out = img.copy()
    p, b = code.module_px, code.border
    for r, c in cells:
        colour = code.light if code.modules[r, c] else code.dark
        out[(b + r) * p:(b + r + 1) * p, (b + c) * p:(b + c + 1) * p] = colour
    return out


def test_accuracy_and_score_fall_monotonically_with_flips():
    code = encode(PAYLOAD, ecc="H", module_px=6)
    rng = np.random.default_rng(0)
    order = [tuple(x) for x in rng.permutation(np.argwhere(np.ones_like(code.modules)))]
    prev_acc, prev_score = 1.01, 1.01
    for k in (0, 1, 3, 10, 30, 80, 200, 400):
        img = _resize(_flip(code.render(), code, order[:k]), 512)
        res = scan_image(img, code, overlay=False)
        assert res.module_accuracy == pytest.approx(1 - k / code.modules.size)
        assert res.module_accuracy < prev_acc and res.scan_score < prev_score, k
        prev_acc, prev_score = res.module_accuracy, res.scan_score
        if k == 0:
            assert res.decoded
        if k == 400:
            assert not res.decoded


def test_score_rises_before_decoding_and_jumps_when_decoded():
    code = encode(PAYLOAD, ecc="H", module_px=6)
    rng = np.random.default_rng(1)
    cells = [tuple(x) for x in rng.permutation(np.argwhere(np.ones_like(code.modules)))]
    broken = cells[: int(0.6 * len(cells))]  # 60% of all modules, finders included
    noise = rng.normal(0, 20, size=code.render().shape)
    scores, decoded = [], []
    for frac in np.linspace(0, 1, 11):
        still = broken[int(frac * len(broken)):]
        img = np.clip(_flip(code.render(), code, still) + noise, 0, 255).astype(np.uint8)
        res = scan_image(img, code, overlay=False)
        scores.append(res.scan_score)
        decoded.append(res.decoded)
    assert not decoded[0] and decoded[-1]
    first = decoded.index(True)
    assert first >= 3  # several undecodable steps to test density on
    assert all(a < b for a, b in zip(scores[:first], scores[1:first]))  # strictly rising, undecoded
    assert min(scores[first:]) > max(scores[:first])
    assert all(decoded[first:])


def test_decoded_beats_undecoded_at_similar_accuracy():
    code = encode(PAYLOAD, ecc="H", module_px=6)
    n = code.size
    # the 3x3 centres of the three finders vs. the same number of data modules in one corner
    centres = [(r + dr, c + dc) for r, c in ((2, 2), (2, n - 5), (n - 5, 2)) for dr in range(3) for dc in range(3)]
    data = sorted((tuple(x) for x in np.argwhere(code.regions == REGION_IDS["data"])),
                  key=lambda rc: (n - rc[0]) ** 2 + (n - rc[1]) ** 2)[: len(centres)]
    broken_finders = scan_image(_flip(code.render(), code, centres), code, overlay=False)
    broken_data = scan_image(_flip(code.render(), code, data), code, overlay=False)
    assert broken_data.decoded and not broken_finders.decoded
    assert broken_data.module_accuracy == pytest.approx(broken_finders.module_accuracy)
    assert broken_data.scan_score > broken_finders.scan_score
    assert broken_finders.scan_score <= 0.6 < broken_data.scan_score
    assert broken_finders.region_accuracy["finder"] < 1.0 and broken_data.region_accuracy["data"] < 1.0


def test_overlay_marks_wrong_modules_red():
    code = encode(PAYLOAD, module_px=8)
    res = scan_image(_flip(code.render(), code, [(10, 10)]), code)
    p, b = code.module_px, code.border
    wrong = res.overlay[(b + 10) * p + 4, (b + 10) * p + 4].astype(int)
    right = res.overlay[(b + 12) * p + 4, (b + 12) * p + 4].astype(int)
    assert wrong[0] > wrong[1] + 80 and right[1] >= right[0]
    assert not res.module_correct[10, 10] and res.module_correct.sum() == code.modules.size - 1


def test_mixed_batch_inputs():
    code = encode(PAYLOAD, module_px=4)
    rgb = code.render()
    gray = rgb[..., 0]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba[:8, :8, 3] = 0  # transparent corner composited on white
    as_float = rgb.astype(np.float32) / 255.0
    tensor = torch.from_numpy(as_float)[None]  # ComfyUI [1,H,W,C]
    chw = torch.from_numpy(as_float).permute(2, 0, 1)
    results = scan_batch([gray, rgb, rgba, as_float, tensor, chw], code)
    assert all(r.decoded and r.module_accuracy == 1.0 for r in results)
    assert np.array_equal(to_uint8_rgb(rgba), rgb)
    batch = torch.from_numpy(np.stack([as_float, np.full_like(as_float, 0.5)]))
    reward = scan_reward(batch, code)
    assert isinstance(reward, Reward) and reward.batch_size == 2
    assert set(reward.components) == {"decoded", "module_accuracy", "scan_score"}
    assert list(reward.components["decoded"]) == [1.0, 0.0]
    assert np.array_equal(reward.total, reward.components["scan_score"])
    assert reward.details[0]["decoder"] == "zxing" and reward.details[0]["text"] == PAYLOAD
    assert reward.details[1] == {"decoder": None, "variant": None, "text": None}
    # one code per image
    other = encode("other", module_px=4)
    rs = scan_batch([rgb, other.render()], [code, other])
    assert all(r.decoded for r in rs)
    with pytest.raises(QRRLError, match="2 images but 3 QR codes"):
        scan_batch([rgb, rgb], [code, code, code])


def test_no_code_and_wrong_payload():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    assert decode(noise).decoded is False
    assert decode(np.full((64, 64), 255, np.uint8), PAYLOAD).decoded is False
    other = encode("something else entirely, much longer", module_px=4)
    res = decode(other.render(), PAYLOAD)
    assert not res.decoded and res.text == other.payload
    anything = decode(other.render())  # no payload: any read counts
    assert anything.decoded and anything.text == other.payload
    scan = scan_image(other.render(), encode(PAYLOAD, module_px=4, version=other.version))
    assert not scan.decoded and scan.text == other.payload and scan.scan_score <= 0.6
    assert scan.to_json()["text"] == other.payload and "overlay" not in scan.to_json()


def test_exhaustive_lists_every_decoder():
    code = encode(PAYLOAD, module_px=6)
    res = scan_image(code.render(), code, exhaustive=True)
    assert res.decoders == list(DEFAULT_DECODERS)
    assert decode(code.render(), PAYLOAD, decoders="zbar,opencv").decoders == ["zbar"]


def test_unknown_decoder():
    with pytest.raises(QRRLError, match="valid decoders are zxing, zbar, opencv"):
        decode(np.zeros((32, 32), np.uint8), decoders=["zxing", "quirc"])


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(QRRLError, match="broken.png"):
        load_image(bad)
    with pytest.raises(QRRLError, match="nope.png: no such image file"):
        load_image(tmp_path / "nope.png")
