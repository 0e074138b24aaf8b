"""Model weights: local SD1.5 UNet / ControlNet files -> diffusers models, and back to the layouts
ComfyUI loads (the diffusers -> ldm key tables live here too; the test builders use them).

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

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SD15_UNET_CONFIG = CONFIG_ROOT / "sd15_unet"
SD15_CONTROLNET_CONFIG = CONFIG_ROOT / "sd15_controlnet"

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CONTROLNET_PREFIX = "control_model."


def ensure_model_imports() -> None:
    """Import-time guards needed before diffusers/peft model imports (torchvision, torchaudio)."""
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()




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
    return {LDM_CONTROLNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(dict(sd), dict(config)).items()}


# --------------------------------------------------------------------------------------------
# diffusers -> ldm key tables (derived from the two libraries' module layouts)


def _resnet_ldm(name: str) -> str:
    for diff, ldm in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ):
        if name.startswith(diff + "."):
            return ldm + name[len(diff) :]
    raise KeyError(f"unexpected resnet key {name!r}")


def _split(key: str, prefix: str) -> tuple[int, str]:
    index, rest = key[len(prefix) :].split(".", 1)
    return int(index), rest


def unet_diffusers_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel (or ControlNetModel) state dict to ldm keys.

    ldm numbers ``input_blocks`` flat (block 0 is ``conv_in``; each level has ``layers_per_block``
    [resnet, transformer] entries then a downsampler) and ``output_blocks`` deepest level first
    (``layers_per_block + 1`` entries per level, the upsampler appended to the last one).
    Transformer internals have the same names in both layouts.
    """
    per_level = config["layers_per_block"] + 1
    has_attn_up = ["CrossAttn" in t for t in config.get("up_block_types", [])]
    n_hint_blocks = None
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        if key.startswith("conv_in."):
            new = "input_blocks.0.0." + key[len("conv_in.") :]
        elif key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + key.split(".", 2)[2]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + key.split(".", 2)[2]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + key[len("conv_norm_out.") :]
        elif key.startswith("conv_out."):
            new = "out.2." + key[len("conv_out.") :]
        elif key.startswith("down_blocks."):
            level, rest = _split(key, "down_blocks.")
            kind, rest = rest.split(".", 1)
            if kind == "downsamplers":  # downsamplers.0.conv.* -> op.*
                block = 1 + level * per_level + per_level - 1
                new = f"input_blocks.{block}.0.op." + rest.split(".", 2)[2]
            else:
                j, rest = _split(rest, "")
                block = 1 + level * per_level + j
                new = (
                    f"input_blocks.{block}.0." + _resnet_ldm(rest)
                    if kind == "resnets"
                    else f"input_blocks.{block}.1." + rest
                )
        elif key.startswith("mid_block."):
            kind, rest = key[len("mid_block.") :].split(".", 1)
            j, rest = _split(rest, "")
            if kind == "resnets":
                new = f"middle_block.{2 * j}." + _resnet_ldm(rest)
            else:
                new = "middle_block.1." + rest
        elif key.startswith("up_blocks."):
            level, rest = _split(key, "up_blocks.")
            kind, rest = rest.split(".", 1)
            if kind == "upsamplers":  # upsamplers.0.conv.* -> <block>.<1|2>.conv.*
                block = level * per_level + per_level - 1
                slot = 2 if has_attn_up[level] else 1
                new = f"output_blocks.{block}.{slot}.conv." + rest.split(".", 2)[2]
            else:
                j, rest = _split(rest, "")
                block = level * per_level + j
                new = (
                    f"output_blocks.{block}.0." + _resnet_ldm(rest)
                    if kind == "resnets"
                    else f"output_blocks.{block}.1." + rest
                )
        # ControlNet extras.
        elif key.startswith("controlnet_down_blocks."):
            j, rest = _split(key, "controlnet_down_blocks.")
            new = f"zero_convs.{j}.0.{rest}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key[len("controlnet_mid_block.") :]
        elif key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding.") :]
            if n_hint_blocks is None:
                n_hint_blocks = len(
                    {k.split(".")[2] for k in state_dict if k.startswith("controlnet_cond_embedding.blocks.")}
                )
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest[len("conv_in.") :]
            elif rest.startswith("conv_out."):
                new = f"input_hint_block.{2 * (n_hint_blocks + 1)}." + rest[len("conv_out.") :]
            else:
                j, rest = _split(rest, "blocks.")
                new = f"input_hint_block.{2 * (j + 1)}.{rest}"
        if new is None:
            raise KeyError(f"no ldm name for UNet key {key!r}")
        out[new] = value
    return out


def vae_diffusers_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to ldm keys (attention linears -> 1x1 convs)."""
    n_levels = len(config["block_out_channels"])
    attn_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        side, rest = key.split(".", 1)  # encoder / decoder / quant_conv / post_quant_conv
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        new = None
        if rest.startswith(("conv_in.", "conv_out.")):
            new = rest
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out.") :]
        elif rest.startswith(("down_blocks.", "up_blocks.")):
            kind = "down" if rest.startswith("down_blocks.") else "up"
            level, rest2 = _split(rest, f"{kind}_blocks.")
            if kind == "up":  # decoder.up is numbered from the highest resolution
                level = n_levels - 1 - level
            part, rest2 = rest2.split(".", 1)
            if part in ("downsamplers", "upsamplers"):
                sample = "downsample" if part == "downsamplers" else "upsample"
                new = f"{kind}.{level}.{sample}.conv." + rest2.split(".", 2)[2]
            else:
                j, rest2 = _split(rest2, "")
                new = f"{kind}.{level}.block.{j}." + rest2.replace("conv_shortcut.", "nin_shortcut.")
        elif rest.startswith("mid_block.resnets."):
            j, rest2 = _split(rest, "mid_block.resnets.")
            new = f"mid.block_{j + 1}.{rest2}"
        elif rest.startswith("mid_block.attentions.0."):
            rest2 = rest[len("mid_block.attentions.0.") :]
            for diff, ldm in attn_names.items():
                if rest2.startswith(diff + "."):
                    new = f"mid.attn_1.{ldm}." + rest2[len(diff) + 1 :]
                    if diff != "group_norm" and value.ndim == 2:
                        value = value[:, :, None, None]
                    break
        if new is None:
            raise KeyError(f"no ldm name for VAE key {key!r}")
        out[f"{side}.{new}"] = value
    return out


def clip_text_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> SD1.5 ``cond_stage_model.transformer.text_model.*``.

    transformers >= 5.6 drops the ``text_model.`` level; older versions keep it.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("text_model."):
            key = "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out
