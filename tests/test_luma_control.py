"""Luma-only control (rl.luma_control): the ControlNet's change to a prediction keeps its luma and
loses its colour, exactly, on the real toy model; shards name it and the trainer replays it."""

from __future__ import annotations

import json

import pytest
import torch


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def test_luma_only_keeps_the_luma_and_drops_the_colour():
    from rl.errors import QRRLError
    from rl.luma_control import folded_luma_projection, luma_only

    delta = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grey = luma_only(delta)
    assert torch.allclose(_luma(grey), _luma(delta), atol=1e-6)  # the same brightness change ...
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])  # ... in grey
    # folded latents (the toy's 2×2 pixel unshuffle): the same projection, pixel for pixel
    folded = torch.nn.functional.pixel_unshuffle(delta, 2)
    unfolded = torch.nn.functional.pixel_shuffle(folded_luma_projection(2)(folded), 2)
    assert torch.allclose(unfolded, grey, atol=1e-6)
    with pytest.raises(QRRLError, match="12 channels"):
        folded_luma_projection(2)(torch.zeros(1, 4, 8, 8))
    with pytest.raises(QRRLError, match=r"\[B,3,H,W\]"):
        luma_only(torch.zeros(1, 4, 8, 8))


def test_the_toy_policy_changes_only_the_luma_of_its_prediction():
    """D = D_art + Y(D_cn − D_art): its colour (RGB minus luma) is the art's, its luma the ControlNet's."""
    from rl.toy import world
    from rl.toy.model import ToyModel, latents_to_images, sampling_schedule

    model = ToyModel.load()
    prompts = ["pink dots on dark green", "cyan checks on dark blue"]
    cond, uncond = model.encode_prompts(prompts)
    hints = torch.stack([world.hint_image(world.toy_code(p)) for p in ("HELLO", "QR-RL")])
    sigmas, timesteps = sampling_schedule(model.steps)
    x = torch.randn(2, world.LATENT_CHANNELS, world.LATENT_SIZE, world.LATENT_SIZE,
                    generator=torch.Generator().manual_seed(1)) * float(sigmas[3])
    args = (x, float(sigmas[3]), timesteps[3], cond, uncond, hints)
    plain, luma = model.policy(), model.policy(luma_control=True)
    with torch.no_grad():
        d_cn, d_art, d = plain.denoise(*args, 0.8, 1.0), plain.denoise(*args, 0.0, 1.0), luma.denoise(*args, 0.8, 1.0)
        assert torch.equal(luma.denoise(*args, 0.0, 1.0), d_art)  # no ControlNet: nothing to project, one pass
    rgb = {k: torch.nn.functional.pixel_shuffle(v, world.LATENT_FACTOR) for k, v in
           {"cn": d_cn, "art": d_art, "luma": d}.items()}  # linear in the latent: compare before clamping

    def chroma(v):
        return v - _luma(v)[:, None]

    assert torch.allclose(_luma(rgb["luma"]), _luma(rgb["cn"]), atol=1e-5)
    assert torch.allclose(chroma(rgb["luma"]), chroma(rgb["art"]), atol=1e-5)
    assert not torch.allclose(chroma(rgb["cn"]), chroma(rgb["art"]), atol=1e-3)  # the ControlNet does move colour
    assert latents_to_images(d).shape == (2, 3, 64, 64)


def test_the_trainer_rebuilds_the_projection_a_shard_names_and_refuses_mixtures(tmp_path):
    """The shard names its projection, the trainer rebuilds it (the replay itself, with drift < 1e-3, is
    test_demo.py::test_schedule_only_and_plain_runs); unknown or mixed settings are refused."""
    from rl.cli import main
    from rl.errors import QRRLError
    from rl.luma_control import projection_from_meta, projection_meta
    from rl.toy.model import ToyModel
    from rl.train import TrainConfig, train
    from rl.trajectory import read_shard, write_shard

    assert projection_from_meta(None) is None and projection_from_meta(projection_meta(2)) is not None
    with pytest.raises(QRRLError, match="unknown luma control"):
        projection_from_meta({"kind": "vae_luma", "factor": 8})
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--rounds", "1", "--hold-rounds", "1", "--eval-samples", "4", "--out", str(out),
                 "--no-progress"]) == 0
    path = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])["shard"]
    shard = read_shard(path)
    assert shard.meta["luma_control"] == projection_meta(2)
    shard.meta["luma_control"] = None  # the same data, claiming the plain sampler: not one setting
    write_shard(shard, tmp_path / "mixed", "plain")
    write_shard(read_shard(path), tmp_path / "mixed", "luma")
    model = ToyModel.load()
    tc = TrainConfig(trajectories=[str(tmp_path / "mixed")], out=str(tmp_path / "trained.safetensors"),
                     checkpoint=str(model.unet_path), controlnet=str(model.controlnet_path),
                     unet_config=model.unet_config_path, controlnet_config=model.controlnet_config_path,
                     mode="zero_convs", cpu=True, progress=False)
    with pytest.raises(QRRLError, match="one sampler setting"):
        train(tc)


SD15_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
SDXL_RGB = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]


@pytest.mark.parametrize("factors", [SD15_RGB, SDXL_RGB], ids=["sd15", "sdxl"])
def test_latent_luma_projection_keeps_the_preview_luma_and_drops_its_colour(factors):
    """VAE latents: through the linear latent→RGB map (ComfyUI's preview colours) the projected change is
    grey with the original's luma; the projection is idempotent and what a shard records rebuilds it."""
    from rl.luma_control import (
        latent_luma_projection,
        latent_projection_meta,
        projection_from_meta,
        projection_leak,
    )

    project = latent_luma_projection(factors)
    m = project.matrix
    assert torch.allclose(m @ m, m, atol=1e-12) and int(torch.linalg.matrix_rank(m)) == 1
    f = torch.tensor(factors)
    delta = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def rgb(z):
        return torch.einsum("bchw,cd->bdhw", z, f)

    before, after = rgb(delta), rgb(project(delta))
    assert torch.allclose(_luma(after), _luma(before), atol=1e-5)
    assert torch.allclose(after[:, 0], after[:, 1], atol=1e-5) and torch.allclose(after[:, 1], after[:, 2], atol=1e-5)
    leak = projection_leak(project, factors)
    assert leak["chroma_leak"] < 1e-12 and leak["luma_error"] < 1e-12  # exact through the linear map (float64)
    assert 0.05 < leak["chroma_removed"] < 0.5  # a random latent change is partly colour: that part goes
    spec = latent_projection_meta(factors, [0.1, 0.0, -0.1])
    assert json.loads(json.dumps(spec)) == spec and spec["kind"] == "latent_luma"
    assert torch.equal(projection_from_meta(spec)(delta), project(delta))  # the bias cancels in a difference


def test_latent_luma_projection_refuses_what_it_cannot_use():
    from rl.errors import QRRLError
    from rl.luma_control import latent_luma_projection, projection_from_meta

    with pytest.raises(QRRLError, match="latent→RGB approximation"):
        latent_luma_projection(None)
    with pytest.raises(QRRLError, match=r"\[C, 3\]"):
        latent_luma_projection([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(QRRLError, match="rank < 3"):
        latent_luma_projection([[1.0, 1.0, 1.0]] * 4)
    with pytest.raises(QRRLError, match="bias"):
        latent_luma_projection(SD15_RGB, [0.0, float("nan"), 0.0])
    with pytest.raises(QRRLError, match="4 channels"):
        latent_luma_projection(SD15_RGB)(torch.zeros(1, 16, 8, 8))
    with pytest.raises(QRRLError, match="unknown luma control"):
        projection_from_meta({"kind": "latent_luma"})
