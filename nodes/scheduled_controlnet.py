"""Scheduled ControlNet Apply: one ControlNet strength per sampling step, from a curve.

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
"""

from __future__ import annotations

from collections.abc import Sequence

from comfy_api.latest import io

from ..rl.errors import QRRLError
from ..rl.schedule import CURVES, StrengthSchedule
from ._common import CATEGORY

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


class QRScheduledControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRScheduledControlNetApply",
            display_name="Scheduled ControlNet Apply (QR)",
            category=CATEGORY,
            description="Apply a ControlNet to positive and negative with a strength that follows a curve over "
            "the sampling run: exactly one strength per step (no doubled strength at segment borders). Works "
            "with any sampler.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (gets the same ControlNet, as in "
                                      "ComfyUI's Apply ControlNet)."),
                io.ControlNet.Input("control_net", tooltip="The ControlNet, e.g. QR Code Monster."),
                io.Image.Input("image", tooltip="The hint image (e.g. from QR Code Encode); resized to the latent "
                               "size x8 (nearest-exact, centre crop) like ComfyUI does."),
                *schedule_inputs(),
                io.Vae.Input("vae", optional=True, tooltip="Only for ControlNets that need a VAE (not SD1.5 ones)."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive", tooltip="Positive with the scheduled ControlNet."),
                io.Conditioning.Output("negative", display_name="negative", tooltip="Negative with the same ControlNet."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, control_net, image, curve: str, strength_start: float,
                strength_end: float, keyframes: str, start_percent: float, end_percent: float,
                vae=None) -> io.NodeOutput:
        schedule = build_schedule(curve, strength_start, strength_end, keyframes, start_percent, end_percent)
        if _all_zero(schedule):
            return io.NodeOutput(positive, negative)
        pos, neg, _ = apply_scheduled(positive, negative, control_net, image, schedule, vae=vae)
        return io.NodeOutput(pos, neg)


def _all_zero(schedule: StrengthSchedule) -> bool:
    if schedule.curve == "keyframes":
        return all(s == 0 for _, s in schedule.keyframes)
    if schedule.curve == "constant":
        return schedule.strength_start == 0
    return schedule.strength_start == 0 and schedule.strength_end == 0

