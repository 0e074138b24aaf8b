"""The round pipeline (rl/rounds.py) on its own: the base strength, each sample's curve as a
keyframes line, jobs collected through a real Backend (the tiny toy model in-process), the shards
read back in draw order, the curve's update, and the trainer's config of a round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_collect import TOY_PROMPT, tiny_toy  # noqa: F401 - session fixture

from rl import rounds
from rl.collect import Job, keyframes_table, plan_jobs
from rl.errors import QRRLError
from rl.schedule import Curriculum
from rl.schedule_policy import SchedulePolicy


def test_base_strength_follows_the_curriculum_then_holds():
    cur = Curriculum(kind="linear", start=1.0, end=0.5, rounds=3)
    got = [rounds.base_strength(cur, r, [], 0.5, hold_from=3) for r in range(5)]
    assert got == pytest.approx([1.0, 0.75, 0.5, 0.5, 0.5])
    assert rounds.base_strength(cur, 1, [], 0.4, hold_from=1) == 0.4  # held rounds sit at the end strength
    assert rounds.base_strength(None, 7, [], 0.4) == 0.4  # no curriculum
    adaptive = Curriculum(kind="adaptive", start=1.0, end=0.5, rounds=3, target_decode_rate=0.8)
    assert rounds.base_strength(adaptive, 2, [0.9, 0.1], 0.5) == pytest.approx(0.75)  # one round met the target


def test_drawn_curves_are_the_lines_the_sampler_follows():
    policy = SchedulePolicy(3, sigma=0.3, shape="level_slope")
    percents = [0.0, 0.5, 1.0]
    draw = rounds.draw_curves(policy, 4, 1.2, np.random.default_rng(0), True, percents)
    assert draw.strengths.shape == (4, 3) and draw.delta.shape == (4, 2) and draw.mirrored
    assert torch.allclose(draw.delta[0::2], -draw.delta[1::2])  # mirrored pairs ±δ
    assert torch.allclose(torch.tensor(keyframes_table(draw.keyframes, percents), dtype=torch.float64), draw.strengths.double(),
                          atol=1e-7)
    rec = draw.record()
    assert rec["keyframes"] == draw.keyframes and rec["mean_strength"] == pytest.approx(float(draw.strengths.mean()))
    ends = rounds.draw_curves(policy, 2, 1.2, np.random.default_rng(0), False, None)  # percents unknown
    assert [line.count(":") for line in ends.keyframes] == [2, 2]
    with pytest.raises(QRRLError, match="samples 2 steps"):
        rounds.draw_curves(policy, 2, 1.0, np.random.default_rng(0), False, [0.0, 1.0])


def test_per_sample_values_go_to_their_jobs_in_order():
    jobs = [Job(0, 0, "p", "q", (1, 2), 1.0), Job(1, 0, "p", "q", (3,), 1.0)]
    out = rounds.per_sample(jobs, ["a", "b", "c"], [[0.8, 2.0], [0.7, 2.1], [0.9, 1.9]])
    assert [j.keyframes for j in out] == [("a", "b"), ("c",)]
    assert out[1].feedback_gains == ((0.9, 1.9),) and out[0].key != jobs[0].key  # what a job samples names it
    assert rounds.per_sample(jobs) == jobs
    with pytest.raises(QRRLError, match="2 drawn strength curves for 3 samples"):
        rounds.per_sample(jobs, ["a", "b"])


def test_one_round_through_a_backend(tiny_toy, tmp_path):  # noqa: F811
    from rl.toy.backend import LocalToyBackend

    backend = LocalToyBackend(tiny_toy, steps=3)
    policy = SchedulePolicy(3, sigma=0.3, shape="level_slope")
    jobs = plan_jobs([TOY_PROMPT], ["QR-RL", "HI"], 2, 0, 0, 1.0, batch=2)
    draw = rounds.draw_curves(policy, 4, 1.0, np.random.default_rng(1), False, backend.step_percents())
    jobs = rounds.per_sample(jobs, draw.keyframes)
    from rl.collect import collect

    report = collect(jobs, backend, tmp_path / "r0", progress=False, log=lambda m: None)
    assert report.done == 2
    got = rounds.read_round(tmp_path / "r0", jobs)
    assert len(got.shards) == 2 and got.reward.shape == (4,) and got.components["decoded"].shape == (4,)
    assert got.keys[0] == got.keys[1] != got.keys[2]  # one advantage group per (prompt, payload, strength)
    from rl.trajectory import read_shard

    for i, path in enumerate(got.shards):  # in job order: the order the curves were drawn
        shard = read_shard(path)
        assert torch.allclose(shard.strength.float(), draw.strengths[2 * i:2 * i + 2], atol=1e-6)
        assert torch.allclose(shard.reward.double(), got.reward[2 * i:2 * i + 2])
    adv = rounds.advantages(got, min_group_size=2)
    before = policy.log_gain.clone()
    stats = rounds.update_curve(policy, draw.delta, adv)
    assert policy.updates == 1 and stats["schedule_step"] > 0 and not torch.equal(before, policy.log_gain)
    with pytest.raises(QRRLError, match="3 drawn curves for 4 samples"):
        rounds.update_curve(policy, draw.delta[:3], adv)
    with pytest.raises(QRRLError, match="has no shard"):
        rounds.read_round(tmp_path / "r0", [dataclasses.replace(jobs[0], seeds=(99, 98))])


def test_a_rounds_trainer_config():
    from rl.train import TrainConfig

    settings = rounds.TrainerSettings(mode="full", anchor_decay=0.1, seed=7)
    assert rounds.TrainerSettings().lr == TrainConfig.__dataclass_fields__["lr"].default  # the trainer's defaults
    tc = rounds.train_config(settings, 3, shards=["a", "b"], checkpoint="ck", controlnet="cn", out="o.safetensors",
                             anchor="start.safetensors", run_name="x")
    assert tc.seed == 10 and tc.round == 3 and tc.anchor_controlnet == "start.safetensors" and tc.mode == "full"
    assert tc.trajectories == ["a", "b"] and tc.run_name == "x"
    plain = rounds.train_config(rounds.TrainerSettings(), 0, shards=["a"], checkpoint="ck", controlnet="cn",
                                out="o.safetensors", anchor="start.safetensors")
    assert plain.anchor_controlnet is None  # no pull, no anchor
    with pytest.raises(QRRLError, match="--objective must be one of"):
        rounds.TrainerSettings(objective="hope").validate()


def test_a_mirrored_pair_samples_its_base_and_reference_once(tiny_toy):  # noqa: F811
    """A mirrored pair shares its seed, so its base image (and the art budget's pretrained reference)
    is one picture: the backend samples each distinct seed once and gives it to both samples."""
    from rl.toy.backend import LocalToyBackend
    from rl.toy.model import sample

    backend = LocalToyBackend(tiny_toy, steps=3)
    job = Job(0, 0, TOY_PROMPT, "QR-RL", (7, 7, 9, 9), 1.0, "cn.safetensors")
    calls = []

    def draw(prompts, seeds):
        calls.append(list(seeds))
        return sample(backend.model, prompts, None, seeds, 0.0, steps=3, record=False).images

    once = backend._per_seed(job, draw)
    assert calls == [[7, 9]]
    every = sample(backend.model, [TOY_PROMPT] * 4, None, [7, 7, 9, 9], 0.0, steps=3, record=False).images
    assert torch.allclose(once, every, atol=1e-5)
