"""ComfyUI adapters. Each module here exports ``NODES``: a list of V3 ``io.ComfyNode`` classes.

Nodes stay thin: they convert ComfyUI types (IMAGE ``[B,H,W,C]`` in 0..1, LATENT dicts,
CONDITIONING, MODEL, CONTROL_NET) to calls into ``rl/`` and back.
"""

from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "NODES", []))
    return found


class QRRLExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
