"""Payload -> QR module matrix, region map and hint image.

Why segno: it is pure Python (no native build to break inside ComfyUI's venv), it takes the
version, error-correction level and mask explicitly, and its ``matrix_iter(verbose=True)``
reports the *type* of every module (finder, separator, timing, alignment, format, version,
dark module, data). That type map is what the scan reward needs to weight function patterns
and to report per-region accuracy. We always pass ``boost_error=False``: segno would otherwise
silently raise the ECC level when the payload leaves room, and the ECC stored in a shard
would then not be the one the user chose.

Colours: ControlNet "QR Code Monster v2" expects a mid-gray background, so the light colour
``MONSTER_V2_LIGHT`` (``#808080``) is provided; other QR ControlNets use black on white.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QRRLError

ECC_LEVELS: tuple[str, ...] = ("L", "M", "Q", "H")
REGIONS: tuple[str, ...] = (
    "finder",
    "separator",
    "alignment",
    "timing",
    "format",
    "version",
    "dark_module",
    "data",
)
REGION_IDS: dict[str, int] = {name: i for i, name in enumerate(REGIONS)}
#: Region id used for the quiet zone when a map includes the border (never inside ``regions``).
QUIET_ZONE_ID = len(REGIONS)
MONSTER_V2_LIGHT = "#808080"
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}
COLOUR_FORMS = '"#RRGGBB", "#RGB", "r,g,b" (0-255 each) or one of black/white/gray'

# segno module types: a light type t < 256, its dark variant is t << 8.
_SEGNO_BASE_TO_REGION = {
    6: "finder",
    8: "separator",
    10: "alignment",
    12: "timing",
    14: "format",
    16: "version",
    2: "dark_module",
    4: "data",
}
_MODE_CCI_BITS = {  # character-count-indicator bits for versions 1-9, 10-26, 27-40
    "numeric": (10, 12, 14),
    "alphanumeric": (9, 11, 13),
    "byte": (8, 16, 16),
}
_ALNUM = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")

Colour = tuple[int, int, int]


def parse_colour(value: str | tuple[int, int, int] | list[int], what: str = "colour") -> Colour:
    """Parse ``#RRGGBB``, ``#RGB``, ``r,g,b`` or a colour name into an RGB tuple."""
    if isinstance(value, (tuple, list)):
        parts: list[Any] = list(value)
    else:
        text = str(value).strip().lower()
        if text in NAMED_COLOURS:
            return NAMED_COLOURS[text]
        if text.startswith("#"):
            hexpart = text[1:]
            if len(hexpart) == 3:
                hexpart = "".join(c * 2 for c in hexpart)
            if len(hexpart) == 6:
                try:
                    return (int(hexpart[0:2], 16), int(hexpart[2:4], 16), int(hexpart[4:6], 16))
                except ValueError:
                    pass
            raise QRRLError(f"bad {what} {value!r}: use {COLOUR_FORMS}")
        parts = text.split(",")
    try:
        rgb = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        raise QRRLError(f"bad {what} {value!r}: use {COLOUR_FORMS}") from None
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise QRRLError(f"bad {what} {value!r}: use {COLOUR_FORMS}")
    return rgb  # type: ignore[return-value]


def colour_hex(rgb: Colour) -> str:
    return "#{:02X}{:02X}{:02X}".format(*rgb)


def _payload_mode(payload: str) -> str:
    if payload.isdigit() and payload.isascii():
        return "numeric"
    if set(payload) <= _ALNUM:
        return "alphanumeric"
    return "byte"


def _payload_bytes(payload: str) -> int:
    try:
        return len(payload.encode("latin-1"))
    except UnicodeEncodeError:
        return len(payload.encode("utf-8"))


def capacity(version: int, ecc: str, mode: str = "byte") -> int:
    """How many characters (bytes in byte mode) fit in ``version`` at ``ecc`` in ``mode``."""
    from segno import consts

    bits = consts.SYMBOL_CAPACITY[version][consts.ERROR_MAPPING[ecc]]
    cci = _MODE_CCI_BITS[mode][0 if version < 10 else 1 if version < 27 else 2]
    avail = bits - 4 - cci
    if avail <= 0:
        return 0
    if mode == "numeric":
        rest = avail % 10
        return 3 * (avail // 10) + (2 if rest >= 7 else 1 if rest >= 4 else 0)
    if mode == "alphanumeric":
        return 2 * (avail // 11) + (1 if avail % 11 >= 6 else 0)
    return avail // 8


def _too_long_message(payload: str, ecc: str, version: int | None) -> str:
    mode = _payload_mode(payload)
    unit = "bytes" if mode == "byte" else f"{mode} characters"
    length = _payload_bytes(payload) if mode == "byte" else len(payload)
    smallest = next((v for v in range(1, 41) if capacity(v, ecc, mode) >= length), None)
    if version is not None:
        msg = (
            f"payload is {length} {unit} but QR version {version} at ECC {ecc} holds at most "
            f"{capacity(version, ecc, mode)} {unit}"
        )
    else:
        msg = f"payload is {length} {unit}"
    if smallest is not None:
        return msg + f"; the smallest version that fits at ECC {ecc} is {smallest} (or use a lower ECC)"
    best = next((e for e in reversed(ECC_LEVELS) if capacity(40, e, mode) >= length), None)
    hint = f"use ECC {best}" if best and best != ecc else "shorten the payload (e.g. a URL shortener)"
    return (
        msg + f"; even version 40 at ECC {ecc} holds only {capacity(40, ecc, mode)} {unit}: {hint}"
    )


@dataclass(frozen=True, eq=False)
class QRCode:
    """An encoded QR code plus how it is rendered as a ControlNet hint.

    ``modules`` is the N x N symbol without quiet zone (True = dark); ``regions`` holds a
    ``REGION_IDS`` id per module. The hint image is ``(N + 2*border) * module_px`` square.
    """

    payload: str
    modules: np.ndarray
    regions: np.ndarray
    version: int
    ecc: str
    mask: int
    module_px: int = 16
    border: int = 4
    dark: Colour = (0, 0, 0)
    light: Colour = (255, 255, 255)

    @property
    def size(self) -> int:
        return int(self.modules.shape[0])

    @property
    def image_size(self) -> int:
        return (self.size + 2 * self.border) * self.module_px

    def module_grid(self) -> np.ndarray:
        """Bool matrix including the quiet zone (N + 2*border square)."""
        return np.pad(self.modules, self.border, constant_values=False)

    def render(self) -> np.ndarray:
        """The hint image, uint8 ``[H, W, 3]`` (light colour in the quiet zone)."""
        grid = np.kron(self.module_grid(), np.ones((self.module_px, self.module_px), dtype=bool))
        out = np.empty(grid.shape + (3,), dtype=np.uint8)
        out[...] = np.asarray(self.light, dtype=np.uint8)
        out[grid] = np.asarray(self.dark, dtype=np.uint8)
        return out

    def mask_image(self) -> np.ndarray:
        """Float32 ``[H, W]``: 1 where a dark module is (a ComfyUI MASK)."""
        grid = self.module_grid().astype(np.float32)
        return np.kron(grid, np.ones((self.module_px, self.module_px), dtype=np.float32))

    def matrix_hex(self) -> str:
        return np.packbits(self.modules.reshape(-1)).tobytes().hex()

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able description; the packed matrix lets a shard reader recheck it."""
        return {
            "payload": self.payload,
            "version": self.version,
            "ecc": self.ecc,
            "mask": self.mask,
            "module_px": self.module_px,
            "border": self.border,
            "dark": colour_hex(self.dark),
            "light": colour_hex(self.light),
            "size": self.size,
            "matrix": self.matrix_hex(),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> QRCode:
        """Re-encode from ``to_metadata()`` output and check the matrix is the same."""
        try:
            code = encode(
                meta["payload"],
                ecc=meta["ecc"],
                version=int(meta["version"]),
                mask=int(meta["mask"]),
                module_px=int(meta.get("module_px", 16)),
                border=int(meta.get("border", 4)),
                dark=meta.get("dark", "#000000"),
                light=meta.get("light", "#FFFFFF"),
            )
        except KeyError as exc:
            raise QRRLError(f"QR metadata lacks the field {exc.args[0]!r}") from None
        if "matrix" in meta and meta["matrix"] != code.matrix_hex():
            raise QRRLError(
                "QR metadata matrix differs from a fresh encoding of its payload/version/ECC/mask "
                "(made by an incompatible encoder?); re-encode the hint"
            )
        return code

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QRCode):
            return NotImplemented
        return self.to_metadata() == other.to_metadata()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_metadata().items())))


def encode(
    payload: str,
    ecc: str = "H",
    version: int | None = None,
    mask: int | None = None,
    module_px: int = 16,
    border: int = 4,
    dark: str | Colour = "#000000",
    light: str | Colour = "#FFFFFF",
) -> QRCode:
    """Encode ``payload`` as a (non-micro) QR code.

    ``version``/``mask`` None = the smallest version / segno's best mask. For QR Code
    Monster v2 pass ``light=MONSTER_V2_LIGHT`` (mid-gray).
    """
    import segno

    if not isinstance(payload, str) or payload == "":
        raise QRRLError("payload is empty: give the text or URL the QR code should contain")
    ecc_u = str(ecc).strip().upper()
    if ecc_u not in ECC_LEVELS:
        raise QRRLError(f"bad ECC level {ecc!r}: use one of L, M, Q, H (H survives most art)")
    if version is not None and not (isinstance(version, (int, np.integer)) and 1 <= int(version) <= 40):
        raise QRRLError(f"QR version must be 1-40 (or auto), got {version!r}")
    if mask is not None and not (isinstance(mask, (int, np.integer)) and 0 <= int(mask) <= 7):
        raise QRRLError(f"QR mask must be 0-7 (or auto), got {mask!r}")
    if not isinstance(module_px, (int, np.integer)) or module_px < 1:
        raise QRRLError(f"module_px must be an integer >= 1 (pixels per module), got {module_px!r}")
    if not isinstance(border, (int, np.integer)) or border < 0:
        raise QRRLError(f"border must be an integer >= 0 (quiet-zone modules; 4 is standard), got {border!r}")
    dark_rgb = parse_colour(dark, "dark colour")
    light_rgb = parse_colour(light, "light colour")
    try:
        qr = segno.make(
            payload,
            error=ecc_u,
            version=None if version is None else int(version),
            mask=None if mask is None else int(mask),
            micro=False,
            boost_error=False,
        )
    except segno.DataOverflowError:
        raise QRRLError(_too_long_message(payload, ecc_u, version)) from None
    modules, regions = _matrix_and_regions(qr)
    return QRCode(
        payload=payload,
        modules=modules,
        regions=regions,
        version=int(qr.version),
        ecc=ecc_u,
        mask=int(qr.mask),
        module_px=int(module_px),
        border=int(border),
        dark=dark_rgb,
        light=light_rgb,
    )


def _matrix_and_regions(qr: Any) -> tuple[np.ndarray, np.ndarray]:
    types = np.array(list(qr.matrix_iter(scale=1, border=0, verbose=True)), dtype=np.int32)
    dark = types >= 256
    base = np.where(dark, types >> 8, types)
    regions = np.full(types.shape, REGION_IDS["data"], dtype=np.uint8)
    for seg_base, name in _SEGNO_BASE_TO_REGION.items():
        regions[base == seg_base] = REGION_IDS[name]
    modules = dark.copy()
    modules.setflags(write=False)
    regions.setflags(write=False)
    return modules, regions


def code_from_hint(image: Any, payload: str, ecc: str | None = None) -> QRCode:
    """Recover the ``QRCode`` (version, ECC, mask, module px, border, colours) from a hint.

    Why: ``qr-rl scan --hint qr.png`` should not ask for the encode options again. The dark
    bounding box is the symbol (three corners are finder patterns), the first dark run of its
    top row is the 7-module finder edge, which gives the module size, N and the version; then
    each ECC level x mask is encoded and the one whose matrix matches the sampled modules wins.
    """
    from .image_io import to_uint8_rgb

    rgb = to_uint8_rgb(image)
    gray = rgb.astype(np.float32).mean(axis=2)
    lo, hi = float(gray.min()), float(gray.max())
    if hi - lo < 16:
        raise QRRLError("hint image has no contrast: it does not look like a rendered QR code")
    dark_px = gray < (lo + hi) / 2
    ys, xs = np.nonzero(dark_px)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    row = dark_px[y0, x0:x1]
    run = int(np.argmin(row)) if not row.all() else row.size
    px = run / 7.0
    n_float = (x1 - x0) / px
    n = int(round(n_float))
    if px <= 0 or (n - 17) % 4 or not 21 <= n <= 177 or abs(n_float - n) > 0.2:
        raise QRRLError("could not find the QR finder pattern geometry in the hint image; pass the encode options instead")
    version = (n - 17) // 4
    centres_y = y0 + (np.arange(n) + 0.5) * ((y1 - y0) / n)
    centres_x = x0 + (np.arange(n) + 0.5) * px
    sampled = dark_px[np.ix_(centres_y.astype(int), centres_x.astype(int))]
    module_px = max(1, int(round(px)))
    border = int(round(x0 / px))
    dark_rgb = tuple(int(v) for v in np.median(rgb[dark_px], axis=0))
    light_rgb = tuple(int(v) for v in np.median(rgb[~dark_px], axis=0))
    levels = [str(ecc).upper()] if ecc else ["H", "Q", "M", "L"]
    for level in levels:
        for mask in range(8):
            try:
                code = encode(payload, ecc=level, version=version, mask=mask, module_px=module_px,
                              border=border, dark=dark_rgb, light=light_rgb)
            except QRRLError:
                break
            if np.array_equal(code.modules, sampled):
                return code
    raise QRRLError(
        f"the hint image is a version-{version} QR code but no ECC/mask encoding of payload "
        f"{payload!r} reproduces it: is it the hint for a different payload?"
    )
