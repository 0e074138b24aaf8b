"""Combine Rewards: weighted sum of up to four QR_REWARDs for the same images."""

from __future__ import annotations

from comfy_api.latest import io

from ..rl.reward import combine_rewards
from ._common import CATEGORY, RewardType

_SLOTS = ("a", "b", "c", "d")


class QRCombineRewards(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = []
        for i, slot in enumerate(_SLOTS):
            inputs.append(RewardType.Input(f"reward_{slot}", optional=i > 0,
                                           tooltip="A QR_REWARD (scan or CLIP) for the same batch of images."))
            inputs.append(io.Float.Input(f"weight_{slot}", default=1.0, min=-100.0, max=100.0, step=0.05, optional=i > 0,
                                         tooltip="Multiplies this reward's total; used as given (no renormalising)."))
        return io.Schema(
            node_id="QRCombineRewards",
            display_name="Combine QR Rewards",
            category=CATEGORY,
            description="total = sum of weight x reward total; components (decoded, clip_text, ...) are kept.",
            inputs=inputs,
            outputs=[
                RewardType.Output("reward", tooltip="The combined reward, with every component."),
                io.String.Output("report", tooltip="Batch means of the total and of each component."),
            ],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        pairs = [(kwargs.get(f"reward_{s}"), kwargs.get(f"weight_{s}", 1.0)) for s in _SLOTS]
        pairs = [(r, w) for r, w in pairs if r is not None]
        combined = combine_rewards([r for r, _ in pairs], [w for _, w in pairs])
        report = combined.report()
        return io.NodeOutput(combined, report, ui={"text": [report]})
