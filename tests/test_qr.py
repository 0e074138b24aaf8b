"""rl.qr: encoding, region map, rendering, metadata and every user error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rl.errors import QRRLError
from rl.qr import (
    ECC_LEVELS,
    MONSTER_V2_LIGHT,
    REGION_IDS,
    REGIONS,
    QRCode,
    capacity,
    code_from_hint,
    encode,
    parse_colour,
)


def test_explicit_parameters_are_honoured_and_ecc_is_not_boosted():
    code = encode("hi", ecc="L", version=3, mask=5, module_px=3, border=2)
    assert (code.version, code.ecc, code.mask) == (3, "L", 5)  # "hi" would fit H: no silent boost
    assert code.size == 29 and code.modules.shape == code.regions.shape == (29, 29)
    assert code.modules.dtype == np.bool_ and code.regions.dtype == np.uint8
    assert code.image_size == (29 + 4) * 3
    assert ECC_LEVELS == ("L", "M", "Q", "H") and len(REGIONS) == 8


def test_region_map():
    code = encode("region map", ecc="H", version=7)
    r = code.regions
    assert np.all(r[:7, :7] == REGION_IDS["finder"]) and np.all(r[-7:, :7] == REGION_IDS["finder"])
    assert r[7, 0] == REGION_IDS["separator"]
    timing_row = r[6, 8:-8]
    assert np.all((timing_row == REGION_IDS["timing"]) | (timing_row == REGION_IDS["alignment"]))
    assert (timing_row == REGION_IDS["timing"]).sum() > 20
    assert r[8, 0] == REGION_IDS["format"]
    assert r[4 * 7 + 9, 8] == REGION_IDS["dark_module"] and code.modules[4 * 7 + 9, 8]
    assert (r == REGION_IDS["version"]).sum() == 36  # two 6x3 blocks from version 7 on
    assert (r == REGION_IDS["alignment"]).sum() == 6 * 25
    assert (r == REGION_IDS["data"]).sum() > 1000
    # the finder's 7x7 ring is dark, its inner ring light
    assert code.modules[0, :7].all() and not code.modules[1, 1:6].any()


def test_render_mask_and_colours():
    code = encode("colours", module_px=2, border=1, dark="#123", light=MONSTER_V2_LIGHT)
    img = code.render()
    assert img.shape == (code.image_size, code.image_size, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (128, 128, 128)  # quiet zone is light
    assert tuple(img[2, 2]) == (0x11, 0x22, 0x33)  # top-left finder corner
    mask = code.mask_image()
    assert mask.shape == img.shape[:2] and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0} and mask[2, 2] == 1.0 and mask[0, 0] == 0.0


@pytest.mark.parametrize(
    ("text", "rgb"),
    [("#FF8000", (255, 128, 0)), ("#f80", (255, 136, 0)), ("10, 20,30", (10, 20, 30)),
     ("gray", (128, 128, 128)), ("Black", (0, 0, 0)), ("white", (255, 255, 255))],
)
def test_parse_colour(text, rgb):
    assert parse_colour(text) == rgb


def test_metadata_roundtrip_and_tamper_check():
    code = encode("metadata", ecc="Q", light="gray", module_px=5)
    meta = json.loads(json.dumps(code.to_metadata()))
    again = QRCode.from_metadata(meta)
    assert again == code and np.array_equal(again.modules, code.modules)
    assert meta["light"] == "#808080" and meta["size"] == code.size
    meta["matrix"] = "00" + meta["matrix"][2:]
    with pytest.raises(QRRLError, match="matrix differs"):
        QRCode.from_metadata(meta)


@pytest.mark.parametrize("light", ["#FFFFFF", MONSTER_V2_LIGHT])
def test_code_from_hint(light):
    code = encode("https://example.com/from-hint", ecc="Q", mask=6, module_px=5, border=3, light=light)
    found = code_from_hint(code.render(), code.payload)
    assert found == code
    with pytest.raises(QRRLError, match="no ECC/mask"):
        code_from_hint(code.render(), "another payload")


@pytest.mark.parametrize(("version", "ecc"), [(1, "H"), (9, "M"), (10, "L"), (27, "Q")])
def test_capacity_matches_the_encoder(version, ecc):
    n = capacity(version, ecc)
    assert encode("x" * n, ecc=ecc, version=version).version == version
    with pytest.raises(QRRLError, match=f"at most {n} bytes"):
        encode("x" * (n + 1), ecc=ecc, version=version)


def test_capacity_table():
    assert capacity(1, "H") == 7 and capacity(1, "L") == 17 and capacity(40, "L") == 2953
    assert capacity(1, "L", "numeric") == 41 and capacity(1, "L", "alphanumeric") == 25


def test_too_long_for_version_names_capacity_and_smallest_version():
    with pytest.raises(QRRLError) as err:
        encode("x" * 30, ecc="H", version=2)
    msg = str(err.value)
    assert "30 bytes" in msg and "at most 14 bytes" in msg and "smallest version that fits at ECC H is 4" in msg


def test_too_long_even_for_v40():
    with pytest.raises(QRRLError) as err:
        encode("x" * 1300, ecc="H")
    msg = str(err.value)
    assert "even version 40 at ECC H holds only 1273 bytes" in msg and "use ECC Q" in msg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"payload": ""}, "payload is empty"),
        ({"ecc": "X"}, "L, M, Q, H"),
        ({"version": 0}, "1-40"),
        ({"version": 41}, "1-40"),
        ({"mask": 8}, "0-7"),
        ({"module_px": 0}, "module_px"),
        ({"border": -1}, "border"),
        ({"dark": "blue"}, "#RRGGBB"),
        ({"light": "300,0,0"}, "r,g,b"),
        ({"light": "#12345"}, "#RGB"),
    ],
)
def test_errors(kwargs, match):
    args = {"payload": "ok"} | kwargs
    with pytest.raises(QRRLError, match=match):
        encode(**args)
