"""rl/policy.py: the hint embedding computed once per sample gives the denoiser's exact numbers.

Why: the cache (``Policy.embed_hint`` + ``hint_embedding=``) is a speed-up only; a cached
prediction that drifts from the uncached one would make the trainer's first update off-policy.
The uncached reference is diffusers' ControlNet called on the raw hint, one CFG branch at a time.
"""

from __future__ import annotations

import pytest
import torch

from rl.policy import Policy, build_tiny_models

torch.set_num_threads(1)

DRIFT_TOL = 1e-6


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    b = 3
    return dict(
        x=torch.randn(b, 4, 8, 8, generator=g) * 2, sigma=torch.tensor([2.0, 0.7, 0.1]),
        timestep=torch.tensor([600.0, 250.0, 20.0]), cond=torch.randn(b, 6, 32, generator=g),
        uncond=torch.randn(b, 6, 32, generator=g),
        hint=(torch.rand(b, 3, 64, 64, generator=g) * 255).to(torch.uint8),
    )


def _uncached(pol: Policy, x, sigma, timestep, cond, uncond, hint, strength, cfg):
    """D as the policy computed it before the cache: one batched call of both CFG branches, the
    ControlNet on the raw hint (its encoder runs on both copies)."""
    c_in = (1 / torch.sqrt(sigma**2 + 1)).view(-1, 1, 1, 1)
    h = hint.float() / 255.0
    x2, t2, ctx, h2 = torch.cat([x * c_in] * 2), torch.cat([timestep] * 2), torch.cat([uncond, cond]), torch.cat([h, h])
    down, mid = pol.controlnet(x2, t2, encoder_hidden_states=ctx, controlnet_cond=h2,
                               conditioning_scale=1.0, return_dict=False)
    eps_u, eps_c = pol.unet(x2, t2, encoder_hidden_states=ctx,
                            down_block_additional_residuals=[d * strength for d in down],
                            mid_block_additional_residual=mid * strength).sample.chunk(2)
    return x - sigma.view(-1, 1, 1, 1) * (eps_u + cfg * (eps_c - eps_u))


@pytest.mark.parametrize("mode", ["zero_convs", "lora", "full"])
def test_cached_hint_embedding_drift(mode, inputs):
    """Cached vs uncached D and one-step log-prob drift ≤ 1e-6, in every training mode."""
    from rl.sampling import gaussian_log_prob, step_mean

    unet, cn = build_tiny_models(seed=4)
    pol = Policy(unet, cn, mode=mode)
    assert pol.hint_embedding_frozen() == (mode != "full")
    with torch.no_grad():
        emb = pol.embed_hint(inputs["hint"])
        cached = pol.denoise(**inputs, strength=0.9, cfg=5.0, hint_embedding=emb)
        per_call = pol.denoise(**inputs, strength=0.9, cfg=5.0)
        want = _uncached(pol, **inputs, strength=0.9, cfg=5.0)
        x_next = inputs["x"] + 0.3 * torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))
        std = torch.full((3, 1, 1, 1), 0.3)

        def lp(d):
            return gaussian_log_prob(x_next, step_mean(inputs["x"], d, 0.5), std)

        for got in (cached, per_call):
            assert (got - want).abs().max() <= DRIFT_TOL
            assert (lp(got) - lp(want)).abs().max() <= DRIFT_TOL


def test_cached_embedding_gradients_match(inputs):
    """Gradients of the trainable weights are the same with a cached embedding (LoRA, zero convs)."""
    unet, cn = build_tiny_models(seed=4)
    pol = Policy(unet, cn, mode="zero_convs")
    params = [p for p in pol.parameters() if p.requires_grad]

    def grads(**kw):
        for p in params:
            p.grad = None
        pol.denoise(**inputs, strength=0.9, cfg=5.0, **kw).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in params])

    with torch.no_grad():
        emb = pol.embed_hint(inputs["hint"])
    assert (grads(hint_embedding=emb) - grads()).abs().max() <= DRIFT_TOL


def test_full_mode_trains_the_hint_encoder(inputs):
    """In full mode the per-call embedding keeps its graph: the encoder gets a gradient."""
    unet, cn = build_tiny_models(seed=4)
    pol = Policy(unet, cn, mode="full")
    pol.denoise(**inputs, strength=0.9, cfg=5.0).square().mean().backward()
    assert pol.controlnet.controlnet_cond_embedding.conv_in.weight.grad.abs().sum() > 0


def test_bgr_controlnet_cached(inputs):
    """A "bgr" ControlNet flips the hint before its encoder; the cached path does the same."""
    unet, cn = build_tiny_models(seed=4)
    cn.register_to_config(controlnet_conditioning_channel_order="bgr")
    pol = Policy(unet, cn, mode="zero_convs")
    with torch.no_grad():
        want = _uncached(pol, **inputs, strength=1.0, cfg=3.0)
        got = pol.denoise(**inputs, strength=1.0, cfg=3.0, hint_embedding=pol.embed_hint(inputs["hint"]))
    assert (got - want).abs().max() <= DRIFT_TOL


def test_lora_targets_attention_and_residual_projections():
    """Default LoRA: attention/FF layers and the residual (zero) convs, not the hint encoder or
    the ResNet convs, so the embedding stays cacheable; scope "all" is the old every-conv choice."""
    from rl.errors import QRRLError
    from rl.policy import lora_target_modules

    _, cn = build_tiny_models(seed=4)
    targets = lora_target_modules(cn)
    assert {"controlnet_mid_block", "controlnet_down_blocks.0"} <= set(targets)
    assert any(t.endswith("attn2.to_k") for t in targets) and any(t.endswith("proj_in") for t in targets)
    assert not any("controlnet_cond_embedding" in t or t.endswith(("conv1", "conv2")) for t in targets)
    every = lora_target_modules(cn, "all")
    assert set(targets) < set(every) and "controlnet_cond_embedding.conv_in" in every
    with pytest.raises(QRRLError):
        lora_target_modules(cn, "convs")
