"""``accelerate launch`` with 2 CPU processes (gloo) trains exactly what one process trains on the
same shards, and resumes (issue 23). The tiny UNet + ControlNet and shards of tests/test_train.py.

Why equal: each accumulation group of micro-batches (one optimizer step) is split across the
processes and every process scales its losses by ``processes / group size``; DDP averages the
gradients, so each step gets the same gradient as in one process (up to float summation order).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import Models

from rl.train import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: 8 samples x 5 units x 0.5 → 20 units a epoch; micro-batches of 3 → 7; 3 per step → steps of
#: 3, 3 and 1 micro-batches: uneven splits, and a step where one process has none.
SETTINGS = dict(epochs=2, lr=1e-3, batch_size=3, grad_accum=3, lora_rank=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    models = Models(root / "models")
    pol, base, cn = models.policy()
    folder = root / "shards"
    for i in range(2):
        models.sample(pol, list(range(i * 4, i * 4 + 4)), folder, base, cn)
    return models, folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(models: Models, folder: Path, out: Path, epochs: int, resume: bool = False) -> subprocess.CompletedProcess:
    # --multi_gpu picks the torchrun launcher; the trainer's --cpu then makes it MULTI_CPU over gloo
    # (accelerate's own --cpu would start a single process)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "rl", "train", "--trajectories", str(folder), "--checkpoint", str(models.unet_path),
           "--controlnet", str(models.cn_path), "--out", str(out), "--unet-config", str(models.root / "unet_cfg"),
           "--controlnet-config", str(models.root / "cn_cfg"), "--export-dtype", "fp32", "--cpu", "--no-progress",
           "--epochs", str(epochs), "--lr", str(SETTINGS["lr"]), "--batch-size", str(SETTINGS["batch_size"]),
           "--grad-accum", str(SETTINGS["grad_accum"]), "--lora-rank", str(SETTINGS["lora_rank"])]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def _max_diff(a_path: Path, b_path: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_equal_one_and_resume(setup, tmp_path):
    import torch

    models, folder = setup
    torch.set_num_threads(1)
    one = train(models.config([folder], tmp_path / "one.safetensors", **SETTINGS), log=lambda m: None)
    base = train(models.config([folder], tmp_path / "zero.safetensors", **{**SETTINGS, "lr": 1e-12}),
                 log=lambda m: None)
    moved = _max_diff(one.out, base.out)
    assert moved > 1e-4, "the run must move the weights, or equality says nothing"

    proc = _launch(models, folder, tmp_path / "two.safetensors", epochs=2)
    assert "2 processes" in proc.stdout + proc.stderr
    assert _max_diff(one.out, tmp_path / "two.safetensors") < 1e-5 * max(1.0, moved)

    # resume in the same mode: 1 epoch, "killed" before export, then the full 2 epochs with --resume
    _launch(models, folder, tmp_path / "res.safetensors", epochs=1)
    (tmp_path / "res.run" / "result.json").unlink()
    again = _launch(models, folder, tmp_path / "res.safetensors", epochs=2, resume=True)
    assert "resuming after epoch 1" in again.stdout + again.stderr
    assert _max_diff(one.out, tmp_path / "res.safetensors") < 1e-5 * max(1.0, moved)
