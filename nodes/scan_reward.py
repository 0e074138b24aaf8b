"""QR Scan Reward: does each image decode to the payload, how many modules are right."""

from __future__ import annotations

from comfy_api.latest import io

from ..rl.scan import DEFAULT_DECODERS, results_to_reward, scan_batch
from ._common import CATEGORY, QRCodeType, RewardType, images_to_numpy, numpy_to_images

DECODER_CHOICES = {
    "all": DEFAULT_DECODERS,
    "zxing+zbar": ("zxing", "zbar"),
    "zxing": ("zxing",),
    "zbar": ("zbar",),
    "opencv": ("opencv",),
}


class QRScanReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QRScanReward",
            display_name="QR Scan Reward",
            category=CATEGORY,
            description="Scores scannability: exact-payload decode with several real decoders, module "
            "accuracy against the encoded matrix, and a dense scan_score in [0,1].",
            inputs=[
                io.Image.Input("images", tooltip="Generated images, aligned with the QR hint (any size: the hint "
                               "geometry is scaled to the image)."),
                QRCodeType.Input("qr_code", tooltip="The QR_CODE from QR Code Encode that the images should carry."),
                io.Combo.Input("decoders", options=list(DECODER_CHOICES), default="all",
                               tooltip="Decoders to try, cheapest first; an image counts as decoded when any of "
                               "them reads the exact payload (zxing-cpp, zbar, OpenCV when installed)."),
            ],
            outputs=[
                RewardType.Output("reward", tooltip="Per-image decoded / module_accuracy / scan_score; total = scan_score."),
                io.Float.Output("decode_rate", tooltip="Fraction of the batch that decodes to the exact payload."),
                io.String.Output("report", tooltip="One readable line per image."),
                io.Image.Output("error_overlay", tooltip="Each image dimmed, wrong modules tinted red."),
            ],
        )

    @classmethod
    def execute(cls, images, qr_code, decoders: str) -> io.NodeOutput:
        results = scan_batch(images_to_numpy(images), qr_code, decoders=DECODER_CHOICES[decoders])
        reward = results_to_reward(results)
        lines = [
            f"#{i}: {'DECODED via ' + '+'.join(r.decoders) + f' ({r.variant})' if r.decoded else 'no decode'}"
            f" | modules {r.module_accuracy:.1%} | scan_score {r.scan_score:.3f}"
            for i, r in enumerate(results)
        ]
        decode_rate = sum(r.decoded for r in results) / max(len(results), 1)
        report = f"decode rate {decode_rate:.0%} ({len(results)} images)\n" + "\n".join(lines)
        overlay = numpy_to_images([r.overlay for r in results])
        return io.NodeOutput(reward, decode_rate, report, overlay, ui={"text": [report]})
