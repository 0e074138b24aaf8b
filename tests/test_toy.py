"""The embedded toy model: its world, the shipped weights, and `qr-rl toy pretrain`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rl.errors import QRRLError
from rl.toy import world


def test_world_is_deterministic_and_tokenizes_like_open_clip():
    spec = world.parse_prompt("Yellow  rings on dark blue")
    assert spec.prompt == "yellow rings on dark blue"
    a, b = world.render_base(spec, 7), world.render_base(spec, 7)
    assert a.shape == (3, world.IMAGE_SIZE, world.IMAGE_SIZE) and np.array_equal(a, b)
    assert not np.array_equal(a, world.render_base(spec, 8))
    tok = world.tokenize(["yellow rings on dark blue", ""])
    assert tok.shape == (2, world.CONTEXT_LENGTH)
    assert int(tok[0].argmax()) == 6 and int(tok[1].argmax()) == 1  # EOT is the largest id (open_clip pooling)
    assert len(world.all_specs()) == 240
    with pytest.raises(QRRLError, match="not in the toy world"):
        world.parse_prompt("blue cats on the moon")


def test_blend_weight_controls_scannability():
    """The world's premise: a stronger blend scans more often (what the ControlNet learns)."""
    from rl.scan import scan_batch

    rng = np.random.default_rng(0)
    _, base = world.random_batch(rng, 12)
    codes = [world.toy_code(world.random_payload(rng)) for _ in range(12)]
    light = torch.stack([world.code_image(c, world.IMAGE_SIZE) for c in codes])
    rates = []
    for w in (0.1, 0.7):
        img = world.blend(torch.from_numpy(base), light, w)
        res = scan_batch((img.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), codes, overlay=False)
        rates.append(np.mean([r.decoded for r in res]))
    assert rates[0] <= 0.25 and rates[1] == 1.0
    assert world.hint_image(codes[0]).shape == (3, 8 * world.LATENT_SIZE, 8 * world.LATENT_SIZE)


@pytest.fixture(scope="module")
def shipped():
    from rl.toy.model import ToyModel

    return ToyModel.load()


def test_shipped_weights_load_and_reproduce_checksum(shipped):
    from rl.toy.model import ASSETS, FILES, sample_checksum

    size = sum((ASSETS / f).stat().st_size for f in FILES.values())
    assert size <= 20 * 2**20, f"shipped toy weights are {size / 2**20:.1f} MB (> 20 MB)"
    ref = shipped.info["checksum"]
    got = sample_checksum(shipped)
    assert got["seeds"] == ref["seeds"] and got["strength"] == ref["strength"]
    # rounded statistics: identical on one machine, within float noise across BLAS builds
    np.testing.assert_allclose(got["per_image_means"], ref["per_image_means"], atol=3e-3)
    np.testing.assert_allclose(got["channel_means"], ref["channel_means"], atol=3e-3)
    assert abs(got["std"] - ref["std"]) < 3e-3


def test_sampling_keeps_a_trainable_controlnet_trainable(shipped):
    """Sampling with a ControlNet that is being trained leaves its requires_grad flags alone."""
    import copy

    from rl.toy.model import eval_prompts_codes, sample

    cn = copy.deepcopy(shipped.controlnet)
    cn.requires_grad_(False)
    cn.controlnet_mid_block.requires_grad_(True)
    before = {n: p.requires_grad for n, p in cn.named_parameters()}
    prompts, codes, _ = eval_prompts_codes(1)
    out = sample(shipped, prompts, codes, [5], shipped.demo_strength, controlnet=cn, record=False, steps=2)
    assert out.images.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert {n: p.requires_grad for n, p in cn.named_parameters()} == before
    assert any(before.values()) and not all(before.values())


def test_per_step_and_per_sample_strength_schedules(shipped):
    """``sample`` takes a number, one strength per step or one schedule per sample; the same
    curve given each way draws the same images, and each sample's row reaches that sample."""
    from rl.errors import QRRLError
    from rl.toy.model import eval_prompts_codes, sample

    prompts, codes, _ = eval_prompts_codes(2)
    curve = [0.2, 0.4, 0.8]
    a = sample(shipped, prompts, codes, [3, 4], curve, steps=3)
    b = sample(shipped, prompts, codes, [3, 4], torch.tensor([curve, curve]), steps=3)
    assert torch.equal(a.images, b.images)
    assert a.record.strength.tolist() == pytest.approx(curve) and b.record.strength.shape == (2, 3)
    c = sample(shipped, prompts, codes, [3, 4], torch.tensor([curve, [0.0, 0.0, 0.0]]), steps=3)
    assert torch.equal(c.images[0], a.images[0]) and not torch.equal(c.images[1], a.images[1])
    with pytest.raises(QRRLError, match="one schedule per sample"):
        sample(shipped, prompts, codes, [3, 4], [0.4, 0.4], steps=3)


def test_shipped_model_strength_ordering(shipped):
    """Without ControlNet: never scans; demo strength: rarely; high strength: almost always, less art."""
    from rl.toy.model import measure, sample

    seeds = list(range(900, 916))
    from rl.toy.model import eval_prompts_codes

    prompts, codes, _ = eval_prompts_codes(len(seeds))
    scorer = shipped.clip_scorer()
    base = sample(shipped, prompts, None, seeds, 0.0, record=False).images
    from rl.scan import scan_reward
    from rl.toy.model import images_hwc_uint8

    none = scan_reward(images_hwc_uint8(base), codes).components["decoded"].mean()
    low = measure(shipped, shipped.demo_strength, seeds, scorer=scorer, base_images=base)
    high = measure(shipped, shipped.high_strength, seeds, scorer=scorer, base_images=base)
    assert none == 0.0
    assert low["decode_rate"] <= 0.45, low["decode_rate"]
    assert high["decode_rate"] >= 0.8, high["decode_rate"]
    assert high["art_similarity"] < low["art_similarity"]
    assert low["module_accuracy"] < high["module_accuracy"]


def test_pretrain_command_writes_a_loadable_model(tmp_path, capsys):
    from rl.cli import main
    from rl.toy.model import ToyModel, sample

    out = tmp_path / "toy"
    rc = main(["toy", "pretrain", "--out", str(out), "--steps", "2", "--batch-size", "2",
               "--calibrate-samples", "0", "--no-progress"])
    assert rc == 0
    info = json.loads((out / "toy.json").read_text())
    assert info["training"]["unet_steps"] == 2 and "checksum" in info
    model = ToyModel.load(out)
    got = sample(model, ["red stripes on gray"], [world.toy_code("HI")], [3], 0.5, steps=3)
    assert got.images.shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert got.record.x.shape == (1, 4, world.LATENT_CHANNELS, world.LATENT_SIZE, world.LATENT_SIZE)
    assert torch.isfinite(got.images).all()

    # `qr-rl toy calibrate` measures the dial and rewrites only toy.json
    weights = (out / "unet.safetensors").read_bytes()
    assert main(["toy", "calibrate", "--model", str(out), "--samples", "2"]) == 0
    info = json.loads((out / "toy.json").read_text())
    assert [row["strength"] for row in info["calibration"]] == [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2]
    assert all(row["n"] == 2 for row in info["calibration"])
    assert info["checksum"]["strength"] == info["strengths"]["demo"]
    assert 0 < info["strengths"]["demo"] <= info["strengths"]["high"]
    assert (out / "unet.safetensors").read_bytes() == weights
    assert main(["toy", "calibrate", "--model", str(out), "--samples", "0"]) == 2
    assert main(["toy", "calibrate", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "at least 1 sample" in err and "qr-rl toy pretrain" in err


def test_pretrain_rejects_bad_arguments(tmp_path, capsys):
    from rl.cli import main

    assert main(["toy", "pretrain", "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert "--unet-steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(QRRLError, match="qr-rl toy pretrain"):
        from rl.toy.model import ToyModel

        ToyModel.load(tmp_path)
