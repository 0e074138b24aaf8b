"""ControlNet strength curves over one sampling run, and the training curriculum over rounds.

Why one module: the Scheduled ControlNet Apply node, the RL sampler node, the shard recorder
(which stores the per-step strengths and the schedule spec) and the curriculum loop all need
the same numbers. Everything here is pure Python (no torch), validated, and JSON-able.

Progress ``p`` is measured the way ComfyUI measures ControlNet start/end percent: ``p`` is the
fraction of the model's timestep range with ``sigma = model_sampling.percent_to_sigma(p)``;
``p = 0`` is the start of sampling (high noise), ``p = 1`` the end. The node converts each
step's sigma into ``p``; the functions here only see ``p``.

Inside the window ``[start_percent, end_percent]`` (both borders inclusive, as in ComfyUI) a
curve is evaluated at the *window progress* ``q = (p - start_percent) / (end_percent -
start_percent)`` in ``[0, 1]``; outside the window the strength is 0. Keyframe positions are
window progress ``q`` too (with the default window ``[0, 1]``, ``q == p``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import QRRLError

CURVES: tuple[str, ...] = ("constant", "linear", "cosine", "exponential", "step", "keyframes")
CURRICULUM_KINDS: tuple[str, ...] = ("constant", "linear", "cosine", "exponential", "adaptive")

#: Decay rate used by the "exponential" curve when one end strength is 0 (a geometric
#: interpolation is undefined there): the curve behaves as if the zero end were 1% of the other.
ZERO_END_EXP_RATE: float = math.log(100.0)

Keyframes = tuple[tuple[float, float], ...]


# --------------------------------------------------------------------------------------------
# small validated helpers


def _finite(value: object, what: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise QRRLError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise QRRLError(f"{what} must be a finite number, got {value!r}")
    return out


def _strength(value: object, what: str) -> float:
    out = _finite(value, what)
    if out < 0:
        raise QRRLError(f"{what} must be >= 0 (0 disables the ControlNet), got {out}")
    return out


def _percent(value: object, what: str) -> float:
    out = _finite(value, what)
    if not 0.0 <= out <= 1.0:
        raise QRRLError(f"{what} must be in [0, 1] (fraction of the sampling run), got {out}")
    return out


def interpolate(curve: str, a: float, b: float, q: float) -> float:
    """Value of a start→end curve at progress ``q`` in [0, 1] (``a`` at 0, ``b`` at 1).

    linear: ``a + (b-a)q``. cosine: ``b + (a-b)(1+cos(pi q))/2`` (flat at both ends).
    exponential: ``b + (a-b)(e^{-rq} - e^{-r})/(1 - e^{-r})`` with ``r = ln(a/b)``, which is
    exactly the geometric interpolation ``a (b/a)^q`` when both are > 0; when one end is 0
    ``r = ±ln(100)`` (:data:`ZERO_END_EXP_RATE`), i.e. as if that end were 1% of the other.
    constant: ``a``.
    """
    q = min(1.0, max(0.0, q))
    if curve == "constant":
        return a
    if curve == "linear":
        return a + (b - a) * q
    if curve == "cosine":
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * q))
    if curve == "exponential":
        if a == b:
            return a
        if a > 0 and b > 0:
            return a * (b / a) ** q
        rate = ZERO_END_EXP_RATE if a > b else -ZERO_END_EXP_RATE
        e_q, e_1 = math.exp(-rate * q), math.exp(-rate)
        return b + (a - b) * (e_q - e_1) / (1.0 - e_1)
    raise QRRLError(f"unknown curve {curve!r}; valid curves: {', '.join(CURVES)}")


# --------------------------------------------------------------------------------------------
# keyframes


def parse_keyframes(text: str | Sequence[Sequence[float]] | None) -> Keyframes:
    """Parse ``"0:1.6, 0.4:1.2, 1.0:0.8"`` into ``((0.0, 1.6), (0.4, 1.2), (1.0, 0.8))``.

    Also accepts a sequence of ``(p, strength)`` pairs (as stored in a spec). An empty string
    or ``None`` gives ``()``. Positions must be in [0, 1] and strictly increasing; strengths
    finite and >= 0.
    """
    if text is None:
        return ()
    pairs: list[tuple[object, object]] = []
    if isinstance(text, str):
        body = text.strip()
        if not body:
            return ()
        for raw in body.replace(";", ",").split(","):
            item = raw.strip()
            if not item:
                continue
            if item.count(":") != 1:
                raise QRRLError(
                    f"keyframe {item!r} is not 'position:strength'; write e.g. '0:1.6, 0.4:1.2, 1:0.8'"
                )
            pos, val = item.split(":")
            pairs.append((pos.strip(), val.strip()))
    else:
        for item in text:
            if len(item) != 2:
                raise QRRLError(f"keyframe {item!r} must be a (position, strength) pair")
            pairs.append((item[0], item[1]))
    out: list[tuple[float, float]] = []
    for pos, val in pairs:
        p = _percent(pos, f"keyframe position {pos!r}")
        s = _strength(val, f"keyframe strength at {pos!r}")
        if out and p == out[-1][0]:
            raise QRRLError(f"duplicate keyframe position {p}; give each position once")
        if out and p < out[-1][0]:
            raise QRRLError(
                f"keyframes out of order: {p} comes after {out[-1][0]}; list positions in increasing order"
            )
        out.append((p, s))
    return tuple(out)


def format_keyframes(keyframes: Keyframes) -> str:
    """Inverse of :func:`parse_keyframes` (``"0:1.6, 0.4:1.2, 1:0.8"``)."""
    return ", ".join(f"{p:g}:{s:g}" for p, s in keyframes)


def keyframe_value(keyframes: Keyframes, q: float) -> float:
    """Linear interpolation between keyframes; held flat before the first and after the last."""
    if not keyframes:
        raise QRRLError("the 'keyframes' curve needs at least one keyframe, e.g. '0:1.6, 1:0.8'")
    if q <= keyframes[0][0]:
        return keyframes[0][1]
    for (p0, s0), (p1, s1) in zip(keyframes, keyframes[1:]):
        if q <= p1:
            return s0 + (s1 - s0) * (q - p0) / (p1 - p0)
    return keyframes[-1][1]


# --------------------------------------------------------------------------------------------
# per-run strength schedule


@dataclass(frozen=True)
class StrengthSchedule:
    """ControlNet strength as a function of sampling progress ``p``.

    curve: one of :data:`CURVES`. ``step`` uses ``strength_start`` for window progress
    ``q < step_at`` and ``strength_end`` from ``step_at`` on. ``keyframes`` uses only
    ``keyframes`` (positions in window progress); ``strength_start``/``strength_end`` are then
    ignored. Keyframes given with another curve are validated and kept, but not used.
    Construct with keyframes as a tuple of pairs or a ``"p:s, ..."`` string.
    """

    curve: str = "constant"
    strength_start: float = 1.0
    strength_end: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    keyframes: Keyframes = field(default=())
    step_at: float = 0.5

    def __post_init__(self) -> None:
        curve = str(self.curve).strip().lower()
        if curve not in CURVES:
            raise QRRLError(f"unknown strength curve {self.curve!r}; valid curves: {', '.join(CURVES)}")
        object.__setattr__(self, "curve", curve)
        object.__setattr__(self, "strength_start", _strength(self.strength_start, "strength_start"))
        object.__setattr__(self, "strength_end", _strength(self.strength_end, "strength_end"))
        start = _percent(self.start_percent, "start_percent")
        end = _percent(self.end_percent, "end_percent")
        if start > end:
            raise QRRLError(
                f"start_percent ({start}) is after end_percent ({end}); the ControlNet window must have start <= end"
            )
        object.__setattr__(self, "start_percent", start)
        object.__setattr__(self, "end_percent", end)
        object.__setattr__(self, "keyframes", parse_keyframes(self.keyframes))
        object.__setattr__(self, "step_at", _percent(self.step_at, "step_at"))
        if curve == "keyframes" and not self.keyframes:
            raise QRRLError("the 'keyframes' curve needs keyframes, e.g. '0:1.6, 0.4:1.2, 1:0.8'")

    def window_progress(self, p: float) -> float | None:
        """``q`` in [0, 1] for ``p`` inside the window, ``None`` outside it."""
        p = _finite(p, "progress p")
        if p < self.start_percent or p > self.end_percent:
            return None
        width = self.end_percent - self.start_percent
        return 0.0 if width <= 0 else (p - self.start_percent) / width

    def strength_at(self, p: float) -> float:
        """Strength at progress ``p``; 0 outside ``[start_percent, end_percent]``."""
        q = self.window_progress(p)
        if q is None:
            return 0.0
        if self.curve == "keyframes":
            return keyframe_value(self.keyframes, q)
        if self.curve == "step":
            return self.strength_start if q < self.step_at else self.strength_end
        return interpolate(self.curve, self.strength_start, self.strength_end, q)

    def to_spec(self) -> dict[str, object]:
        """JSON-able dict (stored in shard metadata as ``strength_schedule``)."""
        return {
            "curve": self.curve,
            "strength_start": self.strength_start,
            "strength_end": self.strength_end,
            "start_percent": self.start_percent,
            "end_percent": self.end_percent,
            "keyframes": [[p, s] for p, s in self.keyframes],
            "step_at": self.step_at,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, object] | str) -> StrengthSchedule:
        """Rebuild from :meth:`to_spec` output (a dict or its JSON string)."""
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise QRRLError(f"strength schedule spec is not valid JSON: {e}") from None
        if not isinstance(spec, Mapping):
            raise QRRLError(f"strength schedule spec must be an object, got {type(spec).__name__}")
        known = {"curve", "strength_start", "strength_end", "start_percent", "end_percent", "keyframes", "step_at"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise QRRLError(f"unknown strength schedule keys {unknown}; known keys: {sorted(known)}")
        kwargs = dict(spec)
        kwargs["keyframes"] = parse_keyframes(kwargs.get("keyframes") or ())  # type: ignore[arg-type]
        return cls(**kwargs)  # type: ignore[arg-type]


def per_step_strengths(schedule: StrengthSchedule, step_percents: Sequence[float]) -> list[float]:
    """Exactly one strength per sampling step, from each step's progress ``p_k``.

    Why: emulating a schedule with several chained ControlNets over adjacent windows gives a
    step on a shared border both strengths (ComfyUI's borders are inclusive and chained
    ControlNets add). Evaluating the curve once per step avoids that; the recorder stores the
    result as the shard's ``strength`` [K].
    """
    return [schedule.strength_at(_percent(p, f"step progress p[{k}]")) for k, p in enumerate(step_percents)]


# --------------------------------------------------------------------------------------------
# training curriculum


@dataclass(frozen=True)
class Curriculum:
    """ControlNet strength per training round, high → low (DESIGN §6).

    Fixed kinds (constant, linear, cosine, exponential) interpolate from ``start`` at round 0
    to exactly ``end`` at round ``rounds - 1`` and hold ``end`` after it (``constant`` stays
    at ``start``). ``adaptive`` starts at ``start`` and steps down by ``step`` (default
    ``(start - end) / (rounds - 1)``) after every round whose decode rate reached
    ``target_decode_rate``, never below ``end``; otherwise it holds.
    """

    kind: str = "linear"
    start: float = 1.6
    end: float = 0.8
    rounds: int = 5
    target_decode_rate: float = 0.8
    step: float | None = None

    def __post_init__(self) -> None:
        kind = str(self.kind).strip().lower()
        if kind not in CURRICULUM_KINDS:
            raise QRRLError(f"unknown curriculum kind {self.kind!r}; valid kinds: {', '.join(CURRICULUM_KINDS)}")
        object.__setattr__(self, "kind", kind)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise QRRLError(f"curriculum rounds must be an integer >= 1, got {self.rounds!r}")
        start = _strength(self.start, "curriculum start strength")
        end = _strength(self.end, "curriculum end strength")
        if start < end:
            raise QRRLError(f"curriculum goes high → low: start ({start}) must be >= end ({end})")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        target = _finite(self.target_decode_rate, "target_decode_rate")
        if not 0.0 < target <= 1.0:
            raise QRRLError(f"target_decode_rate must be in (0, 1], got {target}")
        object.__setattr__(self, "target_decode_rate", target)
        if self.step is not None:
            step = _finite(self.step, "curriculum step")
            if step <= 0:
                raise QRRLError(f"curriculum step must be > 0, got {step}")
            object.__setattr__(self, "step", step)

    @property
    def step_size(self) -> float:
        """The adaptive step down (``step`` or ``(start - end) / (rounds - 1)``)."""
        if self.step is not None:
            return self.step
        return (self.start - self.end) / (self.rounds - 1) if self.rounds > 1 else self.start - self.end

    def strength_for_round(self, r: int, history: Sequence[float] = ()) -> float:
        """Strength for round ``r`` (0-based).

        ``history[i]`` is the decode rate measured in round ``i``; only ``adaptive`` uses it
        and needs ``len(history) >= r``. A NaN decode rate counts as "target not reached".
        """
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise QRRLError(f"round must be an integer >= 0, got {r!r}")
        if self.kind == "adaptive":
            if len(history) < r:
                raise QRRLError(
                    f"adaptive curriculum needs the decode rate of every past round: round {r} needs "
                    f"{r} values, got {len(history)}"
                )
            strength = self.start
            for rate in history[:r]:
                rate_f = float(rate)
                if math.isfinite(rate_f) and rate_f >= self.target_decode_rate:
                    strength -= self.step_size
                    if strength <= self.end + 1e-12 * max(1.0, abs(self.end)):
                        return self.end
            return strength
        if self.kind == "constant":
            return self.start
        if self.rounds == 1 or r >= self.rounds - 1:
            return self.end
        return interpolate(self.kind, self.start, self.end, r / (self.rounds - 1))

    def to_spec(self) -> dict[str, object]:
        """JSON-able dict (run state, shard metadata)."""
        return {
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
            "rounds": self.rounds,
            "target_decode_rate": self.target_decode_rate,
            "step": self.step,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, object] | str) -> Curriculum:
        """Rebuild from :meth:`to_spec` output (a dict or its JSON string)."""
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise QRRLError(f"curriculum spec is not valid JSON: {e}") from None
        if not isinstance(spec, Mapping):
            raise QRRLError(f"curriculum spec must be an object, got {type(spec).__name__}")
        known = {"kind", "start", "end", "rounds", "target_decode_rate", "step"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise QRRLError(f"unknown curriculum keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(spec))  # type: ignore[arg-type]
