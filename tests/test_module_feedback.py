"""Module feedback: the map finds the wrong modules, scales the ControlNet there, and makes the
shipped toy model scan more at the same base strength."""

from __future__ import annotations

import pytest
import torch

from rl.errors import QRRLError
from rl.module_feedback import (
    LatentFeedback,
    ModuleFeedback,
    latent_rgb,
    light_grids,
    scale_residual,
    strength_map,
    wrong_modules,
)
from rl.qr import encode
from rl.toy import world


def _code_images(codes, invert: bool = False) -> torch.Tensor:
    """The codes painted black on white, 4 pixels per module, [B,3,H,W]."""
    img = torch.stack([world.code_image(c, 4 * c.module_grid().shape[0]) for c in codes])
    img = (img > 0.5).float()
    return (1.0 - img if invert else img).expand(-1, 3, -1, -1)


def test_wrong_modules_are_found_and_get_the_high_gain():
    codes = [world.toy_code("ABC1"), world.toy_code("XYZ99")]
    light = light_grids(codes)
    assert light.shape == (2, 25, 25) and light[0, 0, 0] == 1.0  # quiet zone is light
    right = wrong_modules(_code_images(codes), light, margin=0.05, softness=0.03)
    wrong = wrong_modules(_code_images(codes, invert=True), light, margin=0.05, softness=0.03)
    assert right.max() < 0.01 and wrong.min() > 0.99
    # one image right, one inverted; per-sample gains
    images = torch.cat([_code_images(codes[:1]), _code_images(codes[1:], invert=True)])
    m = strength_map(images, light, torch.tensor([0.5, 0.5]), torch.tensor([3.0, 2.0]), 0.05, 0.03, size=32)
    assert m.shape == (2, 1, 32, 32)
    assert m[0].max() == pytest.approx(0.5, abs=0.01) and m[1].min() == pytest.approx(2.0, abs=0.01)


def test_scale_residual_takes_numbers_or_maps():
    r = torch.randn(2, 4, 8, 8)
    s = torch.tensor([0.5, 2.0])
    assert torch.allclose(scale_residual(r, s), r * s.view(-1, 1, 1, 1))
    flat = s.view(-1, 1, 1, 1).expand(2, 1, 32, 32)  # a constant map is the same as the number
    assert torch.allclose(scale_residual(r, flat), r * s.view(-1, 1, 1, 1), atol=1e-6)
    half = torch.ones(2, 1, 32, 32)
    half[..., :16] = 0.0  # a map zeroes exactly its half at every resolution
    out = scale_residual(r, half)
    assert out[..., :4].abs().max() == 0 and torch.equal(out[..., 4:], r[..., 4:])


def test_bad_settings_are_refused():
    with pytest.raises(QRRLError, match="gains must be >= 0"):
        ModuleFeedback(low=-0.1)
    with pytest.raises(QRRLError, match="margin"):
        ModuleFeedback(margin=0.7)
    with pytest.raises(QRRLError, match="softness"):
        ModuleFeedback(softness=0.0)
    with pytest.raises(QRRLError, match="finite"):
        ModuleFeedback(high=float("nan"))
    with pytest.raises(QRRLError, match="ramp is an exponent"):
        ModuleFeedback(ramp=-1.0)
    with pytest.raises(QRRLError, match="one size"):
        light_grids([world.toy_code("ABC1"), encode("ABC1", ecc="H", version=1, module_px=1, border=4)])


def test_feedback_makes_the_shipped_model_scan_more_at_the_same_strength():
    """At the demo strength, feedback raises module accuracy and decoding on fixed seeds; gains of
    1 reproduce the plain sampler exactly (the map multiplies the strength, nothing else)."""
    from rl.toy.model import ToyModel, eval_prompts_codes, measure, sample

    model = ToyModel.load()
    seeds = list(range(50_000, 50_016))
    scorer = model.clip_scorer()
    plain = measure(model, model.demo_strength, seeds, scorer=scorer)
    fed = measure(model, model.demo_strength, seeds, scorer=scorer, base_images=plain["base_images"],
                  feedback=ModuleFeedback())
    assert fed["module_accuracy"] > plain["module_accuracy"] + 0.04, (plain["module_accuracy"], fed["module_accuracy"])
    assert fed["decode_rate"] > plain["decode_rate"], (plain["decode_rate"], fed["decode_rate"])
    prompts, codes, _ = eval_prompts_codes(2)
    a = sample(model, prompts, codes, [1, 2], 0.5, steps=4, record=False)
    b = sample(model, prompts, codes, [1, 2], 0.5, steps=4, record=False, feedback=ModuleFeedback(low=1.0, high=1.0))
    assert torch.allclose(a.images, b.images, atol=1e-5)
    with pytest.raises(QRRLError, match="feedback_gains"):
        sample(model, prompts, codes, [1, 2], 0.5, steps=2, feedback=ModuleFeedback(), feedback_gains=torch.ones(3, 2))
    with pytest.raises(QRRLError, match="needs feedback"):
        sample(model, prompts, codes, [1, 2], 0.5, steps=2, feedback_gains=torch.ones(2, 2))


def test_policy_refuses_a_map_of_the_wrong_shape():
    from rl.toy.model import ToyModel, eval_prompts_codes

    model = ToyModel.load()
    prompts, codes, _ = eval_prompts_codes(2)
    cond, uncond = model.encode_prompts(prompts)
    hint = torch.stack([world.hint_image(c) for c in codes])
    x = torch.randn(2, world.LATENT_CHANNELS, world.LATENT_SIZE, world.LATENT_SIZE)
    with pytest.raises(QRRLError, match="strength_map must be"):
        model.policy().denoise(x, 1.0, 500, cond, uncond, hint, 0.5, 2.0, strength_map=torch.ones(2, 32, 32))


def test_the_wrong_module_push_ramps_over_the_run():
    fb = ModuleFeedback(ramp=1.0)
    assert [fb.contrast(k, 5) for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]  # mean 1
    assert ModuleFeedback(ramp=0.0).contrast(0, 5) == ModuleFeedback(ramp=0.0).contrast(4, 5) == 1.0
    codes = [world.toy_code("ABC1")]
    inverted = _code_images(codes, invert=True)
    late = strength_map(inverted, light_grids(codes), 0.8, 2.0, 0.05, 0.03, 32, contrast=2.0)
    assert late.min() == pytest.approx(0.8 + 2 * 1.2, abs=0.01)


def test_latent_feedback_reads_the_latent_through_linear_preview_colours():
    """The ComfyUI node's feedback: a 4-channel latent whose channel 0 is the image (preview
    factors take luma from it), two modules flipped: those two get the high gain next step."""
    code = world.toy_code("ABC1")
    light = light_grids([code, code])
    n = light.shape[-1]
    img = light.clone()
    img[1, 10, 12] = 1.0 - img[1, 10, 12]
    img[1, 3, 20] = 1.0 - img[1, 3, 20]
    lum = img.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2 latent pixels per module
    latents = torch.zeros(2, 4, 2 * n, 2 * n)
    latents[:, 0] = 2.0 * lum - 1.0
    factors = torch.zeros(4, 3)
    factors[0] = 1.0
    assert torch.allclose(latent_rgb(latents, factors)[:, 1], lum)
    fb = LatentFeedback(ModuleFeedback(low=0.5, high=3.0, ramp=1.0), light, factors)
    assert fb.map is None  # step 1 runs at gain 1
    fb.observe(latents, k=0, steps=3)  # the map for step 1 of 3: contrast (1+1)*(1/2) = 1
    m = fb.map
    assert m.shape == (2, 1, 2 * n, 2 * n)
    assert m[0].max() == pytest.approx(0.5, abs=1e-3)
    assert m[1, 0, 20, 24] == pytest.approx(3.0, abs=1e-3) and m[1, 0, 6, 40] == pytest.approx(3.0, abs=1e-3)
    assert int((m[1] > 1.0).sum()) == 2 * 4  # exactly the two flipped modules, 4 latent pixels each
    assert fb.wrong_fraction == [pytest.approx(1 / n**2)]  # mean over the batch: 2 of 2·n² modules
    with pytest.raises(QRRLError, match="square latent"):
        fb.observe(latents[..., :-2], k=1, steps=3)
    with pytest.raises(QRRLError, match=r"factors must be \[C=4, 3\]"):
        latent_rgb(latents, torch.zeros(3, 3))
