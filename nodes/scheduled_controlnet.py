"""Scheduled ControlNet Apply: one ControlNet strength per sampling step, from a curve.

The node is ComfyUI's Apply ControlNet with a schedule instead of one strength; how the
ControlNet copy follows the schedule step by step is in :mod:`._controlnet`.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..rl.schedule import StrengthSchedule
from ._common import CATEGORY
from ._controlnet import apply_scheduled, build_schedule, schedule_inputs


class QRScheduledControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRScheduledControlNetApply",
            display_name="Scheduled ControlNet Apply (QR)",
            category=CATEGORY,
            description="Apply a ControlNet to positive and negative with a strength that follows a curve over "
            "the sampling run: exactly one strength per step (no doubled strength at segment borders). Works "
            "with any sampler.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (gets the same ControlNet, as in "
                                      "ComfyUI's Apply ControlNet)."),
                io.ControlNet.Input("control_net", tooltip="The ControlNet, e.g. QR Code Monster."),
                io.Image.Input("image", tooltip="The hint image (e.g. from QR Code Encode); resized to the latent "
                               "size x8 (nearest-exact, centre crop) like ComfyUI does."),
                *schedule_inputs(),
                io.Vae.Input("vae", optional=True, tooltip="Only for ControlNets that need a VAE (not SD1.5 ones)."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive", tooltip="Positive with the scheduled ControlNet."),
                io.Conditioning.Output("negative", display_name="negative", tooltip="Negative with the same ControlNet."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, control_net, image, curve: str, strength_start: float,
                strength_end: float, keyframes: str, start_percent: float, end_percent: float,
                vae=None) -> io.NodeOutput:
        schedule = build_schedule(curve, strength_start, strength_end, keyframes, start_percent, end_percent)
        if _all_zero(schedule):
            return io.NodeOutput(positive, negative)
        pos, neg, _ = apply_scheduled(positive, negative, control_net, image, schedule, vae=vae)
        return io.NodeOutput(pos, neg)


def _all_zero(schedule: StrengthSchedule) -> bool:
    if schedule.curve == "keyframes":
        return all(s == 0 for _, s in schedule.keyframes)
    if schedule.curve == "constant":
        return schedule.strength_start == 0
    return schedule.strength_start == 0 and schedule.strength_end == 0

