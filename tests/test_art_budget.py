"""The art budget: a Lagrange multiplier that holds the mean art similarity at a floor."""

from __future__ import annotations

import numpy as np
import pytest

from rl.art_budget import ArtBudget, LevelBudget
from rl.ddpo import compute_advantages
from rl.reward import Reward, combine_rewards
from rl.schedule_policy import SchedulePolicy


def test_price_rises_below_the_floor_and_falls_back_to_zero():
    b = ArtBudget(floor=0.8, lr=100.0)
    assert b.update(0.79) == pytest.approx({"art_price": 1.0, "art_gap": 0.01})
    b.update(0.78)
    assert b.price == pytest.approx(3.0)
    b.update(0.85)  # inside the budget: the price falls, never below 0
    assert b.price == pytest.approx(0.0)
    r = ArtBudget(floor=0.8, price=2.0).reward([0.9, 0.7])
    assert r.total == pytest.approx([0.2, -0.2]) and r.components["art_margin"] == pytest.approx([0.1, -0.1])


def test_the_proportional_term_answers_this_rounds_gap_and_the_integral_is_kept():
    """PI price: an overspend is priced at once (kp), the integral carries the bias, and an
    underspend can take the price to 0 without winding the integral below 0."""
    b = ArtBudget(floor=0.8, lr=100.0, kp=500.0)
    assert b.update(0.79)["art_price"] == pytest.approx(1.0 + 5.0)
    assert b.integral == pytest.approx(1.0)
    assert b.update(0.80)["art_price"] == pytest.approx(1.0)  # on the floor: the integral alone
    assert b.update(0.83)["art_price"] == 0.0 and b.integral == 0.0
    with pytest.raises(ValueError, match="kp"):
        ArtBudget(floor=0.8, kp=-1.0)


def test_paired_floors_price_each_sample_against_its_own_reference():
    """Per-sample floors (the demo's paired budget): margins against each sample's own floor, and
    the dual step acts on the round's mean floor, so a round of low-art prompts is not a shortfall."""
    b = ArtBudget(floor=0.8, lr=100.0, price=2.0)
    r = b.reward([0.7, 0.9], floors=[0.65, 0.95])
    assert r.components["art_margin"] == pytest.approx([0.05, -0.05]) and r.total == pytest.approx([0.1, -0.1])
    assert b.update(0.75, floor=0.74)["art_gap"] == pytest.approx(-0.01)  # inside its paired budget
    assert b.price == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one floor per sample"):
        b.reward([0.7, 0.9], floors=[0.6])


@pytest.mark.parametrize("kw", [{"floor": float("nan")}, {"floor": 0.8, "lr": -1.0}, {"floor": 0.8, "price": -1.0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        ArtBudget(**kw)
    with pytest.raises(ValueError, match="finite"):
        ArtBudget(floor=0.8).update(float("nan"))


def _constrained_bandit(seed: int, rounds: int = 40) -> tuple[float, float]:
    """A one-knob world like the toy's: strength buys decoding and costs art, and images differ
    in art (std 0.05) by more than the budget. Returns (strength, art) of the mean schedule,
    averaged over the last 10 rounds."""
    rng = np.random.default_rng(seed)
    pol = SchedulePolicy(steps=1, sigma=0.2, lr=2.0)
    budget = ArtBudget(floor=0.855, lr=100.0)  # within 5% of the starting art, 0.9 at strength 0.5

    def art_at(s: np.ndarray) -> np.ndarray:
        return 0.9 - 0.2 * (s - 0.5)

    tail = []
    for r in range(rounds):
        strengths, delta = pol.draw(64, 0.5, rng)
        s = strengths[:, 0].double().numpy()
        decode = 1 / (1 + np.exp(-8 * (s - 0.75)))
        art = art_at(s) + rng.normal(0, 0.05, s.shape)
        scan = Reward(total=decode, components={"decoded": decode}, details=[{}] * 64)
        total = combine_rewards([scan, budget.reward(art)], [1.0, 1.0]).total
        adv = compute_advantages(total, [f"g{i // 8}-{r}" for i in range(64)], min_group_size=8)
        pol.update(delta, adv.values, adv.mask)
        budget.update(float(art.mean()))
        mean_s = float(pol.schedule(0.5)[0])
        tail = (tail + [(mean_s, float(art_at(np.array(mean_s))))])[-10:]
    return tuple(np.mean(tail, axis=0))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_policy_spends_the_art_budget_and_stays_inside_it(seed):
    """Starting inside the budget the price is 0, so strength rises for the decode it buys; once
    the mean art reaches the floor the price holds it there (within 0.02) instead of sliding on."""
    strength, art = _constrained_bandit(seed)
    assert strength > 0.6, strength  # started at 0.5, 12% decode
    assert 0.855 - 0.02 < art < 0.855 + 0.02, art


def _level_world(seed: int, rounds: int = 12, start: float = 0.4):
    """A toy-like world in the curve's log-level L: art = 0.85 − 0.14·L (+ noise), decoding with
    probability sigmoid(4L); the floor is 0.83, so the budget is spent at L* = 0.143."""
    rng = np.random.default_rng(seed)
    budget = LevelBudget(floor=0.83, art_slope=-0.05, decode_slope=0.1, art_weight=0.5)  # poor priors
    level, rows = start, []
    for _ in range(rounds):
        delta = rng.normal(0.0, 0.2, 64)
        lv = level + delta
        art = 0.85 - 0.14 * lv + rng.normal(0.0, 0.01, 64)
        decoded = (rng.random(64) < 1 / (1 + np.exp(-4 * lv))).astype(float)
        info = budget.observe(delta, art - 0.83, decoded)
        level += info["level_step"]
        rows.append(info)
    return level, budget, rows


def test_the_level_budget_holds_the_floor_and_learns_the_exchange_rate():
    """LevelBudget: from an over-spent start and wrong priors, the level settles on the budget
    within a few rounds (no circling), and the price settles around the level's decode-for-art rate
    less the reward's own art weight."""
    for seed in range(3):
        level, budget, rows = _level_world(seed)
        assert level == pytest.approx(0.143, abs=0.03)
        assert all(abs(r["art_gap"]) < 0.01 for r in rows[5:])
        assert budget.art_slope == pytest.approx(-0.14, abs=0.03)
        rate = 4 * 0.25 * 0.9  # d sigmoid(4L)/dL near L* (≈ 0.93), per unit art 0.14
        mean_price = np.mean([r["art_price"] for r in rows[4:]])  # one round's decode slope is noisy (binary)
        assert mean_price == pytest.approx(rate / 0.14 - 0.5, rel=0.35)


def test_the_level_budget_refuses_bad_input():
    with pytest.raises(ValueError, match="art_slope"):
        LevelBudget(floor=0.8, art_slope=0.1)
    with pytest.raises(ValueError, match="one level offset"):
        LevelBudget(floor=0.8).observe([0.1, 0.2], [0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        LevelBudget(floor=0.8).observe([0.1, float("nan")], [0.0, 0.1], [1.0, 0.0])
