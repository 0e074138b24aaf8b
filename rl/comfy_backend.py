"""Collect and loop on ComfyUI servers: one API-format workflow, per-job overrides by node title.

Why node titles: a user may rebuild the collect workflow (other samplers, upscalers, LoRAs) as
long as the nodes the collector sets keep their titles; ``--set`` reaches any other input.
The recorder's shard is downloaded over ``/view``, so servers may be remote
(:class:`rl.comfy_client.ServerPool`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .collect import Backend, Job, JobResult
from .errors import QRRLError

if TYPE_CHECKING:  # pragma: no cover
    from .loop import LoopConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "qr_rl_collect.json"

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
#: One keyframes line per batch item (an optional input: set even where the workflow leaves it out).
TITLE_KEYFRAMES_PER_SAMPLE = "RL Sampler.keyframes_per_sample"
#: The sampler's tricks (``qr-rl loop``'s module_feedback / luma_control): the RL sampler's qr_code input,
#: linked to the QR encoder's qr_code output (output 2 of QR Code Encode), turns module feedback on.
TITLE_FEEDBACK_CODE = "RL Sampler.qr_code"
QR_CODE_OUTPUT = 2
TITLE_LUMA = "RL Sampler.luma_control"



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




def with_input(api_prompt: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``api_prompt`` with ``"Title.input"`` set, also where the node omits that
    (optional) input: saved API workflows leave out optional inputs nobody filled in."""
    import copy

    from .comfy_client import find_node

    out = copy.deepcopy(dict(api_prompt))
    ref, name = key.rsplit(".", 1)
    out[find_node(out, ref)].setdefault("inputs", {})[name] = value
    return out


def with_tricks(api_prompt: Mapping[str, Any], module_feedback: bool = False,
                luma_control: bool = False) -> dict[str, Any]:
    """``api_prompt`` with the RL sampler's tricks switched on: module feedback (its ``qr_code`` input
    linked to the hint's QR encoder, the node whose ``payload`` the collector sets) and luma-only
    control. Off leaves the workflow as it is (a workflow may wire them itself)."""
    from .comfy_client import find_node

    out = dict(api_prompt)
    if module_feedback:
        encoder = find_node(out, TITLE_PAYLOAD.rsplit(".", 1)[0])
        out = with_input(out, TITLE_FEEDBACK_CODE, [encoder, QR_CODE_OUTPUT])
    if luma_control:
        out = with_input(out, TITLE_LUMA, True)
    return out


class ComfyBackend:
    """Run jobs as overrides of one API-format workflow on ComfyUI servers."""

    name = "comfy"

    def __init__(self, workflow: str | os.PathLike[str] | Mapping[str, Any] | None, servers: Sequence[str],
                 per_server_concurrency: int = 1, run_name: str = "qr-rl", controlnet: str | None = None,
                 checkpoint: str | None = None, negative: str | None = None, curve: str = "constant",
                 end_ratio: float = 1.0, overrides: Mapping[str, Any] | None = None, job_timeout: float = 1800.0,
                 request_timeout: float = 30.0, retries: int = 3, key_salt: str = "",
                 module_feedback: bool = False, luma_control: bool = False):
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
        self.workflow = with_tricks(self.workflow, module_feedback, luma_control)
        # fail early on overrides naming no node (before any server is contacted)
        apply_overrides(self.workflow, self.overrides)
        self._apply = apply_overrides

    def prompt_for(self, job: Job) -> dict[str, Any]:
        if job.feedback_gains:  # the RL sampler has one (low, high) per batch: it cannot vary them per sample
            raise QRRLError(f"job {job.index} gives each sample its own module-feedback gains, which the RL sampler "
                            "cannot take (one feedback_low/feedback_high per batch); learn the gains with the "
                            "in-process toy backend, or set them for the whole run with --set "
                            "'RL Sampler.feedback_low=...'")
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
        workflow = self.workflow
        if job.keyframes:  # each sample's own curve (the loop's learned schedule)
            workflow = with_input(workflow, TITLE_KEYFRAMES_PER_SAMPLE, "\n".join(job.keyframes))
        return self._apply(workflow, values)

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


class ComfyLoopBackend:
    """``qr-rl loop --backend comfy``: rounds sample on ComfyUI; the trainer loads the same files."""

    name = "comfy"
    default_prompts: Sequence[str] = ()
    default_payloads: Sequence[str] = ()

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg

    def validate(self) -> None:
        cfg = self.cfg
        if not cfg.servers:
            raise QRRLError("give at least one --server (e.g. http://127.0.0.1:8188)")
        if not cfg.controlnet:
            raise QRRLError("give --controlnet: the ControlNet file to start from (a name in ComfyUI's "
                            "models/controlnet, e.g. control_v1p_sd15_qrcode_monster.safetensors)")
        if not cfg.checkpoint:
            raise QRRLError("give --checkpoint: the SD1.5 checkpoint the workflow samples with (a name in "
                            "ComfyUI's models/checkpoints, or a path); the trainer loads the same file")
        if not (cfg.comfyui_dir or cfg.controlnet_dir):
            raise QRRLError("give --comfyui-dir (the ComfyUI folder, whose models/controlnet receives each "
                            "round's ControlNet) or --controlnet-dir")

    def checkpoint_path(self) -> Path:
        cfg = self.cfg
        p = Path(str(cfg.checkpoint)).expanduser()
        if p.is_file():
            return p
        if cfg.comfyui_dir:
            q = Path(cfg.comfyui_dir).expanduser() / "models" / "checkpoints" / str(cfg.checkpoint)
            if q.is_file():
                return q
        raise QRRLError(f"checkpoint {cfg.checkpoint!r} not found (as a path, or in --comfyui-dir's "
                        "models/checkpoints); the trainer needs the very file ComfyUI samples with")

    def initial_controlnet(self) -> dict[str, str]:
        name = str(self.cfg.controlnet)
        p = Path(name).expanduser()
        if not p.is_file():
            p = self.cfg.controlnet_folder() / name
        if not p.is_file():
            raise QRRLError(f"ControlNet {name!r} not found in {self.cfg.controlnet_folder()}; copy it into "
                            "ComfyUI's models/controlnet (the trainer needs the file the workflow loads)")
        return {"name": p.name, "path": str(p)}

    def trainer_models(self) -> tuple[Path, str | None, str | None]:
        return self.checkpoint_path(), self.cfg.unet_config, self.cfg.controlnet_config

    #: one job is one ComfyUI batch with one seed: its samples cannot share a seed, so no mirrored pairs
    per_sample_seeds = False

    def step_percents(self) -> None:
        """Unknown here (ComfyUI's scheduler places the steps): the loop writes each curve as its
        two ends, at progress 0 and 1, which the node interpolates linearly."""
        return None

    def collector(self, rec: Mapping[str, Any], r: int, run_dir: Path) -> Backend:
        cfg = self.cfg
        overrides = parse_set(cfg.set)
        if cfg.steps:
            overrides.setdefault("RL Sampler.steps", cfg.steps)
        return ComfyBackend(cfg.workflow, cfg.servers, cfg.per_server_concurrency, run_name=cfg.name,
                            controlnet=rec["controlnet"], checkpoint=Path(str(cfg.checkpoint)).name,
                            negative=cfg.negative, curve=cfg.curve, end_ratio=cfg.end_ratio, overrides=overrides,
                            job_timeout=cfg.job_timeout, key_salt=str(run_dir.resolve()),
                            module_feedback=cfg.module_feedback, luma_control=cfg.luma_control)
