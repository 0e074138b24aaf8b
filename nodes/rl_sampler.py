"""QR ControlNet Sampler (RL): a KSampler with a scheduled ControlNet that can record trajectories.

The stochastic sampler of ``rl/sampling.py`` runs inside ComfyUI's own sampling
(``comfy.samplers.KSAMPLER``): the denoiser it calls already applies CFG and the ControlNet to
both branches, previews and the progress bar work as usual. With ``record`` on, the node
outputs a ``QR_TRAJECTORY`` holding everything the trainer needs to recompute the policy's
log-probs; anything it could not reproduce (extra conditioning entries, area/mask
conditioning, other ControlNets, model patches such as a LoRA) is refused, never dropped.

The ComfyUI mechanics live in two private helpers: :mod:`._controlnet` (the per-step strength,
the model-side tricks and the sampler function) and :mod:`._record` (recordability checks,
file identity, the shard's metadata).
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..rl.errors import QRRLError
from ..rl.sampling import batch_seeds
from ._common import CATEGORY, QRCodeType, TrajectoryType
from ._controlnet import (
    SigmaStrength,
    TrickSampler,
    applied_strengths,
    apply_scheduled,
    build_schedule,
    compute_sigmas,
    latent_feedback,
    latent_guidance,
    luma_projection,
    per_sample_schedules,
    schedule_inputs,
)
from ._record import (
    SAMPLER_NAME,
    QRTrajectoryData,
    embedding,
    file_list,
    hint_at_latent,
    recorded_file_hashes,
    shard_meta,
    timesteps,
)

log = logging.getLogger(__name__)


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
                io.Combo.Input("ckpt_name", options=file_list("checkpoints"),
                               tooltip="Only for recording: the checkpoint file the MODEL came from (its sha256 goes "
                               "into the shard; checked against the MODEL)."),
                io.Combo.Input("control_net_name", options=file_list("controlnet"),
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
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        # 1. validate
        if steps < 2:
            raise QRRLError(f"steps must be >= 2, got {steps}")
        schedule = build_schedule(curve, strength_start, strength_end, keyframes, start_percent, end_percent)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        if latent.ndim != 4:
            raise QRRLError(f"the RL sampler needs an image latent [B,C,H,W], got shape {tuple(latent.shape)}")
        batch, _, lh, lw = (int(v) for v in latent.shape)
        # 2. record checks: refuse what the trainer cannot reproduce; hash the files the shard names
        base_sha = cn_sha = None
        if record:
            base_sha, cn_sha = recorded_file_hashes(model, positive, negative, control_net, latent_image, ckpt_name,
                                                    control_net_name)
        # 3. the strength schedule and the per-step tricks
        feedback = guidance = luma = luma_meta = None
        if qr_code is not None:
            feedback = latent_feedback(model, qr_code, image, batch, lh, lw, feedback_low, feedback_high,
                                       feedback_margin, feedback_ramp)
        if scan_guidance > 0:
            guidance = latent_guidance(model, qr_code, image, batch, lh, lw, scan_guidance, guidance_margin,
                                       guidance_start)
        if luma_control:
            luma, luma_meta = luma_projection(model, int(latent.shape[1]))
        per_sample = per_sample_schedules(keyframes_per_sample, batch, schedule)
        pos, neg, sigma_strength = apply_scheduled(positive, negative, control_net, image, schedule, feedback=feedback,
                                                   sigma_strength=SigmaStrength(schedule, per_sample))
        # 4. sample, inside ComfyUI's own sampling (CFG, ControlNet, previews, progress bar)
        sigmas = compute_sigmas(model, scheduler, steps, denoise)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        seeds = batch_seeds(seed, batch)
        preview = latent_preview.prepare_callback(model, len(sigmas) - 1)
        run = TrickSampler(sigma_strength, eta, s_noise, seeds, record, feedback=feedback, luma=luma, guidance=guidance)
        samples = comfy.sample.sample_custom(
            model, noise, cfg, comfy.samplers.KSAMPLER(run), sigmas, pos, neg, latent,
            noise_mask=latent_image.get("noise_mask"), callback=preview,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
        out = {**latent_image, "samples": samples}
        # 5. the report and the trajectory
        strengths, strength_table, notes = applied_strengths(sigma_strength, run.sigmas, batch)
        report = (f"{SAMPLER_NAME}: {len(strengths)} steps, eta={eta:g}, s_noise={s_noise:g}, batch {batch}; "
                  f"{'strength' if per_sample is None else 'largest strength'} per step: "
                  f"{', '.join(f'{v:.3g}' for v in strengths)}")
        traj = None
        if record:
            if feedback is not None:
                run.record.strength_map = feedback.recorded()
            timestep = timesteps(model, run.record)
            hint_u8, note = hint_at_latent(image, batch, lh * 8, lw * 8)
            if note:
                notes.append(note)
                log.info("QRControlNetSamplerRL: %s", note)
            meta = shard_meta(
                cfg=cfg, eta=eta, s_noise=s_noise, scheduler=scheduler, seeds=seeds, batch=batch, prompt=prompt,
                negative_prompt=negative_prompt, schedule=schedule, per_sample=per_sample, base_sha=base_sha,
                cn_sha=cn_sha, steps=steps, denoise=denoise, ckpt_name=ckpt_name, control_net_name=control_net_name,
                seed=seed, feedback=feedback, guidance=run.guidance, luma_meta=luma_meta,
                guided_steps=[k for k, _ in run.guided])
            traj = QRTrajectoryData(record=run.record, timestep=timestep, strength=strength_table,
                                    cond=embedding(positive, batch), uncond=embedding(negative, batch), hint=hint_u8,
                                    meta=meta, notes=notes)
        notes += run.notes()
        if notes:
            report += "\n" + "\n".join(notes)
        return io.NodeOutput(out, traj, report, ui={"text": [report]})
