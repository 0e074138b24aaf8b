"""ComfyUI entry point of the QR-RL node pack (V3 schema: ``comfy_entrypoint``).

ComfyUI imports this file by path, so everything below is a relative import. The heavy
lifting lives in ``rl/`` (no ComfyUI imports); ``nodes/`` only adapts ComfyUI types.
"""

from .rl import _compat

# No-op on a normal install; on CPU-only torch with the index's CUDA torchvision it lets
# open_clip's transforms import (see rl/_compat.py).
_compat.ensure_torchvision_importable()
_compat.ensure_pyzbar_orientation_fix()


async def comfy_entrypoint():
    from .nodes import QRRLExtension

    return QRRLExtension()
