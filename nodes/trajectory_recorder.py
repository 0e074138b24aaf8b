"""Trajectory Recorder (output node): QR_TRAJECTORY + QR_REWARD -> one shard on disk.

Shards go to ``<ComfyUI output>/qr_rl/<run>/`` (run names sanitised: nothing can escape that
folder). ComfyUI caches node outputs by input signature, so re-queueing an identical prompt
does not write a duplicate shard; a new seed (or any changed input) does.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..rl.errors import QRRLError
from ..rl.trajectory import Trajectory, sanitize_run_name, write_shard
from ._common import CATEGORY, QRCodeType, RewardType, TrajectoryType

SUBFOLDER = "qr_rl"


def _qr_meta(code) -> dict:
    return {"payload": code.payload, "version": int(code.version), "ecc": str(code.ecc), "mask": int(code.mask),
            "module_px": int(code.module_px), "border": int(code.border), "size": int(code.size),
            "dark": list(code.dark), "light": list(code.light)}


class QRTrajectoryRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRTrajectoryRecorder",
            display_name="Trajectory Recorder (QR-RL)",
            category=CATEGORY,
            description="Writes the recorded trajectory and its rewards as one shard (safetensors) under "
            "output/qr_rl/<run>/ for `qr-rl train`. An identical re-queue is cached by ComfyUI and writes nothing.",
            is_output_node=True,
            inputs=[
                TrajectoryType.Input("trajectory", tooltip="From QR ControlNet Sampler (RL) with record on."),
                RewardType.Input("reward", tooltip="Rewards of the decoded images (same batch, same order)."),
                io.String.Input("run_name", default="qr-run",
                                tooltip="Folder under output/qr_rl/: letters, digits, '.', '_', '-' (no '/' or '..')."),
                io.String.Input("payload", default="", optional=True,
                                tooltip="Metadata: the encoded payload (taken from qr_code when that is connected)."),
                QRCodeType.Input("qr_code", optional=True,
                                 tooltip="Metadata: the QR_CODE (payload, version, ECC, mask...) stored per sample."),
            ],
            outputs=[io.String.Output("shard_path", tooltip="Path of the written shard.")],
        )

    @classmethod
    def validate_inputs(cls, run_name: str | None = None) -> bool | str:
        """Refuse a bad run name when the prompt is queued, not after minutes of sampling.

        A ``run_name`` fed by a link is not known yet (None) and is checked in ``execute``.
        """
        if not isinstance(run_name, str):
            return True
        try:
            sanitize_run_name(run_name)
        except QRRLError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, trajectory, reward, run_name: str, payload: str = "", qr_code=None) -> io.NodeOutput:
        if trajectory is None:
            raise QRRLError("no trajectory: switch 'record' on in QR ControlNet Sampler (RL)")
        run = sanitize_run_name(run_name)
        batch = trajectory.batch_size
        if reward.batch_size != batch:
            raise QRRLError(
                f"the reward has {reward.batch_size} values but the trajectory has {batch} samples: score exactly "
                "the images decoded from this sampler's latent"
            )
        meta = dict(trajectory.meta)
        if qr_code is not None:
            meta["payloads"] = [qr_code.payload] * batch
            meta["qr"] = [_qr_meta(qr_code) for _ in range(batch)]
        elif payload:
            meta["payloads"] = [payload] * batch
        if trajectory.notes:
            meta["notes"] = list(trajectory.notes)
        traj = Trajectory.from_record(
            trajectory.record, timestep=trajectory.timestep, cond=trajectory.cond, uncond=trajectory.uncond,
            hint=trajectory.hint, reward=reward, meta=meta, strength=trajectory.strength,
        )
        root = os.path.join(folder_paths.get_output_directory(), SUBFOLDER)
        path = write_shard(traj, root, run)
        summary = reward.report()
        text = f"wrote {path}\n{summary}"
        shard = {"filename": path.name, "subfolder": f"{SUBFOLDER}/{run}", "type": "output"}
        return io.NodeOutput(str(path), ui={"text": [text], "shards": [shard]})
