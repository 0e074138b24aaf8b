"""The toy wing's :class:`rl.collect.Backend`: the embedded toy model sampled in-process.

Why it exists: ``qr-rl loop --backend local`` and ``qr-rl collect --backend local`` run the
whole loop on a CPU with no ComfyUI, through the very code paths the ComfyUI backend uses.
Samples come from the trainer's own denoiser (``Policy.denoise`` + ``rl.sampling``), are scored
with the real scan and CLIP rewards, and are written with ``rl.trajectory.write_shard``.
The product modules never import this one; ``rl.loop`` finds it by name in ``BACKENDS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .collect import Backend, Job, JobResult
from .errors import QRRLError
from .files import atomic_move, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from .loop import LoopConfig

#: Payload sampled when a run names none.
DEFAULT_PAYLOADS = ("QR-RL",)


def default_prompts() -> list[str]:
    """Prompts sampled when a run names none (two of the toy world's demo prompts)."""
    from .toy import DEMO_PROMPTS

    return list(DEMO_PROMPTS[:2])


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
            from .weights import load_controlnet

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

    def step_percents(self) -> list[float]:
        """Each sampling step's progress as ComfyUI measures it (``1 − timestep/999``)."""
        from .toy import sampling_schedule

        return [1.0 - float(t) / 999.0 for t in sampling_schedule(self.steps or self.model.steps)[1]]

    def job_strengths(self, job: Job) -> tuple[float | list[list[float]], dict[str, Any] | None]:
        """What the sampler takes for ``job`` and the shard's ``strength_schedule``: the job's
        strength (constant curve), or with per-sample keyframes the ``[B][K]`` table they give
        (read at each step's percent, as the RL sampler's ``keyframes_per_sample`` does)."""
        from .collect import keyframes_table

        if not job.keyframes:
            return job.strength, {"curve": "constant", "strength_start": job.strength, "strength_end": job.strength,
                                  "start_percent": 0.0, "end_percent": 1.0, "keyframes": [], "step_at": 0.5}
        if len(job.keyframes) != len(job.seeds):
            raise QRRLError(f"job {job.index}: {len(job.keyframes)} keyframes lines for {len(job.seeds)} samples")
        return keyframes_table(job.keyframes, self.step_percents()), None

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
            strength, schedule = self.job_strengths(job)
            out = sample(self.model, [job.prompt] * n, [code] * n, list(job.seeds), strength,
                         controlnet=self.controlnet_module, steps=self.steps)
            base = sample(self.model, [job.prompt] * n, None, list(job.seeds), 0.0, steps=self.steps,
                          record=False).images
            scan = scan_reward(images_hwc_uint8(out.images), code)
            art = self.model.art_reward(out.images, [job.prompt] * n, base, self._scorer)
            reward = combine_rewards([scan, art], [1.0, self.clip_weight])
            info = self.model.info
            per_sample = {"strength_schedules": [{"curve": "keyframes", "keyframes": line} for line in job.keyframes]}
            meta = (per_sample if job.keyframes else {}) | {
                "cfg": float(info["sampling"]["cfg"]), "scheduler": info["sampling"].get("scheduler", "simple-sd"),
                "sampler": "qr_rl_toy", "prompts": [job.prompt] * n, "payloads": [job.payload] * n,
                "qr": [{"payload": job.payload, "version": int(code.version), "ecc": str(code.ecc)}] * n,
                "strength_schedule": schedule,
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


class ToyLoopBackend:
    """``qr-rl loop --backend local``: rounds sample the toy model; the trainer loads its files."""

    name = "local"
    default_payloads: Sequence[str] = DEFAULT_PAYLOADS

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg

    @property
    def default_prompts(self) -> Sequence[str]:
        return default_prompts()

    def validate(self) -> None:
        """Nothing beyond the shared settings: the model folder is read when the loop starts."""

    def _folder(self) -> Path:
        from .toy import ASSETS

        return Path(self.cfg.toy_model) if self.cfg.toy_model else ASSETS

    def initial_controlnet(self) -> dict[str, str]:
        from .toy import FILES

        path = Path(self.cfg.controlnet) if self.cfg.controlnet else self._folder() / FILES["controlnet"]
        if not path.is_file():
            raise QRRLError(f"toy ControlNet {path} not found; run `qr-rl toy pretrain` or pass --toy-model")
        return {"name": path.name, "path": str(path)}

    def trainer_models(self) -> tuple[Path, Path, Path]:
        from .toy import CONTROLNET_CONFIG_FILE, FILES, UNET_CONFIG_FILE

        folder = self._folder()
        return folder / FILES["unet"], folder / UNET_CONFIG_FILE, folder / CONTROLNET_CONFIG_FILE

    #: each sample has its own seed, so a mirrored pair (±δ) can share one
    per_sample_seeds = True

    def step_percents(self) -> list[float]:
        """Each sampling step's ComfyUI percent (the loop writes one keyframe per step)."""
        import json

        from .toy import CONFIG_FILE, sampling_schedule

        steps = self.cfg.steps or int(json.loads((self._folder() / CONFIG_FILE).read_text())["sampling"]["steps"])
        return [1.0 - float(t) / 999.0 for t in sampling_schedule(steps)[1]]

    def collector(self, rec: Mapping[str, Any], r: int, run_dir: Path) -> Backend:
        cfg = self.cfg
        return LocalToyBackend(cfg.toy_model, rec["controlnet_path"] if r > 0 or cfg.controlnet else None,
                               steps=cfg.steps, run_name=cfg.name)
