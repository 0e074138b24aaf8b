"""Strength curves, keyframes, per-step strengths and the curriculum (pure Python)."""

from __future__ import annotations

import json
import math

import pytest

from rl.errors import QRRLError
from rl.schedule import (
    CURVES,
    Curriculum,
    StrengthSchedule,
    format_keyframes,
    parse_keyframes,
    per_step_strengths,
)

PS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def values(sched: StrengthSchedule, ps=PS) -> list[float]:
    return [sched.strength_at(p) for p in ps]


def test_constant_and_linear_values():
    assert values(StrengthSchedule("constant", 1.3, 0.2)) == [1.3] * len(PS)
    lin = StrengthSchedule("linear", 1.6, 0.8)
    assert values(lin) == pytest.approx([1.6 - 0.8 * p for p in PS], abs=1e-12)


def test_cosine_values_and_flat_ends():
    cos = StrengthSchedule("cosine", 2.0, 0.0)
    assert cos.strength_at(0.0) == pytest.approx(2.0)
    assert cos.strength_at(0.5) == pytest.approx(1.0)
    assert cos.strength_at(1.0) == pytest.approx(0.0, abs=1e-12)
    assert cos.strength_at(0.25) == pytest.approx(1.0 + math.cos(math.pi / 4))
    # flat near the ends: the first 1% moves far less than linear would
    assert 2.0 - cos.strength_at(0.01) < 0.01 * 2.0 / 10


def test_exponential_is_geometric_and_handles_zero_end():
    exp = StrengthSchedule("exponential", 1.6, 0.4)
    for p in PS:
        assert exp.strength_at(p) == pytest.approx(1.6 * (0.25**p), rel=1e-12)
    zero = StrengthSchedule("exponential", 1.0, 0.0)
    vals = values(zero)
    assert vals[0] == pytest.approx(1.0) and vals[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isfinite(v) and v >= 0 for v in vals)
    # convex decay: the first half drops more than the second half
    assert 1.0 - zero.strength_at(0.5) > zero.strength_at(0.5) - 0.0
    rising = StrengthSchedule("exponential", 0.0, 1.0)
    assert rising.strength_at(0.0) == pytest.approx(0.0, abs=1e-12)
    assert rising.strength_at(1.0) == pytest.approx(1.0)
    assert rising.strength_at(0.5) < 0.5  # slow start, like a geometric rise


@pytest.mark.parametrize("curve", ["linear", "cosine", "exponential"])
def test_monotone_between_ends(curve):
    down = values(StrengthSchedule(curve, 1.5, 0.3), [i / 50 for i in range(51)])
    assert all(a >= b for a, b in zip(down, down[1:]))
    up = values(StrengthSchedule(curve, 0.3, 1.5), [i / 50 for i in range(51)])
    assert all(a <= b for a, b in zip(up, up[1:]))


def test_step_curve_switches_at_step_at():
    st = StrengthSchedule("step", 1.5, 0.5)
    assert st.strength_at(0.0) == 1.5 and st.strength_at(0.4999) == 1.5
    assert st.strength_at(0.5) == 0.5 and st.strength_at(1.0) == 0.5
    early = StrengthSchedule("step", 1.5, 0.5, step_at=0.2)
    assert early.strength_at(0.19) == 1.5 and early.strength_at(0.2) == 0.5


def test_window_zero_outside_and_progress_inside():
    sched = StrengthSchedule("linear", 2.0, 1.0, start_percent=0.2, end_percent=0.6)
    assert sched.strength_at(0.0) == 0.0 and sched.strength_at(0.19) == 0.0
    assert sched.strength_at(0.61) == 0.0 and sched.strength_at(1.0) == 0.0
    assert sched.strength_at(0.2) == pytest.approx(2.0)  # borders inclusive, like ComfyUI
    assert sched.strength_at(0.4) == pytest.approx(1.5)
    assert sched.strength_at(0.6) == pytest.approx(1.0)
    point = StrengthSchedule("linear", 2.0, 1.0, start_percent=0.5, end_percent=0.5)
    assert point.strength_at(0.5) == 2.0 and point.strength_at(0.51) == 0.0


def test_keyframes_parse_and_interpolate():
    kf = parse_keyframes("0:1.6, 0.4:1.2, 1.0:0.8")
    assert kf == ((0.0, 1.6), (0.4, 1.2), (1.0, 0.8))
    assert parse_keyframes(format_keyframes(kf)) == kf
    assert parse_keyframes("") == () and parse_keyframes(None) == ()
    sched = StrengthSchedule("keyframes", keyframes="0:1.6, 0.4:1.2, 1.0:0.8")
    assert sched.strength_at(0.2) == pytest.approx(1.4)
    assert sched.strength_at(0.7) == pytest.approx(1.0)
    held = StrengthSchedule("keyframes", keyframes="0.3:1.0, 0.6:0.5")
    assert held.strength_at(0.0) == 1.0 and held.strength_at(1.0) == 0.5  # flat outside
    windowed = StrengthSchedule("keyframes", keyframes=((0.0, 1.0), (1.0, 0.0)), start_percent=0.5)
    assert windowed.strength_at(0.75) == pytest.approx(0.5)  # positions are window progress
    assert windowed.strength_at(0.25) == 0.0


@pytest.mark.parametrize(
    "text,needle",
    [
        ("0.5:1, 0.2:1", "out of order"),
        ("0:1, 0:2", "duplicate"),
        ("1.5:1", "[0, 1]"),
        ("-0.1:1", "[0, 1]"),
        ("0:-1", ">= 0"),
        ("0:nan", "finite"),
        ("nan:1", "finite"),
        ("0=1", "position:strength"),
        ("a:1", "number"),
    ],
)
def test_keyframe_errors(text, needle):
    with pytest.raises(QRRLError, match=None) as err:
        parse_keyframes(text)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"curve": "zigzag"}, "valid curves: constant, linear, cosine, exponential, step, keyframes"),
        ({"strength_start": -0.1}, ">= 0"),
        ({"strength_end": float("nan")}, "finite"),
        ({"start_percent": 0.7, "end_percent": 0.3}, "start <= end"),
        ({"start_percent": -0.1}, "[0, 1]"),
        ({"end_percent": 1.1}, "[0, 1]"),
        ({"curve": "keyframes"}, "needs keyframes"),
        ({"keyframes": "0.5:1, 0.1:1"}, "out of order"),
        ({"step_at": 2.0}, "[0, 1]"),
    ],
)
def test_schedule_validation(kwargs, needle):
    with pytest.raises(QRRLError) as err:
        StrengthSchedule(**kwargs)
    assert needle in str(err.value)


def test_strength_at_rejects_nan():
    with pytest.raises(QRRLError):
        StrengthSchedule().strength_at(float("nan"))


@pytest.mark.parametrize("curve", CURVES)
def test_spec_round_trip_json(curve):
    sched = StrengthSchedule(curve, 1.4, 0.6, 0.1, 0.9, keyframes="0:1, 1:0.5", step_at=0.3)
    spec = sched.to_spec()
    text = json.dumps(spec)
    assert StrengthSchedule.from_spec(text) == sched
    assert StrengthSchedule.from_spec(spec) == sched
    with pytest.raises(QRRLError, match="unknown strength schedule keys"):
        StrengthSchedule.from_spec({**spec, "bogus": 1})


def test_per_step_strengths_one_per_step_at_borders():
    # A window border that falls exactly on a step gets the curve's value once, not twice.
    sched = StrengthSchedule("step", 1.5, 0.5, start_percent=0.0, end_percent=0.5, step_at=0.5)
    steps = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    out = per_step_strengths(sched, steps)
    # step_at is window progress: p = 0.25 is the switch; p = 0.5 is the (inclusive) window end
    assert out == [1.5, 1.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert len(out) == len(steps)
    kf = StrengthSchedule("keyframes", keyframes="0:2, 0.5:1, 1:0")
    assert per_step_strengths(kf, [0.0, 0.5, 1.0]) == [2.0, 1.0, 0.0]
    with pytest.raises(QRRLError, match=r"p\[1\]"):
        per_step_strengths(kf, [0.0, 1.5])


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_curriculum_fixed_kinds_reach_end_exactly(kind):
    cur = Curriculum(kind, start=1.6, end=0.7, rounds=5)
    vals = [cur.strength_for_round(r) for r in range(7)]
    assert vals[0] == pytest.approx(1.6)
    assert vals[4] == 0.7 and vals[5] == 0.7 and vals[6] == 0.7  # exact at the last round, then held
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert Curriculum(kind, 1.6, 0.7, rounds=1).strength_for_round(0) == 0.7


def test_curriculum_linear_values_and_constant():
    cur = Curriculum("linear", 2.0, 1.0, rounds=5)
    assert [cur.strength_for_round(r) for r in range(5)] == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0])
    assert Curriculum("constant", 1.2, 1.2, rounds=3).strength_for_round(2) == 1.2


def test_curriculum_adaptive_steps_only_on_success():
    cur = Curriculum("adaptive", start=1.6, end=1.0, rounds=4, target_decode_rate=0.8)  # step 0.2
    assert cur.strength_for_round(0) == 1.6
    assert cur.strength_for_round(1, [0.5]) == 1.6  # target missed: hold
    assert cur.strength_for_round(2, [0.5, 0.85]) == pytest.approx(1.4)
    assert cur.strength_for_round(3, [0.9, 0.9, float("nan")]) == pytest.approx(1.2)  # NaN = missed
    assert cur.strength_for_round(6, [1.0] * 6) == 1.0  # never below end, exactly end
    big = Curriculum("adaptive", 1.6, 1.0, rounds=3, step=0.5)
    assert big.strength_for_round(2, [0.9, 0.9]) == 1.0
    with pytest.raises(QRRLError, match="decode rate of every past round"):
        cur.strength_for_round(2, [0.9])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"kind": "random"}, "valid kinds"),
        ({"rounds": 0}, ">= 1"),
        ({"rounds": 2.5}, ">= 1"),
        ({"start": -1.0, "end": -2.0}, ">= 0"),
        ({"start": 0.5, "end": 1.0}, "high → low"),
        ({"target_decode_rate": 0.0}, "(0, 1]"),
        ({"target_decode_rate": 1.5}, "(0, 1]"),
        ({"step": 0.0}, "> 0"),
        ({"start": float("inf")}, "finite"),
    ],
)
def test_curriculum_validation(kwargs, needle):
    with pytest.raises(QRRLError) as err:
        Curriculum(**kwargs)
    assert needle in str(err.value)


def test_curriculum_spec_round_trip_and_round_validation():
    cur = Curriculum("adaptive", 1.5, 0.9, rounds=4, target_decode_rate=0.7, step=0.1)
    assert Curriculum.from_spec(json.dumps(cur.to_spec())) == cur
    with pytest.raises(QRRLError, match="round"):
        cur.strength_for_round(-1)
