"""Throughput of the scan reward, single-threaded.

Why: the scan reward runs on every sample of every RL batch, on CPU, next to the sampler.
This prints images/s (and the exact-payload decode rate) per decoder alone (one read of the
native gray image, and the full cascade with that decoder only) and for the full
``scan_score`` (default decoders, no overlay, and with overlay), at 512^2 and 1024^2, on
clean hints and on hints blended with a procedural texture (harder to decode).

    python bench/scan.py [--n 40] [--sizes 512,1024] [--blend 0.55]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise plus stripes: a stand-in for generated art."""
    import cv2

    noise = rng.random((size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
    smooth = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(3, 12))
    fine = rng.random((size, size, 1)).astype(np.float32)
    img = 0.55 * smooth + 0.3 * stripes[..., None] + 0.15 * fine
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def make_inputs(size: int, n: int, blend: float, seed: int = 0) -> list[tuple[np.ndarray, object]]:
    import cv2

    from rl.qr import encode

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        payload = f"https://example.com/qr-rl/{i:04d}-{rng.integers(1e9)}"
        code = encode(payload, ecc="H", module_px=8)
        hint = cv2.resize(code.render(), (size, size), interpolation=cv2.INTER_AREA)
        if blend > 0:
            art = texture(size, rng)
            hint = (hint.astype(np.float32) * (1 - blend) + art.astype(np.float32) * blend).astype(np.uint8)
        out.append((hint, code))
    return out


def bench(fn, items, min_time: float = 1.0) -> tuple[float, float]:
    """images/s and success rate of ``fn(image, code) -> bool``."""
    ok = 0
    count = 0
    start = time.perf_counter()
    while True:
        for img, code in items:
            ok += bool(fn(img, code))
            count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return count / elapsed, ok / count


def main() -> None:
    import cv2

    from rl.scan import _READERS, _gray, available_decoders, decode, scan_image

    cv2.setNumThreads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="distinct images per input kind")
    ap.add_argument("--sizes", default="512,1024", help="comma-separated square sizes")
    ap.add_argument("--blend", type=float, default=0.55, help="texture weight of the hard inputs")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = ap.parse_args()

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for kind, blend in (("clean", 0.0), (f"blend{args.blend:g}", args.blend)):
            items = make_inputs(size, args.n, blend)
            for dec in available_decoders():
                reader = _READERS[dec]
                rows.append((size, kind, f"{dec} (1 read, native)",
                             *bench(lambda im, c, r=reader: c.payload in r(_gray(im)), items, args.min_time)))
                rows.append((size, kind, f"{dec} (cascade)",
                             *bench(lambda im, c, d=dec, s=size: decode(im, c.payload, [d], module_px=c.module_px * s / c.image_size).decoded,
                                    items, args.min_time)))
            rows.append((size, kind, "scan_score (no overlay)",
                         *bench(lambda im, c: scan_image(im, c, overlay=False).decoded, items, args.min_time)))
            rows.append((size, kind, "scan_score + overlay",
                         *bench(lambda im, c: scan_image(im, c).decoded, items, args.min_time)))
            for r in rows[-(2 * len(available_decoders()) + 2):]:
                print(f"{r[0]:>5}  {r[1]:<10} {r[2]:<26} {r[3]:8.1f} img/s  decode {100 * r[4]:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
