"""What record mode needs from ComfyUI objects: refusals, file identity, and the shard's fields.

A recorded trajectory must be reproducible by the trainer from plain files: anything in the
graph it could not rebuild (extra conditioning entries, area/mask conditioning, other
ControlNets, model patches such as a LoRA) is refused here, never dropped, and the checkpoint
and ControlNet files the shard names are checked against the connected MODEL and CONTROL_NET
before their sha256 goes in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import folder_paths
import torch

from ..rl import __version__ as PACK_VERSION
from ..rl.errors import QRRLError
from ..rl.files import sha256_file
from ..rl.sampling import TrajectoryRecord
from ..rl.schedule import StrengthSchedule
from ..rl.trajectory import shard_metadata

SAMPLER_NAME = "qr_rl_stochastic"
#: Conditioning options that change nothing for an SD1.5 UNet + ControlNet (recorded as is).
_HARMLESS_COND_KEYS = {"pooled_output"}
_NONE = "(none)"


@dataclass
class QRTrajectoryData:
    """The ``QR_TRAJECTORY`` value: a sampling record plus what the shard needs besides it."""

    record: TrajectoryRecord
    timestep: torch.Tensor
    strength: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    hint: torch.Tensor  # uint8 [B,3,8H,8W]
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.record.x.shape[0])


# --------------------------------------------------------------------------------------------
# what record mode refuses


def _model_patch_problems(model) -> list[str]:
    found = []
    if getattr(model, "patches", None):
        found.append(f"{len(model.patches)} patched weights (e.g. a LoRA from a LoRA loader)")
    if getattr(model, "object_patches", None):
        found.append(f"object patches {sorted(model.object_patches)} (e.g. a ModelSampling* node)")
    if getattr(model, "hook_patches", None):
        found.append("hook patches (conditioning hooks / scheduled LoRA)")
    for name in ("wrappers", "callbacks"):
        groups = getattr(model, name, None) or {}
        if any(any(v for v in g.values()) if isinstance(g, dict) else g for g in groups.values()):
            found.append(f"model {name} {sorted(groups)}")
    opts = getattr(model, "model_options", {}) or {}
    extra = sorted(k for k in opts if k != "transformer_options")
    if extra:
        found.append(f"model_options {extra} (e.g. a CFG or sampler patch node)")
    t_opts = opts.get("transformer_options", {}) or {}
    if t_opts:
        found.append(f"transformer_options {sorted(t_opts)} (attention patches, e.g. IPAdapter/FreeU)")
    return found


def check_recordable(model, positive, negative, control_net, latent: dict) -> None:
    """Raise :class:`QRRLError` naming anything the trainer could not reproduce."""
    problems = []
    for name, cond in (("positive", positive), ("negative", negative)):
        if len(cond) != 1:
            problems.append(
                f"{name} has {len(cond)} conditioning entries (combine/concat/area nodes); record needs exactly "
                "one: encode the prompt with one CLIP Text Encode"
            )
            continue
        opts = cond[0][1]
        if opts.get("control") is not None:
            problems.append(
                f"{name} already carries a ControlNet ({type(opts['control']).__name__}); the recorder stores only "
                "this node's ControlNet: remove the Apply ControlNet node before this sampler"
            )
        other = sorted(k for k in opts if k not in _HARMLESS_COND_KEYS and k not in ("control", "control_apply_to_uncond"))
        if other:
            problems.append(
                f"{name} conditioning has options {other} (area/mask/strength/timestep-range/hooks...) that the "
                "trainer cannot reproduce: use plain CLIP Text Encode output"
            )
    patches = _model_patch_problems(model)
    if patches:
        problems.append(
            "the MODEL is patched: " + "; ".join(patches) + ". The trainer loads the plain checkpoint, so it cannot "
            "reproduce them: connect the checkpoint loader's MODEL directly (merge a LoRA into the checkpoint first)"
        )
    if getattr(control_net, "previous_controlnet", None) is not None:
        problems.append("the CONTROL_NET is already chained to another ControlNet; load it with ControlNetLoader")
    if getattr(control_net, "latent_format", None) is not None:
        problems.append(f"this ControlNet ({type(control_net).__name__}) needs a VAE-encoded hint; not supported for recording")
    if "noise_mask" in latent:
        problems.append("the latent has a noise mask (inpainting); recording supports full-image sampling only")
    if problems:
        raise QRRLError("record is on, but this graph cannot be recorded exactly: " + " | ".join(problems)
                        + ". Switch record off to just sample.")


# --------------------------------------------------------------------------------------------
# file identity


def _first_tensor(path: str, keys: list[str]) -> tuple[str, torch.Tensor] | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        names = set(fh.keys())
        for k in keys:
            if k in names:
                return k, fh.get_tensor(k)
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.detach().float().cpu()
    b = b.detach().float().cpu()
    if a.shape != b.shape:
        return False
    scale = float(a.abs().max().clamp_min(1e-6))
    return bool(((a - b).abs().max() / scale) < 2e-3)  # fp16/bf16 loading tolerance


def resolve_file(kind: str, name: str, what: str) -> str:
    if not name or name == _NONE:
        raise QRRLError(f"record is on but no {what} file is selected; pick the file the {what} was loaded from "
                        f"(its sha256 goes into the shard)")
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise QRRLError(f"{what} file {name!r} is not in models/{kind}; pick one from the list")
    return path


def verify_checkpoint(model, path: str) -> None:
    """Compare one UNet tensor of the file with the connected MODEL (cheap: lazy safetensors read)."""
    if not path.endswith(".safetensors"):
        raise QRRLError(f"{path}: only .safetensors checkpoints can be verified for recording")
    got = _first_tensor(path, ["model.diffusion_model.input_blocks.0.0.weight", "input_blocks.0.0.weight",
                               "conv_in.weight"])
    try:
        loaded = model.model.diffusion_model.input_blocks[0][0].weight
    except AttributeError:
        raise QRRLError("the MODEL is not an SD1.5-style UNet (no input_blocks); recording supports SD1.5") from None
    if got is None or not _same(got[1], loaded):
        raise QRRLError(
            f"ckpt_name {path.rsplit('/', 1)[-1]!r} does not match the connected MODEL (first UNet conv differs); "
            "select the checkpoint the MODEL was loaded from, so the shard names the right base model"
        )


def verify_controlnet(control_net, path: str) -> None:
    """Compare the hint-embedding conv of the file with the connected CONTROL_NET."""
    if not path.endswith(".safetensors"):
        raise QRRLError(f"{path}: only .safetensors ControlNets can be verified for recording")
    got = _first_tensor(path, ["controlnet_cond_embedding.conv_in.weight", "control_model.input_hint_block.0.weight",
                               "input_hint_block.0.weight"])
    try:
        loaded = control_net.control_model.input_hint_block[0].weight
    except AttributeError:
        raise QRRLError(f"this ControlNet ({type(control_net).__name__}) has no input_hint_block; recording "
                        "supports SD1.5-style ControlNets") from None
    if got is None or not _same(got[1], loaded):
        raise QRRLError(
            f"control_net_name {path.rsplit('/', 1)[-1]!r} does not match the connected CONTROL_NET (hint embedding "
            "differs); select the file the ControlNet was loaded from"
        )


def file_list(kind: str) -> list[str]:
    return [_NONE] + folder_paths.get_filename_list(kind)



def comfy_version() -> str | None:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:
        return None



def embedding(cond: list, batch: int) -> torch.Tensor:
    emb = cond[0][0].detach().float().cpu()
    if emb.ndim != 3:
        raise QRRLError(f"conditioning embedding must be [N,L,D], got shape {tuple(emb.shape)}")
    if emb.shape[0] == batch:
        return emb.contiguous()
    if emb.shape[0] == 1:
        return emb.expand(batch, -1, -1).contiguous()
    raise QRRLError(f"conditioning batch {emb.shape[0]} does not match latent batch {batch}")


def hint_at_latent(image: torch.Tensor, batch: int, h: int, w: int) -> tuple[torch.Tensor, str | None]:
    """The hint resized exactly as ComfyUI's ControlNet does (nearest-exact, centre crop), uint8."""
    import comfy.utils

    hint = image.movedim(-1, 1).float().cpu()
    note = None
    if hint.shape[2] != h or hint.shape[3] != w:
        note = (f"hint {hint.shape[3]}x{hint.shape[2]} resized to {w}x{h} (latent x8; nearest-exact, centre crop, "
                "as ComfyUI's ControlNet does)")
        hint = comfy.utils.common_upscale(hint, w, h, "nearest-exact", "center")
    if hint.shape[0] != batch:
        if hint.shape[0] == 1:
            hint = hint.expand(batch, -1, -1, -1)
        else:
            from comfy.controlnet import broadcast_image_to

            hint = broadcast_image_to(hint, batch, 1)
    hint = hint[:, :3]
    return (hint.clamp(0, 1) * 255.0).round().to(torch.uint8).contiguous(), note



def recorded_file_hashes(model, positive, negative, control_net, latent_image: dict, ckpt_name: str,
                         control_net_name: str) -> tuple[str, str]:
    """Refuse what cannot be recorded, check the named files against the connected models,
    and return their sha256 (base, ControlNet) for the shard."""
    check_recordable(model, positive, negative, control_net, latent_image)
    ckpt_path = resolve_file("checkpoints", ckpt_name, "checkpoint")
    cn_path = resolve_file("controlnet", control_net_name, "ControlNet")
    verify_checkpoint(model, ckpt_path)
    verify_controlnet(control_net, cn_path)
    return sha256_file(ckpt_path), sha256_file(cn_path)


def timesteps(model, record: TrajectoryRecord) -> torch.Tensor:
    """The model's timestep of each recorded step (what the trainer's UNet is called with)."""
    ms = model.get_model_object("model_sampling")
    return ms.timestep(record.sigma[:-1].to(torch.float32)).float().cpu().reshape(-1)


def shard_meta(*, cfg: float, eta: float, s_noise: float, scheduler: str, seeds, batch: int, prompt: str,
               negative_prompt: str, schedule: StrengthSchedule, per_sample, base_sha: str | None,
               cn_sha: str | None, steps: int, denoise: float, ckpt_name: str, control_net_name: str, seed: int,
               feedback=None, guidance=None, guided_steps: list[int] | None = None,
               luma_meta: dict | None = None) -> dict[str, Any]:
    """The shard metadata of one recorded run (:func:`rl.trajectory.shard_metadata`) with what only
    ComfyUI knows: its version, the file names, and that feedback and guidance read the latent preview."""
    return shard_metadata(
        sampler=SAMPLER_NAME, cfg=cfg, scheduler=scheduler, prompts=[prompt or ""] * batch,
        strength_schedule=None if per_sample else schedule, strength_schedules=per_sample,
        base_sha256=base_sha, controlnet_sha256=cn_sha,
        module_feedback=None if feedback is None else {"source": "latent_preview", **asdict(feedback.feedback)},
        # the recorded predictions are the guided ones (rl.scan_guidance)
        scan_guidance=None if guidance is None else {**guidance.to_meta(), "decoder": "latent_preview",
                                                     "steps": list(guided_steps or [])},
        luma_control=luma_meta,  # rl.luma_control.projection_from_meta rebuilds it
        eta=float(eta), s_noise=float(s_noise), seeds=seeds, negative_prompt=negative_prompt or "",
        start_percent=schedule.start_percent, end_percent=schedule.end_percent, apply_to_uncond=True,
        model_patches=[], pack_version=PACK_VERSION, comfyui_version=comfy_version(), steps=int(steps),
        denoise=float(denoise), base_file=ckpt_name, controlnet_file=control_net_name, seed=int(seed),
    )
