"""rl/policy.py + rl/weights.py: local loading (both layouts), the DESIGN §3 denoiser, export."""

from __future__ import annotations

import json

import pytest
import torch

from rl.errors import QRRLError
from rl.files import atomic_save_safetensors
from rl.policy import Policy, build_tiny_models, check_model_patches, tiny_configs
from rl.train import export_controlnet
from rl.weights import load_controlnet, load_unet

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    unet, cn = build_tiny_models(seed=3)
    g = torch.Generator().manual_seed(0)
    b = 2
    inputs = dict(
        x=torch.randn(b, 4, 8, 8, generator=g) * 2, sigma=torch.tensor([2.0, 0.7]),
        timestep=torch.tensor([600.0, 250.0]), cond=torch.randn(b, 6, 32, generator=g),
        uncond=torch.randn(b, 6, 32, generator=g), hint=torch.rand(b, 3, 64, 64, generator=g),
    )
    return unet, cn, inputs


def _manual_denoise(unet, cn, x, sigma, timestep, cond, uncond, hint, strength, cfg, strength_uncond):
    """DESIGN §3 written out with plain diffusers calls, one branch at a time."""
    c_in = (1 / torch.sqrt(sigma**2 + 1)).view(-1, 1, 1, 1)

    def eps(ctx, s):
        down, mid = cn(x * c_in, timestep, encoder_hidden_states=ctx, controlnet_cond=hint,
                       conditioning_scale=1.0, return_dict=False)
        sv = torch.as_tensor(s).view(-1, 1, 1, 1)
        return unet(x * c_in, timestep, encoder_hidden_states=ctx,
                    down_block_additional_residuals=[d * sv for d in down],
                    mid_block_additional_residual=mid * sv).sample

    e_c, e_u = eps(cond, strength), eps(uncond, strength_uncond)
    return x - sigma.view(-1, 1, 1, 1) * (e_u + torch.as_tensor(cfg).view(-1, 1, 1, 1) * (e_c - e_u))


def test_denoiser_matches_design_formula(tiny):
    unet, cn, inp = tiny
    pol = Policy(unet, cn, mode="full")
    with torch.no_grad():
        strength = torch.tensor([1.3, 0.4])
        d = pol.denoise(**inp, strength=strength, cfg=torch.tensor([7.0, 3.0]))
        ref = _manual_denoise(unet, cn, **inp, strength=strength, cfg=torch.tensor([7.0, 3.0]),
                              strength_uncond=strength)
        assert torch.allclose(d, ref, atol=1e-5, rtol=1e-5)
        # apply-to-negative off: uncond branch without ControlNet
        d0 = pol.denoise(**inp, strength=strength, cfg=5.0, strength_uncond=0.0)
        ref0 = _manual_denoise(unet, cn, **inp, strength=strength, cfg=5.0, strength_uncond=torch.zeros(2))
        assert torch.allclose(d0, ref0, atol=1e-5, rtol=1e-5)
        # strength matters, cfg 1 skips the uncond branch without changing the value
        assert (pol.denoise(**inp, strength=0.0, cfg=5.0) - d0).abs().max() > 1e-3
        d1 = pol.denoise(**inp, strength=1.0, cfg=1.0)
        ref1 = _manual_denoise(unet, cn, **inp, strength=torch.ones(2), cfg=1.0, strength_uncond=torch.ones(2))
        assert torch.allclose(d1, ref1, atol=1e-5, rtol=1e-5)
        # different context lengths (long prompt): two calls, same formula
        long_inp = {**inp, "cond": torch.cat([inp["cond"], inp["cond"]], 1)}
        dl = pol.denoise(**long_inp, strength=1.0, cfg=4.0)
        refl = _manual_denoise(unet, cn, **long_inp, strength=torch.ones(2), cfg=4.0, strength_uncond=torch.ones(2))
        assert torch.allclose(dl, refl, atol=1e-5, rtol=1e-5)
        # uint8 hint = float hint / 255
        q = (inp["hint"] * 255).round().to(torch.uint8)
        assert torch.allclose(pol.denoise(**{**inp, "hint": q}, strength=1.0, cfg=2.0),
                              pol.denoise(**{**inp, "hint": q.float() / 255}, strength=1.0, cfg=2.0))


def test_fresh_lora_is_the_base_and_trains_only_adapter(tiny):
    unet, cn, inp = tiny
    full = Policy(unet, cn, mode="full")
    with torch.no_grad():
        base = full.denoise(**inp, strength=1.0, cfg=3.0)
    _, cn2 = build_tiny_models(seed=3)
    pol = Policy(unet, cn2, mode="lora")
    names = [n for n, p in pol.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert any("controlnet_down_blocks" in t for t in pol.lora_targets) and any(t.endswith("to_q") for t in pol.lora_targets)
    with torch.no_grad():
        assert torch.equal(pol.denoise(**inp, strength=1.0, cfg=3.0), base)
    d = pol.denoise(**inp, strength=1.0, cfg=3.0)
    d.square().mean().backward()
    assert all(p.grad is not None for n, p in pol.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for p in pol.unet.parameters())


def test_zero_convs_mode_trains_only_the_output_projections(tiny, tmp_path):
    unet, cn, inp = tiny
    _, cn2 = build_tiny_models(seed=3)
    pol = Policy(unet, cn2, mode="zero_convs")
    names = {n for n, p in pol.controlnet.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) for n in names)
    assert len(names) == 2 * (len(cn2.controlnet_down_blocks) + 1)  # weight + bias of each projection
    assert pol.num_trainable() < sum(p.numel() for p in cn2.parameters()) / 10
    d = pol.denoise(**inp, strength=1.0, cfg=3.0)
    d.square().mean().backward()
    grads = {n: p.grad for n, p in pol.controlnet.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in names)
    assert all(g is None for n, g in grads.items() if n not in names)
    assert all(p.grad is None for p in pol.unet.parameters())
    # the export is the whole ControlNet, loadable like any other
    with torch.no_grad():
        cn2.controlnet_mid_block.weight.mul_(2.0)
    sd = pol.merged_controlnet_state_dict()
    assert set(sd) == set(cn.state_dict()) and torch.equal(sd["controlnet_mid_block.weight"], cn2.controlnet_mid_block.weight)
    with pytest.raises(QRRLError, match="one of lora, full, zero_convs"):
        Policy(unet, cn2, mode="zeroconv")


def _perturb_lora(pol: Policy) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pol.controlnet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_export_reloads_and_reproduces_residuals(tiny, tmp_path, layout):
    unet, _, inp = tiny
    _, cn = build_tiny_models(seed=3)
    pol = Policy(unet, cn, mode="lora", gradient_checkpointing=True)
    _perturb_lora(pol)
    cfg = tiny_configs()[1]
    out, adapter = export_controlnet(pol, tmp_path / "cn.safetensors", cfg, {"base_sha256": "ab", "round": 2},
                                     dtype="fp32", layout=layout)
    reloaded = load_controlnet(out, cfg)
    c_in = (1 / torch.sqrt(inp["sigma"] ** 2 + 1)).view(-1, 1, 1, 1)
    args = (inp["x"] * c_in, inp["timestep"], inp["cond"], inp["hint"])
    with torch.no_grad():
        want_down, want_mid = pol.controlnet_residuals(*args, torch.ones(2))
        got_down, got_mid = reloaded(args[0], args[1], encoder_hidden_states=args[2], controlnet_cond=args[3],
                                     return_dict=False)
    assert max(float((a - b).abs().max()) for a, b in zip(want_down + [want_mid], list(got_down) + [got_mid])) < 1e-5
    with torch.no_grad():
        base = Policy(unet, build_tiny_models(seed=3)[1], mode="full").controlnet_residuals(*args, torch.ones(2))[1]
    assert (base - want_mid).abs().max() > 1e-3  # the adapter did change something
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert json.loads(meta["round"]) == 2 and json.loads(meta["layout"]) == layout
    assert any(k.startswith("control_model.") for k in keys) == (layout == "ldm")
    assert adapter is not None and adapter.is_file()
    # the adapter alone restores the LoRA weights into a fresh policy
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    fresh = Policy(unet, build_tiny_models(seed=3)[1], mode="lora")
    set_peft_model_state_dict(fresh.controlnet, load_file(adapter))
    with torch.no_grad():
        assert torch.allclose(fresh.controlnet_residuals(*args, torch.ones(2))[1], want_mid, atol=1e-6)


def test_fp16_export_is_close(tiny, tmp_path):
    unet, _, inp = tiny
    pol = Policy(unet, build_tiny_models(seed=3)[1], mode="full")
    cfg = tiny_configs()[1]
    out, adapter = export_controlnet(pol, tmp_path / "cn16.safetensors", cfg, {}, dtype="fp16")
    assert adapter is None
    re = load_controlnet(out, cfg)
    for (n, a), b in zip(pol.controlnet.state_dict().items(), re.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), n


def test_ldm_single_file_checkpoint_loads_equal(tiny_sd_files):
    """helper's SD1.5-layout single file (ldm keys, fp16) loads back equal to the diffusers model."""
    from rl.testing.tiny_sd import build_tiny_controlnet_model, build_tiny_unet

    unet = load_unet(tiny_sd_files.checkpoint, tiny_sd_files.config_dir / "unet")
    ref = build_tiny_unet(0).half().float().state_dict()
    got = unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    cn = load_controlnet(tiny_sd_files.controlnet, tiny_sd_files.config_dir / "controlnet")
    ref_cn = build_tiny_controlnet_model(seed=0).half().float().state_dict()
    assert all(torch.equal(cn.state_dict()[k], ref_cn[k]) for k in ref_cn)


def test_wrong_files_are_refused(tiny, tmp_path):
    unet, cn, _ = tiny
    ucfg, ccfg = tiny_configs()
    u = atomic_save_safetensors(unet.state_dict(), tmp_path / "u.safetensors")
    c = atomic_save_safetensors(cn.state_dict(), tmp_path / "c.safetensors")
    assert torch.equal(load_unet(u, ucfg).conv_in.weight, unet.conv_in.weight)
    with pytest.raises(QRRLError, match="is a ControlNet"):
        load_unet(c, ucfg)
    with pytest.raises(QRRLError, match="base model checkpoint, not a ControlNet"):
        load_controlnet(u, ccfg)
    # the shipped SD1.5 config against a tiny file: says what it expected
    with pytest.raises(QRRLError, match=r"not the expected UNet architecture \(block_out_channels=\[320, 640"):
        load_unet(u)
    junk = atomic_save_safetensors({"foo.weight": torch.zeros(2)}, tmp_path / "j.safetensors")
    with pytest.raises(QRRLError, match="not an SD1.5 checkpoint"):
        load_unet(junk)
    (tmp_path / "p.ckpt").write_bytes(b"x")
    with pytest.raises(QRRLError, match="pickled"):
        load_unet(tmp_path / "p.ckpt")
    with pytest.raises(QRRLError, match="UNet patch|model patches"):
        check_model_patches([{"kind": "lora", "name": "detail.safetensors", "sha256": "0", "strength": 1.0}], "s")
    check_model_patches([], "s")
