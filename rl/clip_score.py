"""open_clip image–text and image–image similarity as a [0, 1] reward.

Why this module: the CLIP Similarity Reward node and the trainer need "does the QR art still
look like the prompt / like the base picture" as a number per image. Everything runs offline:
the architecture comes from open_clip's built-in configs (``create_model(arch,
pretrained=None)``) and the weights from a *local* file that we load ourselves (safetensors, or
``torch.load(weights_only=True)``), strictly, so a file for another architecture is reported
instead of half-loaded. Preprocessing is done in torch on the scorer's device for the whole
batch at once (no PIL round trip per image).

Mapping cosines to rewards. Raw CLIP cosines do not use the range [-1, 1]: an image–text pair
typically scores 0.10–0.35 (0.30 is already a good match for ViT-B-32), an image against a
related image 0.5–1.0 (1.0 for the image itself). We therefore use an affine map with clamp::

    reward = clip((cos - lo) / (hi - lo), 0, 1)

with defaults ``text: lo=0.10, hi=0.35`` and ``image: lo=0.50, hi=1.00`` (so an image scored
against itself gets exactly 1.0). Both ranges can be overridden per call.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QRRLError
from .image_io import to_batch
from .reward import Reward

WEIGHT_EXTENSIONS: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth")

#: Default (lo, hi) cosine ranges mapped linearly onto reward 0..1 (see module docstring).
DEFAULT_RANGES: dict[str, tuple[float, float]] = {"text": (0.10, 0.35), "image": (0.50, 1.00)}

# Scalars that OpenAI's TorchScript checkpoints carry next to the weights.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_TEXT_CACHE_SIZE = 256


def _open_clip():
    """Import open_clip behind the CPU-torch/CUDA-torchvision guard."""
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    return open_clip


def list_architectures() -> list[str]:
    """Names of the open_clip architectures built into the installed open_clip."""
    return list(_open_clip().list_models())


# ----------------------------------------------------------------------------- weights files


def _weight_files(folder: Path, limit: int = 40) -> list[str]:
    """Weight files under ``folder`` (recursively, relative names), at most ``limit``."""
    if not folder.is_dir():
        return []
    found: list[str] = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in WEIGHT_EXTENSIONS:
            found.append(path.relative_to(folder).as_posix())
            if len(found) >= limit:
                break
    return found


def _describe_folder(folder: Path) -> str:
    if not folder.is_dir():
        return f"{folder} (folder does not exist)"
    files = _weight_files(folder)
    listing = ", ".join(files) if files else "no .safetensors/.bin/.pt/.pth files"
    return f"{folder} (found: {listing})"


def resolve_weights(name_or_path: str | os.PathLike[str], search_dirs: Sequence[Path] = ()) -> Path:
    """Find a weights file: an existing path (absolute or relative) wins, else ``search_dirs``.

    ``name_or_path`` may be a bare file name or a sub-path inside one of ``search_dirs`` (as
    ComfyUI lists ``models/open_clip``); a name without extension also matches
    ``name.safetensors`` / ``.bin`` / ``.pt`` / ``.pth``. Raises ``QRRLError`` listing every
    folder searched and the weight files found there.
    """
    raw = str(name_or_path).strip()
    if not raw:
        raise QRRLError(
            "no open_clip weights file given: pass a .safetensors/.bin/.pt/.pth file "
            + (f"from {', '.join(str(d) for d in search_dirs)}" if search_dirs else "path")
        )
    given = Path(raw).expanduser()
    if given.is_file():
        return given
    candidates = [given]
    for folder in search_dirs:
        candidates.append(Path(folder) / raw)
    if given.suffix.lower() not in WEIGHT_EXTENSIONS:
        candidates += [c.with_name(c.name + ext) for c in list(candidates) for ext in WEIGHT_EXTENSIONS]
    for cand in candidates:
        if cand.is_file():
            return cand
    folders: list[Path] = []
    parent = given.parent if given.is_absolute() or given.parent != Path(".") else None
    if given.is_dir():
        parent = given
    if parent is not None:
        folders.append(parent.resolve())
    folders += [Path(d) for d in search_dirs]
    if not folders:
        folders.append(Path.cwd())
    searched = "; ".join(_describe_folder(f) for f in folders)
    raise QRRLError(
        f"open_clip weights {raw!r} not found. Searched: {searched}. Put the weights file there "
        "(e.g. ComfyUI/models/open_clip/) or give its full path."
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling code: safetensors or ``torch.load(weights_only=True)``.

    Unwraps ``{"state_dict": ...}`` (and ``{"model": ...}``) and strips a ``module.`` prefix
    (DDP checkpoints from open_clip's trainer).
    """
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_EXTENSIONS:
        raise QRRLError(
            f"{path}: unsupported weights format {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(WEIGHT_EXTENSIONS)}"
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise QRRLError(
                f"{path} is not a readable safetensors file ({exc}); re-download or re-export it"
            ) from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (TorchScript, corrupt zip), EOFError
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
            hint = (
                "it is a TorchScript archive (e.g. OpenAI's original .pt); export its state_dict to "
                ".safetensors once in a trusted environment"
                if "TorchScript" in str(exc)
                else "it contains objects other than tensors (a pickle that could run code) or is "
                "corrupt; only plain state dicts are loaded. Convert it to .safetensors in a "
                "trusted environment"
            )
            raise QRRLError(f"refusing to load {path}: {hint} ({text})") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise QRRLError(
            f"{path} does not hold a state dict (got {type(obj).__name__}); expected name → tensor"
        )
    state = {str(k): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise QRRLError(f"{path} is not a plain state dict: entries {bad[:5]} are not tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    for key in _JIT_EXTRA_KEYS:
        state.pop(key, None)
    return state


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def _signature_from_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A few architecture numbers readable from a ViT-style CLIP state dict."""
    sig: dict[str, Any] = {}
    proj = state.get("text_projection")
    if proj is not None and proj.ndim == 2:
        sig["embed_dim"] = int(proj.shape[1])
    conv = state.get("visual.conv1.weight")
    if conv is not None and conv.ndim == 4:
        sig["vision_width"] = int(conv.shape[0])
        sig["patch_size"] = int(conv.shape[2])
        pos = state.get("visual.positional_embedding")
        if pos is not None and pos.ndim == 2:
            grid = math.isqrt(int(pos.shape[0]) - 1)
            if grid * grid == int(pos.shape[0]) - 1:
                sig["image_size"] = grid * sig["patch_size"]
    tok = state.get("token_embedding.weight")
    if tok is not None and tok.ndim == 2:
        sig["text_width"] = int(tok.shape[1])
    for prefix, name in (
        ("visual.transformer.resblocks.", "vision_layers"),
        ("transformer.resblocks.", "text_layers"),
    ):
        blocks = {m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if blocks:
            sig[name] = len(blocks)
    return sig


def _signature_from_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if (
        vision.get("timm_model_name")
        or text.get("hf_model_name")
        or not isinstance(vision.get("layers", 12), int)
    ):
        return None
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0] if len(set(image_size)) == 1 else None
    return {
        "embed_dim": cfg.get("embed_dim"),
        "vision_width": vision.get("width", 768),
        "patch_size": vision.get("patch_size", 16),
        "image_size": image_size,
        "vision_layers": vision.get("layers", 12),
        "text_width": text.get("width", 512),
        "text_layers": text.get("layers", 12),
    }


def guess_architectures(state: Mapping[str, torch.Tensor], limit: int = 4) -> list[str]:
    """Built-in ViT architectures whose sizes match a state dict (cheap shape comparison)."""
    sig = _signature_from_state(state)
    if len(sig) < 4:
        return []
    from open_clip import factory

    matches = []
    for name, cfg in factory._MODEL_CONFIGS.items():
        csig = _signature_from_config(cfg)
        if csig and all(csig.get(k) == v for k, v in sig.items()):
            matches.append(name)
    return matches[:limit]


def _check_compatible(
    model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path
) -> dict[str, torch.Tensor]:
    """Fix harmless layout differences, then raise ``QRRLError`` on any real mismatch."""
    expected = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in expected and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)
    if "logit_bias" in expected and "logit_bias" not in state and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(expected["logit_bias"])
    state.pop("text.transformer.embeddings.position_ids", None)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return state
    parts = []
    if wrong:
        ex = ", ".join(f"{k} file {_shape(state[k])} vs model {_shape(expected[k])}" for k in wrong[:3])
        parts.append(f"{len(wrong)} shape mismatches (e.g. {ex})")
    if missing:
        ex = ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:3])
        parts.append(f"{len(missing)} keys missing from the file (e.g. {ex})")
    if unexpected:
        ex = ", ".join(f"{k} {_shape(state[k])}" for k in unexpected[:3])
        parts.append(f"{len(unexpected)} unexpected keys in the file (e.g. {ex})")
    try:
        guesses = [g for g in guess_architectures(state) if g != arch]
    except Exception:  # a guess is a courtesy; never mask the real error
        guesses = []
    hint = (
        f" The file looks like {', '.join(repr(g) for g in guesses)}: pick that architecture."
        if guesses
        else " Pick the architecture the weights were trained with (see open_clip.list_models())."
    )
    raise QRRLError(
        f"weights file {path} does not fit open_clip architecture {arch!r}: " + "; ".join(parts) + "." + hint
    )


# ----------------------------------------------------------------------------- images


def _to_float_images(images: Any, device: torch.device) -> list[torch.Tensor]:
    """Images → list of float tensors [N,H,W,3] in 0..1 on ``device`` (one per size run, order kept).

    A ComfyUI IMAGE (float tensor [B,H,W,C]) stays in torch on its way to the device, without a
    uint8 round trip. Anything else (numpy, PIL, lists of mixed sizes, gray, RGBA) goes through
    ``rl.image_io.to_batch`` so every reward sees the same RGB (RGBA composited on white).
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        t = images[None] if images.ndim == 3 and images.shape[-1] in (1, 3, 4) else images
        if t.ndim == 4 and t.shape[-1] in (1, 3, 4):
            if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
                raise QRRLError(f"no images to score: the image batch has shape {tuple(t.shape)}")
            t = t.to(device=device, dtype=torch.float32)
            if not torch.isfinite(t).all():
                raise QRRLError("images contain NaN or infinite values")
            t = t.clamp(0.0, 1.0)
            if t.shape[-1] == 4:
                alpha = t[..., 3:4]
                t = t[..., :3] * alpha + (1.0 - alpha)
            elif t.shape[-1] == 1:
                t = t.expand(*t.shape[:-1], 3)
            return [t]
    arrays = to_batch(images)
    if not arrays:
        raise QRRLError("no images to score: the image batch is empty")
    groups: list[list[np.ndarray]] = []
    for arr in arrays:
        if groups and groups[-1][0].shape == arr.shape:
            groups[-1].append(arr)
        else:
            groups.append([arr])
    return [torch.from_numpy(np.stack(g)).to(device).float().div_(255.0) for g in groups]


# ----------------------------------------------------------------------------- scorer


class ClipScorer:
    """An open_clip model plus its tokenizer and preprocessing, ready to score batches.

    Why a class: the node loads it once (CLIP_SCORER) and every reward call reuses the model,
    the per-text embedding cache and the preprocessing constants already on the device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        arch: str = "custom",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        preprocess_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        open_clip = _open_clip()
        self.arch = arch
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = dict(open_clip.get_model_preprocess_cfg(model) or {})
        cfg.update(preprocess_cfg or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size: tuple[int, int] = (
            (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        self.mean: tuple[float, ...] = tuple(
            float(v) for v in (cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        )
        self.std: tuple[float, ...] = tuple(
            float(v) for v in (cfg.get("std") or open_clip.OPENAI_DATASET_STD)
        )
        self.interpolation: str = str(cfg.get("interpolation") or "bicubic")
        self.resize_mode: str = str(cfg.get("resize_mode") or "shortest")
        self.fill_color: float = float(cfg.get("fill_color") or 0) / 255.0
        self._mean_t = torch.tensor(self.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __repr__(self) -> str:
        return f"ClipScorer(arch={self.arch!r}, device={self.device}, dtype={self.dtype}, image_size={self.image_size})"

    # -- constructors

    @classmethod
    def load(
        cls,
        arch: str,
        weights: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        pretrained_tag: str | None = None,
        search_dirs: Sequence[Path] = (),
    ) -> ClipScorer:
        """Build ``arch`` from open_clip's config (no download) and load ``weights`` strictly.

        ``pretrained_tag`` (e.g. ``"openai"``, ``"laion2b_s34b_b79k"``) names the open_clip
        release the weights come from, so that QuickGELU and the preprocessing mean/std/resize
        match it exactly; without it, the preprocessing is taken from the tags if they all
        agree, else from the config. Never touches the network.
        """
        open_clip = _open_clip()
        arch = str(arch).strip()
        known = open_clip.list_models()
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
            raise QRRLError(
                f"unknown open_clip architecture {arch!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (open_clip.list_models() lists all; hub names are not supported offline)"
            )
        path = resolve_weights(weights, search_dirs)
        state = load_state_dict_file(path)
        pp_cfg, quick_gelu = _pretrained_preprocess(open_clip, arch, pretrained_tag)
        if quick_gelu is None and "openai" in path.name.lower() and "quickgelu" not in arch.lower():
            warnings.warn(
                f"{path.name} looks like OpenAI CLIP weights but {arch!r} uses GELU; OpenAI weights "
                f"need QuickGELU: use '{arch}-quickgelu' or pretrained_tag='openai'",
                stacklevel=2,
            )
        kwargs: dict[str, Any] = {"pretrained": None, "device": "cpu", "force_quick_gelu": bool(quick_gelu)}
        root = logging.getLogger()
        root.addFilter(_quiet_random_init)  # we load the weights right after: not "random"
        try:
            # pretrained_text=False: never fetch a Hugging Face text tower; our file has it all.
            model = open_clip.create_model(arch, pretrained_text=False, **kwargs)
        except TypeError:  # open_clip < 3 has no pretrained_text
            model = open_clip.create_model(arch, **kwargs)
        except Exception as exc:
            raise QRRLError(f"open_clip could not build architecture {arch!r} offline: {exc}") from exc
        finally:
            root.removeFilter(_quiet_random_init)
        state = _check_compatible(model, state, arch, path)
        model.load_state_dict(state, strict=True)
        try:
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as exc:
            raise QRRLError(
                f"the tokenizer of {arch!r} is not available offline ({exc}); pick an architecture with "
                "open_clip's built-in CLIP tokenizer (e.g. ViT-B-32) or pre-fill the Hugging Face cache"
            ) from exc
        return cls(model, tokenizer, arch=arch, device=device, dtype=dtype, preprocess_cfg=pp_cfg)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        arch: str = "custom",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        preprocess_cfg: Mapping[str, Any] | None = None,
    ) -> ClipScorer:
        """Wrap an already-built open_clip model (tests, or a model loaded elsewhere)."""
        return cls(model, tokenizer, arch=arch, device=device, dtype=dtype, preprocess_cfg=preprocess_cfg)

    # -- encoding

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images → normalised float32 [B,3,h,w] on the device, resized as open_clip would."""
        th, tw = self.image_size
        mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
        batches = []
        for group in _to_float_images(images, self.device):
            x = group.permute(0, 3, 1, 2).contiguous()
            h, w = x.shape[-2:]
            if self.resize_mode == "squash":
                x = _resize(x, (th, tw), mode)
            elif self.resize_mode == "longest":
                scale = min(th / h, tw / w)
                nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
                x = _resize(x, (nh, nw), mode)
                pad_t, pad_l = (th - nh) // 2, (tw - nw) // 2
                x = F.pad(x, (pad_l, tw - nw - pad_l, pad_t, th - nh - pad_t), value=self.fill_color)
            else:  # "shortest": resize the short side, then centre crop (CLIP's own transform)
                scale = max(th / h, tw / w)
                nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
                x = _resize(x, (nh, nw), mode)
                top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
                x = x[..., top : top + th, left : left + tw]
            batches.append((x.clamp(0.0, 1.0) - self._mean_t) / self._std_t)
        return torch.cat(batches) if len(batches) > 1 else batches[0]

    @torch.inference_mode()
    def encode_images(self, images: Any, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings, float32 [B,D] on the device."""
        pixels = self.preprocess(images)
        step = max(1, int(batch_size))
        out = [
            self.model.encode_image(pixels[i : i + step].to(self.dtype), normalize=True).float()
            for i in range(0, pixels.shape[0], step)
        ]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings, float32 [N,D]; repeated texts come from an LRU cache."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [str(t) for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for i in range(0, len(todo), max(1, int(batch_size))):
            chunk = todo[i : i + batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            emb = F.normalize(self.model.encode_text(tokens, normalize=True).float(), dim=-1)
            for text, vec in zip(chunk, emb):
                self._text_cache[text] = vec.clone()
        result = []
        for t in texts:
            self._text_cache.move_to_end(t)
            result.append(self._text_cache[t])
        while len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        if not result:
            raise QRRLError("no texts to encode")
        return torch.stack(result)

    # -- similarities

    def text_similarity(self, images: Any, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Cosine of each image with its prompt (one prompt broadcast, or one per image), [B]."""
        img = self.encode_images(images, batch_size=batch_size)
        prompts = [texts] if isinstance(texts, str) else list(texts)
        _check_pairing(len(prompts), img.shape[0], "prompts")
        txt = self.encode_texts(prompts)
        return (img * txt).sum(-1).double().cpu().numpy()

    def image_similarity(self, images: Any, base_images: Any, batch_size: int = 32) -> np.ndarray:
        """Cosine of each image with its base image (one base broadcast, or one per image), [B]."""
        img = self.encode_images(images, batch_size=batch_size)
        base = self.encode_images(base_images, batch_size=batch_size)
        _check_pairing(base.shape[0], img.shape[0], "base images")
        return (img * base).sum(-1).double().cpu().numpy()


def _quiet_random_init(record: logging.LogRecord) -> bool:
    return "initialized randomly" not in record.getMessage()


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _check_pairing(n_other: int, n_images: int, what: str) -> None:
    if n_other not in (1, n_images):
        raise QRRLError(
            f"got {n_other} {what} for {n_images} images: give one (used for all) or one per image"
        )


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QRRLError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def _resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        names = {
            "fp32": torch.float32,
            "float32": torch.float32,
            "fp16": torch.float16,
            "float16": torch.float16,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
        }
        if dtype not in names:
            raise QRRLError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QRRLError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("float16 CLIP on CPU is slow and imprecise; using float32 instead", stacklevel=3)
        return torch.float32
    return dtype


def _pretrained_preprocess(open_clip: Any, arch: str, tag: str | None) -> tuple[dict[str, Any], bool | None]:
    """Preprocessing (and QuickGELU) of an open_clip release, looked up offline in its table."""
    keys = ("mean", "std", "interpolation", "resize_mode")
    tags = list(open_clip.list_pretrained_tags_by_model(arch))
    if tag is not None:
        if tag not in tags:
            raise QRRLError(
                f"unknown pretrained tag {tag!r} for {arch!r}; known: {', '.join(tags) or 'none'}"
            )
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        return {k: cfg[k] for k in keys if cfg.get(k) is not None}, bool(cfg.get("quick_gelu", False))
    variants = {
        tuple(
            (k, tuple(v) if isinstance(v, list) else v)
            for k in keys
            if (v := open_clip.get_pretrained_cfg(arch, t).get(k)) is not None
        )
        for t in tags
    }
    if len(variants) == 1:
        return dict(variants.pop()), None
    return {}, None


# ----------------------------------------------------------------------------- rewards


def cosine_to_reward(
    cos: np.ndarray | Sequence[float] | float,
    kind: Literal["text", "image"],
    lo: float | None = None,
    hi: float | None = None,
) -> np.ndarray:
    """Map raw cosines to rewards in [0, 1]: ``clip((cos - lo) / (hi - lo), 0, 1)``.

    Defaults (``DEFAULT_RANGES``): ``text`` lo=0.10, hi=0.35 (typical CLIP image–text cosines
    lie in ~[0.1, 0.4]); ``image`` lo=0.50, hi=1.00 (an image against itself → 1.0). NaN stays
    NaN so that a failed score is visible rather than silently zero.
    """
    if kind not in DEFAULT_RANGES:
        raise QRRLError(f"cosine kind must be 'text' or 'image', got {kind!r}")
    dlo, dhi = DEFAULT_RANGES[kind]
    lo = dlo if lo is None else float(lo)
    hi = dhi if hi is None else float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise QRRLError(f"{kind} cosine range must satisfy lo < hi (finite), got lo={lo}, hi={hi}")
    arr = np.asarray(cos, dtype=np.float64)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def _blank(prompt: str | Sequence[str] | None) -> bool:
    if prompt is None:
        return True
    if isinstance(prompt, str):
        return not prompt.strip()
    return all(not str(p).strip() for p in prompt)


def clip_reward(
    scorer: ClipScorer,
    images: Any,
    prompt: str | Sequence[str] | None,
    base_images: Any = None,
    *,
    text_range: tuple[float, float] | None = None,
    image_range: tuple[float, float] | None = None,
    batch_size: int = 32,
) -> Reward:
    """CLIP reward: ``clip_text`` (image vs prompt) and/or ``clip_image`` (image vs base).

    Each component is ``cosine_to_reward`` of the raw cosine (ranges overridable as
    ``(lo, hi)``); the total is the mean of the components present. Raw cosines are kept in
    the details as ``clip_text_cos`` / ``clip_image_cos``. A blank prompt counts as no prompt;
    at least one of prompt and base images is required.
    """
    has_text = not _blank(prompt)
    if not has_text and base_images is None:
        raise QRRLError(
            "CLIP reward needs a prompt or base images (or both): the prompt is empty and no base image was given"
        )
    if has_text and not isinstance(prompt, str) and any(not str(p).strip() for p in prompt):  # type: ignore[union-attr]
        empty = [i for i, p in enumerate(prompt) if not str(p).strip()]  # type: ignore[union-attr]
        raise QRRLError(f"prompts {empty} are empty: give a prompt for every image, or none at all")
    components: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    if has_text:
        cos = scorer.text_similarity(images, prompt, batch_size=batch_size)  # type: ignore[arg-type]
        raw["clip_text_cos"] = cos
        components["clip_text"] = cosine_to_reward(cos, "text", *(text_range or (None, None)))
    if base_images is not None:
        cos = scorer.image_similarity(images, base_images, batch_size=batch_size)
        raw["clip_image_cos"] = cos
        components["clip_image"] = cosine_to_reward(cos, "image", *(image_range or (None, None)))
    total = np.mean(np.stack(list(components.values())), axis=0)
    size = total.shape[0]
    details = [
        {name: float(arr[i]) for name, arr in raw.items()} | {"clip_arch": scorer.arch} for i in range(size)
    ]
    return Reward(total=total, components=components, details=details)
