"""The trainer learns: the product's whole loop on a tiny UNet + ControlNet raises the reward.

Sequence (what ``qr-rl loop`` / the ComfyUI nodes do, in-process): sample with
``rl.sampling.sample_loop`` over ``Policy.denoise`` → reward → ``Trajectory.from_record`` +
``write_shard`` → ``rl.train.train`` on the shard folder → load the *exported* ControlNet file
→ sample again. Evaluation always uses the same held-out seeds, so the before/after difference
is paired per seed; the test asserts it lies far outside noise and that PPO stayed in its trust
region (clip fraction, approx KL).

Why the tiny world is hard, and what the reward is: the random tiny UNet hardly denoises, so
the final latent keeps most of its initial noise (std ≈ 10) and the ControlNet moves it by a
fraction of that. The reward is a continuous "module accuracy": the mean over the 8×8 pattern
cells of ``sigmoid(k · x_cell · pattern_sign)`` on channel 0 of the final latent (the hint shows
the pattern). The sign fraction (hard module accuracy) is reported too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rl.files import atomic_save_safetensors
from rl.policy import build_tiny_models, load_policy, tiny_configs
from rl.reward import Reward
from rl.sampling import gaussian_log_prob, initial_noise, sample_loop, step_mean
from rl.train import TrainConfig, train
from rl.trajectory import Trajectory, TrajectoryDataset, write_shard

torch.set_num_threads(1)  # 2 threads on 2 busy shared cores oversubscribe: 67 s became 790 s

#: 8 stochastic Euler-ancestral steps (eta = 1) and the final deterministic step to sigma 0.
SIGMAS = [float(s) for s in np.geomspace(8.0, 0.3, 8)] + [0.0]
LATENT = (4, 8, 8)
CFG = 2.0
REWARD_K = 0.3  # ~3 / std of the final latent: the sigmoid is neither flat nor a hard sign


def sd15_timestep(sigma: float) -> float:
    """Nearest SD1.5 timestep of a sigma (scaled-linear betas), like ComfyUI's model sampling."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas) / alphas) ** 0.5
    return float((sigmas.log() - math.log(sigma)).abs().argmin())


TIMESTEPS = [sd15_timestep(s) for s in SIGMAS[:-1]]


def pattern() -> torch.Tensor:
    """±1 [8,8]: the fake 'QR' the hint shows and the reward asks channel 0 to follow."""
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(8, 8, generator=g) > 0.5).float() * 2 - 1


def module_score(x_final: torch.Tensor) -> torch.Tensor:
    """[B] float64: mean over cells of sigmoid(k · x · sign) — a soft module accuracy."""
    return torch.sigmoid(REWARD_K * x_final[:, 0] * pattern()).mean(dim=(1, 2)).double()


def sign_accuracy(x_final: torch.Tensor) -> torch.Tensor:
    """[B] float64: fraction of cells whose sign matches the pattern (hard module accuracy)."""
    return (torch.sign(x_final[:, 0]) == pattern()).float().mean(dim=(1, 2)).double()


def hint_image(batch: int) -> torch.Tensor:
    img = ((pattern() + 1) / 2).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return (img * 255).round().to(torch.uint8).expand(batch, 3, 64, 64).clone()


class World:
    """Tiny model files (what the product loads) and the sampler around them."""

    def __init__(self, root: Path):
        unet, cn = build_tiny_models(seed=0)
        self.unet_cfg, self.cn_cfg = tiny_configs()
        self.root = root
        self.unet_path, self.cn_path = root / "unet.safetensors", root / "controlnet.safetensors"
        atomic_save_safetensors(unet.state_dict(), self.unet_path)
        atomic_save_safetensors(cn.state_dict(), self.cn_path)
        g = torch.Generator().manual_seed(7)
        self.cond, self.uncond = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)

    def policy(self, cn_path: Path | None = None):
        return load_policy(self.unet_path, cn_path or self.cn_path, unet_config=self.unet_cfg,
                           controlnet_config=self.cn_cfg, mode="full")

    def sample(self, cn_path: Path | None, seeds: list[int], folder: Path | None = None, push: float = 0.0):
        """(module score [B], sign accuracy [B]); with ``folder``, also write the shard. ``push`` adds
        ``push × pattern`` to channel 0 of every prediction: a sampler "trick" that helps the reward,
        which the recorded predictions then carry (what ``--objective rwr`` distils)."""
        loaded = self.policy(cn_path)
        pol, b = loaded.policy, len(seeds)
        hint = hint_image(b)
        cond, uncond = self.cond.expand(b, -1, -1), self.uncond.expand(b, -1, -1)

        def denoise(x, sigma, k):
            with torch.no_grad():
                d = pol.denoise(x, sigma, TIMESTEPS[k], cond, uncond, hint, 1.0, CFG)
            if push:
                d = d.clone()
                d[:, 0] += push * pattern()
            return d

        x0 = SIGMAS[0] * initial_noise((b, *LATENT), seeds)
        x, rec = sample_loop(denoise, x0, SIGMAS, eta=1.0, s_noise=1.0, seeds=seeds,
                             strengths=[1.0] * (len(SIGMAS) - 1))
        score = module_score(x)
        if folder is not None:
            traj = Trajectory.from_record(
                rec, timestep=TIMESTEPS, cond=cond.clone(), uncond=uncond.clone(), hint=hint,
                reward=Reward(total=score.numpy(), components={"sign_accuracy": sign_accuracy(x).numpy()}),
                meta={"cfg": CFG, "prompts": ["a garden"] * b, "payloads": ["HELLO"] * b,
                      "base_sha256": loaded.base_sha256, "controlnet_sha256": loaded.controlnet_sha256},
            )
            write_shard(traj, folder, "learn")
        return score, sign_accuracy(x)

    def config(self, folder: Path, cn_path: Path, out: Path, **kw) -> TrainConfig:
        return TrainConfig(trajectories=[str(folder)], checkpoint=self.unet_path, controlnet=cn_path, out=out,
                           unet_config=self.unet_cfg, controlnet_config=self.cn_cfg, cpu=True, progress=False,
                           export_dtype="fp32", **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"))


def _unit_log_probs(world: World, cn_path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(reward [N], log π [N, K_trainable]) of every recorded sample under the ControlNet file."""
    pol = world.policy(cn_path).policy
    rewards, lps = [], []
    with torch.no_grad():
        for traj in TrajectoryDataset([folder]):
            steps = [k for k in range(traj.num_steps) if traj.std[k] > 0]
            cols = []
            for k in steps:
                d = pol.denoise(traj.x[:, k], traj.sigma[k].expand(traj.batch_size), traj.timestep[k],
                                traj.cond.float(), traj.uncond.float(), traj.hint, traj.strength[k],
                                traj.meta["cfg"])
                cols.append(gaussian_log_prob(traj.x[:, k + 1], step_mean(traj.x[:, k], d, traj.mean_coef[k]),
                                              traj.std[k]))
            lps.append(torch.stack(cols, 1).double().numpy())
            rewards.append(traj.reward.double().numpy())
    return np.concatenate(rewards), np.concatenate(lps)


def test_one_ppo_step_favours_high_advantage_samples(world, tmp_path):
    """Sign check of the estimator on a fixed batch, through export and reload.

    One AdamW step on all units (one micro-batch): afterwards log π rises for samples with
    reward above the batch mean and falls for those below, i.e. ``corr(A, Δ log π) > 0``.
    """
    folder = tmp_path / "batch"
    world.sample(None, list(range(500, 516)), folder)
    r, before = _unit_log_probs(world, world.cn_path, folder)
    res = train(world.config(folder, world.cn_path, tmp_path / "one.safetensors", epochs=1, lr=1e-2,
                             timestep_fraction=1.0, batch_size=16 * 8, clip_range=0.2, lora_rank=4),
                log=lambda m: None)
    assert res.metrics[0]["step"] == 1 and res.data["logp_drift_max_abs"] < 1e-5
    r2, after = _unit_log_probs(world, res.out, folder)
    assert np.array_equal(r, r2)
    adv = (r - r.mean()) / r.std()
    delta = (after - before).sum(axis=1)
    assert np.abs(delta).max() > 1e-4, "the update did not change the policy"
    corr = float(np.corrcoef(adv, delta)[0, 1])
    assert corr > 0.5, (corr, adv.round(2).tolist(), delta.tolist())
    assert float((adv * delta).mean()) > 0


@pytest.mark.slow
def test_it_learns(world, tmp_path):
    """6 rounds of sample → shard → train → export → reload; the held-out reward rises.

    Deterministic (fixed seeds, one thread). The effect per round is small on this tiny world
    (see the module docstring), so the evaluation uses 512 paired seeds to measure it precisely.
    """
    t0 = time.perf_counter()
    eval_seeds = list(range(10_000, 10_512))
    start, start_sign = world.sample(None, eval_seeds)
    cn_path = world.cn_path
    diags = []
    for rnd in range(6):
        folder = tmp_path / f"round{rnd}"
        for i in range(2):  # 2 shards × 16 samples, one advantage group (same prompt/payload/strength)
            world.sample(cn_path, [rnd * 1000 + i * 16 + j for j in range(16)], folder)
        res = train(world.config(folder, cn_path, tmp_path / f"cn-r{rnd}.safetensors", mode="lora", lora_rank=4,
                                 lr=1e-2, epochs=4, clip_range=0.2, timestep_fraction=1.0, batch_size=16,
                                 seed=rnd, round=rnd), log=lambda m: None)
        assert res.data["logp_drift_max_abs"] < 1e-4  # π_old recomputed == what was sampled
        diags.extend(res.metrics)
        cn_path = res.out
    end, end_sign = world.sample(cn_path, eval_seeds)
    diff = (end - start).numpy()
    paired_se = diff.std(ddof=1) / math.sqrt(len(diff))
    eval_se = start.numpy().std(ddof=1) / math.sqrt(len(eval_seeds))
    summary = {
        "start": float(start.mean()), "end": float(end.mean()), "gain": float(diff.mean()),
        "paired_se": paired_se, "eval_se": eval_se, "sign_start": float(start_sign.mean()),
        "sign_end": float(end_sign.mean()), "seconds": time.perf_counter() - t0,
        "clip_fraction": [round(m["clip_fraction"], 3) for m in diags],
        "approx_kl": [float(f"{m['approx_kl']:.3g}") for m in diags],
    }
    print(json.dumps(summary))
    assert diff.mean() > 5 * paired_se, summary  # paired per seed: far outside sampling noise
    assert diff.mean() > 2.5 * eval_se, summary  # and outside the spread of the evaluation mean itself
    assert end_sign.mean() > start_sign.mean(), summary  # the hard module accuracy follows
    assert all(m["clip_fraction"] < 0.3 for m in diags), summary
    assert all(m["approx_kl"] < 0.03 for m in diags), summary
    assert any(m["clip_fraction"] > 0 for m in diags), summary  # several PPO epochs did reuse the batch


def test_rwr_learns_with_one_optimizer_across_rounds(world, tmp_path):
    """``--objective rwr``: 3 rounds of sample with a trick (each prediction pushed toward the
    pattern) → shard → train the plain ControlNet → export → reload, one AdamW carried across the
    rounds. The held-out reward of the *plain* sampler rises, paired per seed: the trick's effect
    has moved into the weights."""
    eval_seeds = list(range(20_000, 20_256))
    start, start_sign = world.sample(None, eval_seeds)
    cn_path, prev_run = world.cn_path, None
    for rnd in range(3):
        folder = tmp_path / f"rwr{rnd}"
        world.sample(cn_path, [50_000 + rnd * 100 + j for j in range(32)], folder, push=1.0)
        res = train(world.config(folder, cn_path, tmp_path / f"rwr-r{rnd}.safetensors", objective="rwr",
                                 awr_beta=1.0, mode="full", lr=3e-3, epochs=2, batch_size=32, seed=rnd,
                                 optimizer_from=prev_run), log=lambda m: None)
        assert res.data["objective"] == "rwr" and res.data["effective_samples"] < 32  # the weights select
        assert ("optimizer_from" in res.data) == (rnd > 0)
        assert "logp_drift_max_abs" not in res.data  # no log-prob pass: the targets are the recorded predictions
        assert res.data["distill_rmse"] > 0.1  # the recorded predictions are not the plain ControlNet's own
        cn_path, prev_run = res.out, res.run_dir
    end, end_sign = world.sample(cn_path, eval_seeds)
    diff = (end - start).numpy()
    paired_se = diff.std(ddof=1) / math.sqrt(len(diff))
    summary = {"start": float(start.mean()), "end": float(end.mean()), "paired_se": paired_se,
               "sign_start": float(start_sign.mean()), "sign_end": float(end_sign.mean())}
    print(json.dumps(summary))
    assert diff.mean() > 5 * paired_se, summary
    assert end_sign.mean() > start_sign.mean(), summary


def test_rwr_says_when_there_is_nothing_to_distil(world, tmp_path):
    """Shards of the plain sampler with the same ControlNet: its predictions *are* the targets, so
    the regression has no gradient; the trainer says so instead of pretending to learn."""
    folder = tmp_path / "own"
    world.sample(None, list(range(900, 916)), folder)
    lines: list[str] = []
    res = train(world.config(folder, world.cn_path, tmp_path / "own.safetensors", objective="rwr", mode="full",
                             epochs=1, batch_size=16), log=lines.append)
    assert res.data["distill_rmse"] < 1e-4
    assert any("nothing to distil" in m for m in lines), lines


def test_rwr_weights_favour_high_advantage_samples():
    from rl.objectives import advantage_weights, regression_loss

    adv = torch.tensor([-1.0, 0.0, 1.0, 2.0, 5.0])
    mask = torch.tensor([True, True, True, True, False])
    w = advantage_weights(adv, mask, beta=1.0)
    assert w[4] == 0 and float(w[:4].mean()) == pytest.approx(1.0)
    assert bool((w[:4].diff() > 0).all())  # monotone in the advantage
    assert float(advantage_weights(adv, mask, beta=0.1)[3]) > float(w[3])  # small β: the best takes more
    assert torch.equal(advantage_weights(adv, torch.zeros(5, dtype=torch.bool), 1.0), torch.zeros(5))
    with pytest.raises(ValueError, match="beta"):
        advantage_weights(adv, mask, beta=0.0)
    d, t = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    loss, err = regression_loss(d, t, torch.tensor([1.0, 0.0]))
    assert float(loss) == pytest.approx(0.5) and err.tolist() == [1.0, 1.0]
