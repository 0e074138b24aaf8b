"""The trainable policy: a frozen SD1.5 UNet plus a ControlNet (LoRA via peft, or full).

Why this exact denoiser: the trainer must recompute the very ``D`` the ComfyUI sampler used,
or the first PPO update is already off-policy (DESIGN §3). ComfyUI's denoiser for SD1.5
(eps prediction) is reproduced term by term:

    c_in = 1/sqrt(σ²+1);  t = the recorded model timestep
    residuals = ControlNet(c_in·x, t, context, hint ∈ [0,1]) · strength   (cond and uncond)
    eps_c, eps_u = UNet(c_in·x, t, context, residuals)                      (one batched call)
    eps = eps_u + cfg·(eps_c − eps_u);   D = x − σ·eps

ComfyUI applies CFG to the denoised predictions (``D_u + cfg·(D_c − D_u)``); with
``D = x − σ·eps`` that is the same number. Strength, sigma, timestep and cfg are per sample,
so one forward can mix steps of different trajectories.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QRRLError
from .files import sha256_file
from .weights import ensure_model_imports, load_controlnet, load_unet

#: Attention and feed-forward layers of the transformer blocks that get LoRA (linears; proj_in/out
#: may be 1×1 convolutions).
LORA_LINEAR_PATTERN = re.compile(r".*\.(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)$")
ADAPTER_NAME = "default"
#: Which layers get LoRA: "attention" (default): the transformer blocks' attention/feed-forward
#: linears plus the residual projections (the 1×1 zero convolutions that make the residuals the
#: UNet receives); "all": also every other Conv2d (ResNet 3×3 convolutions and the hint encoder),
#: the pre-issue-22 choice, kept for comparison: ~2× the step time on the tiny model and no cache.
LORA_SCOPES = ("attention", "all")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; ``alpha`` defaults to ``rank`` (scale 1); ``scope`` in :data:`LORA_SCOPES`."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    scope: str = "attention"

    def peft_config(self, targets: Sequence[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, target_modules=list(targets), init_lora_weights=True)


def lora_target_modules(controlnet: torch.nn.Module, scope: str = "attention") -> list[str]:
    """Full names of the ControlNet layers that get LoRA (see :data:`LORA_SCOPES`).

    Why not every convolution by default: LoRA on the hint encoder makes it trainable, so its
    full-resolution pass (most of a ControlNet forward) can no longer be cached per sample; LoRA
    on the ResNet 3×3 convolutions doubles their cost for little: what a scannability reward asks
    of the ControlNet is mostly *where* and *how strongly* it pushes, which the attention and the
    residual projections decide.
    """
    if scope not in LORA_SCOPES:
        raise QRRLError(f"LoRA scope must be one of {', '.join(LORA_SCOPES)}, got {scope!r}")
    out = []
    for name, module in controlnet.named_modules():
        attention = LORA_LINEAR_PATTERN.match("." + name)  # proj_in/out are 1×1 Conv2d in SD1.5
        linear = isinstance(module, torch.nn.Linear) and attention
        conv = isinstance(module, torch.nn.Conv2d) and (
            scope == "all" or attention or (name + ".").startswith(ZERO_CONV_PREFIXES))
        if linear or conv:
            out.append(name)
    return out


def _as_batch(value, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.as_tensor(value, device=device, dtype=dtype).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"expected a scalar or {batch} values, got {t.numel()}")
    return t


TRAINING_MODES = ("lora", "full", "zero_convs")
#: diffusers names of the ControlNet's output projections (one per down residual + the middle one).
ZERO_CONV_PREFIXES = ("controlnet_down_blocks.", "controlnet_mid_block.")


def zero_conv_parameters(controlnet: torch.nn.Module) -> set[str]:
    """Names of the ControlNet's zero-convolution parameters (``mode="zero_convs"`` trains these)."""
    names = {n for n, _ in controlnet.named_parameters() if n.startswith(ZERO_CONV_PREFIXES)}
    if not names:
        raise QRRLError("this ControlNet has no diffusers zero convolutions (controlnet_down_blocks.*, "
                        "controlnet_mid_block.*); use --mode lora or full")
    return names


class Policy(torch.nn.Module):
    """Frozen UNet + trainable ControlNet; ``forward`` is :meth:`denoise` (DDP-friendly).

    ``mode``: ``"lora"`` (peft adapter on the layers of :func:`lora_target_modules`: attention
    and residual projections; the hint encoder stays frozen, so its output is cached per sample),
    ``"full"`` (all ControlNet weights train, the hint encoder too: it runs once per micro-batch,
    shared by both CFG branches) or ``"zero_convs"`` (hint encoder cached; only the ControlNet's
    output projections -- the "zero convolutions" that turn its features into the residuals
    added to the UNet -- train: few parameters whose obvious move, scaling or reshaping the
    residuals, is what a scannability reward asks for, so a small batch of trajectories gives
    a usable policy gradient). ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    runs the networks under autocast on GPU; D and log-probs stay float32.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        controlnet: torch.nn.Module,
        mode: str = "lora",
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        autocast_dtype: torch.dtype | None = None,
        control_projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if mode not in TRAINING_MODES:
            raise QRRLError(f"training mode must be one of {', '.join(TRAINING_MODES)}, got {mode!r}")
        self.mode = mode
        self.lora = lora or LoraSettings()
        self.unet = unet.eval().requires_grad_(False)
        self.controlnet = controlnet.eval()
        self.autocast_dtype = autocast_dtype
        # rl.luma_control: keep only this projection of the ControlNet's change to D (None: all of it)
        self.control_projection = control_projection
        self.lora_targets: list[str] = []
        if mode == "lora":
            ensure_model_imports()
            from peft import inject_adapter_in_model

            if self.lora.rank < 1:
                raise QRRLError(f"--lora-rank must be >= 1, got {self.lora.rank}")
            self.controlnet.requires_grad_(False)
            self.lora_targets = lora_target_modules(self.controlnet, self.lora.scope)
            inject_adapter_in_model(self.lora.peft_config(self.lora_targets), self.controlnet, ADAPTER_NAME)
            for name, p in self.controlnet.named_parameters():
                p.requires_grad_(".lora_" in name)
        elif mode == "zero_convs":
            self.controlnet.requires_grad_(False)
            names = zero_conv_parameters(self.controlnet)
            for name, p in self.controlnet.named_parameters():
                p.requires_grad_(name in names)
        else:
            self.controlnet.requires_grad_(True)
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ---- bookkeeping
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward (UNet and ControlNet): much less memory for a second forward pass."""
        for m in (self.unet, self.controlnet):
            if enabled:
                m.enable_gradient_checkpointing()
            else:
                m.disable_gradient_checkpointing()
        self.gradient_checkpointing = enabled

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep: the LoRA weights, or the whole ControlNet."""
        return {n: p.detach() for n, p in self.controlnet.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.controlnet.named_parameters())
        wanted = {n for n, p in params.items() if p.requires_grad}
        if set(sd) != wanted:
            raise QRRLError(
                f"checkpoint holds {len(sd)} trainable tensors but this policy has {len(wanted)} "
                "(different --lora-rank or training mode?); resume with the settings of the run"
            )
        with torch.no_grad():
            for n, t in sd.items():
                if tuple(t.shape) != tuple(params[n].shape):
                    raise QRRLError(f"checkpoint tensor {n} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(params[n].shape)} (different --lora-rank?)")
                params[n].copy_(t)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.controlnet.parameters() if p.requires_grad)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run as the reference policy (LoRA mode only: the ControlNet without the adapter)."""
        if self.mode != "lora":
            raise RuntimeError("adapter_disabled() needs LoRA mode")
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.controlnet.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)

    def merged_controlnet_state_dict(self) -> dict[str, torch.Tensor]:
        """diffusers-layout ControlNet weights with the LoRA merged in (no copy of the model)."""
        sd = {k: v.detach() for k, v in self.controlnet.state_dict().items()}
        if self.mode != "lora":
            return {k: v.clone() for k, v in sd.items()}
        from peft.tuners.lora import LoraLayer

        out = {k: v.clone() for k, v in sd.items() if ".lora_" not in k and ".base_layer." not in k}
        for name, module in self.controlnet.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                with torch.no_grad():
                    delta = module.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)
                    out[f"{name}.weight"] = (base.weight.detach() + delta).clone()
                if base.bias is not None:
                    out[f"{name}.bias"] = base.bias.detach().clone()
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights alone, in peft's naming (load with ``set_peft_model_state_dict``)."""
        if self.mode != "lora":
            raise RuntimeError("adapter_state_dict() needs LoRA mode")
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.controlnet, adapter_name=ADAPTER_NAME).items()}

    # ---- the denoiser
    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.denoise(*args, **kwargs)

    def hint_embedding_frozen(self) -> bool:
        """Whether the ControlNet's hint encoder has no trainable weight (zero_convs, LoRA whose
        targets leave it alone): then its output can be computed once per sample and cached."""
        return not any(p.requires_grad for p in self.controlnet.controlnet_cond_embedding.parameters())

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The ControlNet's hint embedding [B,C,H,W] of ``hint`` [B,3,8H,8W] (uint8 or [0,1]).

        Why: it depends on the hint alone, not on the step, the noise or the CFG branch, yet on
        the full-resolution image it is most of the ControlNet's cost. Pass the result to
        :meth:`denoise` as ``hint_embedding`` to reuse it across steps (valid while the encoder's
        weights do not change: :meth:`hint_embedding_frozen`, or sampling under ``no_grad``).
        Runs under the same autocast as the denoiser, so a cached value equals an uncached one.
        """
        if hint.dtype == torch.uint8:
            hint = hint.float() / 255.0
        dev = next(self.controlnet.parameters()).device
        hint = hint.to(dev, torch.float32)
        if self.controlnet.config.controlnet_conditioning_channel_order == "bgr":
            hint = torch.flip(hint, dims=[1])  # what ControlNetModel.forward does before embedding
        with self._autocast(dev):
            return self.controlnet.controlnet_cond_embedding(hint)

    def _autocast(self, dev: torch.device):
        if self.autocast_dtype is not None and dev.type != "cpu":
            return torch.autocast(dev.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def controlnet_residuals(self, x_in, t, context, hint, scale,
                             hint_embedding: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ControlNet residuals on already c_in-scaled input, each multiplied by ``scale``: one value
        per sample [B], or a spatial map [B,1,h,w] (:mod:`rl.module_feedback`) area-resized to each.
        With ``hint_embedding`` (:meth:`embed_hint` of ``hint``) the hint encoder is skipped."""
        from .module_feedback import scale_residual

        if hint_embedding is None:
            down, mid = self.controlnet(x_in, t, encoder_hidden_states=context, controlnet_cond=hint,
                                        conditioning_scale=1.0, return_dict=False)
        else:
            down, mid = controlnet_with_embedding(self.controlnet, x_in, t, context, hint_embedding)
        return [scale_residual(d, scale) for d in down], scale_residual(mid, scale)

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        timestep: torch.Tensor | float,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        hint: torch.Tensor,
        strength: torch.Tensor | float,
        cfg: torch.Tensor | float,
        strength_uncond: torch.Tensor | float | None = None,
        strength_map: torch.Tensor | None = None,
        hint_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``D`` [B,C,H,W] float32 for latents ``x`` at per-sample ``sigma``/``timestep``.

        ``hint`` [B,3,8H,8W] float in [0,1] (or uint8, divided by 255). ``strength`` scales
        the ControlNet on the cond branch, ``strength_uncond`` (default: the same) on the
        uncond branch (0 = ComfyUI's "apply to negative" off). All per-sample values accept a
        scalar or a [B] tensor. ``strength_map`` [B,1,h,w] multiplies both branches' strength
        per position (module feedback). When every cfg is 1 the uncond branch is skipped, as
        ComfyUI does. ``hint_embedding`` [B,C,H,W]: :meth:`embed_hint` of ``hint``, computed once
        per sample by the caller (steps share it); without it the hint is embedded once per call
        (both CFG branches and the luma projection's second pass share it).
        """
        b = x.shape[0]
        dev = x.device
        sig = _as_batch(sigma, b, dev)
        ts = _as_batch(timestep, b, dev)
        st_c = _as_batch(strength, b, dev)
        st_u = st_c if strength_uncond is None else _as_batch(strength_uncond, b, dev)
        g = _as_batch(cfg, b, dev)
        if strength_map is not None:
            m = strength_map.to(dev, torch.float32)
            if m.ndim != 4 or m.shape[0] != b or m.shape[1] != 1:
                raise QRRLError(f"strength_map must be [B={b},1,h,w], got {tuple(m.shape)}")
            st_c, st_u = st_c.view(-1, 1, 1, 1) * m, st_u.view(-1, 1, 1, 1) * m
        if bool((st_c == 0).all() and (st_u == 0).all()):  # no ControlNet anywhere: no embedding
            emb = None
        elif hint_embedding is not None:
            emb = hint_embedding.to(dev)
            if emb.shape[0] != b:
                raise QRRLError(f"hint_embedding has {emb.shape[0]} samples, x has {b}")
        else:
            emb = self.embed_hint(hint)
        d = self._predict(x, sig, ts, cond, uncond, emb, st_c, st_u, g)
        if self.control_projection is None or emb is None:
            return d
        zero = torch.zeros_like(st_c)
        d_art = self._predict(x, sig, ts, cond, uncond, emb, zero, zero, g)
        return d_art + self.control_projection(d - d_art)

    def _predict(self, x, sig, ts, cond, uncond, emb, st_c, st_u, g) -> torch.Tensor:
        """``D`` with the ControlNet at strengths ``st_c`` / ``st_u`` (per sample or maps)."""
        dev = x.device
        x32 = x.float()
        c_in = (1.0 / torch.sqrt(sig**2 + 1.0)).view(-1, 1, 1, 1)
        x_in = x32 * c_in
        skip_uncond = bool((g == 1.0).all())
        ctx_dtype = torch.float32
        branches: list[tuple[torch.Tensor, torch.Tensor]] = []  # (context, strength) per branch
        if not skip_uncond:
            branches.append((uncond.to(dev, ctx_dtype), st_u))
        branches.append((cond.to(dev, ctx_dtype), st_c))
        with self._autocast(dev):
            if len(branches) == 2 and branches[0][0].shape[1:] == branches[1][0].shape[1:]:
                ctx = torch.cat([branches[0][0], branches[1][0]])
                scale = torch.cat([branches[0][1], branches[1][1]])
                emb2 = None if emb is None else torch.cat([emb, emb])
                eps_u, eps_c = self._eps(torch.cat([x_in, x_in]), torch.cat([ts, ts]), ctx,
                                         emb2, scale).float().chunk(2)
            else:  # different context lengths (long prompts): one call per branch, like ComfyUI
                outs = [self._eps(x_in, ts, ctx, emb, scale).float() for ctx, scale in branches]
                eps_c = outs[-1]
                eps_u = outs[0] if len(outs) == 2 else None
        eps = eps_c if eps_u is None else eps_u + g.view(-1, 1, 1, 1) * (eps_c - eps_u)
        return x32 - sig.view(-1, 1, 1, 1) * eps

    def _eps(self, x_in, t, context, emb, scale) -> torch.Tensor:
        if emb is None or bool((scale == 0).all()):  # ControlNet off at this step: ComfyUI does not run it
            down, mid = None, None
        else:
            down, mid = self.controlnet_residuals(x_in, t, context, None, scale, hint_embedding=emb)
        return self.unet(x_in, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class _GivenEmbedding(torch.nn.Module):
    """Stands in for ``controlnet_cond_embedding``: its input already is the embedding."""

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding


def controlnet_with_embedding(controlnet: torch.nn.Module, x_in: torch.Tensor, t: torch.Tensor,
                              context: torch.Tensor, embedding: torch.Tensor):
    """``(down, mid)`` of diffusers' ``ControlNetModel`` forward, given the hint's embedding.

    Why not a re-implementation of the forward: diffusers' own code keeps running (time
    embedding, blocks, checkpointing, peft layers), only the encoder is swapped for the
    identity for the duration of the call. A "bgr" ControlNet flips its ``controlnet_cond``
    before the encoder, so the embedding is pre-flipped to come out unchanged.
    """
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":
        embedding = torch.flip(embedding, dims=[1])
    encoder = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = _GivenEmbedding()
    try:
        return controlnet(x_in, t, encoder_hidden_states=context, controlnet_cond=embedding,
                          conditioning_scale=1.0, return_dict=False)
    finally:
        controlnet.controlnet_cond_embedding = encoder


@dataclass
class LoadedPolicy:
    """A policy plus the identities of the files it came from."""

    policy: Policy
    base_sha256: str
    controlnet_sha256: str
    controlnet_config: dict


def load_policy(
    checkpoint: str | os.PathLike[str],
    controlnet: str | os.PathLike[str],
    *,
    unet_config: str | os.PathLike[str] | Mapping | None = None,
    controlnet_config: str | os.PathLike[str] | Mapping | None = None,
    mode: str = "lora",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    autocast_dtype: torch.dtype | None = None,
    hash_files: bool = True,
) -> LoadedPolicy:
    """Build a :class:`Policy` from local files only (works with ``HF_HUB_OFFLINE=1``).

    Configs default to the SD1.5 ones shipped in ``rl/configs``; pass the diffusers config
    folder of a non-standard model (e.g. the tiny test models). A file of the wrong
    architecture raises ``QRRLError`` naming what was expected and what was found.
    """
    from .weights import SD15_CONTROLNET_CONFIG, load_config

    unet = load_unet(checkpoint, unet_config)
    cn_cfg = load_config(controlnet_config, SD15_CONTROLNET_CONFIG)
    cn = load_controlnet(controlnet, cn_cfg)
    pol = Policy(unet, cn, mode=mode, lora=lora, gradient_checkpointing=gradient_checkpointing,
                 autocast_dtype=autocast_dtype)
    return LoadedPolicy(
        policy=pol,
        base_sha256=sha256_file(checkpoint) if hash_files else "",
        controlnet_sha256=sha256_file(controlnet) if hash_files else "",
        controlnet_config={k: v for k, v in dict(cn.config).items() if not k.startswith("_")},
    )


def check_model_patches(patches: Sequence[Mapping], where: str | Path) -> None:
    """Refuse shards sampled with model patches (e.g. a LoRA on the UNet) we cannot reproduce."""
    if patches:
        names = ", ".join(f"{p.get('kind')} {p.get('name')!r}" for p in patches)
        raise QRRLError(
            f"{where} was sampled with model patches ({names}); the trainer cannot reproduce them, so "
            "its log-probs would be off-policy. Record shards without UNet patches (or merge the "
            "patch into the base checkpoint and pass that as --checkpoint)"
        )


def clone_controlnet(controlnet: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy (full fine-tune reference for the KL term)."""
    return copy.deepcopy(controlnet).eval().requires_grad_(False)


def tiny_configs(width: tuple[int, ...] = (32, 64), context_dim: int = 32) -> tuple[dict, dict]:
    """(UNet config, ControlNet config) of a tiny SD1.5-shaped pair, for tests and benchmarks.

    One CrossAttn level per width entry (the deepest without attention), one layer per block,
    a light hint encoder (8x downsampling like SD1.5, few channels).
    """
    n = len(width)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"] if n > 1 else ["CrossAttnDownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1) if n > 1 else ["CrossAttnUpBlock2D"]
    common = {
        "in_channels": 4, "block_out_channels": list(width), "layers_per_block": 1,
        "cross_attention_dim": context_dim, "attention_head_dim": 8, "norm_num_groups": 8,
        "down_block_types": down,
    }
    unet = {**common, "out_channels": 4, "sample_size": 8, "up_block_types": up}
    cn = {**common, "conditioning_embedding_out_channels": [8, 16, 16, 32]}
    return unet, cn


def build_tiny_models(seed: int = 0, width: tuple[int, ...] = (32, 64), context_dim: int = 32,
                      zero_conv_std: float = 0.05):
    """Random tiny ``(unet, controlnet)`` (fp32) from :func:`tiny_configs`.

    The ControlNet's zero convolutions get small random weights: a fresh ControlNet outputs
    zero residuals, so neither its strength nor its training would change anything.
    """
    ensure_model_imports()
    from diffusers import ControlNetModel, UNet2DConditionModel

    ucfg, ccfg = tiny_configs(width, context_dim)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**ucfg).eval()
    torch.manual_seed(seed + 1)
    cn = ControlNetModel(**ccfg).eval()
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for layer in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * zero_conv_std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * zero_conv_std)
    return unet, cn
