"""Shard format v1: round trip, validation, every corruption case, atomic writes, dataset view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rl.errors import QRRLError
from rl.reward import Reward
from rl.sampling import initial_noise, sample_loop
from rl.schedule import StrengthSchedule, per_step_strengths
from rl.trajectory import (
    META_KEYS,
    SCHEMA_VERSION,
    ShardError,
    Trajectory,
    TrajectoryDataset,
    read_shard,
    sanitize_run_name,
    write_shard,
)

SIGMAS = torch.tensor([14.6146, 4.0, 1.0, 0.3, 0.0])


def make_traj(batch: int = 2, latent: tuple[int, int, int] = (4, 4, 4), seed0: int = 0) -> Trajectory:
    seeds = list(range(seed0, seed0 + batch))
    x0 = initial_noise((batch, *latent), seeds) * float(SIGMAS[0])
    sched = StrengthSchedule("linear", 1.6, 0.8)
    percents = [k / (len(SIGMAS) - 1) for k in range(len(SIGMAS) - 1)]
    _, rec = sample_loop(lambda x, s, k: x / (1 + s * s), x0, SIGMAS, eta=1.0, s_noise=1.0, seeds=seeds,
                         strengths=per_step_strengths(sched, percents))
    c, h, w = latent
    reward = Reward(total=np.linspace(0.1, 0.9, batch),
                    components={"decoded": np.ones(batch), "clip_text": np.full(batch, 0.25)})
    return Trajectory.from_record(
        rec,
        timestep=[999.0, 700.0, 400.0, 100.0],
        cond=torch.randn(batch, 77, 8).half(),
        uncond=torch.zeros(batch, 77, 8).half(),
        hint=torch.rand(batch, 8 * h, 8 * w, 3),  # ComfyUI IMAGE layout, converted to uint8 NCHW
        reward=reward,
        meta={
            "cfg": 7.5, "sampler": "qr_rl_ancestral", "scheduler": "karras",
            "prompts": [f"a castle {i}" for i in range(batch)], "negative_prompt": "blurry",
            "payloads": ["https://example.com"] * batch,
            "qr": [{"ecc": "H", "version": 3, "mask": 2, "module_px": 16, "border": 4}] * batch,
            "strength_schedule": sched.to_spec(), "apply_to_uncond": True,
            "base_sha256": "ab" * 32, "controlnet_sha256": "cd" * 32,
            "model_patches": [{"kind": "lora", "name": "style.safetensors", "sha256": "ef" * 32, "strength": 0.7}],
            "policy_version": "r0", "curriculum_round": 0, "comfyui_version": "0.8.0",
        },
    )


def assert_same(a: Trajectory, b: Trajectory) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    assert a.meta == b.meta


def write_raw(path: Path, traj: Trajectory, meta_override: dict | None = None, drop: str | None = None,
              tensors_override: dict | None = None) -> Path:
    """Write a shard *bypassing* validation, to build corrupt files honestly."""
    meta = {**traj.meta, **(meta_override or {})}
    tensors = {k: v.contiguous() for k, v in traj.tensors().items() if k != drop}
    tensors.update(tensors_override or {})
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


@pytest.fixture()
def shard(tmp_path: Path) -> tuple[Trajectory, Path]:
    traj = make_traj()
    return traj, write_shard(traj, tmp_path, "run-1")


def test_round_trip(shard, tmp_path):
    traj, path = shard
    assert path.parent == tmp_path / "run-1" and path.name.startswith("shard-") and path.suffix == ".safetensors"
    back = read_shard(path)
    assert_same(traj, back)
    assert back.meta["schema_version"] == SCHEMA_VERSION and set(META_KEYS) <= set(back.meta)
    assert back.hint.shape == (2, 3, 32, 32) and back.hint.dtype == torch.uint8
    assert back.reward_components.keys() == {"decoded", "clip_text"}
    assert back.batch_size == 2 and back.num_steps == 4 and back.latent_shape == (4, 4, 4)
    assert back.trainable_steps.tolist() == [True, True, True, False]
    assert StrengthSchedule.from_spec(back.meta["strength_schedule"]).curve == "linear"
    assert back.strength.tolist() == pytest.approx([1.6, 1.4, 1.2, 1.0])
    assert len(back.meta["reward_details"]) == 2
    assert [p.name for p in (tmp_path / "run-1").iterdir()] == [path.name]  # no temp file left


def test_two_writes_get_distinct_names(tmp_path):
    traj = make_traj()
    assert write_shard(traj, tmp_path, "r") != write_shard(traj, tmp_path, "r")


def test_nan_reward_is_kept_and_flagged(tmp_path):
    traj = make_traj(batch=3)
    traj.reward = torch.tensor([0.5, float("nan"), float("inf")], dtype=torch.float64)
    back = read_shard(write_shard(traj, tmp_path, "r"))
    assert back.reward_finite.tolist() == [True, False, False]
    assert [s.reward_finite for s in back.samples()] == [True, False, False]


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "a\\b", ".hidden", "", "   ", "x" * 101, "CON"])
def test_bad_run_names_rejected(tmp_path, name):
    with pytest.raises(QRRLError):
        sanitize_run_name(name)
    with pytest.raises(QRRLError):
        write_shard(make_traj(batch=1), tmp_path / "out", name)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


def test_run_name_mapping():
    assert sanitize_run_name("my run #1") == "my_run__1"
    assert sanitize_run_name("qr-r0.v2_a") == "qr-r0.v2_a"


def test_validate_before_write(tmp_path):
    traj = make_traj()
    traj.x[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ShardError, match="'x' contains NaN"):
        write_shard(traj, tmp_path, "r")
    assert not (tmp_path / "r").exists()  # validation runs before anything is created


def test_truncated_file(shard, tmp_path):
    _, path = shard
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ShardError, match="trunc.safetensors.*not a readable safetensors"):
        read_shard(bad)


def test_garbage_and_non_safetensors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ShardError, match="garbage.safetensors"):
        read_shard(garbage)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file\n")
    with pytest.raises(ShardError, match="notes.safetensors"):
        read_shard(text)
    other = tmp_path / "model.safetensors"  # a valid safetensors file that is not a shard
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ShardError, match="not a QR-RL trajectory shard"):
        read_shard(other)
    with pytest.raises(ShardError, match="no such shard"):
        read_shard(tmp_path / "missing.safetensors")


def test_wrong_schema_version(tmp_path):
    traj = make_traj()
    traj.meta = {**traj.meta, "format": "qr-rl-trajectory", "schema_version": 1, "created": "x",
                 "pack_version": "0.1.0"}
    newer = write_raw(tmp_path / "newer.safetensors", traj, {"schema_version": 2})
    with pytest.raises(ShardError, match="newer.safetensors.*version 2 is newer"):
        read_shard(newer)
    odd = write_raw(tmp_path / "odd.safetensors", traj, {"schema_version": "one"})
    with pytest.raises(ShardError, match="unknown shard schema version"):
        read_shard(odd)


def _complete(traj: Trajectory) -> Trajectory:
    traj.meta = {**traj.meta, "format": "qr-rl-trajectory", "schema_version": 1, "created": "x",
                 "pack_version": "0.1.0"}
    return traj


def test_missing_keys(tmp_path):
    traj = _complete(make_traj())
    no_tensor = write_raw(tmp_path / "a.safetensors", traj, drop="denoised")
    with pytest.raises(ShardError, match=r"a.safetensors: missing tensors \['denoised'\]"):
        read_shard(no_tensor)
    meta = dict(traj.meta)
    del meta["seeds"]
    path = tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in traj.tensors().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    with pytest.raises(ShardError, match=r"b.safetensors: metadata lacks keys \['seeds'\]"):
        read_shard(path)


def test_bad_metadata_json(tmp_path):
    traj = _complete(make_traj())
    path = tmp_path / "j.safetensors"
    meta = {k: json.dumps(v) for k, v in traj.meta.items()}
    meta["cfg"] = "{not json"
    save_file({k: v.contiguous() for k, v in traj.tensors().items()}, str(path), metadata=meta)
    with pytest.raises(ShardError, match="'cfg' is not valid JSON"):
        read_shard(path)


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"log_prob": torch.zeros(2, 3)}, "'log_prob' has shape"),
        ({"denoised": torch.zeros(2, 4, 4, 4, 5)}, "'denoised' has shape"),
        ({"hint": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)}, "hint is 8x the latent"),
        ({"sigma": torch.zeros(6)}, "'sigma' has shape"),
        ({"reward": torch.zeros(3, dtype=torch.float64)}, "'reward' has shape"),
        ({"hint": torch.zeros(2, 3, 32, 32)}, "'hint' must be uint8"),
        ({"x": torch.zeros(2, 5, 4, 4, 4, dtype=torch.float64)}, "'x' must be float32"),
        ({"cond": torch.zeros(3, 77, 8).half()}, "'cond' must be [B=2"),
        ({"sigma": torch.tensor([1.0, 2.0, 0.5, 0.2, 0.0])}, "strictly decreasing"),
    ],
)
def test_shape_and_dtype_mismatch(tmp_path, override, needle):
    path = write_raw(tmp_path / "s.safetensors", _complete(make_traj()), tensors_override=override)
    with pytest.raises(ShardError) as err:
        read_shard(path)
    assert str(path) in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("name", ["x", "denoised", "log_prob", "std"])
def test_nan_rejected(tmp_path, name):
    traj = _complete(make_traj())
    t = traj.tensors()[name].clone()
    t.view(-1)[0] = float("nan")
    path = write_raw(tmp_path / "n.safetensors", traj, tensors_override={name: t})
    with pytest.raises(ShardError, match=f"'{name}' contains NaN"):
        read_shard(path)


def test_per_sample_metadata_length_checked(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", _complete(make_traj()), {"prompts": ["only one"]})
    with pytest.raises(ShardError, match="'prompts' must be a list with one entry per sample"):
        read_shard(path)


def test_disk_full_leaves_no_shard(tmp_path):
    """A real write failure: the child process gets a 64 KiB file-size limit (RLIMIT_FSIZE).

    Writing the ~100 KiB shard fails in the kernel (EFBIG), exactly like a full disk
    (ENOSPC) would at the same point. No valid or partial file may remain.
    """
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_trajectory import make_traj
        from rl.trajectory import ShardError, write_shard
        traj = make_traj(batch=4, latent=(4, 8, 8))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            write_shard(traj, {str(tmp_path)!r}, "full")
        except ShardError as e:
            print("FAILED-AS-EXPECTED", e)
        else:
            print("WROTE")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "FAILED-AS-EXPECTED" in proc.stdout, proc.stdout + proc.stderr
    assert "no partial file was left" in proc.stdout
    left = list((tmp_path / "full").iterdir())
    assert left == [], left


def test_dataset_skips_bad_shard_with_warning(tmp_path):
    good1 = write_shard(make_traj(seed0=0), tmp_path, "run")
    good2 = write_shard(make_traj(batch=3, seed0=10), tmp_path / "nested", "run")
    bad = tmp_path / "run" / "zz-broken.safetensors"
    bad.write_bytes(good1.read_bytes()[:500])
    (tmp_path / "run" / ".shard-x.safetensors.tmp").write_bytes(b"partial")  # in-progress temp file
    with pytest.warns(UserWarning, match="zz-broken.safetensors"):
        ds = TrajectoryDataset([tmp_path])
    assert len(ds) == 2 and ds.num_samples == 5 and set(ds.paths) == {good1, good2}
    assert [p for p, _ in ds.skipped] == [bad] and "not a readable" in ds.skipped[0][1]
    samples = list(ds.samples())
    assert len(samples) == 5 and samples[0].x.shape == (5, 4, 4, 4) and samples[0].hint.shape == (3, 32, 32)
    assert {s.seed for s in samples} == {0, 1, 10, 11, 12}
    assert ds.latent_shape == (4, 4, 4) and ds.num_nonfinite_rewards == 0
    with pytest.raises(ShardError, match="zz-broken"):
        TrajectoryDataset([tmp_path], strict=True)


def test_dataset_mixed_latent_sizes_and_empty(tmp_path):
    write_shard(make_traj(latent=(4, 4, 4)), tmp_path, "a")
    write_shard(make_traj(latent=(4, 8, 4)), tmp_path, "a")
    ds = TrajectoryDataset(tmp_path)
    with pytest.raises(QRRLError, match="different latent sizes"):
        _ = ds.latent_shape
    assert set(ds.by_latent_shape()) == {(4, 4, 4), (4, 8, 4)}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QRRLError, match="no \\*.safetensors shards found in .*empty"):
        TrajectoryDataset([empty])


def test_written_file_is_plain_safetensors(shard):
    # Other tools can open a shard: plain safetensors with JSON-string metadata.
    _, path = shard
    tensors = load_file(str(path))
    assert "reward.decoded" in tensors and tensors["x"].dtype == torch.float32


def test_per_sample_strengths_round_trip_and_reach_each_sample(tmp_path):
    """A shard may record one strength schedule per sample ([B,K]): how the learned strength
    curve explores. Each sample view gets its own row; a wrong shape is refused."""
    traj = make_traj(batch=3)
    table = torch.tensor([[1.0, 0.9, 0.8, 0.7], [0.5, 0.5, 0.5, 0.5], [0.0, 1.2, 0.0, 0.3]])
    per = Trajectory.from_record(
        type("R", (), {**{k: getattr(traj, k) for k in ("x", "denoised", "log_prob", "sigma", "std", "mean_coef")},
                       "strength": table, "seeds": traj.meta["seeds"], "eta": 1.0, "s_noise": 1.0})(),
        timestep=traj.timestep, cond=traj.cond, uncond=traj.uncond, hint=traj.hint, reward=traj.reward,
        meta={k: traj.meta[k] for k in ("cfg", "prompts", "payloads", "qr")})
    back = read_shard(write_shard(per, tmp_path, "per-sample"))
    assert torch.equal(back.strength, table)
    assert [s.strength.tolist() for s in back.samples()] == table.tolist()
    bad = write_raw(tmp_path / "bad.safetensors", per, tensors_override={"strength": table[:2]})
    with pytest.raises(ShardError, match="'strength' has shape"):
        read_shard(bad)


# --------------------------------------------------------------------------------------------
# shard_metadata: the one builder of every writer's metadata

#: What the RL sampler node wrote (``nodes/_record.shard_meta``, before it called
#: ``shard_metadata``) for a recorded batch of two with per-sample curves, module feedback,
#: scan guidance and luma control: the builder must keep every key and value.
_CURVES = [StrengthSchedule("keyframes", keyframes=[(0.0, 1.0), (1.0, 0.5)]),
           StrengthSchedule("keyframes", keyframes=[(0.0, 0.8), (1.0, 0.2)])]
_LUMA = {"kind": "latent_luma", "factors": [0.2, 0.3, 0.1, -0.1], "bias": 0.05}
NODE_META_BEFORE = {
    "apply_to_uncond": True, "base_file": "tiny-sd15.safetensors", "base_sha256": "a" * 64, "cfg": 7.5,
    "comfyui_version": "0.8.0", "controlnet_file": "tiny-controlnet.safetensors", "controlnet_sha256": "b" * 64,
    "denoise": 0.8, "end_percent": 0.9, "eta": 0.5, "luma_control": _LUMA, "model_patches": [],
    "module_feedback": {"high": 3.0, "low": 0.5, "margin": 0.1, "ramp": 0.5, "softness": 0.02,
                        "source": "latent_preview"},
    "negative_prompt": "blurry", "pack_version": "0.1.0", "prompts": ["", ""], "s_noise": 1.0,
    "sampler": "qr_rl_stochastic",
    "scan_guidance": {"decoder": "latent_preview", "end": 1.0, "iterations": 2.0, "margin": 0.05, "scale": 1.0,
                      "start": 0.9, "steps": [3, 4]},
    "scheduler": "karras", "seed": 5, "seeds": [5, 6], "start_percent": 0.0, "steps": 6,
    "strength_schedule": None,
    "strength_schedules": [
        {"curve": "keyframes", "end_percent": 1.0, "keyframes": [[0.0, 1.0], [1.0, 0.5]], "start_percent": 0.0,
         "step_at": 0.5, "strength_end": 1.0, "strength_start": 1.0},
        {"curve": "keyframes", "end_percent": 1.0, "keyframes": [[0.0, 0.8], [1.0, 0.2]], "start_percent": 0.0,
         "step_at": 0.5, "strength_end": 1.0, "strength_start": 1.0},
    ],
}


def test_shard_metadata_keeps_the_node_format_and_makes_a_valid_shard(tmp_path):
    from rl import __version__
    from rl.module_feedback import ModuleFeedback
    from rl.scan_guidance import ScanGuidance
    from rl.trajectory import complete_meta, shard_metadata

    feedback = ModuleFeedback(low=0.5, high=3.0, margin=0.1, softness=0.02, ramp=0.5)
    meta = shard_metadata(
        sampler="qr_rl_stochastic", cfg=7.5, scheduler="karras", prompts=["", ""], strength_schedule=None,
        strength_schedules=_CURVES, base_sha256="a" * 64, controlnet_sha256="b" * 64,
        module_feedback={"source": "latent_preview", **vars(feedback)},
        scan_guidance={**ScanGuidance().to_meta(), "decoder": "latent_preview", "steps": [3, 4]}, luma_control=_LUMA,
        eta=0.5, s_noise=1.0, seeds=[5, 6], negative_prompt="blurry", start_percent=0.0, end_percent=0.9,
        apply_to_uncond=True, model_patches=[], pack_version=__version__, comfyui_version="0.8.0", steps=6,
        denoise=0.8, base_file="tiny-sd15.safetensors", controlnet_file="tiny-controlnet.safetensors", seed=5)
    assert meta == NODE_META_BEFORE
    # ... and it is a shard: written (the v1 keys the node leaves to the recorder get defaults), read back equal
    traj = make_traj(batch=2, seed0=5)
    # what the Trajectory Recorder adds (Trajectory.from_record completes the v1 keys the same way)
    recorder = {k: traj.meta[k] for k in ("payloads", "qr", "reward_details")}
    traj.meta = complete_meta(recorder | meta, 2)
    back = read_shard(write_shard(traj, tmp_path, "node"))
    assert {k: back.meta[k] for k in meta} == meta
    assert back.meta["curriculum_round"] is None and back.meta["payloads"] == ["https://example.com"] * 2


def test_shard_metadata_leaves_unused_keys_out():
    from rl.trajectory import complete_meta, shard_metadata

    plain = shard_metadata(sampler="qr_rl_toy", cfg=3, scheduler="simple-sd", prompts=("a", "b"),
                           strength_schedule=StrengthSchedule("constant", 0.7, 0.7), base_sha256=None,
                           controlnet_sha256="c" * 64, curriculum_round=2, schedule_exploration=None)
    assert plain == {"sampler": "qr_rl_toy", "cfg": 3.0, "scheduler": "simple-sd", "prompts": ["a", "b"],
                     "strength_schedule": StrengthSchedule("constant", 0.7, 0.7).to_spec(), "base_sha256": None,
                     "controlnet_sha256": "c" * 64, "curriculum_round": 2, "schedule_exploration": None}
    assert not {"module_feedback", "scan_guidance", "luma_control", "strength_schedules"} & set(plain)
    full = complete_meta(plain, 2)
    assert full["policy_version"] is None and full["payloads"] == ["", ""]


def test_the_node_writes_the_metadata_it_wrote_before(comfyui_path):
    """The RL sampler node's own builder (``nodes/_record.shard_meta``), imported from the pack
    with ComfyUI on the path, in a fresh interpreter (ComfyUI's modules stay out of this one)."""
    repo = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import importlib, importlib.util, json, sys
        from dataclasses import dataclass
        sys.path.insert(0, {str(comfyui_path)!r})
        spec = importlib.util.spec_from_file_location("qr_rl_pack", {str(repo / "__init__.py")!r},
                                                      submodule_search_locations=[{str(repo)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["qr_rl_pack"] = pack
        spec.loader.exec_module(pack)
        record = importlib.import_module("qr_rl_pack.nodes._record")
        from qr_rl_pack.rl.module_feedback import ModuleFeedback
        from qr_rl_pack.rl.scan_guidance import ScanGuidance
        from qr_rl_pack.rl.schedule import StrengthSchedule

        @dataclass
        class Feedback:  # what the sampler hands over: the LatentFeedback's settings
            feedback: ModuleFeedback

        curves = [StrengthSchedule("keyframes", keyframes=[(0.0, 1.0), (1.0, 0.5)]),
                  StrengthSchedule("keyframes", keyframes=[(0.0, 0.8), (1.0, 0.2)])]
        meta = record.shard_meta(
            cfg=7.5, eta=0.5, s_noise=1.0, scheduler="karras", seeds=[5, 6], batch=2, prompt="",
            negative_prompt="blurry", schedule=StrengthSchedule("linear", 1.2, 0.4, 0.0, 0.9), per_sample=curves,
            base_sha="a" * 64, cn_sha="b" * 64, steps=6, denoise=0.8, ckpt_name="tiny-sd15.safetensors",
            control_net_name="tiny-controlnet.safetensors", seed=5,
            feedback=Feedback(ModuleFeedback(low=0.5, high=3.0, margin=0.1, softness=0.02, ramp=0.5)),
            guidance=ScanGuidance(), guided_steps=[3, 4], luma_meta={_LUMA!r})
        print(json.dumps(meta))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads(out.stdout.strip().splitlines()[-1])
    assert meta.pop("comfyui_version") is not None
    assert meta == {k: v for k, v in NODE_META_BEFORE.items() if k != "comfyui_version"}
