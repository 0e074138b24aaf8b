"""The tiny SD1.5 test weights: ldm key layout, and diffusers reads them back exactly.

diffusers' own ldm -> diffusers converter (``from_single_file``) is an independent check of
our diffusers -> ldm conversion: a round trip must give back the very same tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from rl.testing import tiny_sd
from rl.testing.tiny_sd import (
    build_tiny_controlnet_model,
    build_tiny_unet,
    clip_l_text_config,
    ensure_torchvision_importable,
    sd15_vae_config,
    tiny_sd15_unet_config,
    unet_diffusers_to_ldm,
)

ensure_torchvision_importable()


def _keys(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _assert_same(loaded: dict, reference: dict) -> None:
    assert set(loaded) == set(reference), set(loaded) ^ set(reference)
    for k, v in reference.items():
        expected = v.to(torch.float16).float() if v.is_floating_point() else v
        assert torch.equal(loaded[k].float() if v.is_floating_point() else loaded[k], expected), k


def test_checkpoint_has_sd15_ldm_layout(tiny_sd_files):
    keys = _keys(tiny_sd_files.checkpoint)
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert all(
        k.startswith(
            ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
        )
        for k in keys
    )
    # What ComfyUI's SD1.5 detection reads: model_channels 320, context_dim 768, conv proj_in.
    assert keys["model.diffusion_model.input_blocks.0.0.weight"][0] == (320, 4, 3, 3)
    assert keys["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][0] == (
        320,
        768,
    )
    assert len(keys["model.diffusion_model.input_blocks.1.1.proj_in.weight"][0]) == 4
    assert "model.diffusion_model.middle_block.2.out_layers.3.weight" in keys
    assert "model.diffusion_model.out.2.weight" in keys
    # Full VAE (ldm names, attention as 1x1 convs) and full CLIP-L (12 layers, 77 positions).
    assert keys["first_stage_model.decoder.mid.attn_1.q.weight"][0] == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in keys
    assert "first_stage_model.encoder.down.3.block.1.norm2.weight" in keys
    text = "cond_stage_model.transformer.text_model."
    assert keys[text + "embeddings.position_embedding.weight"][0] == (77, 768)
    assert text + "encoder.layers.11.mlp.fc2.weight" in keys
    assert not any("down_blocks" in k or "resnets" in k for k in keys), "diffusers-style key left over"
    assert {dtype for _, dtype in keys.values()} == {"F16"}


def test_unet_and_vae_round_trip_through_diffusers(tiny_sd_files):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = str(tiny_sd_files.config_dir)
    unet = UNet2DConditionModel.from_single_file(str(tiny_sd_files.checkpoint), config=cfg, subfolder="unet")
    _assert_same(unet.state_dict(), build_tiny_unet(0).state_dict())
    vae = AutoencoderKL.from_single_file(str(tiny_sd_files.checkpoint), config=cfg, subfolder="vae")
    torch.manual_seed(1)  # the builder's VAE seed
    _assert_same(vae.state_dict(), AutoencoderKL(**sd15_vae_config()).state_dict())


def test_text_encoder_keys_load_into_clip_l(tiny_sd_files):
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = "cond_stage_model.transformer."
    sd = {
        k[len(prefix) :]: v
        for k, v in load_file(str(tiny_sd_files.checkpoint)).items()
        if k.startswith(prefix)
    }
    model = CLIPTextModel(CLIPTextConfig(**clip_l_text_config()))
    expected = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5.6
        sd = {k[len("text_model.") :]: v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("position_ids")]


def test_controlnet_loads_back_and_strength_matters(tiny_sd_files):
    from diffusers import ControlNetModel

    keys = _keys(tiny_sd_files.controlnet)
    assert all(k.startswith("control_model.") for k in keys)
    assert (
        "control_model.zero_convs.1.0.weight" in keys and "control_model.input_hint_block.14.weight" in keys
    )
    cfg = str(tiny_sd_files.config_dir)
    controlnet = ControlNetModel.from_single_file(
        str(tiny_sd_files.controlnet), config=cfg, subfolder="controlnet"
    )
    controlnet = controlnet.float().eval()
    _assert_same(controlnet.state_dict(), build_tiny_controlnet_model(None, 0).state_dict())

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)
    hint = (torch.rand(1, 3, 64, 64, generator=gen) > 0.5).float()
    with torch.no_grad():
        full = controlnet(x, 500, context, controlnet_cond=hint, conditioning_scale=1.0, return_dict=False)
        half = controlnet(x, 500, context, controlnet_cond=hint, conditioning_scale=0.5, return_dict=False)
    residuals = [*full[0], full[1]]
    assert len(residuals) == 3  # conv_in, the one res block (no downsampler), mid block
    assert all(r.abs().mean() > 1e-3 for r in residuals), [r.abs().mean().item() for r in residuals]
    torch.testing.assert_close(half[1], 0.5 * full[1])


def test_conversion_handles_down_and_upsamplers(tmp_path):
    """The shipped UNet has one level; check the multi-level numbering on a small 2-level one."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    config = {
        **tiny_sd15_unet_config(),
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
    }
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**config)
    ldm = unet_diffusers_to_ldm(unet.state_dict(), config)
    assert "input_blocks.3.0.op.weight" in ldm  # level 0 downsampler after 2 res blocks
    assert "output_blocks.2.1.conv.weight" in ldm  # level 0 (deepest, no attention) upsampler
    save_file(
        {"model.diffusion_model." + k: v.contiguous() for k, v in ldm.items()}, tmp_path / "u.safetensors"
    )
    (tmp_path / "cfg" / "unet").mkdir(parents=True)
    (tmp_path / "cfg" / "unet" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", **config})
    )
    back = UNet2DConditionModel.from_single_file(
        str(tmp_path / "u.safetensors"), config=str(tmp_path / "cfg"), subfolder="unet"
    )
    sd = unet.state_dict()
    assert all(torch.equal(back.state_dict()[k], sd[k]) for k in sd)


def test_fingerprint_tracks_recipe():
    assert tiny_sd.tiny_sd_fingerprint(0) == tiny_sd.tiny_sd_fingerprint(0)
    assert tiny_sd.tiny_sd_fingerprint(0) != tiny_sd.tiny_sd_fingerprint(1)
    assert tiny_sd.tiny_sd_fingerprint(0, torch.float16) != tiny_sd.tiny_sd_fingerprint(0, torch.float32)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_build_tiny_controlnet_layouts(tmp_path, layout):
    path = tiny_sd.build_tiny_controlnet(tmp_path / f"{layout}.safetensors", layout=layout)
    keys = _keys(path)
    marker = "control_model.zero_convs.0.0.weight" if layout == "ldm" else "controlnet_down_blocks.0.weight"
    assert marker in keys
    with pytest.raises(ValueError, match="layout"):
        tiny_sd.build_tiny_controlnet(tmp_path / "x.safetensors", layout="pth")
