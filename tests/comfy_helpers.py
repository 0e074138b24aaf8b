"""Helpers for tests that drive the pack's workflows in a real ComfyUI (owned by the sampler tests).

Workflows are edited by node *title* (the stable override names documented in
docs/workflows.md), exactly as a headless user would.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
API_COLLECT = REPO_ROOT / "workflows" / "api" / "qr_rl_collect.json"
CKPT = "tiny-sd15.safetensors"
CONTROLNET = "tiny-controlnet.safetensors"


def load_api(path: Path = API_COLLECT) -> dict:
    return json.loads(path.read_text())


def node_id(workflow: dict, title: str) -> str:
    hits = [k for k, v in workflow.items() if v.get("_meta", {}).get("title") == title]
    assert len(hits) == 1, f"expected one node titled {title!r}, found {hits}"
    return hits[0]


def set_inputs(workflow: dict, title: str, **values) -> None:
    workflow[node_id(workflow, title)]["inputs"].update(values)


def scan_only(workflow: dict) -> dict:
    """Drop the CLIP branch (no open_clip weights exist in CI): Combine Rewards keeps the scan reward."""
    wf = copy.deepcopy(workflow)
    for title in ("CLIP Scorer", "CLIP Reward"):
        del wf[node_id(wf, title)]
    wf[node_id(wf, "Combine Rewards")]["inputs"].pop("reward_b")
    return wf


def tiny_collect(batch: int = 1, steps: int = 3, seed: int = 0, run_name: str = "qr-run", **sampler) -> dict:
    """The API collect workflow on the tiny test models at 64x64, CLIP branch removed."""
    wf = scan_only(load_api())
    set_inputs(wf, "Checkpoint", ckpt_name=CKPT)
    set_inputs(wf, "ControlNet", control_net_name=CONTROLNET)
    set_inputs(wf, "Latent", width=64, height=64, batch_size=batch)
    set_inputs(wf, "RL Sampler", ckpt_name=CKPT, control_net_name=CONTROLNET, steps=steps, seed=seed, **sampler)
    set_inputs(wf, "Recorder", run_name=run_name)
    wf.pop(node_id(wf, "Save"))
    return wf


def shard_paths(entry: dict, base_dir: Path) -> list[Path]:
    """Shards the Recorder reported in its UI output."""
    out = []
    for node_out in entry.get("outputs", {}).values():
        for item in node_out.get("shards", []):
            out.append(base_dir / item["type"] / item["subfolder"] / item["filename"])
    return out


# ---- SD1.5 model sampling, from its definition (scaled-linear betas 0.00085..0.012, 1000 steps)


def sd15_log_sigmas() -> np.ndarray:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().numpy()


def sd15_percent_to_sigma(p: float, log_sigmas: np.ndarray) -> float:
    if p <= 0:
        return 1e9
    if p >= 1:
        return 0.0
    t = (1.0 - p) * 999.0
    return float(np.exp(np.interp(t, np.arange(1000), log_sigmas)))


def sd15_sigma_to_percent(sigma: float, log_sigmas: np.ndarray) -> float:
    """Inverse of percent_to_sigma by bisection (independent of the pack's implementation)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if sd15_percent_to_sigma(mid, log_sigmas) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
