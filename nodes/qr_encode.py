"""QR Code Encode: payload -> hint image, dark-module mask and the exact QR_CODE."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..rl.qr import ECC_LEVELS, MONSTER_V2_LIGHT, encode
from ._common import CATEGORY, QRCodeType, numpy_to_images


class QRCodeEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRCodeEncode",
            display_name="QR Code Encode",
            category=CATEGORY,
            description="Encode a payload as a QR code: the ControlNet hint image, a mask of dark "
            "modules, and the exact module matrix that the scan reward checks against.",
            inputs=[
                io.String.Input("payload", default="https://example.com",
                                tooltip="Text or URL to encode. Shorter payloads give larger modules that blend and scan better."),
                io.Combo.Input("ecc", options=list(ECC_LEVELS), default="H",
                               tooltip="Error correction: L 7%, M 15%, Q 25%, H 30% of codewords recoverable. "
                               "H survives the most artistic damage. Never silently boosted."),
                io.Int.Input("version", default=0, min=0, max=40,
                             tooltip="QR version 1-40 (21x21 ... 177x177 modules); 0 = smallest that fits."),
                io.Int.Input("mask", default=-1, min=-1, max=7,
                             tooltip="Data mask pattern 0-7; -1 = the standard's automatic choice."),
                io.Int.Input("module_px", default=16, min=1, max=128,
                             tooltip="Pixels per module in the hint image."),
                io.Int.Input("border", default=4, min=0, max=40,
                             tooltip="Quiet zone around the code, in modules (the standard asks for 4)."),
                io.String.Input("dark", default="#000000",
                                tooltip="Dark module colour: #RRGGBB, #RGB, 'r,g,b' or black/white/gray."),
                io.String.Input("light", default="#FFFFFF",
                                tooltip=f"Light module colour. QR Code Monster v2 expects mid-gray {MONSTER_V2_LIGHT}."),
            ],
            outputs=[
                io.Image.Output("hint", tooltip="The QR code as an IMAGE, for the ControlNet hint."),
                io.Mask.Output("dark_mask", tooltip="1 where a module is dark, 0 elsewhere (quiet zone included)."),
                QRCodeType.Output("qr_code", tooltip="Payload, module matrix, region map and parameters."),
            ],
        )

    @classmethod
    def execute(cls, payload: str, ecc: str, version: int, mask: int, module_px: int, border: int,
                dark: str, light: str) -> io.NodeOutput:
        code = encode(payload, ecc=ecc, version=version or None, mask=None if mask < 0 else mask,
                      module_px=module_px, border=border, dark=dark, light=light)
        hint = numpy_to_images([code.render()])
        dark_mask = torch.from_numpy(code.mask_image()).float().unsqueeze(0)
        return io.NodeOutput(hint, dark_mask, code)
