"""Test-only ComfyUI nodes, linked into the test server's ``custom_nodes`` (tests/conftest.py).

They build graphs a user can meet but the tiny SD1.5 test weights cannot: a model whose latent
format has no latent → RGB preview colours (as some video and audio model families have), so the
RL sampler's refusal of such a model is tested in a real server rather than on a stand-in.
"""

from __future__ import annotations

import comfy.latent_formats


class StripPreviewColours:
    """MODEL → the same MODEL whose latent format has no ``latent_rgb_factors`` (an object patch)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node protocol
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "strip"
    CATEGORY = "testing (not QR-RL)"

    def strip(self, model):
        patched = model.clone()
        patched.add_object_patch("latent_format", comfy.latent_formats.LatentFormat())
        return (patched,)


NODE_CLASS_MAPPINGS = {"QRRLTestStripPreviewColours": StripPreviewColours}
