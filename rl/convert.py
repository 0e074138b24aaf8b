"""Local SD1.5 UNet / ControlNet files -> diffusers models, and ControlNet export layouts.

Why here and not ``from_single_file``: diffusers' loader fills missing weights silently (meta
init) and only warns about unexpected keys, so a wrong-architecture file would "load". We
use diffusers' own ldm -> diffusers key tables (``convert_ldm_unet_checkpoint``,
``convert_controlnet_checkpoint``) and then load *strictly*, turning every mismatch into a
``QRRLError`` that says what was expected and what was found. Configs come from local
folders (the SD1.5 ones ship in ``rl/configs``), so nothing touches the network.

Layouts recognised:
- UNet: a full single-file checkpoint (``model.diffusion_model.*``), a bare ldm UNet
  (``input_blocks.*``), or a diffusers UNet (``down_blocks.*``, ``conv_in.*``).
- ControlNet: ldm (``control_model.*`` or bare ``input_hint_block.*``) or diffusers
  (``controlnet_cond_embedding.*``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import QRRLError
from .files import sha256_file

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SD15_UNET_CONFIG = CONFIG_ROOT / "sd15_unet"
SD15_CONTROLNET_CONFIG = CONFIG_ROOT / "sd15_controlnet"

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CONTROLNET_PREFIX = "control_model."


def ensure_model_imports() -> None:
    """Import-time guards needed before diffusers/peft model imports (torchvision, torchaudio)."""
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()


#: The identity shards record as ``base_sha256``; the one cached hash of :mod:`rl.files`.
file_sha256 = sha256_file


def load_config(config: str | os.PathLike[str] | Mapping | None, default: Path) -> dict:
    """A diffusers config dict from a dict, a folder holding ``config.json``, or a JSON file."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config) if config is not None else default
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise QRRLError(f"model config {path} not found; pass a diffusers config folder (with config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QRRLError(f"model config {path} is not valid JSON: {e}") from None


def read_state_dict(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """All tensors of a local ``.safetensors`` file (never a pickle)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise QRRLError(f"{what} file {p} not found")
    if p.suffix != ".safetensors":
        raise QRRLError(f"{what} file {p} must be a .safetensors file (pickled .ckpt/.pt files are not loaded)")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors' own error type
        raise QRRLError(f"{what} file {p} is not a readable safetensors file: {e}") from None


def unet_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'ldm' (full checkpoint), 'ldm_bare', 'diffusers', or 'unknown'."""
    keys = sd.keys()
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return "ldm"
    if "input_blocks.0.0.weight" in sd and "out.2.weight" in sd:
        return "ldm_bare"
    if "conv_in.weight" in sd and any(k.startswith("up_blocks.") for k in keys):
        return "diffusers"
    return "unknown"


def controlnet_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'ldm', 'diffusers', or 'unknown'."""
    keys = sd.keys()
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return "diffusers"
    if any(k.startswith(LDM_CONTROLNET_PREFIX + "input_hint_block.") for k in keys) or any(
        k.startswith("input_hint_block.") for k in keys
    ):
        return "ldm"
    return "unknown"


def _examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _describe(config: Mapping) -> str:
    return (f"block_out_channels={list(config.get('block_out_channels', []))}, "
            f"layers_per_block={config.get('layers_per_block')}, "
            f"cross_attention_dim={config.get('cross_attention_dim')}")


def load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, path, config: Mapping) -> None:
    """Load ``sd`` into ``model``; any missing/unexpected key or shape mismatch -> QRRLError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} weights missing, e.g. {_examples(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights, e.g. {_examples(unexpected)}")
        raise QRRLError(
            f"{path} is not the expected {what} architecture ({_describe(config)}): {'; '.join(parts)}. "
            f"Use an SD1.5 {what} file, or pass the diffusers config folder of this model"
        )
    with torch.no_grad():
        model.load_state_dict({k: sd[k] for k in expected}, strict=True)


def load_unet(path: str | os.PathLike[str], config: str | os.PathLike[str] | Mapping | None = None):
    """A frozen-ready fp32 ``UNet2DConditionModel`` from a local SD1.5 file (any recognised layout)."""
    ensure_model_imports()
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = load_config(config, SD15_UNET_CONFIG)
    sd = read_state_dict(path, "UNet checkpoint")
    layout = unet_layout(sd)
    if layout == "unknown":
        if controlnet_layout(sd) != "unknown":
            raise QRRLError(f"{path} is a ControlNet, not a base checkpoint; pass it as --controlnet")
        raise QRRLError(
            f"{path} is not an SD1.5 checkpoint: expected 'model.diffusion_model.*' (original single file) or "
            f"'down_blocks.*'/'conv_in.*' (diffusers UNet) weights, found e.g. {_examples(sd.keys())}"
        )
    if layout == "ldm_bare":
        sd = {LDM_UNET_PREFIX + k: v for k, v in sd.items()}
    if layout in ("ldm", "ldm_bare"):
        sd = convert_ldm_unet_checkpoint(sd, cfg)
    model = UNet2DConditionModel.from_config(_model_config(cfg))
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "UNet", path, cfg)
    return model.eval()


def load_controlnet(path: str | os.PathLike[str], config: str | os.PathLike[str] | Mapping | None = None):
    """An fp32 ``ControlNetModel`` from a local ldm- or diffusers-layout ``.safetensors``."""
    ensure_model_imports()
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    cfg = load_config(config, SD15_CONTROLNET_CONFIG)
    sd = read_state_dict(path, "ControlNet")
    layout = controlnet_layout(sd)
    if layout == "unknown":
        if unet_layout(sd) != "unknown":
            raise QRRLError(f"{path} is a base model checkpoint, not a ControlNet; pass it as --checkpoint")
        raise QRRLError(
            f"{path} is not a ControlNet: expected 'controlnet_cond_embedding.*' (diffusers) or "
            f"'control_model.input_hint_block.*' (original) weights, found e.g. {_examples(sd.keys())}"
        )
    if layout == "ldm":
        if not any(k.startswith(LDM_CONTROLNET_PREFIX) for k in sd):
            sd = {LDM_CONTROLNET_PREFIX + k: v for k, v in sd.items()}
        try:
            sd = convert_controlnet_checkpoint(sd, cfg)
        except (KeyError, IndexError) as e:
            raise QRRLError(f"{path} does not match the ControlNet config ({_describe(cfg)}): {e}") from None
    model = ControlNetModel.from_config(_model_config(cfg))
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                "ControlNet", path, cfg)
    return model.eval()


def _model_config(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def controlnet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers ControlNet state dict -> original layout (``control_model.*``).

    ComfyUI reads diffusers-layout ControlNets only for the full-size configs it knows, and
    the original layout for any depth (tiny test models).
    """
    from .tiny_sd import unet_diffusers_to_ldm  # the ldm key tables live next to the test-weight builder

    return {LDM_CONTROLNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(dict(sd), dict(config)).items()}
