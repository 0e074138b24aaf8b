"""Shared bits of the ComfyUI adapters: custom socket types, category, image conversion."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

CATEGORY = "QR-RL"

# Custom socket types of docs/design.md §2. Values are plain rl/ objects (QRCode, Reward, ClipScorer).
QRCodeType = io.Custom("QR_CODE")
RewardType = io.Custom("QR_REWARD")
ClipScorerType = io.Custom("CLIP_SCORER")
TrajectoryType = io.Custom("QR_TRAJECTORY")


def images_to_numpy(images: torch.Tensor) -> list[np.ndarray]:
    """ComfyUI IMAGE ``[B,H,W,C]`` float 0..1 -> list of uint8 ``[H,W,3]`` (RGBA flattened on white)."""
    from ..rl.image_io import to_batch

    return to_batch(images)


def numpy_to_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """List of uint8 ``[H,W,3]`` of one size -> ComfyUI IMAGE ``[B,H,W,3]`` float 0..1."""
    stacked = np.stack([np.asarray(a, dtype=np.uint8) for a in arrays])
    return torch.from_numpy(stacked).float().div_(255.0)
