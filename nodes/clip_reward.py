"""CLIP Scorer Loader + CLIP Similarity Reward (open_clip, local weights only)."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..rl.clip_score import ClipScorer, clip_reward, resolve_weights
from ._common import CATEGORY, ClipScorerType, RewardType

FOLDER = "open_clip"
_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}

# models/open_clip, unless extra_model_paths.yaml already declared the folder.
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], _EXTENSIONS)

_COMMON_ARCHS = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14", "convnext_base_w", "RN50"]


def _architectures() -> list[str]:
    try:
        from ..rl.clip_score import list_architectures

        names = list_architectures()
    except Exception:  # the loader still works by typed name if open_clip cannot list
        names = []
    return _COMMON_ARCHS + sorted(set(names) - set(_COMMON_ARCHS))


class QRClipScorerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRClipScorerLoader",
            display_name="CLIP Scorer Loader (open_clip)",
            category=CATEGORY,
            description="Loads an open_clip model from a local weights file in models/open_clip "
            "(no downloads) for the CLIP similarity reward.",
            inputs=[
                io.Combo.Input("architecture", options=_architectures(), default="ViT-B-32",
                               tooltip="open_clip architecture name; must match the weights file."),
                io.Combo.Input("weights", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="Weights file in models/open_clip (.safetensors preferred; .bin/.pt are "
                               "loaded with weights_only=True)."),
                io.Combo.Input("release", options=["none", "openai"], default="none",
                               tooltip="Which release the weights come from. 'openai' switches on QuickGELU and "
                               "OpenAI's preprocessing; without it OpenAI weights give wrong embeddings silently."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="auto = ComfyUI's torch device."),
                io.Combo.Input("dtype", options=["fp32", "fp16", "bf16"], default="fp32",
                               tooltip="Precision for scoring. fp16 saves memory on GPU; fp32 on CPU."),
            ],
            outputs=[ClipScorerType.Output("clip_scorer", tooltip="An open_clip scorer for CLIP Similarity Reward.")],
        )

    @classmethod
    def execute(cls, architecture: str, weights: str, release: str, device: str, dtype: str) -> io.NodeOutput:
        import comfy.model_management
        import torch

        path = resolve_weights(weights, [Path(p) for p in folder_paths.get_folder_paths(FOLDER)])
        dev = comfy.model_management.get_torch_device() if device == "auto" else torch.device(device)
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        tag = None if release == "none" else release
        return io.NodeOutput(ClipScorer.load(architecture, path, device=dev, dtype=torch_dtype, pretrained_tag=tag))


class QRClipSimilarityReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRClipSimilarityReward",
            display_name="CLIP Similarity Reward",
            category=CATEGORY,
            description="Art-keeping reward: CLIP similarity of each image to the prompt and, when given, "
            "to a base image (the same prompt and seed sampled without the QR ControlNet).",
            inputs=[
                io.Image.Input("images", tooltip="Generated images to score."),
                ClipScorerType.Input("clip_scorer", tooltip="From CLIP Scorer Loader."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Text the images should match; one line per image, or one for all. "
                                "Leave empty to score only against the base image."),
                io.Image.Input("base_images", optional=True,
                               tooltip="Reference art (e.g. sampled without ControlNet): one image, or one per image."),
            ],
            outputs=[
                RewardType.Output("reward", tooltip="clip_text / clip_image in [0,1] (affine map of cosine, "
                                  "see README); total = their mean."),
                io.String.Output("report", tooltip="Batch means."),
            ],
        )

    @classmethod
    def execute(cls, images, clip_scorer, prompt: str, base_images=None) -> io.NodeOutput:
        lines = [line.strip() for line in prompt.splitlines() if line.strip()]
        text = None if not lines else (lines[0] if len(lines) == 1 else lines)
        reward = clip_reward(clip_scorer, images, text, base_images)
        report = reward.report()
        return io.NodeOutput(reward, report, ui={"text": [report]})
