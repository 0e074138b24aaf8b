"""Rewards straight from the scan reward into a shard (issue 23, defect 1).

Why: the scan reward's total *is* its ``scan_score``; when both were the same array, safetensors
refused the shard ("Some tensors share memory: reward, reward.scan_score"). Every shipped
workflow puts Combine Rewards in between, so this wiring was never tried.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_trajectory import make_traj

from rl.qr import encode
from rl.reward import Reward
from rl.scan import results_to_reward, scan_batch
from rl.trajectory import Trajectory, read_shard, write_shard


def _scan_reward(batch: int) -> Reward:
    code = encode("QR-RL", module_px=4)
    return results_to_reward(scan_batch([code.render()] * batch, code, overlay=False))


def _with_reward(traj: Trajectory, reward) -> Trajectory:
    """``traj`` rebuilt the way the Trajectory Recorder builds it, with ``reward``."""
    from rl.trajectory import _reward_tensors

    total, comps = _reward_tensors(reward)
    return dataclasses.replace(traj, reward=total, reward_components=comps)


def test_scan_reward_components_do_not_alias_the_total():
    reward = _scan_reward(2)
    assert not np.shares_memory(reward.total, reward.components["scan_score"])


@pytest.mark.parametrize("batch", [1, 2])
def test_shard_from_scan_reward_writes(tmp_path, batch):
    reward = _scan_reward(batch)
    assert reward.total.tolist() == [1.0] * batch  # a clean render scans perfectly
    path = write_shard(_with_reward(make_traj(batch=batch), reward), tmp_path, f"scan-{batch}")
    back = read_shard(path)
    assert torch.equal(back.reward, back.reward_components["scan_score"])
    assert back.reward_components["decoded"].tolist() == [1.0] * batch


def test_shard_writer_clones_tensors_that_share_memory(tmp_path):
    """A reward whose components alias its total (a third-party reward node) still writes."""
    shared = np.array([0.25, 0.75])
    aliased = Reward(total=shared, components={"scan_score": shared, "view": shared[:]})
    assert np.shares_memory(aliased.total, aliased.components["scan_score"])
    path = write_shard(_with_reward(make_traj(batch=2), aliased), tmp_path, "aliased")
    back = read_shard(path)
    assert back.reward.tolist() == [0.25, 0.75] == back.reward_components["view"].tolist()
