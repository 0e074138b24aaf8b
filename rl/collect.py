"""Collect trajectory shards: G seeds × prompts × payloads, on ComfyUI servers or in-process.

Why a manifest: collection is the slow, interruptible part of the loop. Every finished job
adds one entry (shard path, sha256, prompt, payload, seeds, strength, round) to a JSON
manifest written atomically, and shard files are named by the job's key. A resumed collect
skips jobs already in the manifest, adopts a finished shard whose entry was not written yet
(killed between the two writes), and never trains on a file twice.

Backends:
- ``ComfyBackend``: an API-format workflow (default ``workflows/api/qr_rl_collect.json``)
  with per-job overrides addressed by node title, run on one or more servers
  (:class:`rl.comfy_client.ServerPool`); the recorder's shard is downloaded over ``/view``,
  so servers may be remote.
- ``LocalToyBackend``: the embedded toy model (``rl.toy``) sampled in-process with the
  trainer's own denoiser (``Policy.denoise`` + ``rl.sampling.sample_loop``), scored with the
  real scan and CLIP rewards, written with ``rl.trajectory.write_shard``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import QRRLError
from .files import atomic_move, atomic_write_text, sha256_file

MANIFEST_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "qr_rl_collect.json"
SUMMARY_COMPONENTS = ("decoded", "module_accuracy", "scan_score", "clip_text", "clip_image")

#: The workflow inputs the collector sets per job (node titles of qr_rl_collect.json; see
#: docs/workflows.md). A custom workflow must use the same titles, or map them with --set.
TITLE_PROMPT = "Prompt.value"
TITLE_NEGATIVE = "Negative.value"
TITLE_PAYLOAD = "QR Payload.payload"
TITLE_SEED = "RL Sampler.seed"
TITLE_BATCH = "Latent.batch_size"
TITLE_CURVE = "RL Sampler.curve"
TITLE_STRENGTH_START = "RL Sampler.strength_start"
TITLE_STRENGTH_END = "RL Sampler.strength_end"
TITLE_CN_LOADER = "ControlNet.control_net_name"
TITLE_CN_SAMPLER = "RL Sampler.control_net_name"
TITLE_CKPT_LOADER = "Checkpoint.ckpt_name"
TITLE_CKPT_SAMPLER = "RL Sampler.ckpt_name"
TITLE_RUN = "Recorder.run_name"


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


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["Title.input=value", ...]`` → dict; values are JSON when they parse (``7``, ``true``), else text."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise QRRLError(f"--set {item!r} must be 'Title.input=value', e.g. 'RL Sampler.steps=20'")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
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

    @property
    def key(self) -> str:
        """Stable id of what this job samples (same settings → same key → same shard name)."""
        blob = json.dumps([self.round, self.prompt, self.payload, list(self.seeds), round(self.strength, 6),
                           self.controlnet], ensure_ascii=False)
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


class ComfyBackend:
    """Run jobs as overrides of one API-format workflow on ComfyUI servers."""

    name = "comfy"

    def __init__(self, workflow: str | os.PathLike[str] | Mapping[str, Any] | None, servers: Sequence[str],
                 per_server_concurrency: int = 1, run_name: str = "qr-rl", controlnet: str | None = None,
                 checkpoint: str | None = None, negative: str | None = None, curve: str = "constant",
                 end_ratio: float = 1.0, overrides: Mapping[str, Any] | None = None, job_timeout: float = 1800.0,
                 request_timeout: float = 30.0, retries: int = 3, key_salt: str = ""):
        from .comfy_client import ServerPool, apply_overrides
        from .schedule import CURVES
        from .trajectory import sanitize_run_name

        if isinstance(workflow, Mapping):
            self.workflow = dict(workflow)
            self.workflow_path = None
        else:
            path = Path(workflow) if workflow else DEFAULT_WORKFLOW
            if not path.is_file():
                raise QRRLError(f"workflow {path} not found; the default is {DEFAULT_WORKFLOW}")
            try:
                self.workflow = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise QRRLError(f"workflow {path} is not valid JSON: {e}") from None
            self.workflow_path = path
        if curve not in CURVES or curve == "keyframes":
            raise QRRLError(f"--curve must be one of {', '.join(c for c in CURVES if c != 'keyframes')}, got {curve!r}")
        self.run_name = sanitize_run_name(run_name)
        self.controlnet = controlnet
        self.checkpoint = checkpoint
        self.negative = negative
        self.curve = curve
        self.end_ratio = float(end_ratio)
        self.overrides = dict(overrides or {})
        self.job_timeout = float(job_timeout)
        self.key_salt = key_salt
        self.pool = ServerPool(list(servers), per_server_concurrency, timeout=request_timeout, retries=retries)
        # fail early on overrides naming no node (before any server is contacted)
        apply_overrides(self.workflow, self.overrides)
        self._apply = apply_overrides

    def prompt_for(self, job: Job) -> dict[str, Any]:
        values: dict[str, Any] = {
            TITLE_PROMPT: job.prompt, TITLE_PAYLOAD: job.payload, TITLE_SEED: job.seeds[0],
            TITLE_BATCH: len(job.seeds), TITLE_CURVE: self.curve, TITLE_STRENGTH_START: job.strength,
            TITLE_STRENGTH_END: job.strength * (self.end_ratio if self.curve != "constant" else 1.0),
            TITLE_RUN: self.run_name,
        }
        if self.negative is not None:
            values[TITLE_NEGATIVE] = self.negative
        if self.controlnet:
            values[TITLE_CN_LOADER] = values[TITLE_CN_SAMPLER] = self.controlnet
        if self.checkpoint:
            values[TITLE_CKPT_LOADER] = values[TITLE_CKPT_SAMPLER] = self.checkpoint
        values.update(self.overrides)  # the user's --set wins
        return self._apply(self.workflow, values)

    def check(self) -> None:
        """Every server is reachable and has every node type; the workflow records shards."""
        from .comfy_client import check_workflow

        check_workflow(self.workflow, None)
        self.pool.check(self.workflow)

    def run(self, jobs: Sequence[Job], shards_dir: Path, on_done: Callable[[Job, JobResult], None],
            progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        def one(client, job: Job) -> JobResult:
            api = self.prompt_for(job)
            pid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"qr-rl/{self.key_salt}/{job.key}"))
            res = client.run_or_resume(api, pid, timeout=self.job_timeout, callback=progress,
                                       cancel=self.pool.cancel)
            refs = res.files("shards")
            if not refs:
                texts = " | ".join(res.texts())[:300]
                raise QRRLError(f"job {job.index} ({job.prompt!r}, {job.payload!r}) finished on {client.url} but the "
                                f"recorder reported no shard; is 'record' on in the RL sampler? {texts}")
            shard, sha = client.download(refs[0], shards_dir / job.shard_name)
            image = None
            imgs = res.files("images")
            if imgs:
                try:
                    image, _ = client.download(imgs[0], shards_dir.parent / "samples" / f"{job.key}.png")
                except QRRLError:
                    image = None
            return JobResult(shard, sha, client.url, res.prompt_id, image)

        self.pool.map(jobs, one, on_result=on_done)


class LocalToyBackend:
    """In-process collection with the embedded toy model (``rl.toy``), no ComfyUI needed."""

    name = "local"

    def __init__(self, model_folder: str | os.PathLike[str] | None = None,
                 controlnet: str | os.PathLike[str] | None = None, steps: int | None = None,
                 clip_weight: float = 0.5, run_name: str = "qr-rl"):
        from .toy import ToyModel

        self.model = ToyModel.load(model_folder)
        self.model_folder = self.model.folder
        self.controlnet_path = Path(controlnet) if controlnet else self.model.controlnet_path
        self.controlnet_module = None
        if controlnet:
            from .convert import load_controlnet

            self.controlnet_module = load_controlnet(controlnet, self.model.controlnet_config_path).requires_grad_(False)
        self.steps = steps
        self.clip_weight = float(clip_weight)
        self.run_name = run_name
        self._scorer = None

    @property
    def checkpoint_path(self) -> Path:
        return self.model.unet_path

    def check(self) -> None:
        """Nothing to reach: the model is loaded; prompts are checked per job."""

    def run(self, jobs: Sequence[Job], shards_dir: Path, on_done: Callable[[Job, JobResult], None],
            progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        from .image_io import save_png
        from .reward import combine_rewards
        from .scan import scan_reward
        from .toy import images_hwc_uint8, sample
        from .toy_world import parse_prompt, toy_code
        from .trajectory import Trajectory, write_shard

        base_sha = sha256_file(self.model.unet_path)
        cn_sha = sha256_file(self.controlnet_path)
        if self._scorer is None:
            self._scorer = self.model.clip_scorer()
        for job in jobs:
            parse_prompt(job.prompt)
            n = len(job.seeds)
            code = toy_code(job.payload)
            out = sample(self.model, [job.prompt] * n, [code] * n, list(job.seeds), job.strength,
                         controlnet=self.controlnet_module, steps=self.steps)
            base = sample(self.model, [job.prompt] * n, None, list(job.seeds), 0.0, steps=self.steps,
                          record=False).images
            scan = scan_reward(images_hwc_uint8(out.images), code)
            art = self.model.art_reward(out.images, [job.prompt] * n, base, self._scorer)
            reward = combine_rewards([scan, art], [1.0, self.clip_weight])
            info = self.model.info
            meta = {
                "cfg": float(info["sampling"]["cfg"]), "scheduler": info["sampling"].get("scheduler", "simple-sd"),
                "sampler": "qr_rl_toy", "prompts": [job.prompt] * n, "payloads": [job.payload] * n,
                "qr": [{"payload": job.payload, "version": int(code.version), "ecc": str(code.ecc)}] * n,
                "strength_schedule": {"curve": "constant", "strength_start": job.strength,
                                      "strength_end": job.strength, "start_percent": 0.0, "end_percent": 1.0,
                                      "keyframes": [], "step_at": 0.5},
                "base_sha256": base_sha, "controlnet_sha256": cn_sha, "curriculum_round": job.round,
                "base_file": str(self.model.unet_path), "controlnet_file": str(self.controlnet_path),
            }
            traj = Trajectory.from_record(out.record, timestep=out.timesteps, cond=out.cond, uncond=out.uncond,
                                          hint=out.hints, reward=reward, meta=meta)
            tmp_dir = shards_dir / ".local"
            written = write_shard(traj, tmp_dir, "w", prefix=f"r{job.round:03d}-{job.key}")
            final = shards_dir / job.shard_name
            atomic_move(written, final)  # same file system: atomic; the name is the job's key
            image = save_png(shards_dir.parent / "samples" / f"{job.key}.png",
                             images_hwc_uint8(out.images[:1])[0])
            on_done(job, JobResult(final, sha256_file(final), "local", None, Path(image)))
            if progress:
                progress({"type": "job", "index": job.index})


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
        "server": server, "prompt_id": prompt_id, "metrics": dict(metrics),
        "image": os.path.relpath(image, folder) if image else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def collect(jobs: Sequence[Job], backend: ComfyBackend | LocalToyBackend, folder: str | os.PathLike[str],
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
