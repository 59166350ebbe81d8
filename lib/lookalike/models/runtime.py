"""Loaded models: ONNX Runtime or torch, once per process, with the ONNX export cached per model_ver.

get_embedder loads a spec once per process (Spark Python workers call it per batch). Backends:
``torch`` (the reference) and ``onnx`` (ONNX Runtime on a file exported once per model_ver and
verified against torch). Once the ONNX file exists, the ONNX path imports neither torch nor
torchvision nor open_clip, so executors stay light. Text embedding (CLIP only) always runs the
torch text tower, loaded on the first Embedder.embed_text call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lookalike.errors import one_line
from lookalike.layout import file_safe
from lookalike.models.preprocess import preprocess_image, write_image
from lookalike.models.registry import TEXT_MODELS, CheckpointError, ModelSpec, _import_open_clip
from lookalike.vectors import l2_normalize

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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


Samples = Callable[[], Sequence[Image.Image]]  # real photos to verify a new export on, made only if needed


def catalog_embedder(spec: ModelSpec, backend: str, cache_dir: str | Path, batch_size: int,
                     samples: Samples) -> Embedder:
    """The embedder a catalog's runs and searches share: ONNX exports kept in `cache_dir`, and a
    new export checked against torch on `samples()` (the catalog's thumbnails, or the query)."""
    verify = None
    if backend != "torch" and not onnx_path(spec, cache_dir).exists():
        verify = list(samples()) or None
    return get_embedder(spec, backend=backend, cache_dir=cache_dir, batch_size=batch_size,
                        verify_images=verify)


def ensure_export(spec: ModelSpec, backend: str, cache_dir: str | Path, batch_size: int,
                  samples: Samples) -> None:
    """Make the ONNX export, once per model_ver, on the driver before any executor needs it."""
    if backend != "torch" and not onnx_path(spec, cache_dir).exists():
        catalog_embedder(spec, backend, cache_dir, batch_size, samples)


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
    from lookalike.models.onnx_export import export_image_model, synthetic_photos

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
                                  f"{one_line(exc)}") from exc
        model._fc = torch.nn.Identity()  # forward() then returns the pooled 1280-d features
        return model.eval()
    open_clip = _import_open_clip()
    try:
        model = open_clip.create_model(spec.arch, pretrained=spec.checkpoint,
                                       force_quick_gelu=spec.quick_gelu)
    except Exception as exc:
        raise CheckpointError(f"cannot load {spec.checkpoint} as open_clip {spec.arch} weights: "
                              f"{one_line(exc)}") from exc
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

