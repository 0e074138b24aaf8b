"""QR ControlNet Sampler (RL): a KSampler with a scheduled ControlNet that can record trajectories.

The stochastic sampler of ``rl/sampling.py`` runs inside ComfyUI's own sampling
(``comfy.samplers.KSAMPLER``): the denoiser it calls already applies CFG and the ControlNet to
both branches, previews and the progress bar work as usual. With ``record`` on, the node
outputs a ``QR_TRAJECTORY`` holding everything the trainer needs to recompute the policy's
log-probs; anything it could not reproduce (extra conditioning entries, area/mask
conditioning, other ControlNets, model patches such as a LoRA) is refused, never dropped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io

from ..rl import __version__ as PACK_VERSION
from ..rl.errors import QRRLError
from ..rl.files import sha256_file
from ..rl.sampling import TrajectoryRecord, batch_seeds, sample_loop
from ..rl.schedule import StrengthSchedule
from ._common import CATEGORY, QRCodeType, TrajectoryType
from .scheduled_controlnet import (
    SigmaStrength,
    apply_scheduled,
    build_schedule,
    per_sample_schedules,
    schedule_inputs,
)

log = logging.getLogger(__name__)

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


def _resolve(kind: str, name: str, what: str) -> str:
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


def _file_list(kind: str) -> list[str]:
    return [_NONE] + folder_paths.get_filename_list(kind)


# --------------------------------------------------------------------------------------------
# helpers


def _comfy_version() -> str | None:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:
        return None


def compute_sigmas(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """Sigmas exactly like KSampler: ``denoise < 1`` takes the tail of ``int(steps/denoise)`` steps."""
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    if denoise is None or denoise > 0.9999:
        return comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
    if denoise <= 0.0:
        raise QRRLError("denoise must be > 0")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, int(steps / denoise)).cpu()
    return sigmas[-(steps + 1):]


def _embedding(cond: list, batch: int) -> torch.Tensor:
    emb = cond[0][0].detach().float().cpu()
    if emb.ndim != 3:
        raise QRRLError(f"conditioning embedding must be [N,L,D], got shape {tuple(emb.shape)}")
    if emb.shape[0] == batch:
        return emb.contiguous()
    if emb.shape[0] == 1:
        return emb.expand(batch, -1, -1).contiguous()
    raise QRRLError(f"conditioning batch {emb.shape[0]} does not match latent batch {batch}")


def _hint_at_latent(image: torch.Tensor, batch: int, h: int, w: int) -> tuple[torch.Tensor, str | None]:
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


def latent_feedback(model, qr_code, image: torch.Tensor, batch: int, lh: int, lw: int, low: float, high: float,
                    margin: float, ramp: float):
    """Module feedback for this run: the code's module grid, checked against the hint, seen
    through the model's latent preview factors (see :class:`rl.module_feedback.LatentFeedback`)."""
    from ..rl.module_feedback import LatentFeedback, ModuleFeedback, light_grids, wrong_modules

    fb = ModuleFeedback(low=float(low), high=float(high), margin=float(margin), ramp=float(ramp))
    if lh != lw:
        raise QRRLError(f"module feedback needs a square latent (the QR code fills the image), got {lw * 8}x{lh * 8}")
    if image.shape[1] != image.shape[2]:
        raise QRRLError(f"module feedback needs the square hint of QR Code Encode, got {image.shape[2]}x{image.shape[1]}")
    light = light_grids([qr_code])
    hint = image[:1, :, :, :3].movedim(-1, 1).float().cpu()
    agree = float((wrong_modules(hint, light, 0.0, 1e-3) < 0.5).float().mean())
    if agree < 0.9:
        raise QRRLError(f"qr_code does not match the hint image (only {100 * agree:.0f}% of modules agree): connect "
                        "hint and qr_code from the same QR Code Encode node")
    lf = model.get_model_object("latent_format")
    factors = getattr(lf, "latent_rgb_factors", None)
    if factors is None or getattr(lf, "latent_rgb_factors_reshape", None) is not None:
        raise QRRLError(f"module feedback reads the latent through the model's preview colours, and this model's latent "
                        f"format ({type(lf).__name__}) has none usable; disconnect qr_code")
    return LatentFeedback(fb, light.expand(batch, -1, -1), factors, getattr(lf, "latent_rgb_factors_bias", None))


def latent_guidance(model, qr_code, image: torch.Tensor, batch: int, lh: int, lw: int, scale: float, margin: float,
                    start: float):
    """Scan guidance for this run (:mod:`rl.scan_guidance`): the settings, the code's module grid
    (checked against the hint) and the decoder it steers, the model's linear latent→RGB preview."""
    from ..rl.module_feedback import latent_rgb, light_grids, wrong_modules
    from ..rl.scan_guidance import ScanGuidance

    guidance = ScanGuidance(scale=float(scale), margin=float(margin), start=float(start))
    if qr_code is None:
        raise QRRLError("scan_guidance needs the code it should make readable: connect QR Code Encode's qr_code "
                        "(the code of the hint) to this sampler, or set scan_guidance to 0")
    if lh != lw or image.shape[1] != image.shape[2]:
        raise QRRLError(f"scan guidance needs a square latent and the square hint of QR Code Encode, got latent "
                        f"{lw * 8}x{lh * 8}, hint {image.shape[2]}x{image.shape[1]}")
    light = light_grids([qr_code])
    hint = image[:1, :, :, :3].movedim(-1, 1).float().cpu()
    if float((wrong_modules(hint, light, 0.0, 1e-3) < 0.5).float().mean()) < 0.9:
        raise QRRLError("qr_code does not match the hint image: connect hint and qr_code from the same QR Code Encode node")
    lf = model.get_model_object("latent_format")
    factors = getattr(lf, "latent_rgb_factors", None)
    if factors is None or getattr(lf, "latent_rgb_factors_reshape", None) is not None:
        raise QRRLError(f"scan guidance steers the picture through the model's latent→RGB preview colours, and this "
                        f"model's latent format ({type(lf).__name__}) has none usable; set scan_guidance to 0")
    factors = [list(map(float, row)) for row in factors]  # plain numbers: no inference tensor enters the graph
    bias = getattr(lf, "latent_rgb_factors_bias", None)
    bias = None if bias is None else [float(v) for v in bias]

    def decode(z: torch.Tensor) -> torch.Tensor:
        return latent_rgb(z, factors, bias, clamp=False)

    return guidance, light.expand(batch, -1, -1), decode


def luma_projection(model, channels: int):
    """Luma-only control for this model: the projection and what a shard records of it
    (:func:`rl.luma_control.latent_luma_projection`, through the model's preview colours)."""
    from ..rl.luma_control import latent_luma_projection, latent_projection_meta

    lf = model.get_model_object("latent_format")
    factors = getattr(lf, "latent_rgb_factors", None)
    if factors is None or getattr(lf, "latent_rgb_factors_reshape", None) is not None:
        raise QRRLError(f"luma_control keeps the ControlNet's change in luma through the model's latent→RGB "
                        f"preview colours, and this model's latent format ({type(lf).__name__}) has none usable; "
                        "switch luma_control off")
    if len(factors) != channels:
        raise QRRLError(f"luma_control: the model's latent→RGB factors have {len(factors)} channels, the latent "
                        f"{channels}; switch luma_control off")
    bias = getattr(lf, "latent_rgb_factors_bias", None)
    return latent_luma_projection(factors, bias), latent_projection_meta(factors, bias)


# --------------------------------------------------------------------------------------------
# the node


class QRControlNetSamplerRL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="QRControlNetSamplerRL",
            display_name="QR ControlNet Sampler (RL)",
            category=CATEGORY,
            description="KSampler with a scheduled ControlNet and a stochastic sampler (eta, s_noise) whose steps "
            "can be recorded as an RL trajectory for the trainer.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (connect the checkpoint loader directly when recording)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (one CLIP Text Encode when recording)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (one CLIP Text Encode when recording)."),
                io.Latent.Input("latent_image", tooltip="Start latent; its batch size is the number of images."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Initial noise as KSampler (same seed = same start); sample i's step noise uses "
                             "seed+i, so each image is reproducible from its own seed."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Sampling steps (at least 2)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (recorded; the trainer applies the same)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="Sigma schedule, as in KSampler."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Below 1: sample only the last steps of steps/denoise (img2img), like KSampler."),
                io.ControlNet.Input("control_net", tooltip="The QR ControlNet (from Load ControlNet Model)."),
                io.Image.Input("image", tooltip="Hint image (QR Code Encode); resized to latent x8 like ComfyUI does."),
                *schedule_inputs(),
                io.Float.Input("eta", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Noise injected per step (1 = ancestral; 0 = deterministic Euler, nothing to learn)."),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Scale of the injected noise (1 = exact ancestral step)."),
                io.Boolean.Input("record", default=True,
                                 tooltip="Record the trajectory for training. Refuses graphs the trainer could not "
                                 "reproduce (LoRA on MODEL, extra ControlNets, area/multiple conditioning)."),
                io.Combo.Input("ckpt_name", options=_file_list("checkpoints"),
                               tooltip="Only for recording: the checkpoint file the MODEL came from (its sha256 goes "
                               "into the shard; checked against the MODEL)."),
                io.Combo.Input("control_net_name", options=_file_list("controlnet"),
                               tooltip="Only for recording: the ControlNet file (sha256 into the shard; checked against "
                               "the CONTROL_NET)."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="Metadata only: the positive prompt text, stored in the shard (CONDITIONING does "
                                "not carry its text)."),
                io.String.Input("negative_prompt", default="", multiline=True, optional=True,
                                tooltip="Metadata only: the negative prompt text, stored in the shard."),
                QRCodeType.Input("qr_code", optional=True,
                                 tooltip="Connect the QR Code Encode's qr_code (the code of the hint) to turn on module "
                                 "feedback: from step 2 on, the ControlNet pushes harder on the modules the previous "
                                 "step's preview still gets wrong and softer on the rest. With record on, each step's gain map "
                                 "goes into the shard and the trainer replays it."),
                io.Float.Input("feedback_low", default=0.8, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="Module feedback: ControlNet gain on modules already on their side (below 1 "
                               "gives art back where the code already reads)."),
                io.Float.Input("feedback_high", default=2.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="Module feedback: ControlNet gain on modules still wrong (above 1 pushes them "
                               "harder). low = high = 1 is plain sampling."),
                io.Float.Input("feedback_margin", default=0.05, min=0.0, max=0.49, step=0.005, optional=True,
                               tooltip="Module feedback: how far past the light/dark midpoint (in luma, 0-1) a "
                               "module must be to count as right."),
                io.Float.Input("feedback_ramp", default=1.0, min=0.0, max=10.0, step=0.1, optional=True,
                               tooltip="Module feedback: the push on wrong modules grows over the run as "
                               "(ramp+1)*p^ramp at progress p (early previews are blurry and mostly 'wrong'). "
                               "0 = the same push at every step."),
                io.Boolean.Input("luma_control", default=False, optional=True,
                                 tooltip="Luma-only control: each step predicts the image with and without the "
                                 "ControlNet and keeps only the luma of the difference (through the model's "
                                 "latent→RGB preview colours), so the code's light/dark pattern is the "
                                 "ControlNet's and the colours stay the art's. Costs one more model call per step "
                                 "where the ControlNet runs. Recorded; the trainer (ddpo) replays it."),
                io.String.Input("keyframes_per_sample", default="", multiline=True, optional=True,
                                tooltip="One strength curve per image: one keyframes line per batch item, in the "
                                "format of keyframes ('0:1.6, 0.4:1.2, 1:0.8'), inside the start/end window. "
                                "Replaces curve/strength_start/strength_end/keyframes; recorded per sample. Empty: "
                                "one curve for the whole batch."),
                io.Float.Input("scan_guidance", default=0.0, min=0.0, max=4.0, step=0.05, optional=True,
                               tooltip="Scan guidance (needs qr_code): on the late steps, nudge each step's "
                               "predicted image so that every module the preview still gets wrong moves past the "
                               "light/dark midpoint by guidance_margin; modules already right are left alone. "
                               "1 = the full step, 0 = off. No extra model calls. With record on, the shard holds "
                               "the guided predictions: train it with --objective rwr (ddpo refuses it)."),
                io.Float.Input("guidance_margin", default=0.05, min=0.0, max=0.49, step=0.005, optional=True,
                               tooltip="Scan guidance: how far past the light/dark midpoint (luma, 0-1) each module "
                               "is pushed."),
                io.Float.Input("guidance_start", default=0.9, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Scan guidance: the first guided step, as a fraction of the run (0.9 of 10 "
                               "steps = the last one). Earlier starts let the model redraw the nudge in its own "
                               "style, and cost more art."),
            ],
            outputs=[
                io.Latent.Output("LATENT", tooltip="The sampled latents."),
                TrajectoryType.Output("trajectory", tooltip="The recorded trajectory (None when record is off)."),
                io.String.Output("report", tooltip="Steps, per-step strengths and notes (e.g. hint resizing)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, steps: int, cfg: float, scheduler: str,
                denoise: float, control_net, image, curve: str, strength_start: float, strength_end: float,
                keyframes: str, start_percent: float, end_percent: float, eta: float, s_noise: float, record: bool,
                ckpt_name: str, control_net_name: str, prompt: str = "", negative_prompt: str = "", qr_code=None,
                feedback_low: float = 0.8, feedback_high: float = 2.0, feedback_margin: float = 0.05,
                feedback_ramp: float = 1.0, luma_control: bool = False, keyframes_per_sample: str = "",
                scan_guidance: float = 0.0, guidance_margin: float = 0.05,
                guidance_start: float = 0.9) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        if steps < 2:
            raise QRRLError(f"steps must be >= 2, got {steps}")
        schedule = build_schedule(curve, strength_start, strength_end, keyframes, start_percent, end_percent)
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        if latent.ndim != 4:
            raise QRRLError(f"the RL sampler needs an image latent [B,C,H,W], got shape {tuple(latent.shape)}")
        batch, _, lh, lw = (int(v) for v in latent.shape)
        base_sha = cn_sha = None
        if record:
            check_recordable(model, positive, negative, control_net, latent_image)
            ckpt_path = _resolve("checkpoints", ckpt_name, "checkpoint")
            cn_path = _resolve("controlnet", control_net_name, "ControlNet")
            verify_checkpoint(model, ckpt_path)
            verify_controlnet(control_net, cn_path)
            base_sha, cn_sha = sha256_file(ckpt_path), sha256_file(cn_path)

        feedback = None
        if qr_code is not None:
            feedback = latent_feedback(model, qr_code, image, batch, lh, lw, feedback_low, feedback_high,
                                       feedback_margin, feedback_ramp)
        guidance = guide_light = guide_decode = None
        if scan_guidance > 0:
            guidance, guide_light, guide_decode = latent_guidance(model, qr_code, image, batch, lh, lw, scan_guidance,
                                                                  guidance_margin, guidance_start)
        guided: list[tuple[int, float]] = []  # (step, mean margin loss left)
        luma = luma_meta = None
        if luma_control:
            luma, luma_meta = luma_projection(model, int(latent.shape[1]))
        per_sample = per_sample_schedules(keyframes_per_sample, batch, schedule)
        sigma_strength = SigmaStrength(schedule, per_sample)
        pos, neg, sigma_strength = apply_scheduled(positive, negative, control_net, image, schedule, feedback=feedback,
                                                   sigma_strength=sigma_strength)
        sigmas = compute_sigmas(model, scheduler, steps, denoise)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        seeds = batch_seeds(seed, batch)
        preview = latent_preview.prepare_callback(model, len(sigmas) - 1)
        holder: dict[str, Any] = {}
        luma_calls: list[int] = []  # steps that paid luma control's extra model call

        def sampler_fn(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
            extra_args = extra_args or {}
            s_in = x.new_ones([x.shape[0]])

            def denoise_fn(xk, sigma, k):
                if feedback is not None:
                    feedback.begin_step(xk)  # recorded: the trainer replays each step's map
                t = sigma * s_in
                denoised = model_k(xk, t, **extra_args)
                if luma is not None and sigma_strength.used.get(float(t[0]), 0.0) != 0.0:
                    sigma_strength.enabled = False  # the same step without the ControlNet: the art's prediction
                    try:
                        art = model_k(xk, t, **extra_args)
                    finally:
                        sigma_strength.enabled = True
                    denoised = art + luma(denoised - art)
                    luma_calls.append(k)
                if guidance is not None and guidance.active(k, len(sigmas_in) - 1):
                    from ..rl.scan_guidance import guide

                    denoised, left = guide(denoised, guide_decode, guide_light, guidance)
                    guided.append((k, float(left.mean())))
                if feedback is not None:
                    feedback.observe(denoised, k, len(sigmas_in) - 1)  # the gain map for step k + 1
                return denoised

            def step_cb(k, xk, dk, out):
                if callback is not None:
                    callback({"x": xk, "i": k, "sigma": sigmas_in[k], "sigma_hat": sigmas_in[k], "denoised": dk})

            x_final, rec = sample_loop(denoise_fn, x, sigmas_in, eta, s_noise, seeds, record=record, callback=step_cb)
            holder["record"] = rec
            holder["sigmas"] = sigmas_in
            return x_final

        sampler = comfy.samplers.KSAMPLER(sampler_fn)
        samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, pos, neg, latent, noise_mask=latent_image.get("noise_mask"),
            callback=preview, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
        out = latent_image.copy()
        out["samples"] = samples

        used = sigma_strength.used
        sig_list = [float(s) for s in holder["sigmas"].float().cpu()]
        missing = [k for k, s in enumerate(sig_list[:-1]) if s not in used]
        strengths = [used.get(s, 0.0) for s in sig_list[:-1]]
        notes = []
        if missing:
            notes.append(f"the ControlNet did not run at steps {missing} (strength 0 recorded)")
        report = (f"{SAMPLER_NAME}: {len(sig_list) - 1} steps, eta={eta:g}, s_noise={s_noise:g}, batch {batch}; "
                  f"strength per step: {', '.join(f'{v:.3g}' for v in strengths)}")
        strength_table = torch.tensor(strengths, dtype=torch.float32)
        if per_sample is not None:  # [B,K]: each sample's own curve, as applied
            zeros = (0.0,) * batch
            rows = [sigma_strength.used_per_sample.get(s, zeros) for s in sig_list[:-1]]
            strength_table = torch.tensor(rows, dtype=torch.float32).T.contiguous()
            report = report.replace("strength per step:", "largest strength per step:")
            notes.append("strength per sample (keyframes_per_sample): " + " | ".join(
                ", ".join(f"{v:.3g}" for v in row) for row in strength_table.tolist()))
        traj = None
        if record:
            rec: TrajectoryRecord = holder["record"]
            if feedback is not None:
                rec.strength_map = feedback.recorded()
            ms = model.get_model_object("model_sampling")
            timestep = ms.timestep(rec.sigma[:-1].to(torch.float32)).float().cpu().reshape(-1)
            hint_u8, note = _hint_at_latent(image, batch, lh * 8, lw * 8)
            if note:
                notes.append(note)
                log.info("QRControlNetSamplerRL: %s", note)
            meta = {
                "cfg": float(cfg), "eta": float(eta), "s_noise": float(s_noise), "sampler": SAMPLER_NAME,
                "scheduler": scheduler, "seeds": seeds, "prompts": [prompt or ""] * batch,
                "negative_prompt": negative_prompt or "", "strength_schedule": None if per_sample else schedule.to_spec(),
                "start_percent": schedule.start_percent, "end_percent": schedule.end_percent,
                "apply_to_uncond": True, "base_sha256": base_sha, "controlnet_sha256": cn_sha,
                "model_patches": [], "pack_version": PACK_VERSION, "comfyui_version": _comfy_version(),
                "steps": int(steps), "denoise": float(denoise), "base_file": ckpt_name,
                "controlnet_file": control_net_name, "seed": int(seed),
            }
            if feedback is not None:
                meta["module_feedback"] = {"source": "latent_preview", **asdict(feedback.feedback)}
            if per_sample is not None:
                meta["strength_schedules"] = [q.to_spec() for q in per_sample]
            if guidance is not None:  # the recorded predictions are the guided ones (rl.scan_guidance)
                meta["scan_guidance"] = {**guidance.to_meta(), "decoder": "latent_preview",
                                         "steps": [k for k, _ in guided]}
            if luma_meta is not None:
                meta["luma_control"] = luma_meta  # rl.luma_control.projection_from_meta rebuilds it
            traj = QRTrajectoryData(
                record=rec, timestep=timestep, strength=strength_table,
                cond=_embedding(positive, batch), uncond=_embedding(negative, batch), hint=hint_u8,
                meta=meta, notes=notes,
            )
        if feedback is not None:
            fb = feedback.feedback
            shares = ", ".join(f"{100 * v:.0f}%" for v in feedback.wrong_fraction)
            notes.append(f"module feedback: gain {fb.low:g} on right modules, {fb.high:g} on wrong ones (margin "
                         f"{fb.margin:g}, ramp {fb.ramp:g}); modules off their side after each step (latent preview): "
                         f"{shares}")
        if luma is not None:
            notes.append(f"luma control: the ControlNet's change kept in luma (latent preview colours); "
                         f"{len(luma_calls)} extra model calls (one per step where the ControlNet ran, "
                         f"{len(luma_calls)}/{len(sig_list) - 1} steps)")
        if guidance is not None:
            notes.append(f"scan guidance: scale {guidance.scale:g}, margin {guidance.margin:g}, guided steps "
                         f"{[k for k, _ in guided]}; margin loss left per image after each: "
                         + ", ".join(f"{v:.3g}" for _, v in guided) + " (no extra model calls)")
        if notes:
            report += "\n" + "\n".join(notes)
        return io.NodeOutput(out, traj, report, ui={"text": [report]})



def expected_strengths(schedule: StrengthSchedule, model_sampling, sigmas) -> list[float]:
    """Per-step strengths for ``sigmas`` (tests and tools; same rule as the node)."""
    from .scheduled_controlnet import SigmaStrength, strengths_for_sigmas

    return strengths_for_sigmas(SigmaStrength(schedule), model_sampling, sigmas)
