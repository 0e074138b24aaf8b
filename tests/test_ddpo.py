"""rl/ddpo.py against numbers computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rl.ddpo import (
    StatTracker,
    compute_advantages,
    gaussian_kl,
    group_key,
    ppo_clip_loss,
    ppo_diagnostics,
    step_weights,
)


def test_group_normalisation_zero_variance_fallback_and_nan():
    a, b, c = group_key("p", "x", 1.0), group_key("p", "x", 0.5), group_key("q", "x", 1.0)
    keys = [a, a, a, a, b, b, b, b, c, c]
    rewards = [1, 2, 3, 4, 7, 7, 7, 7, 10, math.nan]
    adv = compute_advantages(rewards, keys, min_group_size=4)
    # group a: mean 2.5, population std sqrt(1.25)
    np.testing.assert_allclose(adv.values[:4].numpy(), [-1.3416408, -0.4472136, 0.4472136, 1.3416408], atol=1e-6)
    # group b: all equal -> no signal, masked out
    assert adv.values[4:8].tolist() == [0, 0, 0, 0] and not adv.mask[4:8].any()
    # group c has one finite reward -> batch statistics over the 9 finite rewards (mean 16/3, std 2.7888668)
    assert adv.fallback[8] and adv.values[8].item() == pytest.approx(1.6733201, abs=1e-6)
    # NaN reward: never trained on
    assert not adv.mask[9] and adv.values[9] == 0
    assert adv.mask.tolist() == [True] * 4 + [False] * 4 + [True, False]
    assert adv.num_groups == 3 and adv.num_zero_variance_groups == 1


def test_strength_rounding_keeps_one_group():
    assert group_key("p", "x", 0.1 + 0.2) == group_key("p", "x", 0.3)


def test_clip_at_five():
    # 29 zeros and one 1: z of the outlier = sqrt(29) = 5.385 -> clipped to 5
    adv = compute_advantages([0.0] * 29 + [1.0], [("g",)] * 30, min_group_size=4)
    assert adv.values[-1].item() == pytest.approx(5.0)
    assert adv.values[0].item() == pytest.approx(-1 / math.sqrt(29), rel=1e-5)


def test_stat_tracker_history_and_resume_roundtrip():
    t = StatTracker(buffer_size=4, min_group_size=3)
    first = t.update([("g",)] * 2, [0.0, 2.0])  # 2 < 3 in the group: batch stats (mean 1, std 1)
    assert first.fallback.all() and first.values.tolist() == [-1.0, 1.0]
    state = json.loads(json.dumps(t.state_dict()))  # must survive JSON
    t2 = StatTracker()
    t2.load_state_dict(state)
    # history [0, 2] + current [4] = 3 values: mean 2, std sqrt(8/3)
    a1 = t.update([("g",)], [4.0])
    a2 = t2.update([("g",)], [4.0])
    assert a1.values.tolist() == a2.values.tolist()
    assert a1.values[0].item() == pytest.approx(2 / math.sqrt(8 / 3), rel=1e-6)
    assert not a1.fallback.any()
    assert t.history == t2.history == {("g",): [0.0, 2.0, 4.0]}


def test_ppo_clip_loss_hand_values_and_gradient():
    logp_old = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), math.log(0.5), 0.0, math.log(1.1)], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, ratio = ppo_clip_loss(logp, logp_old, adv, clip_range=0.2)
    # terms: max(-1.5,-1.2)=-1.2, max(-0.5,-0.8)=-0.5, 1, max(2.2,2.2)=2.2 -> mean 0.375
    assert loss.item() == pytest.approx(0.375, abs=1e-6)
    np.testing.assert_allclose(ratio.detach().numpy(), [1.5, 0.5, 1.0, 1.1], rtol=1e-6)
    loss.backward()
    # clipped term 0 has no gradient; others: d(-A r)/dlogp = -A r / 4
    np.testing.assert_allclose(logp.grad.numpy(), [0.0, -0.125, 0.25, 0.55], atol=1e-6)


def test_ppo_at_ratio_one_is_reinforce():
    logp = torch.tensor([0.3, -0.2], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = ppo_clip_loss(logp, logp.detach(), adv, clip_range=1e-4)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    np.testing.assert_allclose(logp.grad.numpy(), [-1.0, 0.5])


def test_diagnostics_hand_values():
    old = torch.zeros(4)
    new = torch.tensor([math.log(1.5), math.log(0.5), 0.0, math.log(1.1)])
    d = ppo_diagnostics(new, old, clip_range=0.2)
    assert d["clip_fraction"] == pytest.approx(0.5)
    assert d["approx_kl"] == pytest.approx(0.07309297316, rel=1e-6)
    assert d["approx_kl_sq"] == pytest.approx(0.08174237477, rel=1e-6)
    assert (d["ratio_min"], d["ratio_max"]) == (pytest.approx(0.5), pytest.approx(1.5))
    assert d["ratio_mean"] == pytest.approx(1.025)


def test_gaussian_kl_equal_std():
    mean = torch.zeros(2, 1, 2, 2)
    ref = torch.ones(2, 1, 2, 2)
    ref[1] = 2.0
    kl = gaussian_kl(mean, ref, torch.tensor([0.5, 1.0]))
    # (1)^2/(2*0.25)=2 ; (2)^2/(2*1)=2
    np.testing.assert_allclose(kl.numpy(), [2.0, 2.0])
    assert gaussian_kl(mean, mean, 0.3).abs().max() == 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        StatTracker(min_group_size=0)
    with pytest.raises(ValueError):
        compute_advantages([1.0, 2.0], [("a",)])
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0)


def test_step_weights_equalise_the_score_scale():
    """Weighted by std, every step's gradient w.r.t. the mean is A·ε·w/std = A·ε/reference."""
    std = torch.tensor([6.6, 1.0, 0.03])
    w = step_weights(std, reference=2.0)
    assert torch.allclose(w, std / 2.0)
    assert torch.equal(step_weights(std, 2.0, "none"), torch.ones(3))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 16, generator=g)
    mean = torch.zeros(3, 16, requires_grad=True)
    x_next = eps * std[:, None]  # the sampled action: mean + std·ε
    lp = (-((x_next - mean) ** 2) / (2 * std[:, None] ** 2)).mean(1)
    adv = torch.ones(3)
    loss, _ = ppo_clip_loss(lp, lp.detach(), adv, 0.2, w)
    loss.backward()
    # d loss / d mean = −(1/3)·A·w·ε/(std·16): with w = std/2 the 1/std is gone
    assert torch.allclose(mean.grad, -eps / (3 * 16 * 2.0), atol=1e-7)
    with pytest.raises(ValueError, match="step weighting"):
        step_weights(std, 1.0, "sigma")
    with pytest.raises(ValueError, match="reference"):
        step_weights(std, 0.0)
