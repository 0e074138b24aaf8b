"""ComfyUI entry point of the QR-RL node pack (V3 schema: ``comfy_entrypoint``).

ComfyUI imports this file by path, so everything below is a relative import. The heavy
lifting lives in ``rl/`` (no ComfyUI imports); ``nodes/`` only adapts ComfyUI types.
"""

if __package__:
    # ComfyUI imports the pack as a package. pytest, run from a checkout whose folder name is
    # not a Python identifier (``comfyui-qr-rl``), imports this file as a top-level module with
    # no package: then there is nothing to register, and relative imports would fail.
    from .rl import _compat

    # No-op on a normal install; on CPU-only torch with the index's CUDA torchvision it lets
    # open_clip's transforms import (see rl/_compat.py).
    _compat.ensure_torchvision_importable()
    _compat.ensure_pyzbar_orientation_fix()


async def comfy_entrypoint():
    from .nodes import QRRLExtension

    return QRRLExtension()
