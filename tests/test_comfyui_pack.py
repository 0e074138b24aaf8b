"""Tier-2 tests against a real ComfyUI server (skipped unless ``COMFYUI_PATH`` is set).

They prove the harness itself (the tiny SD1.5 checkpoint and ControlNet load and sample on
CPU with core nodes) and that our pack loads with every node registered under ``QR-RL``.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

PACK_FOLDER = "comfyui-qr-rl"  # the folder conftest gives our pack under custom_nodes/

# Node ids the pack must register (the lead extends this list as nodes land).
EXPECTED_NODE_IDS = [
    "QRCodeEncode",
    "QRScanReward",
    "QRClipScorerLoader",
    "QRClipSimilarityReward",
    "QRCombineRewards",
    "QRScheduledControlNetApply",
    "QRControlNetSamplerRL",
    "QRTrajectoryRecorder",
]

CKPT = "tiny-sd15.safetensors"
CONTROLNET = "tiny-controlnet.safetensors"
# ComfyUI's complaints about weights it could not place (would mean a wrong key layout).
WEIGHT_WARNINGS = re.compile(
    r"unet missing|clip missing|Missing VAE keys|missing controlnet keys|leftover keys|NOT LOADED|"
    r"VAE not initalized|no CLIP/text encoder weights"
)


def _txt2img(seed: int, prefix: str, controlnet: bool = False) -> dict:
    """API prompt: tiny checkpoint -> 2-step KSampler at 64x64 -> SaveImage (core nodes only)."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a red fox, qr code art", "clip": ["ckpt", 1]},
        },
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": seed,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    if controlnet:
        prompt["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
        prompt["hint"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
        prompt["apply"] = {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "control_net": ["cn", 0],
                "image": ["hint", 0],
                "strength": 1.5,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        }
        prompt["sample"]["inputs"]["positive"] = ["apply", 0]
        prompt["sample"]["inputs"]["negative"] = ["apply", 1]
    return prompt


def test_pack_imports_without_error(comfy_server):
    log = comfy_server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    assert not failed, f"our pack failed to import:\n{comfy_server.log_tail(80)}"
    # Import errors are logged with a traceback that names the pack's path.
    assert not re.search(rf"Cannot import .*{re.escape(PACK_FOLDER)}", log), comfy_server.log_tail(80)


def test_expected_nodes_registered(comfy_server):
    info = comfy_server.object_info()
    missing = [n for n in EXPECTED_NODE_IDS if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}; log tail:\n{comfy_server.log_tail(40)}"
    wrong = {
        n: info[n].get("category")
        for n in EXPECTED_NODE_IDS
        if not info[n].get("category", "").startswith("QR-RL")
    }
    assert not wrong, f"categories must start with 'QR-RL': {wrong}"
    ours = sorted(n for n, v in info.items() if str(v.get("category", "")).startswith("QR-RL"))
    assert ours == sorted(EXPECTED_NODE_IDS), "the pack registers exactly the listed nodes"


def test_tiny_models_listed(comfy_server):
    ckpts = comfy_server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
    assert CKPT in ckpts["ckpt_name"][0]
    cns = comfy_server.object_info("ControlNetLoader")["ControlNetLoader"]["input"]["required"]
    assert CONTROLNET in cns["control_net_name"][0]


def test_harness_reports_rejected_prompts(comfy_server):
    bad = _txt2img(seed=0, prefix="harness_bad")
    bad["ckpt"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    with pytest.raises(RuntimeError, match="no-such-model"):  # conftest.ComfyError
        comfy_server.queue(bad)


def test_tiny_checkpoint_samples_on_cpu(comfy_server):
    start = time.monotonic()
    entry = comfy_server.run(_txt2img(seed=1, prefix="harness_plain"), timeout=150)
    seconds = time.monotonic() - start
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].is_file(), entry
    with Image.open(files[0]) as img:
        assert img.size == (64, 64)
    warnings = [line for line in comfy_server.log_text().splitlines() if WEIGHT_WARNINGS.search(line)]
    assert not warnings, f"ComfyUI could not place some weights: {warnings}"
    print(f"\nComfyUI startup {comfy_server.startup_s:.1f} s; first 64x64 2-step prompt {seconds:.1f} s")


def test_tiny_controlnet_changes_the_image(comfy_server):
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[8:56:8] = 255  # stripes: any hint works, the ControlNet is random
    Image.fromarray(hint).save(comfy_server.base_dir / "input" / "hint.png")
    plain = comfy_server.output_files(comfy_server.run(_txt2img(seed=2, prefix="harness_a"), timeout=150))
    start = time.monotonic()
    ctrl = comfy_server.output_files(
        comfy_server.run(_txt2img(seed=2, prefix="harness_b", controlnet=True), timeout=150)
    )
    seconds = time.monotonic() - start
    a = np.asarray(Image.open(plain[0]), dtype=np.int16)
    b = np.asarray(Image.open(ctrl[0]), dtype=np.int16)
    assert np.abs(a - b).mean() > 0.5, "the tiny ControlNet had no visible effect"
    warnings = [line for line in comfy_server.log_text().splitlines() if WEIGHT_WARNINGS.search(line)]
    assert not warnings, f"ComfyUI could not place some weights: {warnings}"
    print(f"\nControlNet prompt {seconds:.1f} s")
