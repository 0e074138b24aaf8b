"""Tiny random-weight Stable Diffusion 1.5 models in the file layouts ComfyUI loads.

Why: no real weights exist on test machines (and a full random SD1.5 is ~2 GB). ComfyUI
recognises SD1.5 from the UNet's ``model_channels`` (320) and ``context_dim`` (768) only; depth
and the number of resolution levels are free. So the UNet here has one level, one res block and
one cross-attention transformer, while the CLIP-L text encoder and the VAE keep their standard
(fixed) configs -- ComfyUI builds those from fixed configs and would leave missing weights
uninitialised.

Files written:
- checkpoint: one ``.safetensors`` in the original (ldm) single-file layout
  (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.text_model.*``);
- ControlNet: ldm layout (``control_model.*``) by default. ComfyUI only accepts the diffusers
  ControlNet layout for the full-size configs it knows, so a tiny one must be ldm; diffusers
  loads both (``ControlNetModel.from_single_file(path, config=<config dir>)``);
- a diffusers config folder (``unet/``, ``vae/``, ``text_encoder/``, ``controlnet/``,
  ``scheduler/``) so diffusers can load the files offline with ``from_single_file(...,
  config=folder, subfolder=...)``.

The diffusers -> ldm key tables live in :mod:`rl.weights` (the ControlNet export uses them too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .._compat import ensure_torchvision_importable
from ..files import atomic_dir, atomic_save_safetensors
from ..weights import clip_text_to_ldm, unet_diffusers_to_ldm, vae_diffusers_to_ldm

# Bump when the conversion or the weights' recipe changes: it is part of the cache key.
FORMAT_VERSION = 1
CONTROLNET_ZERO_CONV_STD = 0.05
CHECKPOINT_NAME = "tiny-sd15.safetensors"
CONTROLNET_NAME = "tiny-controlnet.safetensors"
CONFIG_DIR_NAME = "tiny-sd15-diffusers"


# --------------------------------------------------------------------------- configs


def tiny_sd15_unet_config() -> dict:
    """diffusers ``UNet2DConditionModel`` config: SD1.5 widths, one level, as shallow as allowed."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D"],
        "block_out_channels": [320],
        "layers_per_block": 1,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,  # diffusers' name for SD1.5's 8 heads
        "norm_num_groups": 32,
        "use_linear_projection": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


def sd15_vae_config() -> dict:
    """The standard SD1.x VAE (``AutoencoderKL``) config."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def clip_l_text_config() -> dict:
    """The CLIP ViT-L/14 text tower config (``transformers.CLIPTextConfig``) used by SD1.5."""
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


def sd15_scheduler_config() -> dict:
    """SD1.5's training noise schedule (scaled-linear betas, eps prediction)."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def tiny_sd_fingerprint(seed: int = 0, dtype: torch.dtype = torch.float16) -> str:
    """Short hash of everything that determines the files' bytes: the cache key."""
    blob = json.dumps(
        {
            "v": FORMAT_VERSION,
            "unet": tiny_sd15_unet_config(),
            "vae": sd15_vae_config(),
            "clip": clip_l_text_config(),
            "cn_std": CONTROLNET_ZERO_CONV_STD,
            "seed": seed,
            "dtype": str(dtype),
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- builders


def build_tiny_unet(seed: int = 0):
    """The tiny UNet2DConditionModel (fp32, random weights from ``seed``)."""
    ensure_torchvision_importable()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_sd15_unet_config()).eval()


def build_tiny_sd15_checkpoint(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a random SD1.5-layout single-file checkpoint (tiny UNet, full CLIP-L and VAE)."""
    ensure_torchvision_importable()
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    unet = build_tiny_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**sd15_vae_config()).eval()
    torch.manual_seed(seed + 2)
    text = CLIPTextModel(CLIPTextConfig(**clip_l_text_config())).eval()

    tensors: dict[str, torch.Tensor] = {}
    for k, v in unet_diffusers_to_ldm(unet.state_dict(), tiny_sd15_unet_config()).items():
        tensors["model.diffusion_model." + k] = v
    for k, v in vae_diffusers_to_ldm(vae.state_dict(), sd15_vae_config()).items():
        tensors["first_stage_model." + k] = v
    tensors.update(clip_text_to_ldm(text.state_dict()))
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v)
        for k, v in tensors.items()
        if not k.endswith("position_ids")
    }
    atomic_save_safetensors(tensors, path, {"format": "pt", "qr_rl_tiny_sd": tiny_sd_fingerprint(seed, dtype)})
    return path


def build_tiny_controlnet_model(unet_config: dict | None = None, seed: int = 0):
    """ControlNetModel copied from the tiny UNet (``seed``), zero convolutions re-randomised.

    A fresh ControlNet's output convolutions are zero, so its strength would change nothing;
    small random weights make the residuals -- and therefore ``strength`` -- matter.
    """
    ensure_torchvision_importable()
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or tiny_sd15_unet_config())).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        zero_layers = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        zero_layers.append(controlnet.controlnet_cond_embedding.conv_out)
        for layer in zero_layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * CONTROLNET_ZERO_CONV_STD)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * CONTROLNET_ZERO_CONV_STD)
    return controlnet


def build_tiny_controlnet(
    path: str | os.PathLike,
    unet_config: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    layout: str = "ldm",
) -> Path:
    """Write the tiny ControlNet as safetensors.

    ``layout="ldm"`` (``control_model.*``, what ComfyUI can load for a non-standard depth) or
    ``"diffusers"`` (ControlNetModel keys; ComfyUI only recognises these for the full-size
    SD1.5/SDXL configs, e.g. QR Code Monster).
    """
    if layout not in ("ldm", "diffusers"):
        raise ValueError(f"layout must be 'ldm' or 'diffusers', got {layout!r}")
    config = unet_config or tiny_sd15_unet_config()
    controlnet = build_tiny_controlnet_model(config, seed)
    sd = controlnet.state_dict()
    if layout == "ldm":
        sd = {"control_model." + k: v for k, v in unet_diffusers_to_ldm(sd, config).items()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    path = Path(path)
    atomic_save_safetensors(tensors, path, {"format": "pt", "qr_rl_tiny_sd": tiny_sd_fingerprint(seed, dtype)})
    return path


def write_diffusers_configs(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``unet/ vae/ text_encoder/ controlnet/ scheduler/`` configs for offline
    ``from_single_file(..., config=folder, subfolder=...)`` loads."""
    ensure_torchvision_importable()
    from diffusers import __version__ as diffusers_version

    folder = Path(folder)
    controlnet_cfg = dict(build_tiny_controlnet_model(tiny_sd15_unet_config(), seed).config)
    configs = {
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **tiny_sd15_unet_config()},
        "vae/config.json": {"_class_name": "AutoencoderKL", **sd15_vae_config()},
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **clip_l_text_config(),
        },
        "controlnet/config.json": {"_class_name": "ControlNetModel", **controlnet_cfg},
        "scheduler/scheduler_config.json": sd15_scheduler_config(),
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        },
    }
    for rel, cfg in configs.items():
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
        cfg = {**cfg, "_diffusers_version": diffusers_version} if "_class_name" in cfg else cfg
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=list))
    return folder


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class TinySD:
    """Paths of one built set of tiny models."""

    checkpoint: Path
    controlnet: Path
    config_dir: Path
    fingerprint: str


def default_cache_dir() -> Path:
    root = os.environ.get("QR_RL_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-qr-rl-tests"
    )
    return Path(root)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise builders across processes (parallel test runs share the cache)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps readers safe
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_sd(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> TinySD:
    """Build (once) and return the tiny checkpoint, ControlNet and config folder.

    The set lives in ``<cache>/<fingerprint>/`` and is published by renaming a finished
    temporary folder, so a reader never sees half-written files.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = tiny_sd_fingerprint(seed)
    final = cache / fp
    result = TinySD(final / CHECKPOINT_NAME, final / CONTROLNET_NAME, final / CONFIG_DIR_NAME, fp)
    if final.is_dir():
        return result
    with _locked(cache / f".{fp}.lock"):
        if final.is_dir():
            return result
        with atomic_dir(final) as tmp:
            start = time.perf_counter()
            build_tiny_sd15_checkpoint(tmp / CHECKPOINT_NAME, seed=seed)
            build_tiny_controlnet(tmp / CONTROLNET_NAME, seed=seed)
            write_diffusers_configs(tmp / CONFIG_DIR_NAME, seed=seed)
            (tmp / "build.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 2)}))
    return result
