"""The stochastic step of DESIGN §3: coefficients, log-prob, Euler limit, seeded noise, replay."""

from __future__ import annotations

import math

import pytest
import torch

from rl.sampling import (
    batch_seeds,
    gaussian_log_prob,
    initial_noise,
    make_generator,
    replay_log_probs,
    replay_means,
    sample_loop,
    step_coefficients,
    step_log_prob,
    step_noise,
    stochastic_step,
)

SIGMAS = torch.tensor([14.6146, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0])


def posterior_mean(x: torch.Tensor, sigma: float, k: int = 0) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ N(0, I), x = x0 + sigma·eps."""
    return x / (1.0 + sigma**2)


def test_step_coefficients_match_formula_floats_and_tensors():
    s, sn, eta = 3.0, 1.2, 0.7
    up, down = step_coefficients(s, sn, eta)
    assert up == pytest.approx(eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
    assert down == pytest.approx(math.sqrt(sn**2 - up**2))
    tup, tdown = step_coefficients(torch.tensor(s, dtype=torch.float64), torch.tensor(sn, dtype=torch.float64), eta)
    assert float(tup) == pytest.approx(up, rel=1e-12) and float(tdown) == pytest.approx(down, rel=1e-12)
    # eta large: capped at sigma_next, sigma_down 0
    up_big, down_big = step_coefficients(s, sn, 100.0)
    assert up_big == sn and down_big == 0.0
    assert step_coefficients(s, 0.0, 1.0) == (0.0, 0.0)
    assert step_coefficients(s, sn, 0.0) == (0.0, sn)
    with pytest.raises(ValueError):
        step_coefficients(s, sn, -1.0)
    with pytest.raises(ValueError):
        step_coefficients(1.0, 2.0, 1.0)


def test_log_prob_equals_torch_normal():
    gen = make_generator(0)
    x = torch.randn(3, 4, 5, 6, generator=gen)
    d = torch.randn(3, 4, 5, 6, generator=gen)
    out = stochastic_step(x, d, 2.0, 1.1, eta=1.0, s_noise=0.9, generator=gen)
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.x_next).mean(dim=(1, 2, 3))
    assert out.log_prob.shape == (3,)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-6, atol=1e-6)
    direct = gaussian_log_prob(out.x_next, out.mean, out.std)
    torch.testing.assert_close(direct, ref, rtol=1e-6, atol=1e-6)
    # std as a tensor of shape [B,1,1,1] too
    torch.testing.assert_close(gaussian_log_prob(out.x_next, out.mean, torch.full((3, 1, 1, 1), out.std)), ref)


def test_log_prob_has_gradient_through_denoised():
    x = torch.randn(2, 4, 3, 3)
    d = torch.randn(2, 4, 3, 3, requires_grad=True)
    z = torch.randn(2, 4, 3, 3)
    out = stochastic_step(x, d, 2.0, 1.0, eta=1.0, s_noise=1.0, noise=z)
    # the trainer evaluates log pi(x_next_recorded | mean(D)) with grad
    lp = gaussian_log_prob(out.x_next.detach(), out.mean, out.std)
    lp.sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0
    # the trainer's one-call form gives the same numbers and the same gradient
    d2 = d.detach().clone().requires_grad_(True)
    lp2 = step_log_prob(x, d2, out.x_next.detach(), 2.0, 1.0, eta=1.0, s_noise=1.0)
    torch.testing.assert_close(lp2, lp.detach(), rtol=0, atol=0)
    lp2.sum().backward()
    torch.testing.assert_close(d2.grad, d.grad)
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob(x, d, out.x_next, 2.0, 0.0, eta=1.0)


def test_eta_zero_is_comfyui_euler():
    gen = make_generator(1)
    x = torch.randn(2, 4, 8, 8, generator=gen) * 5
    d = torch.randn(2, 4, 8, 8, generator=gen)
    for s, sn in [(14.6146, 9.0), (2.0, 1.0), (0.5, 0.0292)]:
        out = stochastic_step(x, d, s, sn, eta=0.0, s_noise=1.0)
        euler = x + (x - d) / s * (sn - s)
        torch.testing.assert_close(out.x_next, euler, rtol=1e-6, atol=1e-5)
        assert out.std == 0.0 and not out.trainable
        assert torch.equal(out.log_prob, torch.zeros(2))


def test_last_step_deterministic_without_nan():
    x = torch.randn(2, 4, 4, 4)
    d = torch.randn(2, 4, 4, 4)
    out = stochastic_step(x, d, 0.1, 0.0, eta=1.0, s_noise=1.0)
    assert torch.equal(out.x_next, d)
    assert torch.equal(out.log_prob, torch.zeros(2))
    assert not out.trainable
    # tensor sigmas too
    out_t = stochastic_step(x, d, torch.tensor(0.1), torch.tensor(0.0), eta=1.0, s_noise=1.0)
    assert torch.isfinite(out_t.x_next).all() and torch.equal(out_t.log_prob, torch.zeros(2))
    # s_noise 0 is deterministic as well
    out0 = stochastic_step(x, d, 1.0, 0.5, eta=1.0, s_noise=0.0)
    assert torch.equal(out0.x_next, out0.mean) and torch.equal(out0.log_prob, torch.zeros(2))


def test_step_noise_reproducible_and_batch_independent():
    shape = (4, 4, 8, 8)
    seeds = [11, 12, 13, 14]
    a = step_noise(shape, seeds, 3)
    b = step_noise(shape, seeds, 3)
    assert torch.equal(a, b)
    alone = step_noise((1, 4, 8, 8), [13], 3)
    assert torch.equal(alone[0], a[2])  # same seed, other batch composition
    reordered = step_noise((2, 4, 8, 8), [14, 11], 3)
    assert torch.equal(reordered[0], a[3]) and torch.equal(reordered[1], a[0])
    assert not torch.equal(step_noise(shape, seeds, 4), a)  # other step, other noise
    assert not torch.equal(a[0], a[1])
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 1) < 0.1
    init = initial_noise(shape, seeds)
    assert not torch.equal(init, a) and torch.equal(initial_noise((1, 4, 8, 8), [12])[0], init[1])
    assert batch_seeds(5, 3) == [5, 6, 7]
    with pytest.raises(ValueError, match="one seed per sample"):
        step_noise(shape, [1, 2], 0)


def run_toy(seeds, eta=1.0, s_noise=1.0, shape=(4, 8, 8), sigmas=SIGMAS):
    x0 = initial_noise((len(seeds), *shape), seeds) * float(sigmas[0])
    return sample_loop(posterior_mean, x0, sigmas, eta=eta, s_noise=s_noise, seeds=seeds,
                       strengths=[1.0] * (len(sigmas) - 1))


def test_sample_loop_shapes_and_record():
    seen = []
    seeds = [1, 2, 3]
    x0 = initial_noise((3, 4, 8, 8), seeds) * float(SIGMAS[0])
    x, rec = sample_loop(posterior_mean, x0, SIGMAS, eta=1.0, s_noise=1.0, seeds=seeds,
                         callback=lambda k, xk, d, out: seen.append(k), strengths=[1.5] * 6)
    k = len(SIGMAS) - 1
    assert rec.x.shape == (3, k + 1, 4, 8, 8) and rec.denoised.shape == (3, k, 4, 8, 8)
    assert rec.log_prob.shape == (3, k) and rec.sigma.shape == (k + 1,)
    assert rec.std.shape == (k,) and rec.mean_coef.shape == (k,) and rec.strength.shape == (k,)
    assert seen == list(range(k))
    assert torch.equal(rec.x[:, -1], x) and torch.equal(rec.x[:, 0], x0)
    assert rec.std[-1] == 0 and rec.log_prob[:, -1].eq(0).all()  # last step deterministic
    assert rec.trainable_steps.tolist() == [True] * (k - 1) + [False]
    assert all(not t.requires_grad for t in (rec.x, rec.denoised, rec.log_prob))
    assert torch.isfinite(rec.log_prob).all()


def test_sample_loop_samples_the_data_distribution():
    # With the exact posterior mean of N(0, 1) data, a fine ancestral schedule ends near unit
    # variance (measured: 0.93 at 40 steps, 0.95 at 80; coarse schedules shrink it).
    sig = torch.cat([torch.logspace(math.log10(14.6), math.log10(0.03), 40), torch.zeros(1)])
    seeds = list(range(8))
    x0 = initial_noise((8, 4, 16, 16), seeds) * float(sig[0])
    x, _ = sample_loop(posterior_mean, x0, sig, eta=1.0, s_noise=1.0, seeds=seeds, record=False)
    assert 0.85 < float(x.std()) < 1.1 and abs(float(x.mean())) < 0.1


def test_sample_loop_reproducible_per_sample():
    _, rec_a = run_toy([5, 6, 7])
    _, rec_b = run_toy([7])
    torch.testing.assert_close(rec_b.x[0], rec_a.x[2], rtol=0, atol=0)
    _, none = sample_loop(posterior_mean, torch.zeros(1, 1, 2, 2) + 14.0, SIGMAS, 1.0, 1.0, [0], record=False)
    assert none is None


def test_replay_reproduces_means_and_noise():
    seeds = [21, 22]
    _, rec = run_toy(seeds, eta=0.8, s_noise=1.0)
    means = replay_means(rec.x, rec.denoised, rec.sigma, eta=0.8)
    k = rec.num_steps
    for j in range(k):
        target = rec.x[:, j + 1]
        err = (target - means[:, j]).abs()
        if rec.std[j] == 0:
            assert float(err.max()) <= 1e-6 * float(target.abs().max())
            continue
        z = step_noise(target.shape, seeds, j)
        # x_{k+1} - mean = std · z, to fp32 precision relative to the latent's scale
        resid = (target - means[:, j] - float(rec.std[j]) * z).abs().max()
        assert float(resid) < 1e-6 * max(1.0, float(target.abs().max()))
    lp = replay_log_probs(rec.x, rec.denoised, rec.sigma, eta=0.8, s_noise=1.0)
    torch.testing.assert_close(lp, rec.log_prob, rtol=1e-5, atol=1e-5)


def test_replay_shape_mismatch_rejected():
    _, rec = run_toy([1])
    with pytest.raises(ValueError, match="sigmas give"):
        replay_means(rec.x[:, :-1], rec.denoised, rec.sigma, 1.0)


def test_sample_loop_validates_inputs():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="one seed per sample"):
        sample_loop(posterior_mean, x, SIGMAS, 1.0, 1.0, [1])
    with pytest.raises(ValueError, match="decreasing"):
        sample_loop(posterior_mean, x, [1.0, 2.0], 1.0, 1.0, [1, 2])
    with pytest.raises(ValueError, match="strengths"):
        sample_loop(posterior_mean, x, SIGMAS, 1.0, 1.0, [1, 2], strengths=[1.0])
