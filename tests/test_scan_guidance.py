"""Scan guidance: the Gauss-Newton nudge puts wrong modules on their side, leaves right ones alone,
makes a faint code scan with the real decoders, and refuses settings that cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl.errors import QRRLError
from rl.module_feedback import light_grids, module_luma
from rl.scan import scan_reward
from rl.scan_guidance import ScanGuidance, guide, margin_loss
from rl.toy import world

PX = 4  # pixels per module in these hand-made pictures


def _code(payload: str = "GUIDE-1"):
    return world.toy_code(payload)


def _pictures(code, faint: float, seed: int = 0) -> torch.Tensor:
    """A smooth two-colour 'art' with the code added at amplitude ``faint`` (too weak to scan)."""
    n = code.module_grid().shape[0] * PX
    g = torch.Generator().manual_seed(seed)
    blobs = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 5, generator=g), size=(n, n), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
    colour = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1)
    art = 0.25 + 0.5 * blobs * colour + 0.2 * (1 - blobs)
    code_img = world.code_image(code, n)[None].expand(-1, 3, -1, -1)
    return (art + faint * (code_img - 0.5)).clamp(0, 1)


def _decode(z: torch.Tensor) -> torch.Tensor:
    return z.clamp(0, 1)


def _uint8(images: torch.Tensor) -> np.ndarray:
    up = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    return (up.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_a_faint_code_scans_after_guidance_with_the_real_decoders():
    code = _code()
    light = light_grids([code])
    img = _pictures(code, faint=0.03)
    assert float(scan_reward(_uint8(img), [code]).components["decoded"][0]) == 0.0
    guided, loss = guide(img, _decode, light, ScanGuidance(scale=1.0, margin=0.1, iterations=3))
    assert float(margin_loss(guided, light, 0.1)) < 0.05 * float(margin_loss(img, light, 0.1))
    assert float(scan_reward(_uint8(guided), [code]).components["decoded"][0]) == 1.0
    assert loss.shape == (1,) and torch.isfinite(loss).all()


def test_modules_already_on_their_side_are_left_alone():
    code = _code()
    light = light_grids([code])
    img = _pictures(code, faint=0.15)
    guided, _ = guide(img, _decode, light, ScanGuidance(scale=1.0, margin=0.05, iterations=1))
    moved = (guided - img).abs().sum(1)[0]  # [H,W]
    per_module = torch.nn.functional.avg_pool2d(moved[None, None], PX)[0, 0]
    lum = module_luma(img, light.shape[-1])[0]
    lt = light[0]
    thr = 0.5 * (lum[lt > 0].mean() + lum[lt == 0].mean())
    signed = (lum - thr) * (2 * lt - 1)
    right, wrong = signed > 0.05 + 1e-3, signed < 0.05 - 1e-3
    assert right.any() and wrong.any()
    assert per_module[right].max() < 1e-6  # right modules: untouched
    assert per_module[wrong].min() > 0  # every wrong one moved


def test_the_window_selects_steps():
    g = ScanGuidance(start=0.5, end=1.0)
    assert [g.active(k, 10) for k in range(10)] == [False] * 5 + [True] * 5
    assert [ScanGuidance(start=0.95).active(k, 10) for k in range(10)] == [False] * 9 + [True]
    assert not ScanGuidance(scale=0.0).active(9, 10)


@pytest.mark.parametrize("kw, words", [
    ({"scale": -1}, "scale"), ({"scale": float("nan")}, "finite"), ({"margin": 0.6}, "margin"),
    ({"start": 0.8, "end": 0.5}, "window"), ({"iterations": 0}, "iterations"),
])
def test_settings_that_cannot_work_are_refused(kw, words):
    with pytest.raises(QRRLError, match=words):
        ScanGuidance(**kw)


def test_bad_inputs_get_clear_errors():
    code = _code()
    light = light_grids([code])
    img = _pictures(code, faint=0.03)
    with pytest.raises(QRRLError, match="square"):
        guide(img[..., :-4], _decode, light, ScanGuidance())
    with pytest.raises(QRRLError, match="one QR code per image"):
        guide(torch.cat([img, img]), _decode, light, ScanGuidance())
    with pytest.raises(QRRLError, match="does not respond"):
        guide(img, lambda z: 0.0 * z + 0.5, light, ScanGuidance())


def test_a_step_that_blows_up_is_stopped_not_returned_as_nan():
    code = _code()
    light = light_grids([code])
    img = _pictures(code, faint=0.0)

    with pytest.raises(QRRLError, match="non-finite"):  # a decoder whose response overflows float32
        guide(img, lambda z: z * 1e30, light, ScanGuidance(scale=4.0, margin=0.4))
    with pytest.raises(QRRLError, match="already non-finite"):
        guide(img * float("nan"), _decode, light, ScanGuidance())


def test_toy_sampler_scans_more_with_guidance_and_records_the_guided_predictions():
    from rl.toy.model import ToyModel, eval_prompts_codes, images_hwc_uint8, latents_to_images, sample

    model = ToyModel.load()
    prompts, codes, _ = eval_prompts_codes(12)
    seeds = list(range(70_000, 70_012))
    plain = sample(model, prompts, codes, seeds, 0.4, record=False)
    g = sample(model, prompts, codes, seeds, 0.4, record=True, guidance=ScanGuidance(start=0.95, margin=0.05))
    dec = [float(scan_reward(images_hwc_uint8(x.images), codes).components["decoded"].mean()) for x in (plain, g)]
    assert dec[1] >= dec[0] + 0.25
    # the last step is deterministic: the image is the recorded (guided) prediction
    assert torch.allclose(latents_to_images(g.record.denoised[:, -1]), g.images, atol=1e-6)
    assert torch.allclose(g.record.denoised[:, :-1].float(), sample(
        model, prompts, codes, seeds, 0.4, record=True).record.denoised[:, :-1].float(), atol=1e-5)
