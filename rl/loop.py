"""The curriculum loop (docs/design.md §6): strength → collect → train → export → next round.

Each round is the recipe of :mod:`rl.rounds` (the demo runs the same steps); the loop adds
phases that survive a crash and the export into ComfyUI.

Why a run folder with a state file: a loop runs for hours on several servers and will be
killed (OOM, pre-emption, Ctrl-C, ``kill -9``). ``state.json`` is rewritten atomically after
every phase, the collect manifest after every job, ``rl.train`` checkpoints every epoch, and
exports are atomic copies. So the same command resumes where it stopped: no shard lost or
trained twice, never a half-written ControlNet in ComfyUI's ``models/controlnet``.

Run folder layout::

    <run_dir>/state.json            round, phase, per-round strengths/metrics/files (atomic)
    <run_dir>/.lock                 fcntl lock: one loop per run folder
    <run_dir>/config.json           the resolved settings of the first start
    <run_dir>/rounds/r000/          manifest.json, shards/, samples/, train/ (rl.train run),
                                    schedule.json (learn_schedule: the strength curve after this round)
    <run_dir>/schedule.json         learn_schedule: the latest strength curve (keyframes for ComfyUI)
    <run_dir>/metrics.jsonl|csv     one row per finished round
    <run_dir>/report.png            curves + a grid of sample images, redrawn every round
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .collect import read_lines
from .errors import QRRLError
from .files import atomic_copy, atomic_write_text
from .image_io import save_figure
from .rounds import TrainerSettings
from .schedule import Curriculum

if TYPE_CHECKING:  # pragma: no cover
    from .collect import Backend

STATE_VERSION = 1
#: Which ControlNet a round samples with (``LoopConfig.teacher``): the one trained so far (on-policy,
#: what ddpo needs), or the run's starting one every round while the trained one only learns (a fixed
#: teacher: with a current one the rwr student's weaker code became the next teacher and the loop
#: spiralled down on the toy; docs/research-log.md).
TEACHERS = ("current", "pretrained")
PHASES = ("collect", "train", "export", "done")
#: Settings that must not change when a run folder is resumed (they define what was sampled).
FROZEN_KEYS = ("name", "backend", "prompts", "payloads", "seeds", "seed_start", "batch", "curriculum",
               "start_strength", "end_strength", "target_decode_rate", "curriculum_step", "curve", "end_ratio",
               "learn_schedule", "schedule_sigma", "teacher", "module_feedback", "luma_control")
METRIC_COLUMNS = ("round", "strength", "decode_rate", "module_accuracy", "clip_text", "clip_image", "reward",
                  "samples", "controlnet", "exported")
#: The flat trainer keys of earlier releases → their key in ``LoopConfig.train`` (deprecated aliases).
DEPRECATED_TRAIN_KEYS = {"mode": "mode", "lora_rank": "lora_rank", "lr": "lr", "epochs": "epochs",
                         "train_batch_size": "batch_size", "grad_accum": "grad_accum", "clip_range": "clip_range",
                         "timestep_fraction": "timestep_fraction", "steps_from": "steps_from",
                         "step_weighting": "step_weighting", "kl_coef": "kl_coef", "anchor_decay": "anchor_decay",
                         "mixed_precision": "mixed_precision", "export_dtype": "export_dtype", "train_seed": "seed",
                         "cpu": "cpu"}
#: Where the loop's trainer defaults differ from ``qr-rl train``'s, and why.
LOOP_TRAINER = {"epochs": 2}  # each round trains on that round's shards only: 2 passes, not a whole run's 4


def loop_trainer(**settings: Any) -> TrainerSettings:
    """The loop's :class:`rl.rounds.TrainerSettings`: the trainer's defaults, ``LOOP_TRAINER``, ``settings``."""
    return TrainerSettings(**(LOOP_TRAINER | settings))


def _deprecation(message: str) -> None:
    print(f"qr-rl loop: warning: {message}", file=sys.stderr, flush=True)


#: ``backend`` setting → "module:class" of its :class:`LoopBackend`, imported only when a run
#: chooses it (so the loop never loads the CPU demonstration's toy wing for ComfyUI runs).
BACKENDS = {"comfy": "rl.comfy_backend:ComfyLoopBackend", "local": "rl.toy.backend:ToyLoopBackend"}


class LoopBackend(Protocol):
    """The loop's only view of where rounds sample: what to start from, what to train, who collects."""

    name: str
    default_prompts: Sequence[str]  # sampled when a run names no prompts (empty: refuse)
    default_payloads: Sequence[str]

    def validate(self) -> None:
        """Refuse missing or contradictory settings before any work."""

    def initial_controlnet(self) -> dict[str, str]:
        """``{"name", "path"}`` of the ControlNet round 0 samples with (and the anchor)."""

    def trainer_models(self) -> tuple[Path, str | os.PathLike[str] | None, str | os.PathLike[str] | None]:
        """``(checkpoint, unet_config, controlnet_config)``: the files the samples came from."""

    def collector(self, rec: Mapping[str, Any], r: int, run_dir: Path) -> Backend:
        """The :class:`rl.collect.Backend` of round ``r`` (``rec``: its state, e.g. its ControlNet)."""

    # learn_schedule reads two more (optional: a backend without them gets the defaults below):
    #   per_sample_seeds: bool -- each sample of a job has its own seed (mirrored pairs possible); default False
    #   step_percents() -> list[float] | None -- each step's ComfyUI percent, or None (unknown); default None


def loop_backend(cfg: LoopConfig) -> LoopBackend:
    """The :class:`LoopBackend` named by ``cfg.backend`` (see ``BACKENDS``)."""
    import importlib

    if cfg.backend not in BACKENDS:
        raise QRRLError(f"backend must be {' or '.join(repr(b) for b in BACKENDS)}, got {cfg.backend!r}")
    module, _, cls = BACKENDS[cfg.backend].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)


@dataclass
class LoopConfig:
    """Every setting of ``qr-rl loop``; TOML keys and ``--flags`` map 1:1 onto these fields."""

    name: str = "qr-rl"
    run_dir: str = "runs/qr-rl"
    rounds: int = 3
    # curriculum
    curriculum: str = "linear"
    start_strength: float = 1.6
    end_strength: float = 0.8
    target_decode_rate: float = 0.8
    curriculum_step: float | None = None
    # what to sample
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    payloads: list[str] = field(default_factory=list)
    payloads_file: str | None = None
    seeds: int = 4
    seed_start: int = 0
    batch: int | None = None
    negative: str | None = None
    curve: str = "constant"
    end_ratio: float = 1.0
    # the learned strength curve (rl.schedule_policy, as the demo learns it)
    learn_schedule: bool = False
    schedule_sigma: float = 0.2  # log-gain exploration of the curve's level and tilt
    schedule_lr: float = 2.0  # natural-gradient step of the curve's mean log-gain
    # the sampler's tricks and who samples (the demo's recipe: rwr distils the tricks of a fixed teacher)
    teacher: str = "current"  # current: each round samples with the ControlNet trained so far | pretrained: the start
    module_feedback: bool = False  # the RL sampler pushes harder on modules each step's preview still gets wrong
    luma_control: bool = False  # the ControlNet changes only the luma of each step's prediction
    # where
    backend: str = "comfy"  # a key of BACKENDS: "comfy" | "local"
    servers: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8188"])
    per_server_concurrency: int = 1
    workflow: str | None = None
    set: list[str] = field(default_factory=list)
    job_timeout: float = 1800.0
    comfyui_dir: str | None = None
    controlnet_dir: str | None = None
    checkpoint: str | None = None
    controlnet: str | None = None
    unet_config: str | None = None
    controlnet_config: str | None = None
    toy_model: str | None = None
    steps: int | None = None
    # training: the trainer's own settings (rl.rounds.TrainerSettings), the loop's defaults in LOOP_TRAINER
    train: TrainerSettings = field(default_factory=lambda: loop_trainer())
    threads: int | None = None
    progress: bool = True

    # ---- construction
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config",
                     warn: Callable[[str], None] | None = None) -> LoopConfig:
        """Build from a dict (TOML), refusing unknown keys (dashes are accepted for underscores).

        The trainer's settings sit in a ``train`` table (``[loop.train]`` or ``[train]``; flags
        ``--train-<key>``); the flat keys of earlier releases (``lr``, ``mode``, ``train_batch_size``,
        ...) still work, each with a warning naming its new key.
        """
        say = warn or _deprecation
        norm = {str(k).replace("-", "_"): v for k, v in data.items()}
        train = norm.pop("train", None) or {}
        if not isinstance(train, Mapping):
            raise QRRLError(f"{source}: 'train' must be a table of trainer settings (e.g. [loop.train]), got {train!r}")
        train = {str(k).replace("-", "_"): v for k, v in train.items()}
        unknown = sorted(set(train) - set(TrainerSettings.keys()))
        if unknown:
            raise QRRLError(f"{source}: unknown trainer keys {unknown} in 'train'; valid: "
                            f"{', '.join(TrainerSettings.keys())}")
        for old in [k for k in norm if k in DEPRECATED_TRAIN_KEYS]:
            new = DEPRECATED_TRAIN_KEYS[old]
            say(f"{source}: '{old}' is deprecated: set 'train.{new}' ([loop.train] {new} = ..., or --train-"
                f"{new.replace('_', '-')})")
            train.setdefault(new, norm.pop(old))
        unknown = sorted(set(norm) - set(cls.keys()))
        if unknown:
            raise QRRLError(f"{source}: unknown keys {unknown}; valid keys: {', '.join(cls.keys())} "
                            f"(trainer settings under train: {', '.join(TrainerSettings.keys())})")
        return cls(**norm, train=loop_trainer(**train))

    @classmethod
    def load_toml(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        p = Path(path)
        if not p.is_file():
            raise QRRLError(f"config file {p} not found")
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise QRRLError("reading TOML on Python 3.10 needs `pip install tomli` (or use Python >= 3.11)") from None
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise QRRLError(f"config file {p} is not valid TOML: {e}") from None
        # [loop] table (its trainer settings in [loop.train]) or top-level keys (with a [train] table)
        if set(data) == {"loop"} and isinstance(data["loop"], dict):
            data = data["loop"]
        return data

    # ---- validation and derived values
    def validate(self, backend: LoopBackend | None = None) -> None:
        """Shared settings, then the backend's own (``backend``: default ``loop_backend(self)``)."""
        from .trajectory import sanitize_run_name

        sanitize_run_name(self.name)
        if backend is None:
            backend = loop_backend(self)
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise QRRLError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        self.curriculum_obj()
        backend.validate()
        if self.per_server_concurrency < 1:
            raise QRRLError(f"per_server_concurrency must be >= 1, got {self.per_server_concurrency}")
        # fail before the first collection, not after it
        self.train.validate()
        if self.teacher not in TEACHERS:
            raise QRRLError(f"teacher must be {' or '.join(TEACHERS)}, got {self.teacher!r}")
        if self.teacher == "pretrained" and self.train.objective == "ddpo":
            raise QRRLError("teacher = 'pretrained' samples every round with the starting ControlNet, but ddpo learns "
                            "only from the policy's own samples (its ratios would compare two different models): "
                            "use train.objective = 'rwr' (which distils the teacher's tricks), or teacher = 'current'")
        if self.learn_schedule:
            from .schedule_policy import check_schedule_options

            check_schedule_options(self.schedule_sigma, self.schedule_lr)
            if self.curve != "constant":
                raise QRRLError(f"learn_schedule learns the strength curve itself: it needs curve = 'constant', "
                                f"got {self.curve!r}")

    def curriculum_obj(self) -> Curriculum:
        return Curriculum(kind=self.curriculum, start=self.start_strength, end=self.end_strength, rounds=self.rounds,
                          target_decode_rate=self.target_decode_rate, step=self.curriculum_step)

    def resolved_prompts(self, default: Sequence[str] = ()) -> list[str]:
        out = list(self.prompts) + (read_lines(self.prompts_file, "prompts") if self.prompts_file else [])
        if not out:
            if default:
                return list(default)
            raise QRRLError("no prompts: set prompts = [...] / prompts_file, or --prompt / --prompts-file")
        return out

    def resolved_payloads(self, default: Sequence[str] = ()) -> list[str]:
        out = list(self.payloads) + (read_lines(self.payloads_file, "payloads") if self.payloads_file else [])
        if not out:
            if default:
                return list(default)
            raise QRRLError("no payloads: set payloads = [...] / payloads_file, or --payload / --payloads-file")
        return out

    def controlnet_folder(self) -> Path:
        if self.controlnet_dir:
            return Path(self.controlnet_dir).expanduser()
        if self.comfyui_dir:
            return Path(self.comfyui_dir).expanduser() / "models" / "controlnet"
        return Path(self.run_dir) / "controlnets"


# --------------------------------------------------------------------------------------------
# lock


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on ``run_dir/.lock``: a second loop on the folder fails at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fh = open(path, "a+")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise QRRLError(f"another qr-rl loop is using {run_dir} (pid {holder}); wait for it to finish or stop it "
                            "— two loops on one run folder would duplicate work") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def check_writable(folder: Path) -> None:
    """Fail before any work when the ControlNet export folder cannot take a file."""
    if not folder.is_dir():
        raise QRRLError(f"ControlNet folder {folder} does not exist; create it or point --comfyui-dir / "
                        "--controlnet-dir at ComfyUI's models/controlnet")
    probe = folder / f".qr-rl-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise QRRLError(f"cannot write into the ControlNet folder {folder} ({e.strerror or e}); each round exports "
                        "its ControlNet there. Fix its permissions or choose another --controlnet-dir") from None


# --------------------------------------------------------------------------------------------
# state


def _frozen(cfg: LoopConfig, prompts: list[str], payloads: list[str]) -> dict[str, Any]:
    d = asdict(cfg)
    out = {k: d[k] for k in FROZEN_KEYS}
    out["prompts"], out["payloads"] = prompts, payloads
    return out


class RunState:
    """``state.json``: what each round used and measured; rewritten atomically."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise QRRLError(f"{self.path} is not valid JSON ({e}); it is written atomically, so something else "
                                "changed it") from None
            if self.data.get("version") != STATE_VERSION:
                raise QRRLError(f"{self.path} has state version {self.data.get('version')}, expected {STATE_VERSION}")

    @property
    def exists(self) -> bool:
        return bool(self.data)

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.data.setdefault("rounds", [])

    def decode_history(self) -> list[float]:
        return [float(r["metrics"].get("decode_rate") if r.get("metrics", {}).get("decode_rate") is not None
                      else math.nan) for r in self.rounds if r.get("phase") == "done"]


def next_strength(curriculum: Curriculum, state_rounds: Sequence[Mapping[str, Any]], r: int) -> float:
    """Round ``r``'s strength from the curriculum and the decode rates of finished rounds."""
    from .rounds import base_strength

    history = [float(x["metrics"]["decode_rate"]) if x.get("metrics", {}).get("decode_rate") is not None
               else math.nan for x in state_rounds[:r]]
    return base_strength(curriculum, r, history, curriculum.end)


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class LoopResult:
    run_dir: Path
    rounds: list[dict[str, Any]]
    finished: bool


def _say(cfg: LoopConfig) -> Callable[[str], None]:
    return lambda m: print(f"qr-rl loop: {m}", flush=True)


def run_loop(cfg: LoopConfig, log: Callable[[str], None] | None = None,
             stop_after: str | None = None, backend: LoopBackend | None = None) -> LoopResult:
    """Run (or resume) the loop described by ``cfg``; see the module docstring.

    ``stop_after`` ("collect", "train", "export" or "round") returns early after that phase
    of the current round (tests, and users who want one step at a time). ``backend``: where
    rounds sample (default: ``loop_backend(cfg)``, chosen by ``cfg.backend``).
    """
    say = log or _say(cfg)
    backend = backend if backend is not None else loop_backend(cfg)
    cfg.validate(backend)
    curriculum = cfg.curriculum_obj()
    prompts = cfg.resolved_prompts(backend.default_prompts)
    payloads = cfg.resolved_payloads(backend.default_payloads)
    run_dir = Path(cfg.run_dir).expanduser()
    cn_dir = cfg.controlnet_folder()
    if not (cfg.controlnet_dir or cfg.comfyui_dir):  # the default folder lives in the run folder
        cn_dir.mkdir(parents=True, exist_ok=True)
    check_writable(cn_dir)
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))

    with run_lock(run_dir):
        state = RunState(run_dir)
        frozen = _frozen(cfg, prompts, payloads)
        if state.exists:
            old = state.data.get("settings", {})
            changed = sorted(k for k in FROZEN_KEYS if k in old and old[k] != frozen[k] and k != "rounds")
            if changed:
                raise QRRLError(
                    f"{run_dir} was started with other settings ({', '.join(f'{k}: {old[k]!r} → {frozen[k]!r}' for k in changed)}); "
                    "resume with the same settings, or choose a new --run-dir"
                )
            say(f"resuming {run_dir} at round {state.data.get('round', 0)} ({state.rounds[-1]['phase'] if state.rounds else 'start'})")
        else:
            state.data = {"version": STATE_VERSION, "name": cfg.name, "settings": frozen, "round": 0, "rounds": [],
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=1, sort_keys=True))
            state.save()

        base_cn = backend.initial_controlnet()
        while True:
            r = len([x for x in state.rounds if x.get("phase") == "done"])
            if r >= cfg.rounds:
                say(f"all {cfg.rounds} rounds done; last ControlNet: {state.rounds[-1].get('exported') if state.rounds else base_cn}")
                return LoopResult(run_dir, state.rounds, True)
            if len(state.rounds) <= r:
                strength = next_strength(curriculum, state.rounds, r)
                prev = state.rounds[r - 1]["exported_name"] if r > 0 else base_cn["name"]
                prev_path = state.rounds[r - 1]["exported"] if r > 0 else base_cn["path"]
                teacher = base_cn if cfg.teacher == "pretrained" else {"name": prev, "path": prev_path}
                # "controlnet": what the round samples with; "train_from": the weights its training starts from
                state.rounds.append({"round": r, "phase": "collect", "strength": strength,
                                     "controlnet": teacher["name"], "controlnet_path": teacher["path"],
                                     "train_from": prev_path, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
                if cfg.learn_schedule:  # drawn once and kept: a resumed collect plans the very same jobs
                    state.rounds[-1]["schedule_draw"] = draw_schedule(cfg, backend, run_dir, r, strength,
                                                                      round_jobs(cfg, backend, state.rounds[-1], r,
                                                                                 prompts, payloads))
                state.data["round"] = r
                state.save()
            rec = state.rounds[r]
            round_dir = run_dir / "rounds" / f"r{r:03d}"
            say(f"round {r + 1}/{cfg.rounds}: strength {rec['strength']:.3f}, ControlNet {rec['controlnet']}, phase {rec['phase']}")

            if rec["phase"] == "collect":
                report = _collect_round(cfg, backend, rec, r, round_dir, prompts, payloads, run_dir)
                rec["shards"] = [str(p) for p in _manifest_paths(round_dir)]
                rec["metrics"] = _round_metrics(report.summary, rec["strength"])
                if cfg.learn_schedule:
                    rec["schedule"] = update_schedule(cfg, backend, rec, r, run_dir, round_jobs(
                        cfg, backend, rec, r, prompts, payloads))
                    say(f"round {r + 1}: strength curve gains {rec['schedule']['gains']}")
                rec["phase"] = "train"
                state.save()
                say(f"round {r + 1}: {report.summary.get('samples')} samples, decode rate "
                    f"{_fmt(rec['metrics'].get('decode_rate'))}, module accuracy {_fmt(rec['metrics'].get('module_accuracy'))}")
                if stop_after == "collect":
                    return LoopResult(run_dir, state.rounds, False)

            if rec["phase"] == "train":
                out = _train_round(cfg, backend, rec, r, round_dir, base_cn, say)
                rec["trained"] = str(out)
                rec["phase"] = "export"
                state.save()
                if stop_after == "train":
                    return LoopResult(run_dir, state.rounds, False)

            if rec["phase"] == "export":
                name = f"{cfg.name}-r{r}.safetensors"
                dst = cn_dir / name
                sha = atomic_copy(Path(rec["trained"]), dst)
                rec.update({"exported": str(dst), "exported_name": name, "exported_sha256": sha, "phase": "done",
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
                state.save()
                _write_metrics(run_dir, state.rounds)
                try:
                    draw_report(run_dir, state.rounds)
                except Exception as e:  # a report must never stop training
                    say(f"warning: could not draw the report: {e}")
                say(f"round {r + 1}: exported {dst}")
                if stop_after in ("export", "round"):
                    return LoopResult(run_dir, state.rounds, False)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _manifest_paths(round_dir: Path) -> list[Path]:
    from .collect import Manifest

    return Manifest(round_dir / "manifest.json").shard_paths()


def _round_metrics(summary: Mapping[str, Any], strength: float) -> dict[str, Any]:
    return {"strength": strength, "decode_rate": summary.get("decoded"),
            "module_accuracy": summary.get("module_accuracy"), "clip_text": summary.get("clip_text"),
            "clip_image": summary.get("clip_image"), "reward": summary.get("reward"),
            "samples": summary.get("samples")}


def _collect_round(cfg: LoopConfig, backend: LoopBackend, rec: dict[str, Any], r: int, round_dir: Path,
                   prompts: list[str], payloads: list[str], run_dir: Path):
    from .collect import collect

    jobs = round_jobs(cfg, backend, rec, r, prompts, payloads)
    return collect(jobs, backend.collector(rec, r, run_dir), round_dir, progress=cfg.progress)


# --------------------------------------------------------------------------------------------
# the learned strength curve (learn_schedule)


def explores_in_pairs(cfg: LoopConfig, backend: LoopBackend) -> bool:
    """Mirrored pairs (±δ on one seed, the demo's PGPE sampling) where the backend gives each
    sample its own seed and every job holds whole pairs; else each sample draws on its own."""
    return (cfg.learn_schedule and bool(getattr(backend, "per_sample_seeds", False)) and cfg.seeds % 2 == 0
            and (not cfg.batch or cfg.batch % 2 == 0))


def round_jobs(cfg: LoopConfig, backend: LoopBackend, rec: Mapping[str, Any], r: int,
               prompts: Sequence[str], payloads: Sequence[str]) -> list[Any]:
    """Round ``r``'s jobs; with ``learn_schedule``, each carries its samples' keyframes lines
    (``rec["schedule_draw"]``, once drawn) and, mirrored, each seed twice in a row."""
    from dataclasses import replace

    from .collect import plan_jobs
    from .rounds import per_sample

    if not explores_in_pairs(cfg, backend):
        jobs = plan_jobs(prompts, payloads, cfg.seeds, cfg.seed_start, r, rec["strength"], cfg.batch,
                         rec["controlnet"])
    else:
        half = plan_jobs(prompts, payloads, cfg.seeds // 2, cfg.seed_start, r, rec["strength"],
                         cfg.batch // 2 if cfg.batch else None, rec["controlnet"])
        jobs = [replace(j, seeds=tuple(s for s in j.seeds for _ in range(2))) for j in half]
    draw = rec.get("schedule_draw")
    return per_sample(jobs, draw["keyframes"]) if draw else jobs


def _schedule_path(run_dir: Path, r: int) -> Path:
    """The curve after round ``r``'s update (one file per round: redoing an update is idempotent)."""
    return run_dir / "rounds" / f"r{r:03d}" / "schedule.json"


def schedule_before(cfg: LoopConfig, backend: LoopBackend, run_dir: Path, r: int):
    """The :class:`rl.schedule_policy.SchedulePolicy` round ``r`` draws around: the one round
    ``r − 1`` saved, or a flat curve (level and tilt 0) at the start."""
    from .schedule_policy import SchedulePolicy

    percents = getattr(backend, "step_percents", lambda: None)()
    steps = len(percents) if percents else max(2, int(cfg.steps or 2))
    prev = _schedule_path(run_dir, r - 1)
    if r > 0 and prev.is_file():
        policy = SchedulePolicy.load(prev)
        if policy.steps != steps or policy.shape != "level_slope":
            raise QRRLError(f"{prev} holds a {policy.shape} curve of {policy.steps} steps; this run samples "
                            f"{steps} steps: resume with the same --steps")
        policy.lr = cfg.schedule_lr
        return policy
    return SchedulePolicy(steps, sigma=cfg.schedule_sigma, lr=cfg.schedule_lr, shape="level_slope")


def draw_schedule(cfg: LoopConfig, backend: LoopBackend, run_dir: Path, r: int, strength: float,
                  jobs: Sequence[Any]) -> dict[str, Any]:
    """Each sample's curve around ``strength`` (rl.rounds.draw_curves): the offsets δ (what the
    update needs) and the keyframes line the sampler follows."""
    import numpy as np

    from .rounds import draw_curves

    draw = draw_curves(schedule_before(cfg, backend, run_dir, r), sum(len(j.seeds) for j in jobs), strength,
                       np.random.default_rng([cfg.seed_start, 2000 + r]), explores_in_pairs(cfg, backend),
                       getattr(backend, "step_percents", lambda: None)())
    return draw.record()


def update_schedule(cfg: LoopConfig, backend: LoopBackend, rec: Mapping[str, Any], r: int, run_dir: Path,
                    jobs: Sequence[Any]) -> dict[str, Any]:
    """One PGPE step of the curve from round ``r``'s shards, as the demo takes it (rl.rounds):
    rewards per sample in job order (the order the δ were drawn), advantages per (prompt, payload)."""
    from .rounds import advantages, read_round, update_curve

    samples = read_round(run_dir / "rounds" / f"r{r:03d}", jobs)
    adv = advantages(samples, min_group_size=max(2, cfg.seeds))
    policy = schedule_before(cfg, backend, run_dir, r)
    stats = update_curve(policy, rec["schedule_draw"]["delta"], adv)
    percents = getattr(backend, "step_percents", lambda: None)()
    policy.save(_schedule_path(run_dir, r), base=float(rec["strength"]), positions=percents)
    policy.save(run_dir / "schedule.json", base=float(rec["strength"]), positions=percents)
    return stats | {"gains": [round(float(g), 4) for g in policy.gains()],
                    "log_gain": [round(float(v), 6) for v in policy.log_gain], "used_samples": adv.num_used,
                    "file": str(_schedule_path(run_dir, r))}


def _train_round(cfg: LoopConfig, backend: LoopBackend, rec: dict[str, Any], r: int, round_dir: Path,
                 base_cn: Mapping[str, str], say) -> Path:
    from .rounds import train_config
    from .train import train

    checkpoint, unet_cfg, cn_cfg = backend.trainer_models()
    # one AdamW for the run, as the demo: round r starts from round r-1's moments (a fresh one every
    # round makes its first steps ≈ lr·sign(g) per weight, whatever the gradient)
    prev = round_dir.parent / f"r{r - 1:03d}" / "train" / "run"
    carried = prev if r > 0 and (prev / "checkpoint.safetensors").is_file() else None
    tc = train_config(cfg.train, r, shards=_manifest_paths(round_dir), checkpoint=checkpoint,
                      controlnet=rec.get("train_from", rec["controlnet_path"]),
                      out=round_dir / "train" / "controlnet.safetensors",
                      anchor=base_cn["path"], run_dir=round_dir / "train" / "run", unet_config=unet_cfg,
                      controlnet_config=cn_cfg, resume=True, run_name=cfg.name, progress=cfg.progress,
                      optimizer_from=carried)
    return Path(train(tc, log=lambda m: say(f"train: {m}")).out)


# --------------------------------------------------------------------------------------------
# metrics and report


def _rows(rounds: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for x in rounds:
        if x.get("phase") != "done":
            continue
        m = x.get("metrics", {})
        rows.append({"round": x["round"], "strength": x["strength"], "decode_rate": m.get("decode_rate"),
                     "module_accuracy": m.get("module_accuracy"), "clip_text": m.get("clip_text"),
                     "clip_image": m.get("clip_image"), "reward": m.get("reward"), "samples": m.get("samples"),
                     "controlnet": x.get("controlnet"), "exported": x.get("exported_name")})
    return rows


def _write_metrics(run_dir: Path, rounds: Sequence[Mapping[str, Any]]) -> None:
    rows = _rows(rounds)
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_COLUMNS})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def draw_report(run_dir: Path, rounds: Sequence[Mapping[str, Any]], max_images: int = 8) -> Path:
    """``report.png``: metric curves over rounds and sample images of every finished round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = _rows(rounds)
    grid: list[tuple[int, Path]] = []
    for x in rounds:
        if x.get("phase") != "done":
            continue
        manifest = run_dir / "rounds" / f"r{x['round']:03d}" / "manifest.json"
        if manifest.is_file():
            entries = json.loads(manifest.read_text()).get("entries", [])
            imgs = [manifest.parent / e["image"] for e in entries if e.get("image")]
            grid.extend((x["round"], p) for p in imgs[:max_images] if p.is_file())
    n_rounds = max(1, len(rows))
    per_row = max(1, min(max_images, max((sum(1 for g in grid if g[0] == r["round"]) for r in rows), default=1)))
    fig = plt.figure(figsize=(max(8.0, 1.3 * per_row), 3.2 + 1.4 * n_rounds))
    gs = fig.add_gridspec(1 + n_rounds, per_row, height_ratios=[2.2] + [1.0] * n_rounds)
    ax = fig.add_subplot(gs[0, :])
    xs = [r["round"] for r in rows]
    for key in ("strength", "decode_rate", "module_accuracy", "clip_text", "clip_image"):
        ys = [math.nan if r.get(key) is None else float(r[key]) for r in rows]
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, marker="o", label=key)
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{run_dir.name}: curriculum and rewards")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="best")
    for i, r in enumerate(rows):
        imgs = [p for rr, p in grid if rr == r["round"]][:per_row]
        for j in range(per_row):
            a = fig.add_subplot(gs[1 + i, j])
            a.axis("off")
            if j < len(imgs):
                a.imshow(Image.open(imgs[j]).convert("RGB"))
            if j == 0:
                a.set_title(f"r{r['round']} s={r['strength']:.2f}", fontsize=8, loc="left")
    fig.tight_layout()
    out = run_dir / "report.png"
    return save_figure(fig, out)
