"""rl/train.py: log π_old from the recording equals the recomputed one, and is used only then.

Why: ``old_log_probs="auto"`` skips the trainer's no-grad pass over every unit when the shards
were sampled with the policy being trained; the PPO ratio must come out the same as with the
full pass (drift ≤ 1e-6), and a recording that is not the policy's own must fall back to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl.files import atomic_save_safetensors
from rl.policy import build_tiny_models, load_policy, tiny_configs
from rl.sampling import initial_noise, sample_loop
from rl.train import TrainConfig, _embed_hints, _load_data, _old_pass, train
from rl.trajectory import Trajectory, write_shard

torch.set_num_threads(1)

DRIFT_TOL = 1e-6
SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0]
TIMESTEPS = [980.0, 900.0, 760.0, 560.0, 330.0, 150.0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("old_pass")
    unet, cn = build_tiny_models(seed=0)
    ucfg, ccfg = tiny_configs()
    atomic_save_safetensors(unet.state_dict(), root / "unet.safetensors")
    atomic_save_safetensors(cn.state_dict(), root / "cn.safetensors")
    # the same architecture, other weights: what a recording by another ControlNet looks like
    other = build_tiny_models(seed=1)[1]
    atomic_save_safetensors(other.state_dict(), root / "other_cn.safetensors")
    return {"root": root, "unet": root / "unet.safetensors", "cn": root / "cn.safetensors",
            "other_cn": root / "other_cn.safetensors", "ucfg": ucfg, "ccfg": ccfg}


def _record(files: dict, folder: Path, controlnet: Path, label_sha: str | None = None) -> None:
    """Two shards of 3 samples sampled in process with ``controlnet`` (fp32, CPU), as the demo does;
    ``label_sha`` overrides the ControlNet hash the shards name."""
    loaded = load_policy(files["unet"], controlnet, unet_config=files["ucfg"], controlnet_config=files["ccfg"])
    pol = loaded.policy
    g = torch.Generator().manual_seed(3)
    for shard in range(2):
        seeds = [10 * shard + i for i in range(3)]
        cond, uncond = torch.randn(3, 6, 32, generator=g), torch.randn(3, 6, 32, generator=g)
        hint = (torch.rand(3, 3, 64, 64, generator=g) > 0.5).to(torch.uint8) * 255
        emb = pol.embed_hint(hint)

        def denoise(x, sigma, k, cond=cond, uncond=uncond, hint=hint, emb=emb):
            return pol.denoise(x, sigma, TIMESTEPS[k], cond, uncond, hint, 0.9, 3.0, hint_embedding=emb)

        x0 = SIGMAS[0] * initial_noise((3, 4, 8, 8), seeds)
        _, rec = sample_loop(denoise, x0, SIGMAS, 1.0, 1.0, seeds, strengths=[0.9] * 6)
        traj = Trajectory.from_record(
            rec, timestep=TIMESTEPS, cond=cond, uncond=uncond, hint=hint, reward=torch.rand(3, generator=g).double(),
            meta={"cfg": 3.0, "prompts": ["p"] * 3, "payloads": ["X"] * 3, "base_sha256": loaded.base_sha256,
                  "controlnet_sha256": label_sha or loaded.controlnet_sha256})
        write_shard(traj, folder, f"s{shard}")


def _pi_old(files: dict, folder: Path, mode: str, how: str, kl: float = 0.0) -> tuple[dict, dict, dict]:
    from accelerate import Accelerator

    cfg = TrainConfig(trajectories=[str(folder)], checkpoint=files["unet"], controlnet=files["cn"],
                      out=files["root"] / "unused.safetensors", unet_config=files["ucfg"],
                      controlnet_config=files["ccfg"], mode=mode, old_log_probs=how, kl_coef=kl, cpu=True)
    loaded = load_policy(files["unet"], files["cn"], unet_config=files["ucfg"], controlnet_config=files["ccfg"],
                         mode=mode)
    samples, _, data = _load_data(cfg, loaded.base_sha256, loaded.controlnet_sha256, lambda m: None)
    device = torch.device("cpu")
    _embed_hints(loaded.policy, samples, device)
    units = [(n, k) for n, s in enumerate(samples) for k in s.active]
    old_lp, old_mean = _old_pass(cfg, loaded.policy, samples, units, device, Accelerator(cpu=True), data,
                                 lambda m: None)
    return old_lp, old_mean, data


@pytest.fixture(scope="module")
def own_shards(files, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    _record(files, folder, files["cn"])
    return folder


@pytest.mark.parametrize("mode", ["lora", "zero_convs", "full"])
def test_recorded_pi_old_equals_recomputed(files, own_shards, mode):
    """Shards sampled by this policy: π_old (and the KL means) from the recording, drift ≤ 1e-6."""
    lp_auto, mean_auto, data_auto = _pi_old(files, own_shards, mode, "auto", kl=0.1)
    lp_full, mean_full, data_full = _pi_old(files, own_shards, mode, "recompute", kl=0.1)
    assert data_auto["old_log_probs"] == "recorded" and data_full["old_log_probs"] == "recomputed"
    assert data_auto["shards_same_models"] and data_auto["old_log_prob_checked_units"] < len(lp_full)
    assert set(lp_auto) == set(lp_full) and len(lp_full) == 6 * 5  # 6 samples × 5 stochastic steps
    assert max(abs(lp_auto[u] - lp_full[u]) for u in lp_full) <= DRIFT_TOL
    # the KL term's old means: the same up to fp32's batch-composition noise, relative to each
    # unit's scale (the recomputed means differ from the training forward's by as much)
    assert max(float((mean_auto[u] - mean_full[u]).abs().max() / mean_full[u].abs().max().clamp(min=1))
               for u in mean_full) <= 1e-5


def test_recording_by_another_controlnet_is_recomputed(files, tmp_path):
    """A recording that claims this ControlNet but was sampled with another fails the spot check;
    one that names another ControlNet is not trusted at all. Both give the full pass's numbers."""
    lying, honest = tmp_path / "lying", tmp_path / "honest"
    from rl.files import sha256_file

    _record(files, lying, files["other_cn"], label_sha=sha256_file(files["cn"]))
    _record(files, honest, files["other_cn"])
    for folder, same in ((lying, True), (honest, False)):
        lp_auto, _, data = _pi_old(files, folder, "lora", "auto")
        lp_full, _, _ = _pi_old(files, folder, "lora", "recompute")
        assert data["shards_same_models"] is same and data["old_log_probs"] == "recomputed"
        assert lp_auto == lp_full
        assert data["logp_drift_max_abs"] > 1e-4  # the recording really is another policy's


def test_train_uses_the_recording_and_starts_on_policy(files, own_shards, tmp_path):
    """End to end: the default trainer skips the full pass on its own shards; ratio 1 at the start."""
    res = train(TrainConfig(trajectories=[str(own_shards)], checkpoint=files["unet"], controlnet=files["cn"],
                            out=tmp_path / "o.safetensors", unet_config=files["ucfg"],
                            controlnet_config=files["ccfg"], cpu=True, progress=False, export_dtype="fp32",
                            epochs=1, lr=1e-12, min_group_size=1))
    assert res.data["old_log_probs"] == "recorded", res.data
    m = res.metrics[0]
    assert abs(m["ratio_max"] - 1) < 1e-5 and abs(m["ratio_min"] - 1) < 1e-5, m
    assert json.loads((res.run_dir / "result.json").read_text())["data"]["old_log_probs"] == "recorded"
