"""Scannability reward: real decoders plus a dense module-accuracy signal.

Why both: "did it decode" is the goal but is a cliff (0 for almost every early sample), so an
RL policy needs a graded signal that already rises while the code is still unreadable. We
sample every module of the image at the geometry of the hint and compare it with the matrix
the hint encodes; decoders then say whether real scanners agree.

Decoding works like a tolerant phone scanner: a cascade of cheap image variants (native gray,
bicubic upscale when modules are tiny, area downscale to ~4 px/module which averages art
texture away, Otsu binarisation, mild blur), and for each variant the chosen decoders
(zxing-cpp, zbar, OpenCV). Only an exact read of the payload counts as success; what was read
instead is reported. The cascade stops at the first success (``exhaustive=True`` goes on to
list every decoder that can read the code). zbar and OpenCV are much slower than zxing on a
full-size image (docs/benchmarks.md, "Scan reward throughput"), so when modules are large they
only see the small (downscaled / binarised) variants.

``scan_score`` (in [0, 1]):

* per module ``i`` the sampled luminance ``L_i`` (Gaussian-weighted mean of the central ~60%
  of its cell), a label-free threshold ``T`` (Otsu on the module means refined to the midpoint
  of the two class means, so a mid-gray light colour works) and the class contrast ``C``;
  signed margin ``m_i = (T - L_i)/C`` for modules that should be dark, ``(L_i - T)/C`` for light;
* soft correctness ``s_i = clip(0.5 + 2*m_i, 0, 1)``: 1 once a module is a quarter of the
  contrast on the right side, 0 when as far on the wrong side, graded in between;
* ``q = sum(w_i * s_i) / sum(w_i)`` with weights 3 for finder/format, 2 for separator,
  alignment, timing and version modules, 1 for data and the dark module (a scanner must
  find the function patterns before error correction can help);
* not decoded: ``scan_score = 0.6 * q``; decoded: ``scan_score = 0.6 + 0.4 * q * r`` where
  ``r`` is 1 when a decoder reads the native image, 0.9 after up- or downscaling, 0.8
  after binarisation, 0.7 only after blurring.

So the score rises with every corrected module before any decode, jumps when the code
decodes, and reaches 1.0 only for a natively decodable image whose every module is on the
right side with margin. Flipping more modules never raises it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import QRRLError
from .image_io import to_batch, to_uint8_rgb
from .qr import REGION_IDS, REGIONS, QRCode
from .reward import Reward

DEFAULT_DECODERS: tuple[str, ...] = ("zxing", "zbar", "opencv")
KNOWN_DECODERS: tuple[str, ...] = ("zxing", "zbar", "opencv")
REGION_WEIGHTS: dict[str, float] = {
    "finder": 3.0,
    "separator": 2.0,
    "alignment": 2.0,
    "timing": 2.0,
    "format": 3.0,
    "version": 2.0,
    "dark_module": 1.0,
    "data": 1.0,
}
VARIANT_ROBUSTNESS: dict[str, float] = {"native": 1.0, "upscale": 0.9, "downscale": 0.9, "otsu": 0.8, "blur": 0.7}
UNDECODED_CAP = 0.6
_MIN_CONTRAST = 32.0
_WEIGHT_BY_ID = np.array([REGION_WEIGHTS[name] for name in REGIONS], dtype=np.float64)


# --------------------------------------------------------------------------- decoders


def _bytes_to_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_zxing(gray: np.ndarray) -> list[str]:
    import zxingcpp

    return [b.text for b in zxingcpp.read_barcodes(gray, formats=zxingcpp.BarcodeFormat.QRCode)]


def _read_zbar(gray: np.ndarray) -> list[str]:
    from pyzbar import pyzbar

    from ._compat import ensure_pyzbar_orientation_fix

    ensure_pyzbar_orientation_fix()
    h, w = gray.shape
    found = pyzbar.decode((np.ascontiguousarray(gray).tobytes(), w, h), symbols=[pyzbar.ZBarSymbol.QRCODE])
    return [_bytes_to_text(s.data) for s in found]


_CV_LOCAL = threading.local()


def _cv_detectors() -> list[Any]:
    dets = getattr(_CV_LOCAL, "dets", None)
    if dets is None:
        import cv2

        dets = []
        for name in ("QRCodeDetectorAruco", "QRCodeDetector"):
            cls = getattr(cv2, name, None)
            if cls is not None:
                try:
                    dets.append(cls())
                except cv2.error:
                    pass
        _CV_LOCAL.dets = dets
    return dets


def _read_opencv(gray: np.ndarray) -> list[str]:
    import cv2

    texts: list[str] = []
    for det in _cv_detectors():
        try:
            text, _points, _straight = det.detectAndDecode(gray)
        except cv2.error:
            continue
        if text:
            texts.append(text)
            break
    return texts


_READERS = {"zxing": _read_zxing, "zbar": _read_zbar, "opencv": _read_opencv}
_AVAILABLE: tuple[str, ...] | None = None


def available_decoders() -> tuple[str, ...]:
    """Decoders whose library imports here (zbar also needs the libzbar0 system library)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        found = []
        try:
            import zxingcpp  # noqa: F401

            found.append("zxing")
        except ImportError:
            pass
        try:
            from pyzbar import pyzbar  # noqa: F401

            found.append("zbar")
        except (ImportError, OSError):
            pass
        try:
            import cv2

            if hasattr(cv2, "QRCodeDetector"):
                found.append("opencv")
        except ImportError:
            pass
        _AVAILABLE = tuple(found)
    return _AVAILABLE


def resolve_decoders(decoders: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate a decoder list (``"zxing,zbar"`` or a sequence); keep the installed ones."""
    if decoders is None:
        decoders = DEFAULT_DECODERS
    if isinstance(decoders, str):
        decoders = [d for d in decoders.split(",") if d.strip()]
    names = [str(d).strip().lower() for d in decoders]
    if not names:
        raise QRRLError(f"no decoder given: use some of {', '.join(KNOWN_DECODERS)}")
    bad = [d for d in names if d not in KNOWN_DECODERS]
    if bad:
        raise QRRLError(f"unknown decoder(s) {', '.join(bad)}: valid decoders are {', '.join(KNOWN_DECODERS)}")
    avail = available_decoders()
    usable = tuple(dict.fromkeys(d for d in names if d in avail))
    if not usable:
        raise QRRLError(
            f"none of the decoders {', '.join(names)} is installed here (installed: {', '.join(avail) or 'none'}); "
            "pip install zxing-cpp (or pyzbar + the libzbar0 system package, or opencv-python-headless)"
        )
    return usable


# --------------------------------------------------------------------------- variants


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _variants(gray: np.ndarray, cell_px: float | None) -> Iterator[tuple[str, np.ndarray, frozenset[str]]]:
    """(name, image, decoders allowed on it), cheap and likely first.

    ``cell_px`` = pixels per module in this image when known. On hints blended with texture
    zbar and OpenCV decode more, and faster, on an area downscale to ~4 px/module than on the
    native image (docs/benchmarks.md, "Scan reward throughput"), so when modules are large they
    only see the downscaled variants; zxing is cheap enough to try everything.
    """
    import cv2

    everyone = frozenset(KNOWN_DECODERS)
    zxing_only = frozenset({"zxing"})
    downscale = cell_px is not None and cell_px > 6
    yield "native", gray, (zxing_only if downscale else everyone)
    base = gray
    if cell_px is not None:
        upscale = 1 if cell_px >= 4 else 2 if cell_px >= 2 else 4
    else:
        upscale = 2 if min(gray.shape) < 400 else 1
    while upscale > 1 and max(gray.shape) * upscale > 2048:
        upscale //= 2
    if upscale > 1:
        base = cv2.resize(gray, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
        yield "upscale", base, frozenset({"zxing", "zbar"})
    if downscale:
        f = 4.0 / cell_px  # type: ignore[operator]
        small = cv2.resize(gray, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        yield "downscale", small, everyone
        base = small
    _, binar = cv2.threshold(base, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    yield "otsu", binar, frozenset({"zxing", "zbar"})
    sigma = 0.3 * cell_px if cell_px else 1.0
    yield "blur", cv2.GaussianBlur(gray, (0, 0), max(0.8, min(sigma, 6.0))), zxing_only


@dataclass
class DecodeResult:
    """What the decoders saw. ``decoders`` lists those that read the payload (or anything,
    when no payload was given); ``text`` is the first text read, right or wrong."""

    decoded: bool
    text: str | None = None
    decoders: list[str] = field(default_factory=list)
    variant: str | None = None
    texts: list[str] = field(default_factory=list)


def _decode_gray(
    gray: np.ndarray,
    payload: str | None,
    decoders: tuple[str, ...],
    cell_px: float | None,
    exhaustive: bool,
) -> DecodeResult:
    result = DecodeResult(decoded=False)
    pending = list(decoders)
    for name, img, allowed in _variants(gray, cell_px):
        for dec in list(pending):
            if dec not in allowed:
                continue
            for text in _READERS[dec](img):
                if text not in result.texts:
                    result.texts.append(text)
                if result.text is None:
                    result.text = text
                if payload is None or text == payload:
                    if not result.decoded:
                        result.decoded, result.variant, result.text = True, name, text
                    result.decoders.append(dec)
                    pending.remove(dec)
                    break
            if result.decoded and not exhaustive:
                return result
        if not pending:
            break
    return result


def decode(
    image: Any,
    payload: str | None = None,
    decoders: str | Sequence[str] | None = DEFAULT_DECODERS,
    module_px: float | None = None,
    exhaustive: bool = False,
) -> DecodeResult:
    """Try to read a QR code from one image; never raises for "no code in the image".

    ``module_px`` (pixels per module in *this* image) lets the cascade upscale tiny modules
    and average texture on large ones; unknown is fine.
    """
    names = resolve_decoders(decoders)
    gray = _gray(to_uint8_rgb(image))
    return _decode_gray(gray, payload, names, module_px, exhaustive)


# --------------------------------------------------------------------------- modules


def _geometry(shape: tuple[int, int], code: QRCode) -> tuple[float, float]:
    """Image pixels per hint pixel along y and x (the image is the hint, resized)."""
    s = float(code.image_size)
    return shape[0] / s, shape[1] / s


def sample_modules(gray: np.ndarray, code: QRCode) -> np.ndarray:
    """Centre-weighted mean luminance of every module, float64 ``[N, N]``."""
    import cv2

    g = gray.astype(np.float32)
    sy, sx = _geometry(g.shape, code)
    cell = code.module_px * min(sy, sx)
    extra = 1.0
    if cell > 10.0:  # area-downscale first: cheaper blur, same centre-weighted mean
        extra = 8.0 / cell
        g = cv2.resize(g, None, fx=extra, fy=extra, interpolation=cv2.INTER_AREA)
        sy, sx = sy * g.shape[0] / gray.shape[0], sx * g.shape[1] / gray.shape[1]
        cell = code.module_px * min(sy, sx)
    sigma = 0.15 * cell
    if sigma >= 0.5:
        g = cv2.GaussianBlur(g, (0, 0), sigma)
    idx = code.border + np.arange(code.size) + 0.5
    ys = np.clip(idx * code.module_px * sy - 0.5, 0, g.shape[0] - 1)
    xs = np.clip(idx * code.module_px * sx - 0.5, 0, g.shape[1] - 1)
    y0 = np.minimum(ys.astype(int), g.shape[0] - 2 if g.shape[0] > 1 else 0)
    x0 = np.minimum(xs.astype(int), g.shape[1] - 2 if g.shape[1] > 1 else 0)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    y1, x1 = np.minimum(y0 + 1, g.shape[0] - 1), np.minimum(x0 + 1, g.shape[1] - 1)
    a = g[np.ix_(y0, x0)]
    b = g[np.ix_(y0, x1)]
    c = g[np.ix_(y1, x0)]
    d = g[np.ix_(y1, x1)]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx).astype(np.float64)


def module_threshold(means: np.ndarray) -> tuple[float, float]:
    """Label-free threshold and contrast: Otsu, refined to the midpoint of the class means."""
    vals = np.clip(means.reshape(-1), 0, 255)
    hist = np.bincount(vals.astype(np.uint8), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    t = float(np.argmax(between)) + 1.0
    lo, hi = vals[vals < t], vals[vals >= t]
    if lo.size and hi.size:
        m_lo, m_hi = float(lo.mean()), float(hi.mean())
        thr = 0.5 * (m_lo + m_hi)
        contrast = m_hi - m_lo
    else:
        thr, contrast = float(vals.mean()), 0.0
    return thr, max(contrast, _MIN_CONTRAST)


@dataclass
class ModuleStats:
    correct: np.ndarray  # bool [N, N]
    soft: np.ndarray  # float [N, N] in [0, 1]
    accuracy: float
    soft_accuracy: float  # the region-weighted q of the module docstring
    region_accuracy: dict[str, float]
    threshold: float


def module_stats(gray: np.ndarray, code: QRCode) -> ModuleStats:
    """Compare the sampled modules of ``gray`` (aligned with the hint) with ``code``."""
    means = sample_modules(gray, code)
    thr, contrast = module_threshold(means)
    sign = np.where(code.modules, 1.0, -1.0)
    margin = sign * (thr - means) / contrast
    correct = margin > 0
    soft = np.clip(0.5 + 2.0 * margin, 0.0, 1.0)
    w = _WEIGHT_BY_ID[code.regions]
    region_acc = {}
    for name in REGIONS:
        sel = code.regions == REGION_IDS[name]
        if sel.any():
            region_acc[name] = float(correct[sel].mean())
    return ModuleStats(
        correct=correct,
        soft=soft,
        accuracy=float(correct.mean()),
        soft_accuracy=float((w * soft).sum() / w.sum()),
        region_accuracy=region_acc,
        threshold=thr,
    )


def error_overlay(rgb: np.ndarray, code: QRCode, correct: np.ndarray) -> np.ndarray:
    """The image dimmed, wrong modules tinted red, right ones lightly green (uint8 RGB)."""
    import cv2

    h, w = rgb.shape[:2]
    sy, sx = _geometry((h, w), code)
    n = code.size
    my = np.floor((np.arange(h) + 0.5) / (code.module_px * sy)).astype(int) - code.border
    mx = np.floor((np.arange(w) + 0.5) / (code.module_px * sx)).astype(int) - code.border
    vy, vx = (my >= 0) & (my < n), (mx >= 0) & (mx < n)
    alpha = np.zeros((n + 1, n + 1), dtype=np.float32)  # last row/col: outside the symbol
    alpha[:n, :n] = np.where(correct, 0.18, 0.6)
    tint = np.zeros((n + 1, n + 1, 3), dtype=np.float32)
    tint[:n, :n] = np.where(correct[..., None], (0.0, 255.0 * 0.18, 0.0), (255.0 * 0.6, 0.0, 0.0))
    rows, cols = np.where(vy, my, n), np.where(vx, mx, n)
    keep = (1.0 - alpha)[rows][:, cols][..., None]
    add = tint[rows][:, cols]
    dim = cv2.convertScaleAbs(rgb, alpha=0.55, beta=40.0).astype(np.float32)
    return cv2.convertScaleAbs(dim * keep + add)


# --------------------------------------------------------------------------- score


@dataclass
class ScanResult:
    decoded: bool
    text: str | None
    decoders: list[str]
    variant: str | None
    module_accuracy: float
    region_accuracy: dict[str, float]
    scan_score: float
    overlay: np.ndarray | None = None
    module_correct: np.ndarray | None = None
    soft_accuracy: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (no images or per-module maps)."""
        d = asdict(self)
        for key in ("overlay", "module_correct"):
            d.pop(key, None)
        return d


def combine_score(soft_accuracy: float, decoded: bool, variant: str | None) -> float:
    """The ``scan_score`` formula of the module docstring."""
    if not decoded:
        return UNDECODED_CAP * soft_accuracy
    r = VARIANT_ROBUSTNESS.get(variant or "", 0.7)
    return UNDECODED_CAP + (1.0 - UNDECODED_CAP) * soft_accuracy * r


def scan_image(
    image: Any,
    code: QRCode,
    decoders: str | Sequence[str] | None = DEFAULT_DECODERS,
    overlay: bool = True,
    exhaustive: bool = False,
) -> ScanResult:
    """Decode ``image`` and measure its modules against ``code`` (image aligned with the hint)."""
    names = resolve_decoders(decoders)
    rgb = to_uint8_rgb(image)
    gray = _gray(rgb)
    sy, sx = _geometry(gray.shape, code)
    dec = _decode_gray(gray, code.payload, names, code.module_px * min(sy, sx), exhaustive)
    stats = module_stats(gray, code)
    return ScanResult(
        decoded=dec.decoded,
        text=dec.text,
        decoders=dec.decoders,
        variant=dec.variant,
        module_accuracy=stats.accuracy,
        region_accuracy=stats.region_accuracy,
        scan_score=combine_score(stats.soft_accuracy, dec.decoded, dec.variant),
        overlay=error_overlay(rgb, code, stats.correct) if overlay else None,
        module_correct=stats.correct,
        soft_accuracy=stats.soft_accuracy,
    )


def _codes_for(n: int, code_or_codes: QRCode | Sequence[QRCode]) -> list[QRCode]:
    if isinstance(code_or_codes, QRCode):
        return [code_or_codes] * n
    codes = list(code_or_codes)
    if len(codes) == 1:
        return codes * n
    if len(codes) != n:
        raise QRRLError(f"got {n} images but {len(codes)} QR codes: give one code, or one per image")
    return codes


def scan_batch(
    images: Any,
    code_or_codes: QRCode | Sequence[QRCode],
    decoders: str | Sequence[str] | None = DEFAULT_DECODERS,
    overlay: bool = True,
    exhaustive: bool = False,
) -> list[ScanResult]:
    """:func:`scan_image` over a batch (``[B,H,W,C]`` tensor/array or a list of images)."""
    names = resolve_decoders(decoders)
    batch = to_batch(images)
    codes = _codes_for(len(batch), code_or_codes)
    return [scan_image(im, c, names, overlay=overlay, exhaustive=exhaustive) for im, c in zip(batch, codes)]


def results_to_reward(results: Sequence[ScanResult]) -> Reward:
    """Pack scan results as a ``Reward`` (total = scan_score).

    The total and the ``scan_score`` component are separate arrays: a shard stores both, and
    safetensors refuses tensors that share memory.
    """
    score = np.array([r.scan_score for r in results], dtype=np.float64)
    return Reward(
        total=score.copy(),
        components={
            "decoded": np.array([float(r.decoded) for r in results]),
            "module_accuracy": np.array([r.module_accuracy for r in results]),
            "scan_score": score,
        },
        details=[
            {"decoder": r.decoders[0] if r.decoders else None, "variant": r.variant, "text": r.text}
            for r in results
        ],
    )


def scan_reward(
    images: Any,
    code_or_codes: QRCode | Sequence[QRCode],
    decoders: str | Sequence[str] | None = DEFAULT_DECODERS,
) -> Reward:
    """The scan reward of a batch: components ``decoded``, ``module_accuracy``, ``scan_score``."""
    return results_to_reward(scan_batch(images, code_or_codes, decoders, overlay=False))
