"""The synthetic "QR art" world of the embedded toy model: prompts, base images, QR blends.

Why a procedural world: nobody can download SD1.5 here, yet ``qr-rl demo`` must show the
whole idea (RL + curriculum make art scan) on a 2-core CPU. A world of coloured patterns named
by short prompts ("yellow rings on dark blue") is rich enough that a tiny text-conditioned
diffusion model has something to learn, that art and QR modules fight over the same pixels,
and that an image-text model can tell the patterns apart -- and it renders in microseconds.

Everything is seeded: ``render_base(spec, seed)`` always gives the same image.
Images are float32 ``[3, H, W]`` in ``[0, 1]`` (the toy diffusion model works on ``2x-1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import QRRLError

IMAGE_SIZE = 64
#: The toy "latent": the [-1, 1] image folded 2x2 into channels (pixel unshuffle), 12x32x32.
#: A fixed, lossless stand-in for SD's VAE that makes the UNet and the 8x hint 4x cheaper.
LATENT_FACTOR = 2
LATENT_SIZE = IMAGE_SIZE // LATENT_FACTOR
LATENT_CHANNELS = 3 * LATENT_FACTOR**2
PATTERNS: tuple[str, ...] = ("rings", "stripes", "checks", "dots", "waves", "blobs")
FOREGROUNDS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.12),
    "orange": (0.98, 0.55, 0.10),
    "yellow": (0.97, 0.88, 0.20),
    "green": (0.25, 0.80, 0.30),
    "cyan": (0.20, 0.85, 0.90),
    "pink": (0.98, 0.50, 0.75),
    "white": (0.95, 0.95, 0.93),
    "purple": (0.62, 0.35, 0.90),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "dark blue": (0.06, 0.10, 0.38),
    "dark green": (0.05, 0.28, 0.12),
    "dark red": (0.35, 0.05, 0.07),
    "black": (0.04, 0.04, 0.05),
    "gray": (0.45, 0.45, 0.47),
}
#: Token 0 pads, then one id per word, then start/end of text (end = the largest id, as
#: open_clip's text tower pools the embedding at the argmax token).
_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [w for name in FOREGROUNDS for w in name.split()]
        + list(PATTERNS)
        + ["on"]
        + [w for name in BACKGROUNDS for w in name.split()]
    )
)
PAD_ID = 0
WORD_IDS: dict[str, int] = {w: i + 1 for i, w in enumerate(_WORDS)}
SOT_ID = len(_WORDS) + 1
EOT_ID = len(_WORDS) + 2
VOCAB_SIZE = len(_WORDS) + 3
CONTEXT_LENGTH = 8


@dataclass(frozen=True)
class PromptSpec:
    """One point of the world: foreground colour, pattern, background colour."""

    fg: str
    pattern: str
    bg: str

    @property
    def prompt(self) -> str:
        return f"{self.fg} {self.pattern} on {self.bg}"


def all_specs() -> list[PromptSpec]:
    """Every prompt of the world (8 colours x 6 patterns x 5 backgrounds = 240)."""
    return [PromptSpec(f, p, b) for p in PATTERNS for f in FOREGROUNDS for b in BACKGROUNDS]


def parse_prompt(prompt: str) -> PromptSpec:
    """``"yellow rings on dark blue"`` -> ``PromptSpec``; QRRLError lists the vocabulary."""
    text = " ".join(str(prompt).lower().split())
    for spec in all_specs():
        if spec.prompt == text:
            return spec
    raise QRRLError(
        f"prompt {prompt!r} is not in the toy world: use '<colour> <pattern> on <background>' with colour in "
        f"{', '.join(FOREGROUNDS)}; pattern in {', '.join(PATTERNS)}; background in {', '.join(BACKGROUNDS)}"
    )


def tokenize(prompts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids ``[N, context_length]`` (int64): SOT, words, EOT, padding; "" gives SOT EOT.

    Callable like an open_clip tokenizer, so the toy image-text model plugs into ClipScorer.
    Unknown words raise QRRLError naming the vocabulary.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = torch.full((len(prompts), context_length), PAD_ID, dtype=torch.long)
    for i, text in enumerate(prompts):
        words = str(text).lower().split()
        unknown = [w for w in words if w not in WORD_IDS]
        if unknown:
            raise QRRLError(f"words {unknown} are not in the toy vocabulary ({', '.join(_WORDS)})")
        ids = [SOT_ID] + [WORD_IDS[w] for w in words][: context_length - 2] + [EOT_ID]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


# --------------------------------------------------------------------------------------------
# patterns


def _soft(v: np.ndarray, sharp: float) -> np.ndarray:
    """A smooth step (anti-aliased edge) of a signed field."""
    return 1.0 / (1.0 + np.exp(-sharp * v))


def pattern_mask(pattern: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Float32 ``[size, size]`` in [0, 1]: where the foreground colour goes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    sharp = 12.0
    if pattern == "rings":
        cy, cx = rng.uniform(0.2, 0.8, 2)
        freq = rng.uniform(3.0, 6.0)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        field = np.sin(2 * math.pi * freq * r + rng.uniform(0, 2 * math.pi))
    elif pattern == "stripes":
        ang = rng.uniform(0, math.pi)
        freq = rng.uniform(3.0, 6.0)
        field = np.sin(2 * math.pi * freq * (xx * math.cos(ang) + yy * math.sin(ang)) + rng.uniform(0, 2 * math.pi))
    elif pattern == "checks":
        ang = rng.uniform(0, math.pi / 2)
        freq = rng.uniform(2.0, 4.0)
        u = xx * math.cos(ang) + yy * math.sin(ang)
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        ph = rng.uniform(0, 2 * math.pi, 2)
        field = np.sin(2 * math.pi * freq * u + ph[0]) * np.sin(2 * math.pi * freq * v + ph[1])
        sharp = 20.0
    elif pattern == "dots":
        freq = rng.uniform(3.0, 5.0)
        ph = rng.uniform(0, 1, 2)
        u = (xx * freq + ph[0]) % 1.0 - 0.5
        v = (yy * freq + ph[1]) % 1.0 - 0.5
        field = (rng.uniform(0.25, 0.35) - np.sqrt(u * u + v * v)) * 4.0
    elif pattern == "waves":
        freq = rng.uniform(3.0, 5.0)
        amp = rng.uniform(0.05, 0.12)
        wf = rng.uniform(1.5, 3.0)
        field = np.sin(2 * math.pi * freq * (yy + amp * np.sin(2 * math.pi * wf * xx + rng.uniform(0, 6.3))))
    elif pattern == "blobs":
        coarse = rng.standard_normal((5, 5)).astype(np.float32)
        t = torch.from_numpy(coarse)[None, None]
        field = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
        field = field - np.median(field)
        sharp = 6.0
    else:
        raise QRRLError(f"unknown pattern {pattern!r}; patterns: {', '.join(PATTERNS)}")
    return _soft(field, sharp).astype(np.float32)


def render_base(spec: PromptSpec, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The base image of ``spec`` for ``seed``: float32 ``[3, size, size]`` in [0, 1]."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, PATTERNS.index(spec.pattern)])
    m = pattern_mask(spec.pattern, rng, size)[None]
    jitter = rng.uniform(-0.05, 0.05, 3).astype(np.float32)[:, None, None]
    fg = np.clip(np.asarray(FOREGROUNDS[spec.fg], np.float32)[:, None, None] + jitter, 0, 1)
    bg = np.clip(np.asarray(BACKGROUNDS[spec.bg], np.float32)[:, None, None] + jitter * 0.5, 0, 1)
    return (bg * (1.0 - m) + fg * m).astype(np.float32)


def random_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE) -> tuple[list[PromptSpec], np.ndarray]:
    """``n`` random (spec, base image) pairs: specs and float32 ``[n, 3, size, size]``."""
    specs = all_specs()
    picks = [specs[int(i)] for i in rng.integers(0, len(specs), n)]
    seeds = rng.integers(0, 2**31 - 1, n)
    return picks, np.stack([render_base(s, int(sd), size) for s, sd in zip(picks, seeds)])


# --------------------------------------------------------------------------------------------
# QR codes in the toy world

QR_VERSION = 1
QR_ECC = "H"
QR_BORDER = 2
HINT_SIZE = 8 * LATENT_SIZE  # the ControlNet hint is 8x the latent, as for SD1.5
_PAYLOAD_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def toy_code(payload: str, mask: int | None = None):
    """The toy world's QR code: version 1, ECC H, 2-module quiet zone (25 modules across)."""
    from ..qr import encode

    return encode(payload, ecc=QR_ECC, version=QR_VERSION, mask=mask, module_px=1, border=QR_BORDER)


def random_payload(rng: np.random.Generator) -> str:
    """A random 4-7 character alphanumeric payload (fits version 1 at ECC H)."""
    n = int(rng.integers(4, 8))
    return "".join(_PAYLOAD_CHARS[int(i)] for i in rng.integers(0, len(_PAYLOAD_CHARS), n))


def code_image(code, size: int) -> torch.Tensor:
    """The code's module grid (quiet zone light) as float32 ``[1, size, size]``, 1 = light.

    Resized with area averaging, so module edges fall between pixels exactly as the scan
    reward's geometry (image = hint resized) expects.
    """
    grid = torch.from_numpy((~code.module_grid()).astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True)[0]


def hint_image(code) -> torch.Tensor:
    """The ControlNet hint: black-on-white code, float32 ``[3, HINT_SIZE, HINT_SIZE]`` in [0, 1]."""
    grid = torch.from_numpy((~code.module_grid()).astype(np.float32))[None, None]
    big = torch.nn.functional.interpolate(grid, size=(HINT_SIZE, HINT_SIZE), mode="nearest-exact")[0]
    return big.expand(3, -1, -1).contiguous()


def blend(base: torch.Tensor, light: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Weave a code into art: ``(1 - w)·base + w·code`` (code: 1 light, 0 dark), in [0, 1].

    ``weight`` is a float or ``[B]``; the ControlNet is pretrained to produce this blend
    with ``w = BLEND_PER_STRENGTH · strength``.
    """
    w = torch.as_tensor(weight, dtype=base.dtype, device=base.device)
    if w.ndim == 1:
        w = w.view(-1, 1, 1, 1)
    return (1.0 - w) * base + w * light.to(base.dtype)
