"""rl/train.py end to end on a tiny UNet + ControlNet: exact replay, bad input, resume, CLI.

That the trainer *learns* (reward rises over rounds) is shown in tests/test_learning.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rl.errors import QRRLError
from rl.files import atomic_save_safetensors
from rl.policy import Policy, build_tiny_models, tiny_configs
from rl.sampling import initial_noise, sample_loop
from rl.train import TrainConfig, train
from rl.trajectory import Trajectory, write_shard

torch.set_num_threads(2)

SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0]
LATENT = (4, 8, 8)


def sd15_timestep(sigma: float) -> float:
    """Nearest SD1.5 timestep of a sigma (scaled-linear betas), like ComfyUI's model sampling."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sigmas = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)) ** 0.5
    return float((sigmas.log() - math.log(sigma)).abs().argmin())


def target_pattern() -> torch.Tensor:
    """±1 [8,8] pattern the reward asks channel 0 of the final latent to match (a fake 'QR')."""
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(8, 8, generator=g) > 0.5).float() * 2 - 1


def scan_like_reward(x_final: torch.Tensor) -> torch.Tensor:
    """Fraction of latent cells whose sign matches the pattern (module accuracy, no gradient)."""
    return (torch.sign(x_final[:, 0]) == target_pattern()).float().mean(dim=(1, 2)).double()


def hint_image(batch: int) -> torch.Tensor:
    """The pattern as a [B,3,64,64] uint8 hint (what the QR hint is to a real ControlNet)."""
    img = ((target_pattern() + 1) / 2).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return (img * 255).round().to(torch.uint8).expand(batch, 3, 64, 64).clone()


class Models:
    def __init__(self, root: Path):
        unet, cn = build_tiny_models(seed=0)
        self.unet_cfg, self.cn_cfg = tiny_configs()
        self.root = root
        self.unet_path = root / "unet.safetensors"
        self.cn_path = root / "controlnet.safetensors"
        atomic_save_safetensors(unet.state_dict(), self.unet_path)
        atomic_save_safetensors(cn.state_dict(), self.cn_path)
        for name, cfg in (("unet_cfg", self.unet_cfg), ("cn_cfg", self.cn_cfg)):
            (root / name).mkdir(exist_ok=True)
            (root / name / "config.json").write_text(json.dumps(cfg))
        g = torch.Generator().manual_seed(7)
        self.cond = torch.randn(1, 6, 32, generator=g)
        self.uncond = torch.randn(1, 6, 32, generator=g)

    def policy(self, controlnet_path: Path | None = None) -> tuple[Policy, str, str]:
        from rl.policy import load_policy

        lp = load_policy(self.unet_path, controlnet_path or self.cn_path, unet_config=self.unet_cfg,
                         controlnet_config=self.cn_cfg)
        return lp.policy, lp.base_sha256, lp.controlnet_sha256

    def sample(self, policy: Policy, seeds, folder: Path, base_sha: str, cn_sha: str, cfg: float = 2.0,
               strength: float = 1.0, reward_fn=scan_like_reward, run: str = "r", write: bool = True,
               prompts=None):
        b = len(seeds)
        k = len(SIGMAS) - 1
        ts = [sd15_timestep(s) for s in SIGMAS[:-1]]
        hint = hint_image(b)
        cond, uncond = self.cond.expand(b, -1, -1), self.uncond.expand(b, -1, -1)

        def denoise(x, sigma, step):
            with torch.no_grad():
                return policy.denoise(x, sigma, ts[step], cond, uncond, hint, strength, cfg)

        x0 = SIGMAS[0] * initial_noise((b, *LATENT), seeds)
        x, rec = sample_loop(denoise, x0, SIGMAS, eta=1.0, s_noise=1.0, seeds=seeds, strengths=[strength] * k)
        reward = reward_fn(x)
        if not write:
            return reward, None
        traj = Trajectory.from_record(
            rec, timestep=ts, cond=cond.clone(), uncond=uncond.clone(), hint=hint, reward=reward,
            meta={"cfg": cfg, "prompts": prompts or ["a garden"] * b, "payloads": ["HELLO"] * b,
                  "base_sha256": base_sha, "controlnet_sha256": cn_sha},
        )
        return reward, write_shard(traj, folder, run)

    def config(self, traj_dirs, out: Path, **kw) -> TrainConfig:
        base = dict(trajectories=[str(d) for d in traj_dirs], checkpoint=self.unet_path, controlnet=self.cn_path,
                    out=out, unet_config=self.unet_cfg, controlnet_config=self.cn_cfg, cpu=True, progress=False,
                    export_dtype="fp32")
        base.update(kw)
        return TrainConfig(**base)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def shards(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    pol, base, cn = models.policy()
    paths = [models.sample(pol, list(range(i * 4, i * 4 + 4)), folder, base, cn)[1] for i in range(2)]
    return folder, paths


def test_recomputed_log_probs_equal_recorded(models, shards, tmp_path):
    folder, _ = shards
    logs = []
    res = train(models.config([folder], tmp_path / "o.safetensors", epochs=1, lr=1e-12), log=logs.append)
    assert res.data["samples"] == 8 and res.data["units"] == 8 * 5  # the step to sigma 0 is deterministic
    # same model, same denoiser, same step formulas: ratio = exp(Δ) within 1e-5 of 1
    assert res.data["logp_drift_max_abs"] < 1e-5, res.data
    assert res.data["denoised_drift_max_rel"] < 1e-4
    m = res.metrics[0]
    assert abs(m["ratio_max"] - 1) < 1e-4 and abs(m["ratio_min"] - 1) < 1e-4
    assert (res.run_dir / "metrics.jsonl").is_file() and (res.run_dir / "curves.png").stat().st_size > 1000


def test_resume_on_finished_run_changes_nothing(models, shards, tmp_path):
    folder, _ = shards
    out = tmp_path / "o.safetensors"
    train(models.config([folder], out, epochs=1))
    before = out.read_bytes(), out.stat().st_mtime_ns
    res = train(models.config([folder], out, epochs=1, resume=True), log=lambda m: None)
    assert res.already_finished and "nothing to do" in res.message
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    with pytest.raises(QRRLError, match="finished run"):
        train(models.config([folder], out, epochs=1))


def test_resume_matches_uninterrupted(models, shards, tmp_path):
    folder, _ = shards
    full = train(models.config([folder], tmp_path / "a.safetensors", epochs=2, lr=1e-3), log=lambda m: None)
    # "interrupted" run: 1 epoch, then drop the result marker as if killed before export
    part = models.config([folder], tmp_path / "b.safetensors", epochs=1, lr=1e-3)
    train(part, log=lambda m: None)
    (tmp_path / "b.run" / "result.json").unlink()
    resumed = train(models.config([folder], tmp_path / "b.safetensors", epochs=2, lr=1e-3, resume=True),
                    log=lambda m: None)
    from safetensors.torch import load_file

    a, b = load_file(full.out), load_file(resumed.out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]


def test_one_run_trains_one_objective(models, shards, tmp_path):
    """A resumed run, or an optimizer carried from another run, under another objective: a clear
    error before anything is written (AdamW's moments are one loss's gradient scale)."""
    folder, _ = shards
    first = train(models.config([folder], tmp_path / "a.safetensors", epochs=1), log=lambda m: None)
    (first.run_dir / "result.json").unlink()  # "interrupted" after its first epoch
    ckpt = first.run_dir / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    with pytest.raises(QRRLError, match="trained with --objective ddpo, this run has --objective rwr"):
        train(models.config([folder], tmp_path / "a.safetensors", epochs=2, objective="rwr", resume=True),
              log=lambda m: None)
    assert ckpt.read_bytes() == before
    with pytest.raises(QRRLError, match="--optimizer-from:.*trained with --objective ddpo"):
        train(models.config([folder], tmp_path / "b.safetensors", objective="rwr", optimizer_from=first.run_dir),
              log=lambda m: None)
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "b.run").exists()


def test_bad_inputs(models, shards, tmp_path):
    folder, paths = shards
    pol, base, cn = models.policy()
    # base-model hash mismatch: refused, unless allowed
    other = tmp_path / "other"
    models.sample(pol, [50, 51, 52, 53], other, "f" * 64, cn)
    with pytest.raises(QRRLError, match="base model sha256"):
        train(models.config([other], tmp_path / "x.safetensors", epochs=1))
    res = train(models.config([other], tmp_path / "y.safetensors", epochs=1, allow_base_mismatch=True),
                log=lambda m: None)
    assert res.out.is_file()
    # corrupt shard skipped and named; NaN reward dropped and counted
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in paths:
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "broken.safetensors").write_bytes(b"\x00garbage")
    models.sample(pol, [60, 61, 62, 63], mixed, base, cn,
                  reward_fn=lambda x: torch.tensor([math.nan, 0.5, 0.6, 0.7], dtype=torch.float64))
    logs: list[str] = []
    res = train(models.config([mixed], tmp_path / "z.safetensors", epochs=1), log=logs.append)
    assert res.data["shards_skipped"] == 1 and "broken.safetensors" in " ".join(logs)
    assert res.data["dropped_nonfinite_reward"] == 1 and res.data["samples"] == 11
    # empty folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(QRRLError, match="no .*shards found"):
        train(models.config([tmp_path / "empty"], tmp_path / "e.safetensors"))
    # mixed latent sizes
    big = tmp_path / "big"
    x0 = 8.0 * initial_noise((2, 4, 16, 16), [1, 2])
    hint = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)

    def den(x, s, k):
        with torch.no_grad():
            return pol.denoise(x, s, 500.0, models.cond.expand(2, -1, -1), models.uncond.expand(2, -1, -1),
                               hint, 1.0, 2.0)

    _, rec = sample_loop(den, x0, SIGMAS, 1.0, 1.0, [1, 2], strengths=[1.0] * 6)
    write_shard(Trajectory.from_record(rec, timestep=[500.0] * 6, cond=models.cond.expand(2, -1, -1).clone(),
                                       uncond=models.uncond.expand(2, -1, -1).clone(), hint=hint,
                                       reward=torch.tensor([0.1, 0.2], dtype=torch.float64),
                                       meta={"cfg": 2.0, "base_sha256": base}), big, "r")
    with pytest.raises(QRRLError, match="different latent sizes"):
        train(models.config([folder, big], tmp_path / "m.safetensors", epochs=1))
    # wrong architecture: a ControlNet given as the base checkpoint, a UNet of another size
    with pytest.raises(QRRLError, match="is a ControlNet"):
        train(models.config([folder], tmp_path / "w.safetensors", checkpoint=models.cn_path))
    big_unet, _ = build_tiny_models(width=(64, 64))
    wrong = tmp_path / "wrong_unet.safetensors"
    atomic_save_safetensors(big_unet.state_dict(), wrong)
    with pytest.raises(QRRLError, match="not the expected UNet architecture.*shape mismatch"):
        train(models.config([folder], tmp_path / "w.safetensors", checkpoint=wrong))
    # an unfinished run is not overwritten silently
    (tmp_path / "u.run").mkdir()
    (tmp_path / "u.run" / "checkpoint.safetensors").write_bytes(b"x")
    with pytest.raises(QRRLError, match="--resume"):
        train(models.config([folder], tmp_path / "u.safetensors"))


def test_kill_during_save_keeps_previous_output(tmp_path):
    """SIGKILL while a big file is being written: the previous file stays intact and loadable."""
    from safetensors.torch import load_file

    out = tmp_path / "cn.safetensors"
    atomic_save_safetensors({"w": torch.ones(4)}, out)
    script = textwrap.dedent(f"""
        import torch
        from rl.files import atomic_save_safetensors
        atomic_save_safetensors({{f"w{{i}}": torch.zeros(4_000_000) for i in range(60)}}, {str(out)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "the writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_file(out)["w"].tolist() == [1.0] * 4


def test_cli_train(models, shards, tmp_path):
    folder, _ = shards
    out = tmp_path / "cli.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rl", "train", "--trajectories", str(folder), "--checkpoint", str(models.unet_path),
           "--controlnet", str(models.cn_path), "--out", str(out), "--unet-config", str(models.root / "unet_cfg"),
           "--controlnet-config", str(models.root / "cn_cfg"), "--epochs", "1", "--lora-rank", "2", "--cpu",
           "--no-progress", "--round", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["round"]) == 3 and json.loads(meta["base_sha256"]) == models.policy()[1]
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    bad = subprocess.run(cmd[:-2] + ["--lr", "-1"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert bad.returncode == 2 and "--lr must be > 0" in bad.stderr
    assert np.isfinite(json.loads((tmp_path / "cli.run" / "metrics.jsonl").read_text().splitlines()[1])["loss"])


def test_steps_from_trains_only_the_late_steps(models, shards, tmp_path):
    """--steps-from 0.5 on 6-step trajectories keeps steps 3-4 (step 5, to sigma 0, is deterministic)."""
    folder, _ = shards
    res = train(models.config([folder], tmp_path / "late.safetensors", epochs=1, lr=1e-12, steps_from=0.5),
                log=lambda m: None)
    assert res.data["units"] == 8 * 2 and res.metrics[0]["units"] == 8 * 1  # timestep_fraction 0.5 of 2
    with pytest.raises(QRRLError, match="steps-from"):
        train(models.config([folder], tmp_path / "x.safetensors", steps_from=1.0))


def test_zero_convs_mode_changes_only_the_output_projections(models, shards, tmp_path):
    from safetensors.torch import load_file

    folder, _ = shards
    out = tmp_path / "z.safetensors"
    res = train(models.config([folder], out, mode="zero_convs", epochs=1, lr=1e-2, step_weighting="std",
                                      export_layout="diffusers"),
                log=lambda m: None)
    assert res.data["step_std_mean"] > 0
    before, after = load_file(str(models.cn_path)), load_file(str(out))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) for k in changed)
    with pytest.raises(QRRLError, match="step-weighting"):
        train(models.config([folder], tmp_path / "w.safetensors", step_weighting="sigma"))


def test_weight_anchor_pulls_toward_the_reference_by_the_decay():
    from rl.anchor import WeightAnchor

    trained, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    trained.bias.requires_grad_(False)  # only trainable parameters are anchored
    w0, b0 = trained.weight.detach().clone(), trained.bias.detach().clone()
    anchor = WeightAnchor.build(trained, ref)
    assert set(anchor.params) == {"weight"}
    d0 = anchor.distance()
    anchor.pull(0.25)
    assert torch.allclose(trained.weight, w0 - 0.25 * (w0 - ref.weight))
    assert torch.equal(trained.bias, b0)
    assert anchor.distance() == pytest.approx(0.75 * d0, rel=1e-5)
    with pytest.raises(QRRLError, match="shape"):
        WeightAnchor.build(torch.nn.Linear(3, 2), torch.nn.Linear(4, 2))
    with pytest.raises(QRRLError, match="no parameter"):
        WeightAnchor.build(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.nn.Linear(3, 2))


def test_anchor_decay_keeps_training_closer_to_the_anchor(models, shards, tmp_path):
    """Same data, seed and lr: with the anchor the trained ControlNet ends nearer the pretrained one."""
    from safetensors.torch import load_file

    folder, _ = shards
    runs = {}
    for decay in (0.0, 0.5):
        out = tmp_path / f"a{decay}.safetensors"
        res = train(models.config([folder], out, mode="zero_convs", epochs=2, lr=1e-2, anchor_decay=decay,
                                  export_layout="diffusers"), log=lambda m: None)
        start, end = load_file(str(models.cn_path)), load_file(str(out))
        runs[decay] = sum(float(((end[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
        if decay:
            assert res.metrics[-1]["anchor_distance"] == pytest.approx(runs[decay], rel=1e-3)
    assert 0 < runs[0.5] < 0.75 * runs[0.0]
    with pytest.raises(QRRLError, match="anchor-decay"):
        train(models.config([folder], tmp_path / "l.safetensors", mode="lora", anchor_decay=0.1))
    with pytest.raises(QRRLError, match="anchor-decay"):
        train(models.config([folder], tmp_path / "r.safetensors", mode="full", anchor_decay=1.0))
    with pytest.raises(QRRLError, match="anchor-controlnet"):
        train(models.config([folder], tmp_path / "m.safetensors", mode="full", anchor_decay=0.1,
                            anchor_controlnet=tmp_path / "missing.safetensors"))
