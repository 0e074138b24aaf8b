"""Tier-2 tests of the scheduled ControlNet, the RL sampler and the recorder in a real ComfyUI.

Skipped unless ``COMFYUI_PATH`` is set; they reuse the session's server (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_helpers import (
    CKPT,
    CONTROLNET,
    node_id,
    sd15_log_sigmas,
    sd15_sigma_to_percent,
    set_inputs,
    shard_paths,
    tiny_collect,
)
from PIL import Image

from rl.sampling import replay_log_probs, replay_means
from rl.schedule import StrengthSchedule
from rl.trajectory import TrajectoryDataset, read_shard

pytestmark = pytest.mark.comfyui


def _run_shard(server, workflow, timeout=240):
    entry = server.run(workflow, timeout=timeout)
    paths = shard_paths(entry, server.base_dir)
    assert len(paths) == 1 and paths[0].is_file(), entry.get("outputs")
    return read_shard(paths[0]), entry



def replay(shard, files, tmp_path):
    """One ddpo epoch on a ComfyUI-recorded shard with the tiny SD1.5 files: its ``data`` reports how
    far the trainer's recomputed log-probabilities are from the recorded ones."""
    from rl.train import TrainConfig, train

    return train(TrainConfig(trajectories=[str(shard)], checkpoint=files.checkpoint, controlnet=files.controlnet,
                             out=tmp_path / "cn.safetensors", unet_config=files.config_dir / "unet",
                             controlnet_config=files.config_dir / "controlnet", epochs=1, cpu=True, progress=False),
                 log=lambda m: None)

def test_collect_workflow_batch2_writes_valid_shard(comfy_server):
    wf = tiny_collect(batch=2, steps=4, seed=11, run_name="t-batch2")
    traj, entry = _run_shard(comfy_server, wf)
    assert traj.batch_size == 2 and traj.num_steps == 4 and traj.latent_shape == (4, 8, 8)
    assert traj.hint.shape == (2, 3, 64, 64) and traj.cond.shape == (2, 77, 768)
    meta = traj.meta
    assert meta["seeds"] == [11, 12] and meta["sampler"] == "qr_rl_stochastic" and meta["scheduler"] == "karras"
    assert meta["comfyui_version"] and len(meta["base_sha256"]) == 64 and len(meta["controlnet_sha256"]) == 64
    assert meta["payloads"] == ["https://example.com"] * 2 and meta["qr"][0]["ecc"] == "H"
    assert meta["prompts"][0].startswith("a medieval village")
    # per-step strengths are the schedule evaluated at each sigma's ComfyUI percent
    spec = StrengthSchedule.from_spec(meta["strength_schedule"])
    log_sigmas = sd15_log_sigmas()
    expected = [spec.strength_at(sd15_sigma_to_percent(float(s), log_sigmas)) for s in traj.sigma[:-1]]
    assert torch.allclose(traj.strength, torch.tensor(expected, dtype=torch.float32), atol=1e-4), (traj.strength, expected)
    assert traj.strength[0] == pytest.approx(1.6) and traj.strength[-1] == pytest.approx(0.8)
    # the recorded steps replay exactly through rl.sampling
    means = replay_means(traj.x, traj.denoised, traj.sigma, meta["eta"])
    resid = (traj.x[:, 1:] - means)[:, -1]
    assert float(resid.abs().max()) < 1e-5  # last step is deterministic
    lp = replay_log_probs(traj.x, traj.denoised, traj.sigma, meta["eta"], meta["s_noise"])
    assert torch.allclose(lp, traj.log_prob, atol=1e-4)
    assert traj.std[-1] == 0 and bool((traj.std[:-1] > 0).all())
    assert torch.equal(traj.timestep, torch.tensor([999.0, *traj.timestep[1:-1].tolist(), 0.0]))
    ui = entry["outputs"][node_id(wf, "Recorder")]["text"][0]
    assert "wrote" in ui and "batch=2" in ui
    assert len(TrajectoryDataset(traj.path.parent)) == 1


def _refusal(server, wf, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        server.run(wf, timeout=240)


def test_refuses_chained_controlnet(comfy_server):
    wf = tiny_collect(seed=21)
    wf["90"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["4", 0], "negative": ["5", 0], "control_net": ["7", 0], "image": ["8", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    set_inputs(wf, "RL Sampler", positive=["90", 0], negative=["90", 1])
    _refusal(comfy_server, wf, "already carries a ControlNet")


def test_refuses_multiple_conditioning_entries(comfy_server):
    wf = tiny_collect(seed=22)
    wf["91"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["5", 0]}}
    set_inputs(wf, "RL Sampler", positive=["91", 0])
    _refusal(comfy_server, wf, "2 conditioning entries")


def test_refuses_patched_model(comfy_server):
    wf = tiny_collect(seed=23)
    wf["92"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction", "zsnr": False}}
    set_inputs(wf, "RL Sampler", model=["92", 0])
    _refusal(comfy_server, wf, "MODEL is patched")


def test_refuses_wrong_checkpoint_name(comfy_server):
    wf = tiny_collect(seed=24)
    set_inputs(wf, "RL Sampler", ckpt_name="(none)")
    _refusal(comfy_server, wf, "no checkpoint file is selected")


def test_run_name_cannot_escape(comfy_server):
    wf = tiny_collect(seed=25, steps=2, run_name="../../x")
    _refusal(comfy_server, wf, "path separator or '..'")
    assert not (comfy_server.base_dir / "x").exists()


def test_record_off_is_a_plain_sampler(comfy_server):
    wf = tiny_collect(seed=26, steps=2, record=False)
    rec = node_id(wf, "Recorder")
    del wf[rec]
    wf["93"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "rl_off"}}
    entry = comfy_server.run(wf, timeout=240)
    assert len(comfy_server.output_files(entry)) == 1


# ---- exact per-step strength vs ComfyUI's chained segments


def _txt2img_cn(seed: int, prefix: str, applies: list[dict]) -> dict:
    """KSampler euler/normal, 3 steps: sigmas (s(999), s(499.5), s(0), 0); the middle sigma is
    exactly ComfyUI's percent_to_sigma(0.5), i.e. on a segment border."""
    wf = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "qr art", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}},
        "qr": {"class_type": "QRCodeEncode", "inputs": {"payload": "border", "ecc": "H", "version": 0, "mask": -1,
                                                        "module_px": 2, "border": 3, "dark": "#000000", "light": "#FFFFFF"}},
    }
    pos, neg = ["pos", 0], ["neg", 0]
    for i, a in enumerate(applies):
        name = f"apply{i}"
        wf[name] = {"class_type": a["class_type"], "inputs": {
            "positive": pos, "negative": neg, "control_net": ["cn", 0], "image": ["qr", 0], **a["inputs"]}}
        pos, neg = [name, 0], [name, 1]
    wf["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["ckpt", 0], "positive": pos, "negative": neg, "latent_image": ["latent", 0], "seed": seed,
        "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    wf["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    wf["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return wf


def _comfy_segment(strength, start, end):
    return {"class_type": "ControlNetApplyAdvanced",
            "inputs": {"strength": strength, "start_percent": start, "end_percent": end}}


def _ours(curve, a, b, keyframes=""):
    return {"class_type": "QRScheduledControlNetApply",
            "inputs": {"curve": curve, "strength_start": a, "strength_end": b, "keyframes": keyframes or "0:1",
                       "start_percent": 0.0, "end_percent": 1.0}}


def _image(server, wf) -> np.ndarray:
    files = server.output_files(server.run(wf, timeout=240))
    return np.asarray(Image.open(files[0]), dtype=np.float64)


def test_comfy_segments_double_the_border_step_and_ours_does_not(comfy_server):
    a, b, seed = 2.0, 2.0, 31
    # ComfyUI: two chained segments sharing the border 0.5 -> the middle step gets a + b
    chain = _image(comfy_server, _txt2img_cn(seed, "b_chain", [_comfy_segment(a, 0.0, 0.5), _comfy_segment(b, 0.5, 1.0)]))
    # ours, told to use a+b at the border: reproduces ComfyUI's chain (proves the doubling)
    doubled = _image(comfy_server, _txt2img_cn(seed, "b_dbl", [_ours("keyframes", a, b, f"0:{a}, 0.5:{a + b}, 1:{b}")]))
    # ours, a step curve a -> b at 0.5: exactly one strength (b) at the border
    step = _image(comfy_server, _txt2img_cn(seed, "b_step", [_ours("step", a, b)]))
    # ComfyUI needs a gap before the border to give one strength per step
    gapped = _image(comfy_server, _txt2img_cn(seed, "b_gap", [_comfy_segment(a, 0.0, 0.4999), _comfy_segment(b, 0.5, 1.0)]))
    d_doubled, d_gapped = np.abs(chain - doubled).mean(), np.abs(step - gapped).mean()
    differ = np.abs(chain - step).mean()
    print(f"\nmean |diff| (0..255): chain vs ours-doubled {d_doubled:.4f}, ours-step vs gapped chain "
          f"{d_gapped:.4f}, chain vs ours-step {differ:.4f}")
    assert d_doubled < 0.05 and d_gapped < 0.05  # float summation order only
    assert differ > 0.1 and differ > 10 * max(d_doubled, d_gapped), "the border step's strength made no difference"


def test_rl_sampler_records_one_strength_at_the_border(comfy_server):
    a, b = 1.5, 0.5
    wf = tiny_collect(seed=32, steps=3, scheduler="normal", curve="step", strength_start=a, strength_end=b,
                      run_name="t-border")
    traj, _ = _run_shard(comfy_server, wf)
    assert traj.strength.tolist() == [a, b, b]
    log_sigmas = sd15_log_sigmas()
    assert sd15_sigma_to_percent(float(traj.sigma[1]), log_sigmas) == pytest.approx(0.5, abs=1e-6)


# ---- module feedback (record off): the gain map comes from each step's latent preview


def _feedback_run(server, prefix: str, **sampler) -> tuple[np.ndarray, str]:
    wf = tiny_collect(seed=41, steps=4, record=False, **sampler)
    del wf[node_id(wf, "Recorder")]
    wf["93"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": prefix}}
    entry = server.run(wf, timeout=240)
    report = entry["outputs"][node_id(wf, "RL Sampler")]["text"][0]
    return np.asarray(Image.open(server.output_files(entry)[0]), dtype=np.float64), report


def test_module_feedback_scales_the_controlnet_per_module(comfy_server):
    qr = [node_id(tiny_collect(), "QR Payload"), 2]
    plain, plain_report = _feedback_run(comfy_server, "fb_plain")
    unity, unity_report = _feedback_run(comfy_server, "fb_unity", qr_code=qr, feedback_low=1.0, feedback_high=1.0)
    fed, report = _feedback_run(comfy_server, "fb_on", qr_code=qr, feedback_low=0.2, feedback_high=4.0,
                                feedback_ramp=0.0)
    assert "module feedback" not in plain_report
    # gain 1 everywhere is the plain sampler, bit for bit (the map multiplies; nothing else moves)
    assert np.array_equal(plain, unity), np.abs(plain - unity).max()
    assert "module feedback: gain 0.2 on right modules, 4 on wrong ones (margin 0.05, ramp 0)" in report
    shares = report.rsplit(":", 1)[1].split(",")
    assert len(shares) == 4 and all(s.strip().endswith("%") for s in shares)  # one per step
    assert np.abs(plain - fed).mean() > 0.5, "feedback gains 0.2 / 4 changed nothing"


def test_module_feedback_is_recorded_and_the_trainer_replays_it(comfy_server, tiny_sd_files, tmp_path):
    wf = tiny_collect(batch=2, steps=4, seed=42, run_name="t-feedback", feedback_low=0.2, feedback_high=4.0)
    set_inputs(wf, "RL Sampler", qr_code=[node_id(wf, "QR Payload"), 2])
    traj, _ = _run_shard(comfy_server, wf)
    maps = traj.strength_map
    assert maps is not None and maps.shape == (2, 4, 1, 8, 8)  # one map per step, at latent size
    assert bool((maps[:, 0] == 1).all()) and float((maps[:, 1:] - 1).abs().max()) > 0.5
    assert traj.meta["module_feedback"]["source"] == "latent_preview"
    assert traj.meta["module_feedback"]["high"] == 4.0
    # the trainer (diffusers) recomputes what ComfyUI sampled, gain maps included
    res = replay(traj.path, tiny_sd_files, tmp_path)
    assert res.data["logp_drift_max_abs"] < 1e-2, res.data
    # without the maps the same steps do not replay: the map is what made them
    plain = tiny_collect(batch=2, steps=4, seed=42, run_name="t-nofeedback")
    ref, _ = _run_shard(comfy_server, plain)
    assert float((ref.x[:, -1] - traj.x[:, -1]).abs().max()) > 1e-3


def test_module_feedback_refuses_a_foreign_code(comfy_server):
    wf = tiny_collect(seed=43, steps=2)
    qr = node_id(wf, "QR Payload")
    wf = tiny_collect(seed=43, steps=2, record=False)
    del wf[node_id(wf, "Recorder")]
    wf["94"] = {"class_type": "QRCodeEncode", "inputs": {**wf[qr]["inputs"], "payload": "another payload entirely"}}
    wf["95"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "fb_foreign"}}
    set_inputs(wf, "RL Sampler", qr_code=["94", 2])
    _refusal(comfy_server, wf, "qr_code does not match the hint image")


# ---- luma-only control: the ControlNet's change kept in luma, through the model's preview colours

SD15_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                         [-0.2120, -0.2616, -0.7177]], dtype=torch.float64)  # ComfyUI's SD15 latent_rgb_factors


def _rgb(latent: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,cd->bdhw", latent.double(), SD15_RGB)


def _luma_chroma(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    return y, rgb - y[:, None]


def test_luma_control_off_is_todays_sampler_and_on_changes_only_the_luma(comfy_server, tiny_sd_files, tmp_path):
    from rl.luma_control import projection_from_meta
    from rl.train import TrainConfig, train

    common = {"batch": 2, "steps": 4, "seed": 51}
    today, _ = _run_shard(comfy_server, tiny_collect(run_name="t-luma-today", **common))
    off, _ = _run_shard(comfy_server, tiny_collect(run_name="t-luma-off", luma_control=False, **common))
    wf = tiny_collect(run_name="t-luma-on", luma_control=True, **common)
    on, entry = _run_shard(comfy_server, wf)
    art, _ = _run_shard(comfy_server, tiny_collect(run_name="t-luma-art", curve="constant", strength_start=0.0,
                                                   strength_end=0.0, **common))
    # off: today's sampler, bit for bit, and nothing new in the shard
    for name in ("x", "denoised", "log_prob"):
        assert torch.equal(getattr(today, name), getattr(off, name)), name
    assert not today.meta.get("luma_control") and not off.meta.get("luma_control")
    # on: the same start; at step 0 (same x) D_on = D_art + P(D_cn − D_art), whose preview is grey
    assert torch.equal(on.x[:, 0], today.x[:, 0]) and torch.equal(art.x[:, 0], today.x[:, 0])
    d_cn, d_art, d_on = today.denoised[:, 0].double(), art.denoised[:, 0].double(), on.denoised[:, 0].double()
    y_cn, c_cn = _luma_chroma(_rgb(d_cn - d_art))
    y_on, c_on = _luma_chroma(_rgb(d_on - d_art))
    scale = float(_rgb(d_cn - d_art).abs().max())
    assert float(c_cn.abs().max()) > 0.1 * scale, "the ControlNet moved no colour: nothing to test"
    assert float(c_on.abs().max()) < 1e-4 * scale  # no colour change left (float32 rounding only) ...
    assert torch.allclose(y_on, y_cn, atol=1e-4 * scale)  # ... and the ControlNet's luma change, whole
    spec = on.meta["luma_control"]
    assert spec["kind"] == "latent_luma" and spec["bias"] is None
    assert torch.allclose(torch.tensor(spec["factors"], dtype=torch.float64), SD15_RGB)
    project = projection_from_meta(spec)
    assert torch.allclose(d_on, d_art + project(d_cn - d_art), atol=1e-5)
    report = entry["outputs"][node_id(wf, "RL Sampler")]["text"][0]
    assert "luma control" in report and "4 extra model calls" in report, report
    # the trainer (ddpo) rebuilds the projection from the shard and recomputes what ComfyUI sampled
    res = train(TrainConfig(trajectories=[str(on.path)], checkpoint=tiny_sd_files.checkpoint,
                            controlnet=tiny_sd_files.controlnet, out=tmp_path / "cn.safetensors",
                            unet_config=tiny_sd_files.config_dir / "unet",
                            controlnet_config=tiny_sd_files.config_dir / "controlnet", epochs=1, cpu=True,
                            progress=False), log=lambda m: None)
    assert res.data["luma_control"] == spec
    print(f"\nluma control, step 0: ControlNet's preview change {float(c_cn.pow(2).sum() / _rgb(d_cn - d_art).pow(2).sum()):.0%}"
          f" colour, after projection {float(c_on.abs().max()) / scale:.1e} of its max; trainer log-prob drift "
          f"{res.data['logp_drift_max_abs']:.1e}")
    assert res.data["logp_drift_max_abs"] < 1e-3, res.data


def test_luma_control_skips_the_extra_call_where_the_controlnet_sits_out(comfy_server):
    wf = tiny_collect(seed=52, steps=4, record=False, luma_control=True, start_percent=0.0, end_percent=0.5)
    del wf[node_id(wf, "Recorder")]
    wf["96"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "luma_window"}}
    report = comfy_server.run(wf, timeout=240)["outputs"][node_id(wf, "RL Sampler")]["text"][0]
    calls = int(report.split("luma control")[1].split(" extra model calls")[0].rsplit(" ", 1)[1])
    assert 0 < calls < 4, report


# ---- one strength curve per sample (keyframes_per_sample): what qr-rl loop needs to learn the curve


def test_keyframes_per_sample_gives_each_image_its_curve_and_the_trainer_replays_it(comfy_server, tiny_sd_files,
                                                                                     tmp_path):
    a, b = "0:1.6, 1:0.4", "0:0.3, 0.5:2, 1:0.8"
    common = {"batch": 2, "steps": 4, "seed": 61}
    wf = tiny_collect(run_name="t-per-sample", keyframes_per_sample=f"{a}\n{b}\n", **common)
    mixed, entry = _run_shard(comfy_server, wf)
    only_a, _ = _run_shard(comfy_server, tiny_collect(run_name="t-curve-a", curve="keyframes", keyframes=a, **common))
    only_b, _ = _run_shard(comfy_server, tiny_collect(run_name="t-curve-b", curve="keyframes", keyframes=b, **common))
    # recorded per sample [B,K]: each row is that sample's curve, as the batch-wide curve records it
    assert mixed.strength.shape == (2, 4)
    assert torch.allclose(mixed.strength[0], only_a.strength, atol=1e-6)
    assert torch.allclose(mixed.strength[1], only_b.strength, atol=1e-6)
    assert not torch.allclose(only_a.strength, only_b.strength, atol=1e-2)
    # each image is the one its curve gives in a batch that runs that curve for all
    assert torch.allclose(mixed.x[0], only_a.x[0], atol=1e-5) and torch.allclose(mixed.x[1], only_b.x[1], atol=1e-5)
    assert float((mixed.x[1] - only_a.x[1]).abs().max()) > 1e-3
    meta = mixed.meta
    assert meta["strength_schedule"] is None and [s["keyframes"] for s in meta["strength_schedules"]] == [
        [[0.0, 1.6], [1.0, 0.4]], [[0.0, 0.3], [0.5, 2.0], [1.0, 0.8]]]
    report = entry["outputs"][node_id(wf, "RL Sampler")]["text"][0]
    assert "strength per sample (keyframes_per_sample)" in report, report
    res = replay(mixed.path, tiny_sd_files, tmp_path)
    assert res.data["logp_drift_max_abs"] < 1e-3, res.data


def test_keyframes_per_sample_needs_one_line_per_image(comfy_server):
    wf = tiny_collect(batch=2, seed=62, steps=2, keyframes_per_sample="0:1, 1:0.5")
    _refusal(comfy_server, wf, "1 lines for a batch of 2")
    wf = tiny_collect(batch=1, seed=63, steps=2, keyframes_per_sample="0:1, 0.5")
    _refusal(comfy_server, wf, "keyframes_per_sample line 1")


# ---- scan guidance: each late prediction nudged toward a readable code, through the preview colours


def test_scan_guidance_off_is_todays_sampler_and_on_moves_the_wrong_modules(comfy_server):
    qr = [node_id(tiny_collect(), "QR Payload"), 2]
    unity = {"qr_code": qr, "feedback_low": 1.0, "feedback_high": 1.0}  # feedback off in effect: the plain sampler
    plain, _ = _feedback_run(comfy_server, "sg_plain")
    off, off_report = _feedback_run(comfy_server, "sg_off", scan_guidance=0.0, **unity)
    on, report = _feedback_run(comfy_server, "sg_on", scan_guidance=1.0, guidance_margin=0.1, guidance_start=0.5,
                               **unity)
    assert np.array_equal(plain, off) and "scan guidance" not in off_report
    assert "scan guidance: scale 1, margin 0.1, guided steps [2, 3]" in report, report
    assert np.abs(plain - on).mean() > 0.1, "scan guidance changed nothing"


def test_scan_guidance_is_recorded_for_rwr_to_distil(comfy_server, tiny_sd_files, tmp_path):
    from rl.module_feedback import latent_rgb, light_grids
    from rl.qr import QRCode
    from rl.scan_guidance import margin_loss

    wf = tiny_collect(batch=2, steps=4, seed=71, run_name="t-guided", feedback_low=1.0, feedback_high=1.0,
                      scan_guidance=1.0, guidance_margin=0.1, guidance_start=0.9)
    set_inputs(wf, "RL Sampler", qr_code=[node_id(wf, "QR Payload"), 2])
    traj, _ = _run_shard(comfy_server, wf)
    ref, _ = _run_shard(comfy_server, tiny_collect(batch=2, steps=4, seed=71, run_name="t-unguided"))
    spec = traj.meta["scan_guidance"]
    assert spec["decoder"] == "latent_preview" and spec["steps"] == [3] and spec["margin"] == 0.1
    # steps before the window are today's; the guided prediction reads better through the preview than the plain one
    assert torch.allclose(traj.denoised[:, :3], ref.denoised[:, :3], atol=1e-5)
    light = light_grids([QRCode.from_metadata(traj.meta["qr"][0])] * 2)
    loss = [float(margin_loss(latent_rgb(t.denoised[:, 3], SD15_RGB.float(), clamp=False), light, 0.1).mean()) for t in (ref, traj)]
    assert loss[1] < 0.5 * loss[0], loss
    from rl.train import TrainConfig, train

    res = train(TrainConfig(trajectories=[str(traj.path)], checkpoint=tiny_sd_files.checkpoint,
                            controlnet=tiny_sd_files.controlnet, out=tmp_path / "cn.safetensors",
                            unet_config=tiny_sd_files.config_dir / "unet",
                            controlnet_config=tiny_sd_files.config_dir / "controlnet", objective="rwr", epochs=1,
                            cpu=True, progress=False), log=lambda m: None)
    assert (tmp_path / "cn.safetensors").is_file() and res.metrics
    from rl.errors import QRRLError

    with pytest.raises(QRRLError, match="scan guidance.*--objective rwr"):  # ddpo cannot replay the edit
        replay(traj.path, tiny_sd_files, tmp_path / "ddpo")
    assert not (tmp_path / "ddpo").exists()


def test_scan_guidance_needs_the_code(comfy_server):
    wf = tiny_collect(seed=72, steps=2, scan_guidance=1.0)
    _refusal(comfy_server, wf, "scan_guidance needs the code it should make readable")


def test_a_model_without_preview_colours_is_a_clear_node_error(comfy_server):
    """Luma-only control and scan guidance read the latent through the model's preview colours: on a
    model whose latent format has none, the node says so and how to turn the option off, and the
    server goes on serving (the next plain run works)."""
    def stripped(**sampler):
        wf = tiny_collect(seed=73, steps=2, record=False, **sampler)
        del wf[node_id(wf, "Recorder")]
        wf["95"] = {"class_type": "QRRLTestStripPreviewColours", "inputs": {"model": ["1", 0]}}
        set_inputs(wf, "RL Sampler", model=["95", 0])
        wf["96"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "rl_stripped"}}
        return wf

    _refusal(comfy_server, stripped(luma_control=True), r"luma.*preview colours.*LatentFormat.*has none usable")
    wf = stripped(scan_guidance=1.0)
    set_inputs(wf, "RL Sampler", qr_code=[node_id(wf, "QR Payload"), 2])
    _refusal(comfy_server, wf, r"preview colours.*has none usable")
    plain = tiny_collect(seed=73, steps=2, record=False)
    del plain[node_id(plain, "Recorder")]
    plain["96"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "rl_plain"}}
    assert len(comfy_server.output_files(comfy_server.run(plain, timeout=240))) == 1
