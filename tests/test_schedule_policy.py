"""The learned per-step strength curve (rl.schedule_policy): exploration, update, export, and
that it *learns*: the mean schedule climbs toward what the reward prefers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl.ddpo import compute_advantages
from rl.errors import QRRLError
from rl.schedule import StrengthSchedule, parse_keyframes, per_step_strengths
from rl.schedule_policy import SchedulePolicy


def test_draws_explore_around_the_mean_schedule():
    pol = SchedulePolicy(steps=5, sigma=0.2, log_gain=torch.log(torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0])))
    strengths, delta = pol.draw(4000, 0.4, np.random.default_rng(0))
    assert strengths.shape == delta.shape == (4000, 5)
    assert delta.std(0).numpy() == pytest.approx([0.2] * 5, abs=0.01)
    assert torch.allclose(strengths, 0.4 * (pol.log_gain + delta).exp())  # nothing clamped here
    assert pol.schedule(0.4).tolist() == pytest.approx([0.4, 0.8, 0.4, 0.2, 0.4], rel=1e-6)


def test_update_is_the_natural_gradient_of_the_gaussian():
    pol = SchedulePolicy(steps=3, sigma=0.1, lr=2.0)
    delta = torch.tensor([[0.1, 0.0, -0.1], [-0.1, 0.2, 0.0], [0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0, 5.0])
    mask = torch.tensor([True, True, False])  # the third sample is outside any group: ignored
    pol.update(delta, adv, mask)
    assert pol.log_gain.tolist() == pytest.approx([2.0 * 0.2 / 2, 2.0 * -0.2 / 2, 2.0 * -0.1 / 2])
    with pytest.raises(QRRLError, match="delta must be"):
        pol.update(delta[:, :2], adv)


def test_the_schedule_learns_where_the_reward_is():
    """A bandit with the toy's shape: only the second-to-last step's strength pays, and strength
    elsewhere costs. From a flat start, rounds of 64 draws with group-normalised advantages move
    that step up and the others down, and the mean reward rises."""
    rng = np.random.default_rng(0)
    pol = SchedulePolicy(steps=10, sigma=0.2, lr=2.0)

    def reward(strengths: torch.Tensor) -> np.ndarray:
        pay = 1.0 - torch.exp(-2.0 * strengths[:, 8])  # decode from the step that matters
        cost = 0.1 * strengths.sum(1)  # art lost to strength anywhere
        return (pay - cost + 0.05 * torch.from_numpy(rng.normal(size=strengths.shape[0]))).numpy()

    mean_reward = []
    for r in range(25):
        strengths, delta = pol.draw(64, 0.4, rng)
        rew = reward(strengths)
        adv = compute_advantages(rew, [f"g{i // 8}-{r}" for i in range(64)], min_group_size=8)
        pol.update(delta, adv.values, adv.mask)
        mean_reward.append(float(reward(pol.schedule(0.4)[None].expand(256, -1)).mean()))
    gains = pol.gains()
    assert gains[8] > 1.5 and float(gains[:8].mean()) < 0.9
    assert mean_reward[-1] > mean_reward[0] + 0.1


def test_keyframes_drive_the_scheduled_controlnet_node_curve():
    pol = SchedulePolicy(steps=4, log_gain=torch.log(torch.tensor([1.0, 0.5, 2.0, 1.0])))
    text = pol.keyframes(0.4)
    frames = parse_keyframes(text)
    assert [p for p, _ in frames] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-4)
    sched = StrengthSchedule("keyframes", 0.4, 0.4, keyframes=frames)
    assert per_step_strengths(sched, [0, 1 / 3, 2 / 3, 1]) == pytest.approx([0.4, 0.2, 0.8, 0.4], abs=1e-4)
    with pytest.raises(QRRLError, match="one keyframe position per step"):
        pol.keyframes(0.4, positions=[0.0, 1.0])


def test_save_and_load_round_trip(tmp_path):
    pol = SchedulePolicy(steps=3, sigma=0.3, lr=0.5, log_gain=torch.tensor([0.1, -0.2, 0.3]))
    path = pol.save(tmp_path / "schedule.json", base=0.4)
    again = SchedulePolicy.load(path)
    assert torch.equal(again.log_gain, pol.log_gain) and again.sigma == 0.3 and again.lr == 0.5
    (tmp_path / "bad.json").write_text("{\"steps\": 3}")
    with pytest.raises(QRRLError, match="not a strength-schedule file"):
        SchedulePolicy.load(tmp_path / "bad.json")


@pytest.mark.parametrize("kw,needle", [({"sigma": 0.0}, "schedule-sigma"), ({"sigma": 2.0}, "schedule-sigma"),
                                       ({"lr": -1.0}, "schedule-lr"), ({"steps": 0}, "at least one step")])
def test_bad_settings_are_refused(kw, needle):
    with pytest.raises(QRRLError, match=needle):
        SchedulePolicy(**({"steps": 3} | kw))


def test_averaged_policy_is_the_mean_of_earlier_means():
    """The demo's result averages the last rounds' means (the primal-dual iterates circle)."""
    pol = SchedulePolicy(steps=3, sigma=0.1, lr=2.0)
    hist = [torch.tensor([0.0, 0.2, -0.2]), torch.tensor([0.2, 0.0, 0.2])]
    avg = pol.averaged(hist)
    assert avg.log_gain.tolist() == pytest.approx([0.1, 0.1, 0.0])
    assert (avg.sigma, avg.lr, avg.steps) == (pol.sigma, pol.lr, pol.steps)
    assert pol.log_gain.tolist() == [0.0, 0.0, 0.0]  # the original is untouched
    with pytest.raises(QRRLError, match="nothing to average"):
        pol.averaged([])
    with pytest.raises(QRRLError, match="4 values for 3 steps"):
        pol.averaged([torch.zeros(4)])


def test_level_slope_shape_explores_two_numbers_and_stays_a_tilted_line():
    """The demo's default shape: a level and a tilt, so every draw and every update is a line in
    log-gain over the steps, and the saved file says which shape it is."""
    pol = SchedulePolicy(steps=5, sigma=0.2, lr=2.0, shape="level_slope")
    assert pol.dims == 2
    strengths, delta = pol.draw(6, 0.5, np.random.default_rng(0))
    assert delta.shape == (6, 2) and strengths.shape == (6, 5)
    logs = (strengths / 0.5).log()
    tilt = torch.linspace(-1, 1, 5)
    assert torch.allclose(logs, delta[:, :1] + delta[:, 1:] * tilt, atol=1e-5)
    pol.update(torch.tensor([[0.1, 0.2], [-0.1, 0.0]]), torch.tensor([1.0, -1.0]))
    # Δθ = 2 · (A·δ summed) / 2 = (0.2, 0.2): level +0.2, tilt +0.2 at the ends
    assert pol.log_gain.tolist() == pytest.approx((0.2 + 0.2 * tilt).tolist(), abs=1e-6)
    with pytest.raises(QRRLError, match=r"delta must be \[2, 2\]"):
        pol.update(torch.zeros(2, 5), torch.tensor([1.0, -1.0]))


def test_shape_round_trips_and_unknown_shapes_are_refused(tmp_path):
    pol = SchedulePolicy(steps=4, shape="level")
    again = SchedulePolicy.load(pol.save(tmp_path / "s.json", base=0.5))
    assert again.shape == "level" and again.dims == 1
    assert pol.averaged([torch.zeros(4)]).shape == "level"
    with pytest.raises(QRRLError, match="unknown schedule shape"):
        SchedulePolicy(steps=3, shape="wiggly")


def test_the_level_learns_faster_than_per_step_gains_when_the_total_matters():
    """Why the demo learns two numbers: when the reward depends on the curve's total strength,
    the level sees all of it, each per-step gain a tenth of it. Same rounds, same noise: after
    five rounds the level and tilt are near the best total, the per-step gains still far."""
    def run(shape: str, seed: int) -> float:
        rng = np.random.default_rng(seed)
        pol = SchedulePolicy(steps=10, sigma=0.2, lr=2.0, shape=shape)
        for r in range(5):
            strengths, delta = pol.draw(64, 0.3, rng)
            rew = -((strengths.mean(1).numpy() - 0.6) ** 2) + 0.01 * rng.normal(size=64)
            adv = compute_advantages(rew, [f"g{i // 8}-{r}" for i in range(64)], min_group_size=8)
            pol.update(delta, adv.values, adv.mask)
        return abs(float(pol.schedule(0.3).mean()) - 0.6)

    two = np.mean([run("level_slope", s) for s in range(3)])
    ten = np.mean([run("per_step", s) for s in range(3)])
    assert two < 0.06 and ten > 0.1, (two, ten)


def test_learn_flags_freeze_the_level_and_shift_level_moves_it():
    """The demo's level budget: PGPE learns only the tilt, the budget moves the level."""
    pol = SchedulePolicy(steps=5, sigma=0.2, lr=2.0, shape="level_slope")
    pol.update(torch.tensor([[0.1, 0.2], [-0.1, 0.0]]), torch.tensor([1.0, -1.0]), learn=[False, True])
    tilt = torch.linspace(-1, 1, 5)
    assert pol.log_gain.tolist() == pytest.approx((0.2 * tilt).tolist(), abs=1e-6)
    pol.shift_level(0.1)
    assert pol.log_gain.tolist() == pytest.approx((0.1 + 0.2 * tilt).tolist(), abs=1e-6)
    with pytest.raises(QRRLError, match="one flag per learned number"):
        pol.update(torch.zeros(2, 2), torch.tensor([1.0, -1.0]), learn=[True])
    with pytest.raises(QRRLError, match="finite"):
        pol.shift_level(float("inf"))


def test_mirrored_draws_come_in_opposite_pairs_and_need_an_even_count():
    pol = SchedulePolicy(steps=5, sigma=0.2, shape="level_slope")
    strengths, delta = pol.draw(6, 0.5, np.random.default_rng(0), mirrored=True)
    assert torch.equal(delta[1::2], -delta[0::2]) and delta[0::2].abs().min() > 0
    assert torch.allclose((strengths[0::2] * strengths[1::2]).sqrt(), torch.full((3, 5), 0.5))  # centred on the mean
    with pytest.raises(QRRLError, match="even"):
        pol.draw(5, 0.5, np.random.default_rng(0), mirrored=True)


def test_mirrored_pairs_cancel_the_seeds_luck():
    """Why the demo explores in pairs: when each seed's own luck moves the reward far more than
    the tilt does (a QR code scans or not), independent draws bury the tilt's signal; a pair on
    one seed differs only by ±δ, so the luck cancels. Same rounds, same luck, same budget."""
    def run(mirrored: bool, seed: int) -> float:
        rng = np.random.default_rng(seed)
        pol = SchedulePolicy(steps=10, sigma=0.2, lr=2.0, shape="level_slope")
        for r in range(8):
            _, delta = pol.draw(64, 0.5, rng, mirrored=mirrored)
            luck = rng.normal(0.0, 1.0, 64)
            if mirrored:  # both samples of a pair share the seed, so its luck
                luck[1::2] = luck[0::2]
            tilt = pol.log_gain[-1] - pol.log_gain[0]  # the learned tilt's span over the run
            rew = luck - 2.0 * (tilt.item() / 2 + delta[:, 1].numpy() - 0.3) ** 2
            adv = compute_advantages(rew, [f"g{i // 8}-{r}" for i in range(64)], min_group_size=8)
            pol.update(delta, adv.values, adv.mask, learn=[False, True])
        return abs((pol.log_gain[-1] - pol.log_gain[0]).item() / 2 - 0.3)

    paired = np.mean([run(True, s) for s in range(4)])
    alone = np.mean([run(False, s) for s in range(4)])
    assert paired < 0.01 and paired < alone / 5, (paired, alone)
