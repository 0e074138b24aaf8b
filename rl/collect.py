"""Collect trajectory shards: G seeds × prompts × payloads, from any :class:`Backend`.

Why a manifest: collection is the slow, interruptible part of the loop. Every finished job
adds one entry (shard path, sha256, prompt, payload, seeds, strength, round) to a JSON
manifest written atomically, and shard files are named by the job's key. A resumed collect
skips jobs already in the manifest, adopts a finished shard whose entry was not written yet
(killed between the two writes), and never trains on a file twice.

Why a protocol: this module knows jobs, shards and the manifest, not where samples come from.
Backends: ``rl.comfy_backend.ComfyBackend`` (an API-format workflow on ComfyUI servers) and
the CPU demonstration's ``rl.toy.backend.LocalToyBackend`` (the toy model, in-process).
``rl.rounds`` drives one round of the recipe through this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import QRRLError
from .files import atomic_write_text, sha256_file

MANIFEST_VERSION = 1
SUMMARY_COMPONENTS = ("decoded", "module_accuracy", "scan_score", "clip_text", "clip_image")


# --------------------------------------------------------------------------------------------
# small file helpers


def read_lines(path: str | os.PathLike[str], what: str) -> list[str]:
    """Non-empty, non-comment (``#``) lines of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise QRRLError(f"{what} file {p} not found")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise QRRLError(f"{what} file {p} has no entries (one per line; '#' starts a comment)")
    return out


# --------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class Job:
    """One recorded batch: ``len(seeds)`` samples of one prompt × payload at one strength."""

    index: int
    round: int
    prompt: str
    payload: str
    seeds: tuple[int, ...]
    strength: float
    controlnet: str = ""
    #: one keyframes line per sample (its own strength curve, ``"0:1.6, 1:0.8"``), or () for ``strength``
    keyframes: tuple[str, ...] = ()
    #: one (low, high) module-feedback gain pair per sample (drawn around the learned gains), or ()
    feedback_gains: tuple[tuple[float, float], ...] = ()

    @property
    def key(self) -> str:
        """Stable id of what this job samples (same settings → same key → same shard name)."""
        fields_ = [self.round, self.prompt, self.payload, list(self.seeds), round(self.strength, 6), self.controlnet]
        if self.keyframes:  # only then: jobs without per-sample curves keep their keys
            fields_.append(list(self.keyframes))
        if self.feedback_gains:
            fields_.append([list(g) for g in self.feedback_gains])
        blob = json.dumps(fields_, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def shard_name(self) -> str:
        return f"r{self.round:03d}-{self.key}.safetensors"


def plan_jobs(prompts: Sequence[str], payloads: Sequence[str], seeds: int, seed_start: int = 0, round_index: int = 0,
              strength: float = 1.0, batch: int | None = None, controlnet: str = "") -> list[Job]:
    """Jobs for ``seeds`` samples of every prompt × payload, at most ``batch`` samples per job.

    Seeds never repeat across rounds or jobs: sample seeds are consecutive from
    ``seed_start + round · (prompts · payloads · seeds)``.
    """
    if not prompts:
        raise QRRLError("no prompts: give --prompt (repeatable) or --prompts-file")
    if not payloads:
        raise QRRLError("no payloads: give --payload (repeatable) or --payloads-file")
    if seeds < 1:
        raise QRRLError(f"--seeds must be >= 1 (samples per prompt × payload), got {seeds}")
    batch = seeds if not batch else int(batch)
    if batch < 1:
        raise QRRLError(f"--batch must be >= 1, got {batch}")
    if not math.isfinite(strength) or strength < 0:
        raise QRRLError(f"strength must be a finite number >= 0, got {strength}")
    per_round = len(prompts) * len(payloads) * seeds
    base = int(seed_start) + int(round_index) * per_round
    jobs: list[Job] = []
    n = 0
    for payload in payloads:
        for prompt in prompts:
            for start in range(0, seeds, batch):
                count = min(batch, seeds - start)
                jobs.append(Job(len(jobs), int(round_index), prompt, payload,
                                tuple(range(base + n, base + n + count)), float(strength), controlnet))
                n += count
    return jobs


def keyframes_line(positions: Sequence[float], strengths: Sequence[float]) -> str:
    """One sample's curve as a keyframes line, digits enough to reproduce the strengths to ~1e-8."""
    if len(positions) != len(strengths) or not positions:
        raise QRRLError(f"need one strength per keyframe position: {len(strengths)} for {len(positions)}")
    return ", ".join(f"{float(p):.10g}:{float(s):.10g}" for p, s in zip(positions, strengths))


def keyframes_table(lines: Sequence[str], step_percents: Sequence[float]) -> list[list[float]]:
    """Per-sample strength per step ``[B][K]`` from keyframes lines, as the RL sampler's
    ``keyframes_per_sample`` applies them (linear between keyframes, at each step's percent)."""
    from .schedule import StrengthSchedule, per_step_strengths

    out = []
    for i, line in enumerate(lines):
        try:
            sched = StrengthSchedule(curve="keyframes", keyframes=line)
        except QRRLError as e:
            raise QRRLError(f"keyframes line {i + 1} ({line!r}): {e}") from None
        out.append(per_step_strengths(sched, step_percents))
    return out


# --------------------------------------------------------------------------------------------
# manifest


class Manifest:
    """The JSON list of finished jobs of one collect (one round of a loop)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise QRRLError(f"manifest {self.path} is not valid JSON ({e}); it is written atomically, so "
                                "something else changed it: restore it or delete the round's folder") from None
            if data.get("version") != MANIFEST_VERSION:
                raise QRRLError(f"manifest {self.path} has version {data.get('version')}, expected {MANIFEST_VERSION}")
            self.entries = list(data.get("entries", []))
            self.info = dict(data.get("info", {}))

    @property
    def folder(self) -> Path:
        return self.path.parent

    def keys(self) -> set[str]:
        return {e["key"] for e in self.entries}

    def shard_paths(self) -> list[Path]:
        return [self.resolve(e["path"]) for e in self.entries]

    def resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.folder / p

    def add(self, entry: Mapping[str, Any]) -> None:
        with self._lock:
            if entry["key"] in self.keys():
                return
            self.entries.append(dict(entry))
            self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"version": MANIFEST_VERSION, "info": self.info,
                                                 "entries": self.entries}, indent=1, sort_keys=True))

    def summary(self) -> dict[str, Any]:
        """Sample-weighted means of the reward components over all entries."""
        out: dict[str, Any] = {"jobs": len(self.entries), "samples": sum(int(e.get("samples", 0)) for e in self.entries)}
        for name in ("reward", *SUMMARY_COMPONENTS):
            num = den = 0.0
            for e in self.entries:
                v = (e.get("metrics") or {}).get(name)
                if v is not None and math.isfinite(v):
                    num += v * int(e.get("samples", 0))
                    den += int(e.get("samples", 0))
            out[name] = num / den if den else None
        return out


def shard_summary(path: Path) -> tuple[int, dict[str, float]]:
    """Validate a shard (``read_shard``) and return ``(samples, component means)``."""
    from .trajectory import read_shard

    traj = read_shard(path)
    metrics: dict[str, float] = {}
    finite = traj.reward[traj.reward_finite]
    metrics["reward"] = float(finite.double().mean()) if finite.numel() else float("nan")
    for name, t in traj.reward_components.items():
        vals = t[t.isfinite()]
        if vals.numel():
            metrics[name] = float(vals.double().mean())
    return traj.batch_size, metrics


# --------------------------------------------------------------------------------------------
# backends


@dataclass
class JobResult:
    shard: Path  # final path in the shards folder
    sha256: str
    server: str
    prompt_id: str | None = None
    image: Path | None = None


class Backend(Protocol):
    """What :func:`collect` needs from a place that samples: run jobs, hand over their shards.

    ``run`` writes each job's shard to ``shards_dir / job.shard_name`` (atomically) and calls
    ``on_done(job, result)`` as soon as it is there; the collect driver validates it and adds the
    manifest entry. ``progress`` receives optional events (``{"type": "progress", ...}``).
    """

    name: str

    def check(self) -> None:
        """Fail fast (unreachable server, missing node or model) before any job runs."""

    def run(self, jobs: Sequence[Job], shards_dir: Path, on_done: Callable[[Job, JobResult], None],
            progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run ``jobs``; call ``on_done`` once per finished job (from any thread)."""


# --------------------------------------------------------------------------------------------
# the collect driver


@dataclass
class CollectReport:
    manifest: Path
    done: int
    skipped: int
    adopted: int
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _adopt_orphans(jobs: Sequence[Job], manifest: Manifest, shards_dir: Path, backend_name: str) -> int:
    """Finished shards whose manifest entry was not written (killed in between): adopt or delete."""
    adopted = 0
    known = manifest.keys()
    names = {j.shard_name: j for j in jobs if j.key not in known}
    if shards_dir.is_dir():
        for f in sorted(shards_dir.glob("r*.safetensors")):
            job = names.get(f.name)
            if job is None:
                continue
            try:
                samples, metrics = shard_summary(f)
            except QRRLError:
                f.unlink(missing_ok=True)  # incomplete or foreign: the job runs again
                continue
            manifest.add(_entry(job, f, sha256_file(f), samples, metrics, backend_name, "adopted", None, None))
            adopted += 1
    for tmp in shards_dir.glob(".*.tmp") if shards_dir.is_dir() else ():
        tmp.unlink(missing_ok=True)
    return adopted


def _entry(job: Job, path: Path, sha: str, samples: int, metrics: Mapping[str, float], backend: str,
           server: str | None, prompt_id: str | None, image: Path | None) -> dict[str, Any]:
    folder = path.parent.parent
    rel = os.path.relpath(path, folder)
    return {
        "key": job.key, "index": job.index, "path": rel, "sha256": sha, "prompt": job.prompt,
        "payload": job.payload, "seed": job.seeds[0], "seeds": list(job.seeds), "samples": samples,
        "strength": job.strength, "round": job.round, "controlnet": job.controlnet, "backend": backend,
        "keyframes": list(job.keyframes) or None,
        "server": server, "prompt_id": prompt_id, "metrics": dict(metrics),
        "image": os.path.relpath(image, folder) if image else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    } | ({"feedback_gains": [list(g) for g in job.feedback_gains]} if job.feedback_gains else {})


def collect(jobs: Sequence[Job], backend: Backend, folder: str | os.PathLike[str],
            progress: bool = True, log: Callable[[str], None] | None = None) -> CollectReport:
    """Run ``jobs`` not yet in ``folder/manifest.json``; shards go to ``folder/shards/``.

    The manifest is the source of truth: one entry per finished job, written atomically
    right after its shard is in place. Safe to call again after any crash.
    """
    from tqdm.auto import tqdm

    say = log or (lambda m: print(f"qr-rl collect: {m}", flush=True))
    folder = Path(folder)
    shards_dir = folder / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder / "manifest.json")
    if not manifest.info:
        manifest.info = {"backend": backend.name, "jobs": len(jobs),
                         "samples": sum(len(j.seeds) for j in jobs)}
        manifest.save()
    t0 = time.perf_counter()
    adopted = _adopt_orphans(jobs, manifest, shards_dir, backend.name)
    done_keys = manifest.keys()
    todo = [j for j in jobs if j.key not in done_keys]
    skipped = len(jobs) - len(todo)
    if skipped:
        say(f"{skipped} of {len(jobs)} jobs already done ({adopted} recovered); running {len(todo)}")
    if todo:
        backend.check()
        bar = tqdm(total=sum(len(j.seeds) for j in todo), desc="collect", unit="sample", disable=not progress)
        lock = threading.Lock()

        def on_progress(ev: dict[str, Any]) -> None:
            if ev.get("type") == "progress" and ev.get("max"):
                with lock:
                    bar.set_postfix_str(f"step {ev['value']}/{ev['max']}", refresh=False)

        def on_done(job: Job, res: JobResult) -> None:
            samples, metrics = shard_summary(res.shard)
            if samples != len(job.seeds):
                raise QRRLError(f"job {job.index}: the shard {res.shard} holds {samples} samples, expected "
                                f"{len(job.seeds)} (is 'Latent.batch_size' wired to the sampler?)")
            manifest.add(_entry(job, res.shard, res.sha256, samples, metrics, backend.name, res.server,
                                res.prompt_id, res.image))
            bar.update(samples)

        try:
            backend.run(todo, shards_dir, on_done, on_progress)
        finally:
            bar.close()
    summary = manifest.summary()
    return CollectReport(manifest.path, len(todo), skipped, adopted, summary, time.perf_counter() - t0)


def job_dicts(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    return [asdict(j) | {"key": j.key} for j in jobs]
