"""rl/clip_score.py on tiny open_clip configs with random weights, loaded through the real path.

Two tiny ViT configs are registered with open_clip (``qrrl-tiny-test`` and a wider
``qrrl-tiny-test-b``) so ``ClipScorer.load(arch, file)`` builds them exactly as it builds a
built-in architecture. The network is blocked for the whole module.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rl._compat import ensure_torchvision_importable
from rl.clip_score import (
    DEFAULT_RANGES,
    ClipScorer,
    clip_reward,
    cosine_to_reward,
    list_architectures,
    resolve_weights,
)
from rl.errors import QRRLError
from rl.reward import Reward

ensure_torchvision_importable()
import open_clip  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TINY = "qrrl-tiny-test"
TINY_B = "qrrl-tiny-test-b"


def _tiny_cfg(embed_dim: int, width: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": 16, "patch_size": 8},
        # The real BPE tokenizer needs the full vocabulary; the width keeps it small.
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
    }


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """HF offline, and any socket connection fails loudly: loading must not touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Register both tiny configs; save random weights as safetensors and as wrapped .bin."""
    root = tmp_path_factory.mktemp("open_clip")
    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(_tiny_cfg(32, 32)))
    (cfg_dir / f"{TINY_B}.json").write_text(json.dumps(_tiny_cfg(48, 48)))
    open_clip.add_model_config(cfg_dir)
    models = root / "models"
    models.mkdir()
    torch.manual_seed(0)
    sd = open_clip.create_model(TINY, pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(models / "tiny.safetensors"))
    # open_clip trainer layout: {"state_dict": {"module.<key>": tensor}, "epoch": n}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, models / "tiny.bin")
    sd_b = open_clip.create_model(TINY_B, pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in sd_b.items()}, str(models / "other.safetensors"))
    return {
        "dir": models,
        "st": models / "tiny.safetensors",
        "bin": models / "tiny.bin",
        "other": models / "other.safetensors",
    }


@pytest.fixture(scope="module")
def scorer(weights) -> ClipScorer:
    return ClipScorer.load(TINY, weights["st"])


def _images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size + 8, 3, generator=g)


def test_load_safetensors_and_bin_agree(weights, scorer):
    from_bin = ClipScorer.load(TINY, weights["bin"])
    imgs = _images(3)
    a, b = scorer.encode_images(imgs), from_bin.encode_images(imgs)
    assert a.shape == (3, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    t = scorer.encode_texts(["a red fox", "a blue car"])
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(t, from_bin.encode_texts(["a red fox", "a blue car"]))
    assert scorer.image_size == (32, 32) and len(scorer.mean) == 3 and scorer.arch == TINY
    assert TINY in list_architectures() and "ViT-B-32" in list_architectures()


def test_same_input_is_deterministic_and_self_similarity_is_one(scorer):
    imgs = _images(4)
    assert torch.equal(scorer.encode_images(imgs), scorer.encode_images(imgs))
    cos = scorer.image_similarity(imgs, imgs)
    assert cos.shape == (4,) and np.allclose(cos, 1.0, atol=1e-5)
    r = clip_reward(scorer, imgs, None, base_images=imgs)
    assert np.allclose(r.components["clip_image"], 1.0)
    assert np.allclose(r.total, 1.0)


def test_batch_equals_one_by_one(scorer):
    imgs = _images(6, seed=1)
    batched = scorer.encode_images(imgs, batch_size=4)
    single = torch.cat([scorer.encode_images(imgs[i : i + 1]) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-5)
    sims = scorer.text_similarity(imgs, "a cat")
    one = [scorer.text_similarity(imgs[i : i + 1], "a cat")[0] for i in range(6)]
    assert np.allclose(sims, one, atol=1e-5)


def test_input_layouts(scorer):
    imgs = _images(2, seed=2)
    u8 = (imgs.numpy() * 255).round().astype(np.uint8)
    ref = scorer.encode_images(u8)
    # list of HxWx3 arrays == [B,H,W,3] array; float tensor ~ its uint8 quantisation
    assert torch.allclose(scorer.encode_images(list(u8)), ref, atol=1e-5)
    assert torch.allclose(scorer.encode_images(torch.from_numpy(u8).float() / 255), ref, atol=1e-4)
    # gray equals RGB with equal channels; opaque RGBA equals its RGB
    gray = u8[0, :, :, 0]
    assert torch.allclose(
        scorer.encode_images([gray]),
        scorer.encode_images(np.repeat(gray[..., None], 3, axis=2)[None]),
        atol=1e-5,
    )
    rgba = np.concatenate([u8, np.full(u8.shape[:3] + (1,), 255, np.uint8)], axis=-1)
    assert torch.allclose(scorer.encode_images(rgba), ref, atol=1e-5)
    # mixed sizes in one list keep their order
    mixed = scorer.encode_images([u8[0], u8[1, :30, :20]])
    assert torch.allclose(mixed[0], ref[0], atol=1e-5)
    assert mixed.shape == (2, 32)
    with pytest.raises(QRRLError, match="empty"):
        scorer.encode_images([])


def test_text_similarity_pairing_and_cache(scorer):
    imgs = _images(3, seed=3)
    broadcast = scorer.text_similarity(imgs, "a castle")
    per_image = scorer.text_similarity(imgs, ["a castle", "a castle", "a castle"])
    assert broadcast.shape == (3,) and np.allclose(broadcast, per_image)
    assert "a castle" in scorer._text_cache
    cached = scorer.encode_texts(["a castle"])
    assert torch.equal(cached[0], scorer._text_cache["a castle"])
    with pytest.raises(QRRLError, match="2 prompts for 3 images"):
        scorer.text_similarity(imgs, ["a", "b"])
    with pytest.raises(QRRLError, match="2 base images for 3 images"):
        scorer.image_similarity(imgs, imgs[:2])


def test_cosine_to_reward_formula():
    assert DEFAULT_RANGES == {"text": (0.10, 0.35), "image": (0.50, 1.00)}
    np.testing.assert_allclose(cosine_to_reward([0.05, 0.10, 0.225, 0.35, 0.5], "text"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(cosine_to_reward([0.4, 0.75, 1.0], "image"), [0, 0.5, 1])
    np.testing.assert_allclose(cosine_to_reward(0.3, "text", lo=0.2, hi=0.4), 0.5)
    with pytest.raises(QRRLError, match="lo < hi"):
        cosine_to_reward(0.3, "text", lo=0.4, hi=0.2)
    with pytest.raises(QRRLError, match="'text' or 'image'"):
        cosine_to_reward(0.3, "audio")  # type: ignore[arg-type]


def test_clip_reward_components_and_errors(scorer):
    imgs, base = _images(2, seed=4), _images(1, seed=5)
    both = clip_reward(scorer, imgs, "a garden", base_images=base, text_range=(-1.0, 1.0))
    assert isinstance(both, Reward) and set(both.components) == {"clip_text", "clip_image"}
    text_cos = np.array([d["clip_text_cos"] for d in both.details])
    image_cos = np.array([d["clip_image_cos"] for d in both.details])
    np.testing.assert_allclose(both.components["clip_text"], (text_cos + 1) / 2)
    np.testing.assert_allclose(both.components["clip_image"], cosine_to_reward(image_cos, "image"))
    np.testing.assert_allclose(both.total, (both.components["clip_text"] + both.components["clip_image"]) / 2)
    text_only = clip_reward(scorer, imgs, ["a garden", "a tower"])
    assert set(text_only.components) == {"clip_text"} and "clip_image_cos" not in text_only.details[0]
    np.testing.assert_allclose(text_only.total, text_only.components["clip_text"])
    image_only = clip_reward(scorer, imgs, "   ", base_images=base)  # blank prompt = no prompt
    assert set(image_only.components) == {"clip_image"}
    with pytest.raises(QRRLError, match="needs a prompt or base images"):
        clip_reward(scorer, imgs, "")
    with pytest.raises(QRRLError, match="needs a prompt or base images"):
        clip_reward(scorer, imgs, None)
    with pytest.raises(QRRLError, match=r"prompts \[1\] are empty"):
        clip_reward(scorer, imgs, ["a garden", ""])


def test_resolve_weights_searches_dirs(weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_weights(str(weights["st"]), []) == weights["st"]
    assert (
        resolve_weights("tiny.safetensors", [tmp_path / "nowhere", weights["dir"]])
        == weights["dir"] / "tiny.safetensors"
    )
    assert resolve_weights("tiny", [weights["dir"]]) == weights["dir"] / "tiny.safetensors"
    with pytest.raises(QRRLError) as err:
        resolve_weights("ViT-B-32.safetensors", [weights["dir"], tmp_path / "nowhere"])
    msg = str(err.value)
    assert str(weights["dir"]) in msg and "tiny.safetensors" in msg and "tiny.bin" in msg
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg


def test_missing_weights_file_names_folder_and_files(weights):
    with pytest.raises(QRRLError) as err:
        ClipScorer.load(TINY, weights["dir"] / "missing.safetensors")
    msg = str(err.value)
    assert "missing.safetensors" in msg and str(weights["dir"]) in msg
    assert "tiny.safetensors" in msg and "other.safetensors" in msg


def test_weights_of_another_architecture_are_refused_clearly(weights):
    with pytest.raises(QRRLError) as err:
        ClipScorer.load(TINY, weights["other"])
    msg = str(err.value)
    assert TINY in msg and str(weights["other"]) in msg
    assert "shape mismatches" in msg and "text_projection file [48, 48] vs model [32, 32]" in msg
    assert f"looks like '{TINY_B}'" in msg


def test_missing_keys_are_reported(weights, tmp_path):
    sd = open_clip.create_model(TINY, pretrained=None).state_dict()
    sd.pop("logit_scale")
    sd["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(
        QRRLError, match=r"1 keys missing from the file \(e\.g\. logit_scale \[\]\).*1 unexpected keys"
    ):
        ClipScorer.load(TINY, path)


class _Payload:
    """Unpickling this would create a marker file: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_pickle_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(QRRLError, match="refusing to load .*evil.bin"):
        ClipScorer.load(TINY, path)
    assert not marker.exists()
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(QRRLError, match="not a readable safetensors file"):
        ClipScorer.load(TINY, bad)


def test_bad_arguments(weights):
    with pytest.raises(QRRLError, match="unknown open_clip architecture 'ViT-B-33'; did you mean"):
        ClipScorer.load("ViT-B-33", weights["st"])
    with pytest.raises(QRRLError, match="unknown pretrained tag"):
        ClipScorer.load(TINY, weights["st"], pretrained_tag="openai")
    with pytest.warns(UserWarning, match="float32 instead"):
        half = ClipScorer.load(TINY, weights["st"], dtype=torch.float16)
    assert half.dtype == torch.float32
    bf16 = ClipScorer.load(TINY, weights["st"], dtype=torch.bfloat16)
    emb = bf16.encode_images(_images(2))
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_from_model_wraps_an_in_memory_model():
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=24),
        text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=49408, width=16, heads=2, layers=1),
    )
    sc = ClipScorer.from_model(model, open_clip.SimpleTokenizer(context_length=8))
    assert sc.arch == "custom" and sc.image_size == (24, 24)
    assert sc.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    r = clip_reward(sc, _images(2), "a bird")
    assert r.components["clip_text"].shape == (2,)


def test_real_architecture_config_vit_b_32(tmp_path):
    """ViT-B-32 from open_clip's own config (random weights, fp16 file to halve the I/O)."""
    start = time.perf_counter()
    sd = open_clip.create_model("ViT-B-32", pretrained=None).state_dict()
    path = tmp_path / "ViT-B-32.safetensors"
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
    del sd
    sc = ClipScorer.load("ViT-B-32", path)
    emb = sc.encode_images(_images(2, size=64))
    assert emb.shape == (2, 512) and sc.image_size == (224, 224)
    assert sc.mean == tuple(open_clip.OPENAI_DATASET_MEAN)  # all ViT-B-32 tags agree
    assert np.allclose(sc.image_similarity(_images(1, size=64), _images(1, size=64)), 1.0, atol=1e-5)
    assert time.perf_counter() - start < 60


def test_floor_penalty_is_flat_inside_the_budget_and_steep_below():
    from rl.reward import combine_rewards, floor_penalty

    pen = floor_penalty([0.95, 0.86, 0.80], floor=0.86)
    assert pen.total.tolist() == pytest.approx([0.0, 0.0, -0.06])
    assert pen.components["art_shortfall"].tolist() == pytest.approx([0.0, 0.0, 0.06])
    both = combine_rewards([Reward(total=np.ones(3), components={}), pen], [1.0, 5.0])
    assert both.total.tolist() == pytest.approx([1.0, 1.0, 0.7])
    with pytest.raises(ValueError, match="finite"):
        floor_penalty([0.9], float("nan"))
