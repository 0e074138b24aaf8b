"""The embedded toy QR-art model: tiny text encoder + diffusers UNet + ControlNet + tiny CLIP.

Why: ``qr-rl demo`` must show RL + curriculum making QR art scan on a CPU with no network, so
the project trains its own miniature of SD1.5 + a QR ControlNet + CLIP on the procedural world
of :mod:`rl.toy.world` (``qr-rl toy pretrain``) and ships the weights in ``rl/toy/assets``.

Everything downstream is the real machinery, unchanged:

* the UNet is a diffusers ``UNet2DConditionModel`` (eps prediction) in SD1.5's sigma
  parametrisation -- ``x = x0 + σ·ε``, ``c_in = 1/sqrt(σ²+1)``, the discrete SD schedule
  (scaled-linear betas 0.00085..0.012, 1000 steps). Its "latent" is the 64×64 RGB image in
  [-1, 1] folded 2×2 into channels (12×32×32, pixel unshuffle): a fixed, lossless stand-in
  for the VAE that makes everything 4× cheaper than pixel space; the hint is 8× the latent
  (256²), exactly as the shard format and ``rl.policy.Policy`` expect for SD1.5;
* the ControlNet is ``ControlNetModel.from_unet`` (light hint encoder), trained to weave a
  QR code into the art with a visibility that grows with its strength;
* sampling is ``rl.sampling.sample_loop`` with ``Policy.denoise`` as the denoiser, files are
  loaded by ``rl.convert`` (diffusers layout + the JSON configs shipped next to them), so
  ``rl.train.train`` fine-tunes the toy ControlNet like any SD1.5 one;
* the art reward is a tiny ``open_clip.CLIP`` trained contrastively on the toy world, used
  through ``ClipScorer.from_model`` + ``clip_reward`` (the ``tokenize`` of the toy world is
  its tokenizer).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QRRLError
from ..files import atomic_write_json
from . import world

ASSETS = Path(__file__).resolve().parent / "assets"
FILES = {
    "unet": "unet.safetensors",
    "controlnet": "controlnet.safetensors",
    "text_encoder": "text_encoder.safetensors",
    "clip": "clip.safetensors",
}
CONFIG_FILE = "toy.json"
UNET_CONFIG_FILE = "unet_config.json"
CONTROLNET_CONFIG_FILE = "controlnet_config.json"
FORMAT = "qr-rl-toy"
FORMAT_VERSION = 1

TEXT_WIDTH = 32
#: Target blend weight per unit of ControlNet strength in pretraining: strength 1 → w 0.7.
BLEND_PER_STRENGTH = 0.7
MAX_TRAIN_STRENGTH = 1.2


def unet_config() -> dict[str, Any]:
    """A 1.4 M-parameter UNet on the 12×32×32 toy latent; attention at 16² and 8² only (cheap on CPU)."""
    return {
        "sample_size": world.LATENT_SIZE, "in_channels": world.LATENT_CHANNELS,
        "out_channels": world.LATENT_CHANNELS,
        "block_out_channels": [32, 64, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": TEXT_WIDTH, "attention_head_dim": 8, "norm_num_groups": 8,
    }


#: Hint encoder channels: 3 stride-2 stages (256² hint → 32²), 4-16 channels (the hint at
#: SD1.5's 16-256 channels would cost more than the whole UNet).
HINT_CHANNELS = (4, 8, 8, 16)


def clip_configs() -> dict[str, Any]:
    """A ~0.2 M-parameter open_clip CLIP for 64² images and the toy vocabulary."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "image_size": world.IMAGE_SIZE},
        "text_cfg": {"context_length": world.CONTEXT_LENGTH, "vocab_size": world.VOCAB_SIZE, "width": 64,
                     "heads": 4, "layers": 2},
    }


# --------------------------------------------------------------------------------------------
# the SD noise schedule (pixel space)


def sd_sigmas() -> torch.Tensor:
    """σ of the 1000 discrete SD1.5 timesteps (float64, increasing with t)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    return ((1 - ac) / ac).sqrt()


def sampling_schedule(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas [K+1] float32 ending in 0, timesteps [K] float32)``: K evenly spaced SD timesteps.

    Like ComfyUI's "simple" scheduler: model timesteps 999 … 0 at even spacing, each σ the
    schedule's σ of that timestep, so the recorded timestep is exactly the one the UNet saw.
    """
    if steps < 2:
        raise QRRLError(f"the toy sampler needs at least 2 steps, got {steps}")
    ts = torch.linspace(999, 0, steps).round()
    sig = sd_sigmas()[ts.long()].float()
    return torch.cat([sig, torch.zeros(1)]), ts.float()


# --------------------------------------------------------------------------------------------
# text encoder


class ToyTextEncoder(torch.nn.Module):
    """Word + position embeddings and one transformer layer: the toy's "CLIP text encoder".

    Output ``[N, L, D]`` is the cross-attention context (``cond``); the empty prompt gives
    ``uncond``. It is trained jointly with the UNet and frozen afterwards (shards store the
    embeddings, so the trainer never needs it).
    """

    def __init__(self, vocab_size: int = world.VOCAB_SIZE, width: int = TEXT_WIDTH,
                 length: int = world.CONTEXT_LENGTH, heads: int = 4):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab_size, width)
        self.pos = torch.nn.Parameter(torch.zeros(length, width))
        self.layer = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                      norm_first=True)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos[: tokens.shape[1]]
        return self.norm(self.layer(h, src_key_padding_mask=tokens == world.PAD_ID))


# --------------------------------------------------------------------------------------------
# building / loading


def _models():
    from ..weights import ensure_model_imports

    ensure_model_imports()
    from diffusers import ControlNetModel, UNet2DConditionModel

    return UNet2DConditionModel, ControlNetModel


def build_unet(seed: int = 0):
    UNet, _ = _models()
    torch.manual_seed(seed)
    return UNet(**unet_config())


def build_controlnet(unet):
    _, ControlNet = _models()
    return ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)


def build_clip(seed: int = 0):
    """The toy image-text model (random weights): an ``open_clip.CLIP``."""
    from .._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cfg = clip_configs()
    torch.manual_seed(seed)
    model = open_clip.CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]))
    model.visual.preprocess_cfg = {"size": world.IMAGE_SIZE, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                   "interpolation": "bicubic", "resize_mode": "squash"}
    return model


def _config_dict(model) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


@dataclass
class ToyModel:
    """The loaded toy world models plus ``info`` (``toy.json``: settings, demo strength, checks)."""

    unet: torch.nn.Module
    controlnet: torch.nn.Module
    text_encoder: ToyTextEncoder
    clip: torch.nn.Module
    info: dict[str, Any]
    folder: Path | None = None

    # ---- files
    @property
    def unet_path(self) -> Path:
        return self._path("unet")

    @property
    def controlnet_path(self) -> Path:
        return self._path("controlnet")

    def _path(self, key: str) -> Path:
        if self.folder is None:
            raise QRRLError("this toy model was not saved yet: call save(folder) first")
        return self.folder / FILES[key]

    @property
    def unet_config_path(self) -> Path:
        return self._path("unet").with_name(UNET_CONFIG_FILE)

    @property
    def controlnet_config_path(self) -> Path:
        return self._path("unet").with_name(CONTROLNET_CONFIG_FILE)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the four safetensors files + configs + ``toy.json`` atomically (fp32)."""
        from ..files import atomic_save_safetensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT}
        atomic_save_safetensors(dict(self.unet.state_dict()), folder / FILES["unet"], meta)
        atomic_save_safetensors(dict(self.controlnet.state_dict()), folder / FILES["controlnet"], meta)
        atomic_save_safetensors(dict(self.text_encoder.state_dict()), folder / FILES["text_encoder"], meta)
        atomic_save_safetensors(dict(self.clip.state_dict()), folder / FILES["clip"], meta)
        atomic_write_json(folder / UNET_CONFIG_FILE, _config_dict(self.unet))
        atomic_write_json(folder / CONTROLNET_CONFIG_FILE, _config_dict(self.controlnet))
        atomic_write_json(folder / CONFIG_FILE, self.info)
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | None = None) -> ToyModel:
        """Load a toy model folder (default: the weights shipped in ``rl/toy/assets``); no network."""
        from safetensors.torch import load_file

        from ..weights import load_controlnet, load_unet

        folder = Path(folder) if folder is not None else ASSETS
        info_path = folder / CONFIG_FILE
        if not info_path.is_file():
            raise QRRLError(f"{folder} holds no toy model ({CONFIG_FILE} missing); run `qr-rl toy pretrain --out "
                            f"{folder}` to make one, or omit the folder to use the shipped model")
        info = json.loads(info_path.read_text())
        if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
            raise QRRLError(f"{info_path} is not a version-{FORMAT_VERSION} toy model description")
        for key, name in FILES.items():
            if not (folder / name).is_file():
                raise QRRLError(f"toy model file {folder / name} is missing ({key}); re-run `qr-rl toy pretrain`")
        unet = load_unet(folder / FILES["unet"], folder / UNET_CONFIG_FILE).requires_grad_(False)
        cn = load_controlnet(folder / FILES["controlnet"], folder / CONTROLNET_CONFIG_FILE).requires_grad_(False)
        text = ToyTextEncoder()
        text.load_state_dict(load_file(str(folder / FILES["text_encoder"])))
        clip = build_clip()
        clip.load_state_dict(load_file(str(folder / FILES["clip"])))
        return cls(unet=unet, controlnet=cn, text_encoder=text.eval().requires_grad_(False),
                   clip=clip.eval().requires_grad_(False), info=info, folder=folder)

    # ---- pieces the demo needs
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond [B,L,D], uncond [B,L,D])`` float32 for a list of toy prompts."""
        for p in prompts:
            world.parse_prompt(p)
        cond = self.text_encoder(world.tokenize(list(prompts)))
        uncond = self.text_encoder(world.tokenize([""] * len(prompts)))
        return cond, uncond

    def clip_scorer(self):
        """The art-similarity scorer: ``ClipScorer`` over the toy CLIP and the toy tokenizer."""
        from ..clip_score import ClipScorer

        return ClipScorer.from_model(self.clip, world.tokenize, arch="toy-clip")

    def art_reward(self, images: torch.Tensor, prompts: Sequence[str], base_images: torch.Tensor, scorer=None):
        """``clip_reward`` (components ``clip_text``, ``clip_image``) with this model's calibrated ranges.

        ``images``/``base_images`` are ``[B,3,H,W]`` in [0,1]. The ranges map "an unrelated
        image / prompt" to 0 and "the same image / the right prompt" to 1 for the toy CLIP,
        whose raw cosines are not in real CLIP's ranges.
        """
        from ..clip_score import clip_reward

        ranges = self.info.get("clip_ranges") or {}
        return clip_reward(scorer or self.clip_scorer(), images.permute(0, 2, 3, 1), list(prompts),
                           base_images.permute(0, 2, 3, 1), text_range=tuple(ranges["text"]) if "text" in ranges else None,
                           image_range=tuple(ranges["image"]) if "image" in ranges else None)

    def policy(self, controlnet: torch.nn.Module | None = None, luma_control: bool = False):
        """``rl.policy.Policy`` (frozen UNet + this ControlNet) whose ``denoise`` samples the toy
        (with ``luma_control``, the ControlNet changes only the prediction's luma: rl.luma_control).

        A ControlNet passed in keeps its ``requires_grad`` flags (sampling runs under
        ``no_grad``): a caller who samples between optimizer steps must not find its
        parameters silently frozen.
        """
        from ..luma_control import folded_luma_projection
        from ..policy import Policy

        cn = controlnet if controlnet is not None else self.controlnet
        flags = [p.requires_grad for p in cn.parameters()]
        projection = folded_luma_projection(world.LATENT_FACTOR) if luma_control else None
        pol = Policy(self.unet, cn, mode="full", control_projection=projection).eval()
        for p, flag in zip(cn.parameters(), flags):
            p.requires_grad_(flag)
        return pol

    @property
    def steps(self) -> int:
        return int(self.info["sampling"]["steps"])

    @property
    def demo_strength(self) -> float:
        return float(self.info["strengths"]["demo"])

    @property
    def high_strength(self) -> float:
        return float(self.info["strengths"]["high"])

    @property
    def curriculum_start(self) -> float:
        """Where the demo's curriculum starts: the lowest calibrated strength above the demo
        strength at which at least 80% of the samples scan (0.8 on the shipped model).

        Why this high: with the art budget following the round's strength and the level held
        by it, the rounds up there teach the strength curve's *tilt* (more strength on the late
        steps, where it buys decoding), which carries down to the demo strength (bench/learning.py,
        3 seeds: from 0.8 a few points over the flat run at the same art, from 0.6 a tie). (Before the art
        budget, DDPO on the weights learned to *weaken* the code where nearly every sample
        scanned; docs/research-log.md.)
        """
        rows = sorted(self.info.get("calibration") or [], key=lambda row: row["strength"])
        for row in rows:
            if row["strength"] > self.demo_strength and row["decode_rate"] >= 0.8:
                return float(row["strength"])
        return self.high_strength


@dataclass
class SampleBatch:
    """What :func:`sample` returns: images, the record and what a shard needs besides."""

    images: torch.Tensor  # [B,3,H,W] in [0,1]
    record: Any  # rl.sampling.TrajectoryRecord or None
    timesteps: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    hints: torch.Tensor  # [B,3,8H,8W] float [0,1]
    strengths: list[float] | list[list[float]]  # [K], or [B][K] for per-sample schedules


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """Images [B,3,64,64] in [0,1] → toy latents [B,12,32,32] (≈[-1,1], 2×2 pixel unshuffle)."""
    return torch.nn.functional.pixel_unshuffle(images.float() * 2.0 - 1.0, world.LATENT_FACTOR)


def latents_to_images(x: torch.Tensor) -> torch.Tensor:
    """Toy latents → images [B,3,64,64] in [0,1] (the toy's "VAE decode": pixel shuffle)."""
    return ((torch.nn.functional.pixel_shuffle(x.float(), world.LATENT_FACTOR) + 1.0) / 2.0).clamp(0.0, 1.0)


def images_hwc_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] [0,1] → uint8 [B,H,W,3] (what the scan reward reads)."""
    return (images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


@torch.no_grad()
def sample(
    model: ToyModel,
    prompts: Sequence[str],
    codes: Sequence[Any] | None,
    seeds: Sequence[int],
    strength: float | Sequence[float] | torch.Tensor,
    *,
    controlnet: torch.nn.Module | None = None,
    steps: int | None = None,
    eta: float | None = None,
    cfg: float | None = None,
    record: bool = True,
    batch_size: int = 16,
    feedback: Any = None,
    feedback_gains: torch.Tensor | None = None,
    luma_control: bool = False,
    guidance: Any = None,
) -> SampleBatch:
    """Sample the toy model with the real sampler (``rl.sampling.sample_loop``, ``Policy.denoise``).

    ``codes`` None (or ``strength`` 0) samples without the ControlNet -- the base art.
    ``strength`` is one value for every step, one per step ``[K]`` (a schedule, as the ComfyUI
    node's curve gives) or one schedule per sample ``[B,K]`` (how :mod:`rl.schedule_policy`
    explores); it is recorded as given. Each sample's noise depends only on its seed.
    ``feedback`` (:class:`rl.module_feedback.ModuleFeedback`) turns on module feedback: from
    the second step on, the strength is multiplied per module by a map built from the previous
    step's prediction; ``feedback_gains`` ``[B,2]`` gives each sample its own (low, high).
    ``luma_control`` keeps only the luma of the ControlNet's change to each prediction
    (:mod:`rl.luma_control`; one more UNet pass per step). ``guidance``
    (:class:`rl.scan_guidance.ScanGuidance`) nudges each guided step's prediction toward a readable
    code; the record then holds the guided predictions.
    """
    from ..sampling import initial_noise, sample_loop

    steps = steps or model.steps
    eta = float(model.info["sampling"]["eta"] if eta is None else eta)
    cfg = float(model.info["sampling"]["cfg"] if cfg is None else cfg)
    sigmas, timesteps = sampling_schedule(steps)
    n = len(prompts)
    if len(seeds) != n or (codes is not None and len(codes) != n):
        raise QRRLError(f"need one seed (and one QR code) per prompt: {n} prompts, {len(seeds)} seeds")
    cond, uncond = model.encode_prompts(prompts)
    if codes is None:
        hints = torch.zeros(n, 3, world.HINT_SIZE, world.HINT_SIZE)
        strength = 0.0
    else:
        hints = torch.stack([world.hint_image(c) for c in codes])
    policy = model.policy(controlnet, luma_control=luma_control)
    table = torch.as_tensor(strength, dtype=torch.float32)
    if table.ndim == 0:
        table = table.expand(steps)
    if table.shape not in ((steps,), (n, steps)):
        raise QRRLError(f"strength must be a number, one value per step ({steps}) or one schedule per sample "
                        f"({n}×{steps}); got shape {tuple(table.shape)}")
    per_sample = table.ndim == 2
    light = gains = None
    if feedback_gains is not None and feedback is None:
        raise QRRLError("feedback_gains needs feedback (a ModuleFeedback) to act on")
    guide_light = None
    if guidance is not None and codes is not None:
        from ..module_feedback import light_grids

        guide_light = light_grids(codes)
    if feedback is not None and codes is not None:
        from ..module_feedback import light_grids

        light = light_grids(codes)
        gains = torch.tensor([feedback.gains()] * n) if feedback_gains is None else torch.as_tensor(
            feedback_gains, dtype=torch.float32)
        if gains.shape != (n, 2):
            raise QRRLError(f"feedback_gains must be [{n}, 2] (low, high per sample), got {tuple(gains.shape)}")
    shape = (world.LATENT_CHANNELS, world.LATENT_SIZE, world.LATENT_SIZE)
    xs, recs = [], []
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        sd = [int(s) for s in seeds[sl]]
        x0 = initial_noise((len(sd), *shape), sd) * float(sigmas[0])
        c, u, h = cond[sl], uncond[sl], hints[sl]
        # the hint's embedding is the same at every step (sampling runs under no_grad): once per chunk
        emb = None if codes is None else policy.embed_hint(h)

        st = table[sl] if per_sample else table[None].expand(len(sd), steps)
        prev: list[torch.Tensor] = []  # the previous step's prediction, for module feedback
        maps: list[torch.Tensor] = []  # each step's gain map, recorded so the trainer can replay it

        def denoise(x: torch.Tensor, sigma: float, k: int, c=c, u=u, h=h, st=st, sl=sl, prev=prev,
                    maps=maps, emb=emb) -> torch.Tensor:
            smap = None
            if light is not None and prev:
                from ..module_feedback import strength_map

                smap = strength_map(latents_to_images(prev[0]), light[sl], gains[sl, 0], gains[sl, 1],
                                    feedback.margin, feedback.softness, world.LATENT_SIZE, feedback.contrast(k, steps))
            d = policy.denoise(x, sigma, timesteps[k], c, u, h, st[:, k], cfg, strength_map=smap, hint_embedding=emb)
            if guide_light is not None and guidance.active(k, steps):
                from ..scan_guidance import guide

                d = guide(d, latents_to_images, guide_light[sl], guidance)[0]
            if light is not None:
                prev[:] = [d]
                maps.append(torch.ones(x.shape[0], 1, world.LATENT_SIZE, world.LATENT_SIZE) if smap is None
                            else smap.detach().float().cpu())
            return d

        x, rec = sample_loop(denoise, x0, sigmas, eta, 1.0, sd, record=record,
                             strengths=None if per_sample else table.tolist())
        if rec is not None and maps:
            rec.strength_map = torch.stack(maps, dim=1)  # [b,K,1,h,w]
        xs.append(x)
        recs.append(rec)
    rec_all = _cat_records(recs) if record else None
    if rec_all is not None and per_sample:
        rec_all.strength = table.clone()
    return SampleBatch(images=latents_to_images(torch.cat(xs)), record=rec_all, timesteps=timesteps,
                       cond=cond, uncond=uncond, hints=hints, strengths=table.tolist())


def _cat_records(recs: list) -> Any:
    if len(recs) == 1:
        return recs[0]
    from dataclasses import replace

    first = recs[0]
    maps = None if first.strength_map is None else torch.cat([r.strength_map for r in recs])
    return replace(first, x=torch.cat([r.x for r in recs]), denoised=torch.cat([r.denoised for r in recs]),
                   log_prob=torch.cat([r.log_prob for r in recs]), seeds=[s for r in recs for s in r.seeds],
                   strength_map=maps)


# --------------------------------------------------------------------------------------------
# pretraining


@dataclass
class PretrainConfig:
    """``qr-rl toy pretrain`` settings. Defaults: the shipped model (≈20-25 min on 2 cores)."""

    out: str | os.PathLike[str]
    seed: int = 0
    unet_steps: int = 1000
    controlnet_steps: int = 400
    clip_steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    controlnet_lr: float = 1e-3
    ema: float = 0.995
    sampling_steps: int = 10
    eta: float = 1.0
    cfg: float = 1.0
    calibrate_samples: int = 128  # 32 put the demo strength's decode rate 10 points off (docs/research-log.md)
    threads: int | None = None


def _lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    q = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, q))))


def _noised(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in·x_t, t, eps, sigma) for random SD timesteps: the eps-prediction training input."""
    sig_all = sd_sigmas().float()
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    sigma = sig_all[t].view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=gen)
    x = x0 + sigma * eps
    return x / torch.sqrt(sigma**2 + 1.0), t.float(), eps, sigma


class _EMA:
    """Exponential moving average of parameters: smoother weights, far cleaner samples after short training."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def _train_unet(cfg: PretrainConfig, unet, text: ToyTextEncoder, say, bar) -> list[float]:
    rng = np.random.default_rng([cfg.seed, 1])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = _EMA([unet, text], cfg.ema)
    unet.train()
    text.train()
    losses = []
    for step in range(cfg.unet_steps):
        specs, base = world.random_batch(rng, cfg.batch_size)
        prompts = [s.prompt if rng.random() > 0.1 else "" for s in specs]  # 10% empty: CFG works
        x0 = images_to_latents(torch.from_numpy(base))
        x_in, t, eps, _ = _noised(x0, gen)
        ctx = text(world.tokenize(prompts))
        loss = torch.nn.functional.mse_loss(unet(x_in, t, encoder_hidden_states=ctx).sample, eps)
        losses.append(_optimizer_step(opt, params, ema, loss, step, _lr_at(step, cfg.unet_steps, cfg.lr)))
        bar.update(1)
        if (step + 1) % 100 == 0:
            say(f"unet step {step + 1}/{cfg.unet_steps}: loss {np.mean(losses[-100:]):.4f}")
    ema.copy_to_model()
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return losses


def _optimizer_step(opt, params, ema, loss: torch.Tensor, step: int, lr: float) -> float:  # noqa: ANN001
    """One scheduled-lr AdamW step with grad-norm clip and EMA update; returns the loss value."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update(step)
    return float(loss.detach())


def _train_controlnet(cfg: PretrainConfig, unet, cn, text: ToyTextEncoder, say, bar) -> list[float]:
    """ControlNet on blends: strength s ~ U(0, 1.2), target = blend(base, code, 0.7·s), residuals × s."""
    rng = np.random.default_rng([cfg.seed, 2])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    params = list(cn.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.controlnet_lr, weight_decay=0.0)
    ema = _EMA([cn], cfg.ema)
    cn.train()
    losses = []
    for step in range(cfg.controlnet_steps):
        specs, base = world.random_batch(rng, cfg.batch_size)
        codes = [world.toy_code(world.random_payload(rng), mask=int(rng.integers(0, 8))) for _ in specs]
        light = torch.stack([world.code_image(c, world.IMAGE_SIZE) for c in codes])
        hint = torch.stack([world.hint_image(c) for c in codes])
        s = torch.from_numpy(rng.uniform(0.0, MAX_TRAIN_STRENGTH, cfg.batch_size).astype(np.float32))
        x0 = images_to_latents(world.blend(torch.from_numpy(base), light, BLEND_PER_STRENGTH * s))
        x_in, t, eps, _ = _noised(x0, gen)
        with torch.no_grad():
            ctx = text(world.tokenize([sp.prompt for sp in specs]))
        down, mid = cn(x_in, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        sv = s.view(-1, 1, 1, 1)
        pred = unet(x_in, t, encoder_hidden_states=ctx, down_block_additional_residuals=[d * sv for d in down],
                    mid_block_additional_residual=mid * sv).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        losses.append(_optimizer_step(opt, params, ema, loss, step,
                                      _lr_at(step, cfg.controlnet_steps, cfg.controlnet_lr)))
        bar.update(1)
        if (step + 1) % 100 == 0:
            say(f"controlnet step {step + 1}/{cfg.controlnet_steps}: loss {np.mean(losses[-100:]):.4f}")
    ema.copy_to_model()
    cn.eval().requires_grad_(False)
    return losses


def _train_clip(cfg: PretrainConfig, clip, say, bar) -> list[float]:
    """Contrastive image → prompt classification over the whole (known) prompt set, both towers."""
    rng = np.random.default_rng([cfg.seed, 3])
    specs_all = world.all_specs()
    index = {s.prompt: i for i, s in enumerate(specs_all)}
    all_tokens = world.tokenize([s.prompt for s in specs_all])
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.0)
    clip.train()
    losses = []
    for step in range(cfg.clip_steps):
        specs, base = world.random_batch(rng, 64)
        img = (torch.from_numpy(base) - 0.5) / 0.5
        feats = clip.encode_image(img, normalize=True)
        txt = clip.encode_text(all_tokens, normalize=True)
        logits = clip.logit_scale.exp() * feats @ txt.T
        target = torch.tensor([index[s.prompt] for s in specs])
        loss = torch.nn.functional.cross_entropy(logits, target)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.clip_steps, 1e-3, warmup=20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        bar.update(1)
        if (step + 1) % 100 == 0:
            acc = float((logits.argmax(1) == target).float().mean())
            say(f"clip step {step + 1}/{cfg.clip_steps}: loss {np.mean(losses[-100:]):.3f}, batch accuracy {acc:.2f}")
    clip.eval().requires_grad_(False)
    return losses


DEMO_PAYLOADS: tuple[str, ...] = ("QR-RL", "HELLO", "TOY42", "SCAN ME")
DEMO_PROMPTS: tuple[str, ...] = (
    "yellow rings on dark blue", "white stripes on black", "pink dots on dark green", "orange waves on dark red",
    "cyan checks on dark blue", "green blobs on black", "red stripes on gray", "purple rings on black",
)


def eval_prompts_codes(n: int, offset: int = 0) -> tuple[list[str], list[Any], list[str]]:
    """The fixed evaluation set: prompt i and payload j cycle independently (n samples)."""
    prompts = [DEMO_PROMPTS[(offset + i) % len(DEMO_PROMPTS)] for i in range(n)]
    payloads = [DEMO_PAYLOADS[((offset + i) // len(DEMO_PROMPTS)) % len(DEMO_PAYLOADS)] for i in range(n)]
    codes = [world.toy_code(p) for p in payloads]
    return prompts, codes, payloads


def measure(model: ToyModel, strength: float | Sequence[float], seeds: Sequence[int], *, controlnet=None, scorer=None,
            base_images: torch.Tensor | None = None, offset: int = 0, feedback=None,
            luma_control: bool = False, guidance=None) -> dict[str, Any]:
    """Decode rate, module accuracy, art similarity (clip_image vs the no-ControlNet sample) at ``strength``
    (with ``feedback``, a :class:`rl.module_feedback.ModuleFeedback`, on top; ``luma_control`` and
    ``guidance`` as in :func:`sample`)."""
    from ..scan import scan_reward

    n = len(seeds)
    prompts, codes, _ = eval_prompts_codes(n, offset)
    out = sample(model, prompts, codes, seeds, strength, controlnet=controlnet, record=False, feedback=feedback,
                 luma_control=luma_control, guidance=guidance)
    scan = scan_reward(images_hwc_uint8(out.images), codes)
    scorer = scorer or model.clip_scorer()
    if base_images is None:
        base_images = sample(model, prompts, None, seeds, 0.0, record=False).images
    art = model.art_reward(out.images, prompts, base_images, scorer)
    return {
        "strength": float(strength) if isinstance(strength, (int, float)) else torch.as_tensor(strength).tolist(), "n": n,
        "decode_rate": float(scan.components["decoded"].mean()),
        "module_accuracy": float(scan.components["module_accuracy"].mean()),
        "art_similarity": float(art.components["clip_image"].mean()),
        "text_similarity": float(art.components["clip_text"].mean()),
        "images": out.images, "base_images": base_images,
    }


def pretrain(config: PretrainConfig, log: Callable[[str], None] | None = None, progress: bool = True) -> ToyModel:
    """Train text encoder + UNet, then the ControlNet, then the tiny CLIP; calibrate; save.

    Calibration samples the ControlNet at strengths 0.2 … 1.2 and records decode rate and
    art similarity; the *demo strength* is the highest strength whose decode rate is ≤ 30%
    (art kept, rarely scans), the *high strength* the lowest with ≥ 90%. Deterministic for a
    seed on one machine (CPU, fixed thread count).
    """
    from tqdm.auto import tqdm

    say = log or (lambda m: print(f"qr-rl toy: {m}", flush=True))
    if config.threads:
        torch.set_num_threads(int(config.threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    unet = build_unet(config.seed)
    torch.manual_seed(config.seed + 7)
    text = ToyTextEncoder()
    clip = build_clip(config.seed + 11)
    total = config.unet_steps + config.controlnet_steps + config.clip_steps
    bar = tqdm(total=total, desc="toy pretrain", disable=not progress, unit="step")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    unet_losses = _train_unet(config, unet, text, say, bar)
    timings["unet_s"] = time.perf_counter() - t0
    torch.manual_seed(config.seed + 13)
    cn = build_controlnet(unet)
    t0 = time.perf_counter()
    cn_losses = _train_controlnet(config, unet, cn, text, say, bar)
    timings["controlnet_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    clip_losses = _train_clip(config, clip, say, bar)
    timings["clip_s"] = time.perf_counter() - t0
    bar.close()
    info: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seed": config.seed,
        "image_size": world.IMAGE_SIZE, "hint_size": world.HINT_SIZE,
        "qr": {"version": world.QR_VERSION, "ecc": world.QR_ECC, "border": world.QR_BORDER},
        "sampling": {"steps": config.sampling_steps, "eta": config.eta, "cfg": config.cfg, "scheduler": "simple-sd"},
        "training": {"unet_steps": config.unet_steps, "controlnet_steps": config.controlnet_steps,
                     "clip_steps": config.clip_steps, "batch_size": config.batch_size,
                     "final_losses": {"unet": float(np.mean(unet_losses[-50:])),
                                      "controlnet": float(np.mean(cn_losses[-50:])),
                                      "clip": float(np.mean(clip_losses[-50:]))}},
        "blend_per_strength": BLEND_PER_STRENGTH,
        "strengths": {"demo": 0.4, "high": 1.0},
    }
    model = ToyModel(unet=unet, controlnet=cn, text_encoder=text, clip=clip, info=info)
    info["clip_ranges"] = clip_ranges(model, config.seed)
    say(f"toy CLIP ranges: {info['clip_ranges']}")
    t0 = time.perf_counter()
    if config.calibrate_samples:
        recalibrate(model, config.calibrate_samples, say)
    else:
        info["calibration"] = []
        info["checksum"] = sample_checksum(model)
    timings["calibration_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["cpu_s"] = time.process_time() - cpu_start
    info["timings"] = {k: round(v, 1) for k, v in timings.items()}
    info["threads"] = torch.get_num_threads()
    model.save(config.out)
    say(f"wrote {config.out} in {timings['total_s'] / 60:.1f} min; demo strength {info['strengths']['demo']}, "
        f"high strength {info['strengths']['high']}")
    return model


@torch.no_grad()
def clip_ranges(model: ToyModel, seed: int = 0, n: int = 96) -> dict[str, list[float]]:
    """Cosine ranges of the toy CLIP: unrelated → right pairs (text), unrelated image → itself (image)."""
    rng = np.random.default_rng([seed, 4])
    specs, base = world.random_batch(rng, n)
    scorer = model.clip_scorer()
    imgs = torch.from_numpy(base).permute(0, 2, 3, 1)
    prompts = [s.prompt for s in specs]
    right = scorer.text_similarity(imgs, prompts)
    wrong = scorer.text_similarity(imgs, prompts[1:] + prompts[:1])
    other = scorer.image_similarity(imgs, torch.roll(imgs, 1, 0))
    return {"text": [round(float(np.mean(wrong)), 4), round(float(np.mean(right)), 4)],
            "image": [round(float(np.mean(other)), 4), 1.0]}


CALIBRATION_STRENGTHS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2)


def calibrate(model: ToyModel, n: int, say: Callable[[str], None] | None = None,
              strengths: Sequence[float] = CALIBRATION_STRENGTHS) -> list[dict[str, Any]]:
    """Decode rate / module accuracy / art similarity per strength on ``n`` fixed seeds."""
    seeds = list(range(10_000, 10_000 + n))
    scorer = model.clip_scorer()
    prompts, _, _ = eval_prompts_codes(n)
    base = sample(model, prompts, None, seeds, 0.0, record=False).images
    rows = []
    for s in strengths:
        m = measure(model, s, seeds, scorer=scorer, base_images=base)
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items() if k not in ("images", "base_images")}
        rows.append(row)
        if say:
            say(f"strength {s:.2f}: decode {row['decode_rate']:.2f}, module accuracy {row['module_accuracy']:.3f}, "
                f"art {row['art_similarity']:.3f}, text {row['text_similarity']:.3f}")
    return rows


def choose_strengths(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Demo strength: highest strength with decode ≤ 30% (and > 0 strength); high: lowest with ≥ 90%."""
    positive = [r for r in rows if r["strength"] > 0]
    low = [r["strength"] for r in positive if r["decode_rate"] <= 0.30]
    high = [r["strength"] for r in positive if r["decode_rate"] >= 0.90]
    demo = max(low) if low else min(r["strength"] for r in positive)
    hi = min([h for h in high if h > demo], default=max(r["strength"] for r in positive))
    return {"demo": float(demo), "high": float(hi)}


def recalibrate(model: ToyModel, n: int, say: Callable[[str], None] | None = None) -> dict[str, float]:
    """Measure the strength dial on ``n`` samples, then set the model's calibration, its demo /
    high strengths (:func:`choose_strengths`) and the load test's checksum (which samples at the
    demo strength). Updates ``model.info`` in place; the caller saves."""
    if n < 1:
        raise QRRLError(f"calibration needs at least 1 sample per strength, got {n}")
    model.info["calibration"] = calibrate(model, n, say)
    model.info["strengths"] = choose_strengths(model.info["calibration"])
    model.info["checksum"] = sample_checksum(model)
    return model.info["strengths"]


def sample_checksum(model: ToyModel) -> dict[str, Any]:
    """Rounded statistics of a fixed-seed sample (4 images, demo strength): the load test's reference."""
    prompts, codes, _ = eval_prompts_codes(4)
    out = sample(model, prompts, codes, [1, 2, 3, 4], model.demo_strength, record=False)
    img = out.images
    return {"seeds": [1, 2, 3, 4], "strength": model.demo_strength, "mean": round(float(img.mean()), 4),
            "std": round(float(img.std()), 4),
            "channel_means": [round(float(v), 4) for v in img.mean(dim=(0, 2, 3))],
            "per_image_means": [round(float(v), 4) for v in img.mean(dim=(1, 2, 3))]}
