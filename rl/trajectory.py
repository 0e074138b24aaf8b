"""Trajectory shards, format v1 (docs/design.md §4): one safetensors file per recorded batch.

Why a strict, versioned format: shards are written by ComfyUI (the Trajectory Recorder node)
and by the in-process collector, and read later by the trainer, perhaps on another machine
and another version of this pack. Every shard says its schema version and everything needed
to recompute the policy's log-probs; the reader checks shapes, dtypes, finiteness and
version, and a dataset skips (with a warning naming the file) any shard that fails, so one
bad file never stops a training run.

Tensors (B batch, K steps, latent C×H×W):

=====================  ====================  =========================================
name                   shape                 dtype
=====================  ====================  =========================================
``x``                  [B,K+1,C,H,W]         float32 (x_0 .. x_K)
``denoised``           [B,K,C,H,W]           float32 (D at each step)
``log_prob``           [B,K]                 float32 (0 at deterministic steps)
``sigma``              [K+1]                 float32, strictly decreasing, >= 0
``timestep``           [K]                   float32 (model timestep of each step)
``std``                [K]                   float32 (s_noise·σ_up, 0 = not trainable)
``mean_coef``          [K]                   float32 (σ_down/σ)
``strength``           [K] or [B,K]          float32 (ControlNet strength of each step; [B,K] when
                                             each sample drew its own schedule)
``cond``, ``uncond``   [B,L,D], [B,L',D]     float16 / bfloat16 / float32
``hint``               [B,3,8H,8W]           uint8 (the [0,1] hint image × 255)
``reward``             [B]                   float32 / float64 (NaN/inf allowed, flagged)
``reward.<name>``      [B]                   float32 / float64
``strength_map``       [B,K,1,h,w]           float32, optional: module feedback's per-position gain
                                             at each step (:mod:`rl.module_feedback`), ones where a
                                             step had none; the trainer multiplies the strength by it
=====================  ====================  =========================================

Metadata: safetensors metadata is ``str → str``; every value is stored as a JSON string
under its key (see :data:`META_KEYS`). A non-finite reward is kept (so the shard is still
readable) and flagged by :attr:`Trajectory.reward_finite`; the trainer drops those samples
and counts them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import QRRLError
from .files import atomic_save_safetensors
from .schedule import StrengthSchedule

SCHEMA_VERSION = 1
FORMAT_NAME = "qr-rl-trajectory"
SUFFIX = ".safetensors"
MAX_RUN_NAME = 100

#: Metadata keys every v1 shard holds (values may be ``null`` where noted in :func:`complete_meta`).
META_KEYS: tuple[str, ...] = (
    "format", "schema_version", "cfg", "eta", "s_noise", "sampler", "scheduler", "seeds",
    "prompts", "negative_prompt", "payloads", "qr", "strength_schedule", "start_percent",
    "end_percent", "apply_to_uncond", "base_sha256", "controlnet_sha256", "model_patches",
    "policy_version", "curriculum_round", "pack_version", "comfyui_version", "created",
)
#: Per-sample metadata lists (length B).
PER_SAMPLE_META: tuple[str, ...] = ("seeds", "prompts", "payloads", "qr")

_FLOAT_TENSORS = ("x", "denoised", "log_prob", "sigma", "timestep", "std", "mean_coef", "strength")
_COND_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REWARD_DTYPES = (torch.float32, torch.float64)
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class ShardError(QRRLError):
    """A shard that cannot be read or written; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# run names


_RUN_RE = re.compile(r"[^A-Za-z0-9._-]")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def sanitize_run_name(name: str) -> str:
    """A safe folder name for a run.

    Rejected (``QRRLError``): empty names, names containing a path separator (``/``, ``\\``),
    ``..``, a NUL byte, a leading dot, Windows device names, or more than 100 characters —
    a run name can never point outside the output folder. Other characters outside
    ``[A-Za-z0-9._-]`` (spaces, accents, ...) are replaced by ``_``.
    """
    if not isinstance(name, str):
        raise QRRLError(f"run name must be a string, got {type(name).__name__}")
    stripped = name.strip()
    if not stripped:
        raise QRRLError("run name is empty; use letters, digits, '.', '_' or '-', e.g. 'qr-r0'")
    if "/" in stripped or "\\" in stripped or ".." in stripped or "\x00" in stripped:
        raise QRRLError(
            f"run name {name!r} contains a path separator or '..'; a run name is one folder name "
            "made of letters, digits, '.', '_' and '-'"
        )
    if stripped.startswith("."):
        raise QRRLError(f"run name {name!r} starts with '.'; start it with a letter or digit")
    if len(stripped) > MAX_RUN_NAME:
        raise QRRLError(f"run name is {len(stripped)} characters long; the limit is {MAX_RUN_NAME}")
    safe = _RUN_RE.sub("_", stripped)
    if safe.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise QRRLError(f"run name {name!r} is a reserved device name on Windows; pick another")
    return safe


# --------------------------------------------------------------------------------------------
# the container


def shard_metadata(
    *,
    sampler: str,
    cfg: float,
    scheduler: str,
    prompts: Sequence[str],
    strength_schedule: StrengthSchedule | Mapping[str, Any] | None,
    base_sha256: str | None,
    controlnet_sha256: str | None,
    payloads: Sequence[str] | None = None,
    qr: Sequence[Mapping[str, Any]] | None = None,
    curriculum_round: int | None = None,
    policy_version: int | str | None = None,
    strength_schedules: Sequence[StrengthSchedule | Mapping[str, Any]] | None = None,
    module_feedback: Mapping[str, Any] | None = None,
    scan_guidance: Mapping[str, Any] | None = None,
    luma_control: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The metadata of one shard, built the same way by every writer (ComfyUI node, backends, demo).

    Why one builder: the trainer replays a shard from these keys alone, so a key spelt or
    shaped differently by one writer would silently change what is replayed. The required
    arguments are what every writer knows; ``None`` for an optional one leaves its key out
    (:func:`complete_meta` then fills the v1 default; the optional keys of design §4 stay
    absent, which every reader treats as "not used"). ``strength_schedule`` is always written
    (``None`` when ``strength_schedules`` gives one curve per sample). The optional extras
    (``module_feedback``, ``scan_guidance``, ``luma_control``) are the JSON-able records their
    writer describes; ``fields`` carries a writer's own keys (``seeds``, ``eta``, ``steps``,
    ``base_file``, ...), written as given.
    """
    meta: dict[str, Any] = {
        "sampler": sampler, "cfg": float(cfg), "scheduler": scheduler, "prompts": list(prompts),
        "strength_schedule": _spec(strength_schedule),
        "base_sha256": base_sha256, "controlnet_sha256": controlnet_sha256,
    }
    optional = {
        "payloads": None if payloads is None else list(payloads),
        "qr": None if qr is None else [dict(q) for q in qr],
        "curriculum_round": curriculum_round, "policy_version": policy_version,
        "strength_schedules": None if strength_schedules is None else [_spec(s) for s in strength_schedules],
        "module_feedback": None if module_feedback is None else dict(module_feedback),
        "scan_guidance": None if scan_guidance is None else dict(scan_guidance),
        "luma_control": None if luma_control is None else dict(luma_control),
    }
    meta.update({k: v for k, v in optional.items() if v is not None})
    meta.update(fields)
    return meta


def _spec(schedule: StrengthSchedule | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if schedule is None:
        return None
    return schedule.to_spec() if isinstance(schedule, StrengthSchedule) else dict(schedule)


def complete_meta(meta: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """``meta`` plus defaults for every v1 key it lacks (bookkeeping keys are set on write).

    Defaults: sampler ``"qr_rl"``, scheduler ``"unknown"``, prompts/payloads ``[""]*B``,
    qr ``[{}]*B``, negative_prompt ``""``, strength_schedule ``None``, start/end percent 0/1,
    apply_to_uncond ``True``, hashes/versions/policy/round ``None``, model_patches ``[]``.
    ``cfg``, ``eta``, ``s_noise`` and ``seeds`` have no default.
    """
    from . import __version__

    out: dict[str, Any] = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "sampler": "qr_rl",
        "scheduler": "unknown",
        "prompts": [""] * batch_size,
        "negative_prompt": "",
        "payloads": [""] * batch_size,
        "qr": [{} for _ in range(batch_size)],
        "strength_schedule": None,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "apply_to_uncond": True,
        "base_sha256": None,
        "controlnet_sha256": None,
        "model_patches": [],
        "policy_version": None,
        "curriculum_round": None,
        "pack_version": __version__,
        "comfyui_version": None,
        "created": _now_iso(),
    }
    out.update(meta)
    return out


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Trajectory:
    """One recorded batch: the tensors of the table above plus ``meta`` (JSON-able dict).

    ``reward_components`` maps a component name to its ``[B]`` tensor (stored as
    ``reward.<name>``). ``path`` is the file it was read from (None for a new one).
    """

    x: torch.Tensor
    denoised: torch.Tensor
    log_prob: torch.Tensor
    sigma: torch.Tensor
    timestep: torch.Tensor
    std: torch.Tensor
    mean_coef: torch.Tensor
    strength: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    hint: torch.Tensor
    reward: torch.Tensor
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    strength_map: torch.Tensor | None = None

    # ---- shape helpers
    @property
    def batch_size(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.sigma.shape[0]) - 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latent."""
        return tuple(int(v) for v in self.x.shape[2:])  # type: ignore[return-value]

    @property
    def reward_finite(self) -> torch.Tensor:
        """Bool [B]: samples whose total reward is finite (the trainer drops the others)."""
        return torch.isfinite(self.reward)

    @property
    def trainable_steps(self) -> torch.Tensor:
        """Bool [K]: stochastic steps (std > 0)."""
        return self.std > 0

    # ---- construction
    @classmethod
    def from_record(
        cls,
        record: Any,
        *,
        timestep: Sequence[float] | torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        hint: torch.Tensor,
        reward: Any,
        meta: Mapping[str, Any],
        strength: Sequence[float] | torch.Tensor | None = None,
    ) -> Trajectory:
        """Build from a :class:`rl.sampling.TrajectoryRecord` plus what the sampler doesn't know.

        ``hint`` may be uint8 ``[B,3,h,w]`` or a float image in [0,1] (``[B,3,h,w]``, or
        ComfyUI's ``[B,h,w,3]`` IMAGE layout); it must already be resized to latent×8.
        ``reward`` is an :class:`rl.reward.Reward` or a ``[B]`` tensor/array. ``meta`` is
        completed with :func:`complete_meta`; ``seeds``, ``eta`` and ``s_noise`` come from
        the record unless given.
        """
        batch = int(record.x.shape[0])
        rec_strength = record.strength if strength is None else torch.as_tensor(strength, dtype=torch.float32)
        if rec_strength is None:
            raise QRRLError("no per-step strengths: pass strengths to sample_loop or strength= here")
        total, comps = _reward_tensors(reward)
        full_meta = complete_meta(
            {"seeds": list(record.seeds), "eta": record.eta, "s_noise": record.s_noise, **meta}, batch
        )
        if hasattr(reward, "details") and "reward_details" not in full_meta:
            full_meta["reward_details"] = [dict(d) for d in reward.details]
        return cls(
            x=record.x, denoised=record.denoised, log_prob=record.log_prob, sigma=record.sigma,
            timestep=torch.as_tensor(timestep, dtype=torch.float32).reshape(-1),
            std=record.std, mean_coef=record.mean_coef,
            strength=_strength_table(rec_strength, batch),
            cond=cond.detach().cpu(), uncond=uncond.detach().cpu(), hint=hint_to_uint8(hint),
            reward=total, reward_components=comps, meta=full_meta,
            strength_map=getattr(record, "strength_map", None),
        )

    # ---- validation
    def validate(self) -> Trajectory:
        """Check shapes, dtypes, finiteness and metadata; raise :class:`ShardError`."""
        where = str(self.path) if self.path is not None else "trajectory"

        def fail(problem: str) -> None:
            raise ShardError(f"{where}: {problem}")

        tensors = self.tensors()
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                fail(f"{name!r} is a {type(t).__name__}, not a tensor")
        if self.x.ndim != 5:
            fail(f"'x' must be [B,K+1,C,H,W], got shape {tuple(self.x.shape)}")
        b, k1, c, h, w = (int(v) for v in self.x.shape)
        k = k1 - 1
        if b < 1 or k < 1:
            fail(f"'x' has batch {b} and {k} steps; need at least one sample and one step")
        expected = {
            "denoised": (b, k, c, h, w), "log_prob": (b, k), "sigma": (k + 1,), "timestep": (k,),
            "std": (k,), "mean_coef": (k,), "strength": (k,), "hint": (b, 3, 8 * h, 8 * w), "reward": (b,),
        }
        if tensors["strength"].ndim == 2:  # one schedule per sample
            expected["strength"] = (b, k)
        if "strength_map" in tensors:
            m = tensors["strength_map"]
            if m.ndim != 5 or tuple(m.shape[:3]) != (b, k, 1):
                fail(f"'strength_map' must be [B={b},K={k},1,h,w], got shape {tuple(m.shape)}")
            if (m < 0).any():
                fail("'strength_map' must be >= 0")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                fail(f"{name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                     f"(B={b}, K={k}, latent {c}x{h}x{w}; hint is 8x the latent)")
        for name in ("cond", "uncond"):
            t = tensors[name]
            if t.ndim != 3 or t.shape[0] != b:
                fail(f"{name!r} must be [B={b},L,D], got shape {tuple(t.shape)}")
        if self.cond.shape[2] != self.uncond.shape[2]:
            fail(f"cond width {self.cond.shape[2]} != uncond width {self.uncond.shape[2]}")
        for name in (*_FLOAT_TENSORS, *(("strength_map",) if "strength_map" in tensors else ())):
            if tensors[name].dtype != torch.float32:
                fail(f"{name!r} must be float32, got {tensors[name].dtype}")
            if not bool(torch.isfinite(tensors[name]).all()):
                fail(f"{name!r} contains NaN or inf")
        for name in ("cond", "uncond"):
            if tensors[name].dtype not in _COND_DTYPES:
                fail(f"{name!r} must be float16/bfloat16/float32, got {tensors[name].dtype}")
            if not bool(torch.isfinite(tensors[name]).all()):
                fail(f"{name!r} contains NaN or inf")
        if self.hint.dtype != torch.uint8:
            fail(f"'hint' must be uint8, got {self.hint.dtype}")
        if self.reward.dtype not in _REWARD_DTYPES:
            fail(f"'reward' must be float32/float64, got {self.reward.dtype}")
        for name, t in self.reward_components.items():
            if not _COMPONENT_RE.match(name):
                fail(f"reward component name {name!r} must match [A-Za-z0-9_]+")
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,) or t.dtype not in _REWARD_DTYPES:
                fail(f"'reward.{name}' must be a float32/float64 tensor of shape ({b},)")
        if (self.sigma < 0).any() or not bool((self.sigma[1:] < self.sigma[:-1]).all()):
            fail("'sigma' must be >= 0 and strictly decreasing")
        if (self.std < 0).any():
            fail("'std' must be >= 0")
        if (self.mean_coef < 0).any() or (self.mean_coef > 1).any():
            fail("'mean_coef' must be in [0, 1]")
        if (self.strength < 0).any():
            fail("'strength' must be >= 0")
        self._validate_meta(b, fail)
        return self

    def _validate_meta(self, b: int, fail: Any) -> None:
        meta = self.meta
        if not isinstance(meta, Mapping):
            fail("metadata must be a dict")
        if meta.get("format") != FORMAT_NAME:
            fail(f"not a QR-RL trajectory shard (metadata 'format' is {meta.get('format')!r}, "
                 f"expected {FORMAT_NAME!r})")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            if isinstance(version, int) and version > SCHEMA_VERSION:
                fail(f"shard schema version {version} is newer than this pack reads "
                     f"(version {SCHEMA_VERSION}); update comfyui-qr-rl")
            fail(f"unknown shard schema version {version!r}; this pack reads version {SCHEMA_VERSION}")
        missing = [key for key in META_KEYS if key not in meta]
        if missing:
            fail(f"metadata lacks keys {missing}")
        for key in ("cfg", "eta", "s_noise", "start_percent", "end_percent"):
            val = meta[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                fail(f"metadata {key!r} must be a finite number, got {val!r}")
        if meta["eta"] < 0 or meta["s_noise"] < 0:
            fail("metadata 'eta' and 's_noise' must be >= 0")
        for key in PER_SAMPLE_META:
            val = meta[key]
            if not isinstance(val, list) or len(val) != b:
                fail(f"metadata {key!r} must be a list with one entry per sample ({b}), got {val!r:.80}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in meta["seeds"]):
            fail("metadata 'seeds' must be integers")
        if not all(isinstance(q, dict) for q in meta["qr"]):
            fail("metadata 'qr' must be a list of dicts (QR parameters per sample)")
        if not isinstance(meta["apply_to_uncond"], bool):
            fail("metadata 'apply_to_uncond' must be true or false")
        if not isinstance(meta["model_patches"], list) or not all(
            isinstance(p, dict) and {"kind", "name", "sha256", "strength"} <= set(p) for p in meta["model_patches"]
        ):
            fail("metadata 'model_patches' must be a list of {kind, name, sha256, strength}")
        spec = meta["strength_schedule"]
        if spec is not None:
            try:
                StrengthSchedule.from_spec(spec)
            except (QRRLError, TypeError) as e:
                fail(f"metadata 'strength_schedule' is invalid: {e}")

    # ---- serialisation
    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat ``name → tensor`` dict as stored in the file."""
        out = {
            "x": self.x, "denoised": self.denoised, "log_prob": self.log_prob, "sigma": self.sigma,
            "timestep": self.timestep, "std": self.std, "mean_coef": self.mean_coef,
            "strength": self.strength, "cond": self.cond, "uncond": self.uncond, "hint": self.hint,
            "reward": self.reward,
        }
        out.update({f"reward.{name}": t for name, t in self.reward_components.items()})
        if self.strength_map is not None:
            out["strength_map"] = self.strength_map
        return out

    def samples(self) -> Iterator[TrajectorySample]:
        """Per-sample views (no copies) of this batch."""
        meta = self.meta
        for i in range(self.batch_size):
            yield TrajectorySample(
                x=self.x[i], denoised=self.denoised[i], log_prob=self.log_prob[i], sigma=self.sigma,
                timestep=self.timestep, std=self.std, mean_coef=self.mean_coef,
                strength=self.strength[i] if self.strength.ndim == 2 else self.strength,
                cond=self.cond[i], uncond=self.uncond[i], hint=self.hint[i],
                reward=float(self.reward[i]),
                components={n: float(t[i]) for n, t in self.reward_components.items()},
                seed=int(meta["seeds"][i]), prompt=str(meta["prompts"][i]), payload=str(meta["payloads"][i]),
                qr=dict(meta["qr"][i]), shard_meta=meta, path=self.path, index=i,
                strength_map=None if self.strength_map is None else self.strength_map[i],
            )


def _strength_table(strength: Any, batch: int) -> torch.Tensor:
    """[K] (one schedule for the batch) or [B,K] (one per sample) float32."""
    t = torch.as_tensor(strength, dtype=torch.float32)
    if t.ndim == 2 and t.shape[0] == batch:
        return t.clone()
    return t.reshape(-1)


@dataclass
class TrajectorySample:
    """One sample of a shard: tensors without the batch dim, its reward and identifying meta."""

    x: torch.Tensor
    denoised: torch.Tensor
    log_prob: torch.Tensor
    sigma: torch.Tensor
    timestep: torch.Tensor
    std: torch.Tensor
    mean_coef: torch.Tensor
    strength: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    hint: torch.Tensor
    reward: float
    components: dict[str, float]
    seed: int
    prompt: str
    payload: str
    qr: dict[str, Any]
    shard_meta: Mapping[str, Any]
    path: Path | None
    index: int
    strength_map: torch.Tensor | None = None  # [K,1,h,w] (module feedback) or None

    @property
    def reward_finite(self) -> bool:
        return math.isfinite(self.reward)


def hint_to_uint8(hint: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` from uint8 or a float [0,1] image (``[B,3,H,W]`` or ``[B,H,W,3]``)."""
    hint = hint.detach().cpu()
    if hint.ndim == 4 and hint.shape[1] != 3 and hint.shape[-1] == 3:
        hint = hint.permute(0, 3, 1, 2)
    if hint.dtype == torch.uint8:
        return hint.contiguous()
    return (hint.float().clamp(0, 1) * 255.0).round().to(torch.uint8).contiguous()


def _reward_tensors(reward: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if hasattr(reward, "total") and hasattr(reward, "components"):
        total = torch.as_tensor(reward.total, dtype=torch.float64).reshape(-1)
        comps = {n: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for n, v in reward.components.items()}
        return total, comps
    t = torch.as_tensor(reward)
    if t.dtype not in _REWARD_DTYPES:
        t = t.to(torch.float64)
    return t.reshape(-1), {}


# --------------------------------------------------------------------------------------------
# writing


def _json_default(value: Any) -> Any:
    """numpy/torch scalars and arrays (e.g. in reward details) become plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    # NaN is allowed (written as the NaN literal Python's json reads) so that a NaN inside a
    # reward detail never makes a write fail; the numeric keys are checked finite by validate().
    try:
        return {str(k): json.dumps(v, sort_keys=True, default=_json_default) for k, v in meta.items()}
    except (TypeError, ValueError) as e:
        raise QRRLError(f"shard metadata must be JSON-able (str, numbers, lists, dicts): {e}") from None


def write_shard(traj: Trajectory, folder: str | os.PathLike[str], run_name: str, prefix: str = "shard") -> Path:
    """Validate ``traj`` and write it to ``folder/<run>/<prefix>-<UTC time>-<8 hex>.safetensors``.

    Bookkeeping metadata (``format``, ``schema_version``, ``created``, ``pack_version``) is
    filled in if missing. The write is atomic: a hidden temp file in the same folder, fsync,
    then ``os.replace``; on any failure (disk full, permissions, ...) the temp file is removed,
    no file with the final name exists, and :class:`ShardError` names the target and cause.
    ``traj.path`` is set to the written file.
    """
    from . import __version__

    run = sanitize_run_name(run_name)
    prefix_safe = sanitize_run_name(prefix)
    meta = dict(traj.meta)
    meta.setdefault("format", FORMAT_NAME)
    meta.setdefault("schema_version", SCHEMA_VERSION)
    meta.setdefault("created", _now_iso())
    meta.setdefault("pack_version", __version__)
    traj.meta = meta
    traj.validate()
    encoded = _encode_meta(meta)
    tensors = _unshared({name: t.detach().cpu().contiguous() for name, t in traj.tensors().items()})

    out_dir = Path(folder) / run
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    final = out_dir / f"{prefix_safe}-{stamp}-{uuid.uuid4().hex[:8]}{SUFFIX}"
    try:
        atomic_save_safetensors(tensors, final, encoded)
    except Exception as e:
        raise ShardError(f"could not write shard {final}: {e}; no partial file was left") from e
    traj.path = final
    return final


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone every tensor whose storage an earlier one already uses.

    Why: safetensors refuses tensors that share memory ("Some tensors share memory"), and a
    reward whose component *is* its total (or a view of it) is a fair thing for a node to return.
    """
    seen: set[tuple[str, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() and key in seen:
            t = t.clone()
        else:
            seen.add(key)
        out[name] = t
    return out


# --------------------------------------------------------------------------------------------
# reading


_REQUIRED_TENSORS = ("x", "denoised", "log_prob", "sigma", "timestep", "std", "mean_coef", "strength",
                     "cond", "uncond", "hint", "reward")
_OPTIONAL_TENSORS = ("strength_map",)


def read_shard(path: str | os.PathLike[str]) -> Trajectory:
    """Read and fully validate one shard; raise :class:`ShardError` naming the file and problem.

    Checks: a readable safetensors file, ``format``/``schema_version`` (an unknown or newer
    version is refused), JSON metadata with every key of :data:`META_KEYS`, all tensors
    present with consistent shapes and dtypes, finite values (a non-finite reward is kept and
    flagged by :attr:`Trajectory.reward_finite`).
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ShardError(f"{p}: no such shard file")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
            names = list(fh.keys())
            meta = _decode_meta(p, raw_meta)
            missing = [n for n in _REQUIRED_TENSORS if n not in names]
            if missing:
                raise ShardError(f"{p}: missing tensors {missing}")
            tensors = {n: fh.get_tensor(n) for n in names}
    except ShardError:
        raise
    except Exception as e:  # safetensors raises its own error type for truncated/garbage files
        raise ShardError(f"{p}: not a readable safetensors file ({e})") from None
    unknown = [n for n in tensors if n not in (*_REQUIRED_TENSORS, *_OPTIONAL_TENSORS) and not n.startswith("reward.")]
    if unknown:
        raise ShardError(f"{p}: unexpected tensors {unknown} for schema version {SCHEMA_VERSION}")
    comps = {n[len("reward."):]: t for n, t in tensors.items() if n.startswith("reward.")}
    traj = Trajectory(**{n: tensors[n] for n in _REQUIRED_TENSORS}, reward_components=comps, meta=meta, path=p,
                      strength_map=tensors.get("strength_map"))
    return traj.validate()


def _decode_meta(p: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    if raw.get("format") is None and raw.get("schema_version") is None:
        raise ShardError(f"{p}: not a QR-RL trajectory shard (no 'format'/'schema_version' metadata)")
    out: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardError(f"{p}: metadata {key!r} is not valid JSON ({e})") from None
    return out


# --------------------------------------------------------------------------------------------
# dataset


class TrajectoryDataset:
    """All shards under some folders (searched recursively), loaded and validated eagerly.

    A shard that fails :func:`read_shard` is skipped with a ``warnings.warn`` naming the file
    and the reason and listed in ``skipped`` (``strict=True`` raises instead). Hidden files
    (in-progress temp files) are ignored. Eager loading keeps failures up front; a round's
    shards fit in memory (a 64×64 latent, 20 steps, batch 8 is ~3 MB).
    """

    def __init__(self, folders: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], strict: bool = False):
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        self.folders = [Path(f) for f in folders]
        self.skipped: list[tuple[Path, str]] = []
        self.paths: list[Path] = []
        self.shards: list[Trajectory] = []
        found: list[Path] = []
        for folder in self.folders:
            if folder.is_file() and folder.suffix == SUFFIX:
                found.append(folder)
            elif folder.is_dir():
                found.extend(
                    f for f in sorted(folder.rglob(f"*{SUFFIX}"))
                    if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                )
        if not found:
            raise QRRLError(
                f"no *{SUFFIX} shards found in {', '.join(str(f) for f in self.folders) or '(no folders)'}; "
                "record some with the Trajectory Recorder node or `qr-rl demo`"
            )
        for path in found:
            try:
                traj = read_shard(path)
            except ShardError as e:
                if strict:
                    raise
                reason = str(e)
                self.skipped.append((path, reason))
                warnings.warn(f"skipping bad trajectory shard {path}: {reason}", stacklevel=2)
                continue
            self.paths.append(path)
            self.shards.append(traj)
        if not self.shards:
            raise QRRLError(
                f"all {len(found)} shards in {', '.join(str(f) for f in self.folders)} are unreadable; "
                f"first problem: {self.skipped[0][1]}"
            )

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[Trajectory]:
        return iter(self.shards)

    def __getitem__(self, i: int) -> Trajectory:
        return self.shards[i]

    @property
    def num_samples(self) -> int:
        return sum(t.batch_size for t in self.shards)

    @property
    def num_nonfinite_rewards(self) -> int:
        """Samples whose reward is NaN/inf (kept in the shards, to be dropped by the trainer)."""
        return sum(int((~t.reward_finite).sum()) for t in self.shards)

    def samples(self) -> Iterator[TrajectorySample]:
        """Every sample of every shard, in file order."""
        for traj in self.shards:
            yield from traj.samples()

    def by_latent_shape(self) -> dict[tuple[int, int, int], list[Trajectory]]:
        """Shards grouped by latent (C, H, W), for runs that mix image sizes."""
        groups: dict[tuple[int, int, int], list[Trajectory]] = {}
        for traj in self.shards:
            groups.setdefault(traj.latent_shape, []).append(traj)
        return groups

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The common latent (C, H, W); ``QRRLError`` if shards differ (use :meth:`by_latent_shape`)."""
        groups = self.by_latent_shape()
        if len(groups) > 1:
            detail = "; ".join(f"{s}: {len(v)} shards (e.g. {v[0].path})" for s, v in groups.items())
            raise QRRLError(
                f"shards have different latent sizes ({detail}); train one size at a time or group "
                "them with TrajectoryDataset.by_latent_shape()"
            )
        return next(iter(groups))
