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
