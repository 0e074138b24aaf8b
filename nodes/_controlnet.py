"""The ComfyUI mechanics of a per-step ControlNet strength, and the RL sampler's model-side helpers.

Scheduled ControlNet Apply and the RL sampler both give the ControlNet one strength per
sampling step, from a curve.

How: like ComfyUI's ControlNetApplyAdvanced (one copy of the ControlNet per previous
ControlNet, shared by positive and negative, chained with ``set_previous_controlnet``), but
the copy is an instance of a subclass of its own class that sets ``self.strength`` from the
schedule right before ComfyUI's ``get_control`` runs. ComfyUI passes the current sigma as
``t``; its progress ``p`` is measured the way ComfyUI measures start/end percent (the inverse
of ``model_sampling.percent_to_sigma``, found by bisection, so it works for any model
sampling type). The window test uses ComfyUI's own sigma borders (inclusive, like ComfyUI),
and each step gets exactly one strength: a chain of ComfyUI's fixed-strength segments gives a
step on a shared border the *sum* of both strengths.

Module feedback (the RL sampler's ``qr_code`` input) hangs a :class:`rl.module_feedback.LatentFeedback`
on the copy: ``control_merge`` multiplies this ControlNet's own outputs (not a chained previous
one's) by the feedback's current gain map, resized to each output and broadcast over the
cond/uncond chunks exactly as ComfyUI broadcasts the hint.

The RL sampler's own tricks live here too, because they read the MODEL: its sigmas
(:func:`compute_sigmas`), its latent preview colours (module feedback, scan guidance, luma-only
control) and ComfyUI's denoiser (:class:`TrickSampler`, the function ``KSAMPLER`` runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from comfy_api.latest import io

from ..rl.errors import QRRLError
from ..rl.sampling import sample_loop
from ..rl.schedule import CURVES, StrengthSchedule

_BISECT_ITERS = 60
_subclasses: dict[type, type] = {}


def sigma_to_percent(model_sampling, sigma: float) -> float:
    """Progress ``p`` in [0, 1] with ``percent_to_sigma(p) == sigma`` (bisection).

    ``percent_to_sigma`` is non-increasing in ``p``; values above its range map to 0, below
    to 1.
    """
    lo, hi = 0.0, 1.0
    f = model_sampling.percent_to_sigma
    if sigma >= f(1e-12):
        return 0.0
    if sigma <= f(1.0 - 1e-12):
        return 1.0
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        if f(mid) > sigma:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


class SigmaStrength:
    """Strength of one step from its sigma: the schedule, gated exactly like ComfyUI.

    ``in_window`` uses ComfyUI's own comparison (``sigma_end <= sigma <= sigma_start``, with
    ``sigma_x = percent_to_sigma(x_percent)``) so a step on a border is in, as in ComfyUI;
    inside, ``p`` is clamped into the window before the curve is evaluated. Results are
    cached per (model sampling, sigma). ``used`` logs every strength handed to the ControlNet,
    keyed by sigma, so a recorder can store exactly what was applied. ``enabled`` False makes
    the ControlNet sit out (luma-only control's second prediction, without it), unlogged.
    """

    def __init__(self, schedule: StrengthSchedule, per_sample: Sequence[StrengthSchedule] | None = None):
        if per_sample is not None and any((q.start_percent, q.end_percent) != (schedule.start_percent,
                                                                                schedule.end_percent)
                                          for q in per_sample):
            raise ValueError("per-sample schedules must share the window (start/end percent) of the schedule")
        self.schedule = schedule
        #: one schedule per batch item (the RL sampler's keyframes_per_sample), or None: one for all
        self.per_sample = tuple(per_sample) if per_sample else None
        self._cache: dict[tuple[int, float], tuple[float, ...]] = {}
        self.used: dict[float, float] = {}
        self.used_per_sample: dict[float, tuple[float, ...]] = {}
        self.enabled = True

    def strength(self, model_sampling, sigma: float) -> float:
        """The step's strength (per-sample schedules: the largest, 0 only when every sample's is 0)."""
        return max(self.sample_strengths(model_sampling, sigma))

    def sample_strengths(self, model_sampling, sigma: float) -> tuple[float, ...]:
        """The step's strength for each per-sample schedule (one value without them)."""
        key = (id(model_sampling), float(sigma))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        s = self.schedule
        hi = model_sampling.percent_to_sigma(s.start_percent)
        lo = model_sampling.percent_to_sigma(s.end_percent)
        schedules = self.per_sample or (s,)
        if sigma > hi or sigma < lo:
            value = (0.0,) * len(schedules)
        else:
            p = self._snap(model_sampling, float(sigma))
            if p is None:
                p = min(max(sigma_to_percent(model_sampling, float(sigma)), s.start_percent), s.end_percent)
            value = tuple(float(q.strength_at(p)) for q in schedules)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = value
        return value

    def _breakpoints(self) -> list[float]:
        """Progress values where a curve may jump (window borders, step, keyframes)."""
        s = self.schedule
        width = s.end_percent - s.start_percent
        qs = {0.0, 1.0}
        for q in self.per_sample or (s,):
            qs |= {q.step_at, *(k for k, _ in q.keyframes)}
        return sorted({min(max(s.start_percent + q * width, 0.0), 1.0) for q in qs})

    def _snap(self, model_sampling, sigma: float) -> float | None:
        """A breakpoint ``p`` whose ``percent_to_sigma`` is exactly ``sigma``, else None.

        Bisection lands a hair to either side of a border; a step that sits exactly on one
        (ComfyUI's "normal" scheduler puts steps on round percents) must get the value *at*
        the border, deterministically.
        """
        for p in self._breakpoints():
            if model_sampling.percent_to_sigma(p) == sigma:
                return p
        return None


def _scheduled_class(base: type) -> type:
    """A subclass of ``base`` whose strength follows a :class:`SigmaStrength` (cached per base)."""
    cls = _subclasses.get(base)
    if cls is not None:
        return cls

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        ms = getattr(self, "model_sampling_current", None)
        if ms is None:
            raise RuntimeError("scheduled ControlNet: pre_run did not set model_sampling_current")
        sigma = float(t[0])
        if not self.qr_sigma_strength.enabled:
            strength = 0.0
        else:
            ss = self.qr_sigma_strength
            samples = ss.sample_strengths(ms, sigma)
            strength = max(samples)
            ss.used[sigma] = strength
            ss.used_per_sample[sigma] = samples
        if strength == 0.0:
            if self.previous_controlnet is not None:
                return self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            return None
        if self.qr_sigma_strength.per_sample is None:
            self.strength = strength
            self.qr_sample_gain = None
        else:  # one strength per sample: ComfyUI's scalar stays 1, control_merge scales each sample
            self.strength = 1.0
            self.qr_sample_gain = samples
        self.qr_batched_number = batched_number
        return base.get_control(self, x_noisy, t, cond, batched_number, transformer_options)

    def control_merge(self, control, control_prev, output_dtype):
        import torch

        feedback = getattr(self, "qr_feedback", None)
        gain = feedback.map if feedback is not None and feedback.map is not None else None
        samples = getattr(self, "qr_sample_gain", None)
        if samples is not None:
            per = torch.tensor(samples, dtype=torch.float32).view(-1, 1, 1, 1)
            gain = per if gain is None else gain * per.to(gain.device)
        if gain is not None:
            control = {key: [None if x is None else _with_gain(x, gain, self.qr_batched_number) for x in outputs]
                       for key, outputs in control.items()}
        return base.control_merge(self, control, control_prev, output_dtype)

    def copy(self):
        c = base.copy(self)
        c.__class__ = type(self)
        c.qr_sigma_strength = self.qr_sigma_strength
        c.qr_feedback = getattr(self, "qr_feedback", None)
        c.qr_sample_gain = getattr(self, "qr_sample_gain", None)
        return c

    cls = type(f"QRScheduled{base.__name__}", (base,),
               {"get_control": get_control, "control_merge": control_merge, "copy": copy})
    _subclasses[base] = cls
    return cls


def _with_gain(x, gain, batched_number: int):
    """One ControlNet output times the feedback gain map (per sample, broadcast like the hint)."""
    from comfy.controlnet import broadcast_image_to

    from ..rl.module_feedback import scale_residual

    g = broadcast_image_to(gain.to(x.device), x.shape[0], batched_number)
    if g.shape[-2:] == (1, 1):  # one strength per sample, no map
        return x * g.to(x.dtype)
    return scale_residual(x, g)


def scheduled_copy(control_net, hint_bchw, schedule: StrengthSchedule, sigma_strength: SigmaStrength, vae=None,
                   feedback=None):
    """A copy of ``control_net`` whose strength follows ``schedule`` (not yet chained);
    ``feedback`` (a :class:`rl.module_feedback.LatentFeedback`) adds the per-module gain map."""
    if not hasattr(control_net, "model_sampling_current"):
        # T2I adapters and other ControlBase kinds have no model_sampling_current: they gate on
        # timesteps differently, so per-sigma strength cannot be measured the same way.
        raise ValueError(
            f"Scheduled ControlNet Apply supports ControlNet models, not {type(control_net).__name__}; "
            "use ComfyUI's Apply ControlNet for this kind of model"
        )
    c = control_net.copy().set_cond_hint(
        hint_bchw, 1.0, (sigma_strength.schedule.start_percent, sigma_strength.schedule.end_percent), vae=vae
    )
    c.__class__ = _scheduled_class(type(c))
    c.qr_sigma_strength = sigma_strength
    c.qr_feedback = feedback
    c.qr_sample_gain = None
    return c


def apply_scheduled(positive, negative, control_net, image, schedule: StrengthSchedule, vae=None,
                    sigma_strength: SigmaStrength | None = None, feedback=None) -> tuple[list, list, SigmaStrength]:
    """ControlNetApplyAdvanced with a schedule: returns (positive, negative, sigma_strength)."""
    sigma_strength = sigma_strength or SigmaStrength(schedule)
    hint = image.movedim(-1, 1)
    copies: dict[object, object] = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for emb, opts in conditioning:
            d = opts.copy()
            prev = d.get("control", None)
            c_net = copies.get(prev)
            if c_net is None:
                c_net = scheduled_copy(control_net, hint, schedule, sigma_strength, vae=vae, feedback=feedback)
                c_net.set_previous_controlnet(prev)
                copies[prev] = c_net
            d["control"] = c_net
            d["control_apply_to_uncond"] = False
            entries.append([emb, d])
        out.append(entries)
    return out[0], out[1], sigma_strength


def schedule_inputs() -> list:
    """The schedule widgets shared by the apply node and the RL sampler."""
    return [
        io.Combo.Input("curve", options=list(CURVES), default="linear",
                       tooltip="How strength moves from strength_start to strength_end over the window: "
                       "constant, linear, cosine, exponential, step (switch at the middle) or keyframes."),
        io.Float.Input("strength_start", default=1.6, min=0.0, max=10.0, step=0.01,
                       tooltip="ControlNet strength at the start of the window (high noise). "
                       "Strong early fixes the QR structure."),
        io.Float.Input("strength_end", default=0.8, min=0.0, max=10.0, step=0.01,
                       tooltip="ControlNet strength at the end of the window (low noise). Weak late leaves room for art."),
        io.String.Input("keyframes", default="0:1.6, 0.4:1.2, 1:0.8",
                        tooltip="Only for curve=keyframes: 'progress:strength' pairs, progress in [0,1] "
                        "increasing, linear in between. Progress is measured inside the start/end window."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Window start, measured like ComfyUI's ControlNet start percent: a percent of the "
                       "model's timestep range (model_sampling.percent_to_sigma), not of the step list. Inclusive."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Window end, measured like ComfyUI's ControlNet end percent (percent of the model's "
                       "timestep range, not of the step list). Inclusive. Strength is 0 outside the window."),
    ]


def build_schedule(curve: str, strength_start: float, strength_end: float, keyframes: str,
                   start_percent: float, end_percent: float) -> StrengthSchedule:
    return StrengthSchedule(curve=curve, strength_start=strength_start, strength_end=strength_end,
                            start_percent=start_percent, end_percent=end_percent,
                            keyframes=keyframes if curve == "keyframes" else ())


def per_sample_schedules(text: str, batch: int, schedule: StrengthSchedule) -> list[StrengthSchedule] | None:
    """``keyframes_per_sample``: one keyframes line per batch item (blank lines ignored), in the
    window of ``schedule``; None when ``text`` is blank (one curve for the whole batch)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return None
    if len(lines) != batch:
        raise QRRLError(f"keyframes_per_sample has {len(lines)} lines for a batch of {batch}: give one keyframes "
                        "line per image (e.g. '0:1.6, 1:0.8'), or leave it empty for one curve for all")
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(StrengthSchedule(curve="keyframes", keyframes=line, start_percent=schedule.start_percent,
                                        end_percent=schedule.end_percent))
        except (QRRLError, ValueError) as e:
            raise QRRLError(f"keyframes_per_sample line {i + 1} ({line!r}): {e}") from None
    return out


def strengths_for_sigmas(sigma_strength: SigmaStrength, model_sampling, sigmas) -> list[float]:
    """The strength each step k (sigma_k > 0) gets; what ``get_control`` will use."""
    return [sigma_strength.strength(model_sampling, float(s)) for s in sigmas[:-1]]



def expected_strengths(schedule: StrengthSchedule, model_sampling, sigmas) -> list[float]:
    """Per-step strengths for ``sigmas`` (tests and tools; same rule as the node)."""
    return strengths_for_sigmas(SigmaStrength(schedule), model_sampling, sigmas)


def applied_strengths(sigma_strength: SigmaStrength, sigmas: torch.Tensor,
                      batch: int) -> tuple[list[float], torch.Tensor, list[str]]:
    """What the ControlNet got at each step of ``sigmas``: the strengths (the largest per step with
    per-sample curves), the table a shard stores ([K], or [B,K] per sample) and notes for the report."""
    used = sigma_strength.used
    sig_list = [float(s) for s in sigmas.float().cpu()]
    missing = [k for k, s in enumerate(sig_list[:-1]) if s not in used]
    strengths = [used.get(s, 0.0) for s in sig_list[:-1]]
    notes = []
    if missing:
        notes.append(f"the ControlNet did not run at steps {missing} (strength 0 recorded)")
    table = torch.tensor(strengths, dtype=torch.float32)
    if sigma_strength.per_sample is not None:  # [B,K]: each sample's own curve, as applied
        zeros = (0.0,) * batch
        rows = [sigma_strength.used_per_sample.get(s, zeros) for s in sig_list[:-1]]
        table = torch.tensor(rows, dtype=torch.float32).T.contiguous()
        notes.append("strength per sample (keyframes_per_sample): " + " | ".join(
            ", ".join(f"{v:.3g}" for v in row) for row in table.tolist()))
    return strengths, table, notes


# --------------------------------------------------------------------------------------------
# the RL sampler's model-side helpers


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



def preview_colours(model, what: str, off: str) -> tuple[list[list[float]], list[float] | None]:
    """The model's linear latent→RGB preview (factors ``[C][3]``, bias or None) as plain numbers,
    which module feedback, luma-only control and scan guidance read the latent through; refused,
    naming ``what`` needs it and how to turn it ``off``, when the model has none usable."""
    lf = model.get_model_object("latent_format")
    factors = getattr(lf, "latent_rgb_factors", None)
    if factors is None or getattr(lf, "latent_rgb_factors_reshape", None) is not None:
        raise QRRLError(f"{what} reads the latent through the model's latent→RGB preview colours, and this model's "
                        f"latent format ({type(lf).__name__}) has none usable; {off}")
    bias = getattr(lf, "latent_rgb_factors_bias", None)
    # plain numbers: no inference tensor of ComfyUI's enters a graph (scan guidance differentiates through them)
    return [list(map(float, row)) for row in factors], None if bias is None else [float(v) for v in bias]


def code_grid(qr_code, image: torch.Tensor, lh: int, lw: int, what: str) -> torch.Tensor:
    """The code's module grid ``[1,N,N]`` (1 = light), checked against the hint it must match and
    the square latent it must fill."""
    from ..rl.module_feedback import light_grids, wrong_modules

    if lh != lw:
        raise QRRLError(f"{what} needs a square latent (the QR code fills the image), got {lw * 8}x{lh * 8}")
    if image.shape[1] != image.shape[2]:
        raise QRRLError(f"{what} needs the square hint of QR Code Encode, got {image.shape[2]}x{image.shape[1]}")
    light = light_grids([qr_code])
    hint = image[:1, :, :, :3].movedim(-1, 1).float().cpu()
    agree = float((wrong_modules(hint, light, 0.0, 1e-3) < 0.5).float().mean())
    if agree < 0.9:
        raise QRRLError(f"qr_code does not match the hint image (only {100 * agree:.0f}% of modules agree): connect "
                        "hint and qr_code from the same QR Code Encode node")
    return light


def latent_feedback(model, qr_code, image: torch.Tensor, batch: int, lh: int, lw: int, low: float, high: float,
                    margin: float, ramp: float):
    """Module feedback for this run: the code's module grid, checked against the hint, seen
    through the model's latent preview factors (see :class:`rl.module_feedback.LatentFeedback`)."""
    from ..rl.module_feedback import LatentFeedback, ModuleFeedback

    fb = ModuleFeedback(low=float(low), high=float(high), margin=float(margin), ramp=float(ramp))
    light = code_grid(qr_code, image, lh, lw, "module feedback")
    factors, bias = preview_colours(model, "module feedback", "disconnect qr_code")
    return LatentFeedback(fb, light.expand(batch, -1, -1), factors, bias)


def latent_guidance(model, qr_code, image: torch.Tensor, batch: int, lh: int, lw: int, scale: float, margin: float,
                    start: float):
    """Scan guidance for this run (:mod:`rl.scan_guidance`): the settings, the code's module grid
    (checked against the hint) and the decoder it steers, the model's linear latent→RGB preview."""
    from ..rl.module_feedback import latent_rgb
    from ..rl.scan_guidance import ScanGuidance

    guidance = ScanGuidance(scale=float(scale), margin=float(margin), start=float(start))
    if qr_code is None:
        raise QRRLError("scan_guidance needs the code it should make readable: connect QR Code Encode's qr_code "
                        "(the code of the hint) to this sampler, or set scan_guidance to 0")
    light = code_grid(qr_code, image, lh, lw, "scan guidance")
    factors, bias = preview_colours(model, "scan guidance", "set scan_guidance to 0")

    def decode(z: torch.Tensor) -> torch.Tensor:
        return latent_rgb(z, factors, bias, clamp=False)

    return guidance, light.expand(batch, -1, -1), decode


def luma_projection(model, channels: int):
    """Luma-only control for this model: the projection and what a shard records of it
    (:func:`rl.luma_control.latent_luma_projection`, through the model's preview colours)."""
    from ..rl.luma_control import latent_luma_projection, latent_projection_meta

    factors, bias = preview_colours(model, "luma_control", "switch luma_control off")
    if len(factors) != channels:
        raise QRRLError(f"luma_control: the model's latent→RGB factors have {len(factors)} channels, the latent "
                        f"{channels}; switch luma_control off")
    return latent_luma_projection(factors, bias), latent_projection_meta(factors, bias)


class TrickSampler:
    """The function ComfyUI's ``KSAMPLER`` runs: :func:`rl.sampling.sample_loop` over ComfyUI's
    denoiser (CFG and the ControlNet already applied), with this run's tricks around each model
    call: module feedback, luma-only control and scan guidance (each None when off).

    After sampling: ``record`` (the trajectory, record mode), ``sigmas`` (the steps run),
    ``luma_calls`` (steps that paid luma control's extra model call) and ``guided`` ((step, mean
    margin loss left) per guided step).
    """

    def __init__(self, sigma_strength: SigmaStrength, eta: float, s_noise: float, seeds: list[int], record: bool,
                 feedback=None, luma=None, guidance=None):
        self.sigma_strength = sigma_strength
        self.eta, self.s_noise, self.seeds, self.recording = eta, s_noise, seeds, record
        self.feedback, self.luma = feedback, luma
        #: (ScanGuidance, module grid, latent decoder) from :func:`latent_guidance`, or None
        self.guidance, self.guide_light, self.guide_decode = guidance or (None, None, None)
        self.record = None
        self.sigmas: torch.Tensor | None = None
        self.luma_calls: list[int] = []
        self.guided: list[tuple[int, float]] = []

    def __call__(self, model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise_fn(xk, sigma, k):
            return self.denoise(model_k, xk, sigma * s_in, k, len(sigmas_in) - 1, extra_args)

        def step_cb(k, xk, dk, out):
            if callback is not None:
                callback({"x": xk, "i": k, "sigma": sigmas_in[k], "sigma_hat": sigmas_in[k], "denoised": dk})

        x_final, rec = sample_loop(denoise_fn, x, sigmas_in, self.eta, self.s_noise, self.seeds,
                                   record=self.recording, callback=step_cb)
        self.record, self.sigmas = rec, sigmas_in
        return x_final

    def denoise(self, model_k, xk, t, k: int, n_steps: int, extra_args: dict):
        """One step's prediction: ComfyUI's denoiser, then luma control, scan guidance, feedback."""
        if self.feedback is not None:
            self.feedback.begin_step(xk)  # recorded: the trainer replays each step's map
        denoised = model_k(xk, t, **extra_args)
        if self.luma is not None and self.sigma_strength.used.get(float(t[0]), 0.0) != 0.0:
            self.sigma_strength.enabled = False  # the same step without the ControlNet: the art's prediction
            try:
                art = model_k(xk, t, **extra_args)
            finally:
                self.sigma_strength.enabled = True
            denoised = art + self.luma(denoised - art)
            self.luma_calls.append(k)
        if self.guidance is not None and self.guidance.active(k, n_steps):
            from ..rl.scan_guidance import guide

            denoised, left = guide(denoised, self.guide_decode, self.guide_light, self.guidance)
            self.guided.append((k, float(left.mean())))
        if self.feedback is not None:
            self.feedback.observe(denoised, k, n_steps)  # the gain map for step k + 1
        return denoised

    def notes(self) -> list[str]:
        """Report lines for the tricks that ran."""
        notes = []
        if self.feedback is not None:
            fb = self.feedback.feedback
            shares = ", ".join(f"{100 * v:.0f}%" for v in self.feedback.wrong_fraction)
            notes.append(f"module feedback: gain {fb.low:g} on right modules, {fb.high:g} on wrong ones (margin "
                         f"{fb.margin:g}, ramp {fb.ramp:g}); modules off their side after each step (latent preview): "
                         f"{shares}")
        if self.luma is not None:
            n = len(self.luma_calls)
            notes.append(f"luma control: the ControlNet's change kept in luma (latent preview colours); "
                         f"{n} extra model calls (one per step where the ControlNet ran, "
                         f"{n}/{len(self.sigmas) - 1} steps)")
        if self.guidance is not None:
            g = self.guidance
            notes.append(f"scan guidance: scale {g.scale:g}, margin {g.margin:g}, guided steps "
                         f"{[k for k, _ in self.guided]}; margin loss left per image after each: "
                         + ", ".join(f"{v:.3g}" for _, v in self.guided) + " (no extra model calls)")
        return notes
