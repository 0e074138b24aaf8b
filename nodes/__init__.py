"""ComfyUI adapters: the V3 ``io.ComfyNode`` classes of the pack, listed in :func:`all_nodes`.

Nodes stay thin: they convert ComfyUI types (IMAGE ``[B,H,W,C]`` in 0..1, LATENT dicts,
CONDITIONING, MODEL, CONTROL_NET) to calls into ``rl/`` and back.

Why a list and not a scan of this folder: what the pack registers is visible in one place,
in the order the menu shows it, and a helper module never registers by accident
(``tests/test_node_list.py`` checks the list against every node class defined here).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node of the pack, in workflow order (imported here, when ComfyUI asks for them)."""
    from .clip_reward import QRClipScorerLoader, QRClipSimilarityReward
    from .combine_rewards import QRCombineRewards
    from .qr_encode import QRCodeEncode
    from .rl_sampler import QRControlNetSamplerRL
    from .scan_reward import QRScanReward
    from .scheduled_controlnet import QRScheduledControlNetApply
    from .trajectory_recorder import QRTrajectoryRecorder

    return [
        QRCodeEncode,
        QRScheduledControlNetApply,
        QRControlNetSamplerRL,
        QRScanReward,
        QRClipScorerLoader,
        QRClipSimilarityReward,
        QRCombineRewards,
        QRTrajectoryRecorder,
    ]


class QRRLExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
