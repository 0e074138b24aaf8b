"""The toy wing's :class:`rl.collect.Backend`: the embedded toy model sampled in-process.

Why it exists: ``qr-rl loop --backend local`` and ``qr-rl collect --backend local`` run the
whole loop on a CPU with no ComfyUI, through the very code paths the ComfyUI backend uses, and
``qr-rl demo`` collects its rounds through it (rl.rounds), with the sampler's tricks and the art budget.
Samples come from the trainer's own denoiser (``Policy.denoise`` + ``rl.sampling``), are scored
with the real scan and CLIP rewards, and are written with ``rl.trajectory.write_shard``.
The product modules never import this one; ``rl.loop`` finds it by name in ``BACKENDS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..collect import Backend, Job, JobResult
from ..errors import QRRLError
from ..files import atomic_move, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from ..loop import LoopConfig

#: Payload sampled when a run names none.
DEFAULT_PAYLOADS = ("QR-RL",)


def default_prompts() -> list[str]:
    """Prompts sampled when a run names none (two of the toy world's demo prompts)."""
    from .model import DEMO_PROMPTS

    return list(DEMO_PROMPTS[:2])


@dataclass
class ToyScoring:
    """How the toy backend scores a sample: scan + ``clip_weight`` × art, and the art budget's terms.

    ``art_floor`` (an absolute art similarity) adds a per-sample hinge below it, weighted
    ``art_floor_weight``; ``budget`` (:class:`rl.art_budget.ArtBudget`) prices art against paired
    floors: ``budget_fraction`` × the art of the *pretrained* ControlNet at the job's base strength
    for the same prompt, payload and seed (sampled here, which only an in-process backend can afford).
    """

    clip_weight: float = 0.5
    art_floor: float | None = None
    art_floor_weight: float = 10.0
    budget: Any = None
    budget_fraction: float = 0.95


class LocalToyBackend:
    """In-process collection with the embedded toy model (``rl.toy``), no ComfyUI needed.

    The sampler's tricks (``feedback``: rl.module_feedback, ``luma_control``, ``guidance``:
    rl.scan_guidance) and ``scoring`` are the demo's; ``qr-rl loop --backend local`` uses the
    plain sampler and scan + art. ``extra_meta`` adds keys to every shard's metadata (rl.trajectory.shard_metadata builds it).
    """

    name = "local"

    def __init__(self, model_folder: str | os.PathLike[str] | None = None,
                 controlnet: str | os.PathLike[str] | None = None, steps: int | None = None,
                 clip_weight: float = 0.5, run_name: str = "qr-rl", *, model: Any = None,
                 controlnet_module: Any = None, feedback: Any = None, luma_control: bool = False,
                 guidance: Any = None, scoring: ToyScoring | None = None, scorer: Any = None,
                 extra_meta: Mapping[str, Any] | None = None):
        from .model import ToyModel

        self.model = model if model is not None else ToyModel.load(model_folder)
        self.model_folder = self.model.folder
        self.controlnet_path = Path(controlnet) if controlnet else self.model.controlnet_path
        self.controlnet_module = controlnet_module
        if controlnet and controlnet_module is None:
            from ..weights import load_controlnet

            self.controlnet_module = load_controlnet(controlnet, self.model.controlnet_config_path).requires_grad_(False)
        self.steps = steps
        self.scoring = scoring if scoring is not None else ToyScoring(clip_weight=float(clip_weight))
        self.clip_weight = self.scoring.clip_weight
        self.feedback, self.luma_control, self.guidance = feedback, bool(luma_control), guidance
        self.run_name = run_name
        self.extra_meta = dict(extra_meta or {})
        self._scorer = scorer

    @property
    def checkpoint_path(self) -> Path:
        return self.model.unet_path

    def check(self) -> None:
        """Nothing to reach: the model is loaded; prompts are checked per job."""

    def step_percents(self) -> list[float]:
        """Each sampling step's progress as ComfyUI measures it (``1 − timestep/999``)."""
        from .model import sampling_schedule

        return [1.0 - float(t) / 999.0 for t in sampling_schedule(self.steps or self.model.steps)[1]]

    def job_strengths(self, job: Job) -> tuple[float | list[list[float]], dict[str, Any] | None]:
        """What the sampler takes for ``job`` and the shard's ``strength_schedule``: the job's
        strength (constant curve), or with per-sample keyframes the ``[B][K]`` table they give
        (read at each step's percent, as the RL sampler's ``keyframes_per_sample`` does)."""
        from ..collect import keyframes_table

        if not job.keyframes:
            return job.strength, {"curve": "constant", "strength_start": job.strength, "strength_end": job.strength,
                                  "start_percent": 0.0, "end_percent": 1.0, "keyframes": [], "step_at": 0.5}
        if len(job.keyframes) != len(job.seeds):
            raise QRRLError(f"job {job.index}: {len(job.keyframes)} keyframes lines for {len(job.seeds)} samples")
        return keyframes_table(job.keyframes, self.step_percents()), None

    def _feedback_gains(self, job: Job):
        import torch

        if not job.feedback_gains:
            return None
        if self.feedback is None:
            raise QRRLError(f"job {job.index} draws module-feedback gains, but this backend samples without "
                            "module feedback")
        if len(job.feedback_gains) != len(job.seeds):
            raise QRRLError(f"job {job.index}: {len(job.feedback_gains)} feedback gain pairs for "
                            f"{len(job.seeds)} samples")
        return torch.tensor(job.feedback_gains, dtype=torch.float32)

    def _per_seed(self, job: Job, draw: Callable[[list[str], list[int]], Any]):
        """``draw(prompts, seeds)`` once per distinct seed of ``job``, spread back to every sample: a
        mirrored pair shares its seed, so its base image and its pretrained reference are the same
        picture (each sample's noise depends only on its seed); sampling them once saves a quarter of
        a round's model passes."""
        unique = list(dict.fromkeys(job.seeds))
        images = draw([job.prompt] * len(unique), unique)
        if len(unique) == len(job.seeds):
            return images
        return images[[unique.index(s) for s in job.seeds]]

    def score(self, job: Job, images, codes, base):
        """The job's :class:`rl.reward.Reward` (``scoring``'s terms)."""
        from ..reward import combine_rewards, floor_penalty
        from ..scan import scan_reward
        from .model import images_hwc_uint8, sample

        sc, n = self.scoring, len(job.seeds)
        prompts = [job.prompt] * n
        scan = scan_reward(images_hwc_uint8(images), codes)
        art = self.model.art_reward(images, prompts, base, self._scorer)
        parts, weights = [scan, art], [1.0, sc.clip_weight]
        if sc.art_floor is not None:
            parts.append(floor_penalty(art.components["clip_image"], sc.art_floor))
            weights.append(sc.art_floor_weight)
        if sc.budget is not None:  # paired: the pretrained ControlNet's art for the same items, × the fraction
            plain = self._per_seed(job, lambda p, s: sample(self.model, p, codes[:len(s)], s, job.strength,
                                                            steps=self.steps, record=False).images)
            floors = sc.budget_fraction * self.model.art_reward(plain, prompts, base, self._scorer).components["clip_image"]
            parts.append(sc.budget.reward(art.components["clip_image"], floors=floors))
            weights.append(1.0)
        return combine_rewards(parts, weights)

    def run(self, jobs: Sequence[Job], shards_dir: Path, on_done: Callable[[Job, JobResult], None],
            progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        import torch

        from ..image_io import save_png
        from ..luma_control import projection_meta
        from ..trajectory import Trajectory, shard_metadata, write_shard
        from .model import images_hwc_uint8, sample
        from .world import LATENT_FACTOR, parse_prompt, toy_code

        base_sha = sha256_file(self.model.unet_path)
        cn_sha = sha256_file(self.controlnet_path)
        if self._scorer is None:
            self._scorer = self.model.clip_scorer()
        for job in jobs:
            parse_prompt(job.prompt)
            n = len(job.seeds)
            codes = [toy_code(job.payload)] * n
            strength, schedule = self.job_strengths(job)
            gains = self._feedback_gains(job)
            out = sample(self.model, [job.prompt] * n, codes, list(job.seeds), strength,
                         controlnet=self.controlnet_module, steps=self.steps, feedback=self.feedback,
                         feedback_gains=gains, luma_control=self.luma_control, guidance=self.guidance)
            base = self._per_seed(job, lambda p, s: sample(self.model, p, None, s, 0.0, steps=self.steps,
                                                           record=False).images)
            reward = self.score(job, out.images, codes, base)
            info = self.model.info
            fb = self.feedback
            extra = dict(self.extra_meta)
            meta = shard_metadata(
                sampler="qr_rl_toy", cfg=float(info["sampling"]["cfg"]),
                scheduler=info["sampling"].get("scheduler", "simple-sd"), prompts=[job.prompt] * n,
                strength_schedule=schedule, base_sha256=base_sha, controlnet_sha256=cn_sha,
                payloads=[job.payload] * n, qr=[c.to_metadata() for c in codes], curriculum_round=job.round,
                policy_version=extra.pop("policy_version", None),
                strength_schedules=[{"curve": "keyframes", "keyframes": line} for line in job.keyframes] or None,
                # each sample's gains; the per-step gain maps themselves are the shard's strength_map
                module_feedback=None if fb is None else {
                    "margin": fb.margin, "softness": fb.softness, "ramp": fb.ramp,
                    "gains": (torch.tensor([fb.gains()] * n) if gains is None else gains).tolist()},
                # scan guidance edits the recorded predictions: rwr distils them, ddpo refuses them
                scan_guidance=None if self.guidance is None else self.guidance.to_meta(),
                # which luma-only control the sampler used (rl.luma_control): the trainer rebuilds it to replay
                luma_control=projection_meta(LATENT_FACTOR) if self.luma_control else None,
                base_file=str(self.model.unet_path), controlnet_file=str(self.controlnet_path), **extra)
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
        from .model import ASSETS

        return Path(self.cfg.toy_model) if self.cfg.toy_model else ASSETS

    def initial_controlnet(self) -> dict[str, str]:
        from .model import FILES

        path = Path(self.cfg.controlnet) if self.cfg.controlnet else self._folder() / FILES["controlnet"]
        if not path.is_file():
            raise QRRLError(f"toy ControlNet {path} not found; run `qr-rl toy pretrain` or pass --toy-model")
        return {"name": path.name, "path": str(path)}

    def trainer_models(self) -> tuple[Path, Path, Path]:
        from .model import CONTROLNET_CONFIG_FILE, FILES, UNET_CONFIG_FILE

        folder = self._folder()
        return folder / FILES["unet"], folder / UNET_CONFIG_FILE, folder / CONTROLNET_CONFIG_FILE

    #: each sample has its own seed, so a mirrored pair (±δ) can share one
    per_sample_seeds = True

    def step_percents(self) -> list[float]:
        """Each sampling step's ComfyUI percent (the loop writes one keyframe per step)."""
        import json

        from .model import CONFIG_FILE, sampling_schedule

        steps = self.cfg.steps or int(json.loads((self._folder() / CONFIG_FILE).read_text())["sampling"]["steps"])
        return [1.0 - float(t) / 999.0 for t in sampling_schedule(steps)[1]]

    def collector(self, rec: Mapping[str, Any], r: int, run_dir: Path) -> Backend:
        from ..module_feedback import ModuleFeedback

        cfg = self.cfg
        started = rec["controlnet_path"] == self.initial_controlnet()["path"]  # the shipped one, unless --controlnet
        return LocalToyBackend(cfg.toy_model, None if started and not cfg.controlnet else rec["controlnet_path"],
                               steps=cfg.steps, run_name=cfg.name,
                               feedback=ModuleFeedback() if cfg.module_feedback else None,
                               luma_control=cfg.luma_control)
