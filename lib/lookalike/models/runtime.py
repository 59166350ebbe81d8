"""Loaded models: ONNX Runtime or torch, once per process, with the ONNX export cached per model_ver.

get_embedder loads a spec once per process (Spark Python workers call it per batch). Backends:
``torch`` (the reference) and ``onnx`` (ONNX Runtime on a file exported once per model_ver and
verified against torch, made once per machine in lookalike.models.export_cache and linked into
each home). Once the ONNX file exists, the ONNX path imports neither torch nor
torchvision nor open_clip, so executors stay light. Text embedding (CLIP only) always runs the
torch text tower, loaded on the first Embedder.embed_text call.

Labels come from the same forward as the vectors (Embedder.embed_labelled): EfficientNet-Lite0's
ImageNet classifier head is a second output of its graph (``logits`` beside ``features``); CLIP
models label zero-shot, the image vectors against the text vectors of 'a photo of a {name}' for the
same 1000 class names (lookalike.labels), computed once per model_ver and kept beside the ONNX export.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from lookalike.errors import one_line
from lookalike.files import replacing
from lookalike.labels.hierarchy import TOP_LABELS, softmax, top_k
from lookalike.layout import file_safe
from lookalike.models import export_cache
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

# CLIP zero-shot: the prompt of CLIP's own ImageNet evaluation, and its logit scale (the trained
# temperature, clamped at 100): probabilities are softmax(100 * cosine) over the 1000 classes.
ZERO_SHOT_PROMPT = "a photo of a {}"
ZERO_SHOT_SCALE = 100.0
_TEXT_BATCH = 100  # prompts through the text tower at a time


def default_threads() -> int:
    """Intra-op threads when the caller does not say: OMP_NUM_THREADS if set, else every core.

    Several Spark Python workers sharing a machine should each get ``threads`` = their share of
    the cores (usually ``spark.task.cpus`` = 1) to avoid oversubscription.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else os.cpu_count() or 1


def onnx_path(spec: ModelSpec, cache_dir: str | Path) -> Path:
    """The ONNX export of ``spec``: one file per model_ver (content-hashed weights)."""
    return Path(cache_dir) / (file_safe(spec.model_ver) + ".onnx")


def onnx_outputs(spec: ModelSpec) -> tuple[str, ...]:
    """The outputs the export of ``spec`` has: EfficientNet's classifier logits beside the features."""
    return ("features", "logits") if spec.family == "effnet" else ("features",)


def label_source(spec: ModelSpec) -> str | None:
    """Where ``spec``'s labels come from: its "classifier" head, "zero-shot" text vectors, or None."""
    if spec.family == "effnet":
        return "classifier"
    return "zero-shot" if spec.supports_text else None


def zero_shot_prompts() -> list[str]:
    """One prompt per class of lookalike.labels, in class index order: its first lemma ("a photo of
    a crane"), as the label text vectors were first made, so that their cached files stay valid."""
    from lookalike.labels import load

    h = load()
    return [ZERO_SHOT_PROMPT.format(h.node_lemmas[wnid][0]) for wnid in h.wnids]


def label_text_path(spec: ModelSpec, cache_dir: str | Path) -> Path:
    """The zero-shot text vectors of ``spec``: one file per model_ver and prompt set, beside the export."""
    digest = hashlib.sha256("\n".join(zero_shot_prompts()).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{file_safe(spec.model_ver)}.labels-{digest}.npy"


class Labelled(NamedTuple):
    """Vectors and their top labels, from one forward."""

    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    labels: np.ndarray  # (n, k) int16 class indices into lookalike.labels' 1000 classes, most probable first
    scores: np.ndarray  # (n, k) float32 probabilities of those classes


# (n, 3, H, W) float32, and whether logits are wanted -> ((n, dim) raw features, (n, 1000) logits or None)
ImageForward = Callable[[np.ndarray, bool], tuple[np.ndarray, "np.ndarray | None"]]


class Embedder:
    """A loaded model. Get one with :func:`get_embedder`, which loads each model once per process."""

    def __init__(self, spec: ModelSpec, backend: str, image_forward: ImageForward, *, threads: int,
                 batch_size: int, clip_model: torch.nn.Module | None = None,
                 cache_dir: str | Path | None = None) -> None:
        self.spec = spec
        self.backend = backend
        self.threads = threads
        self.batch_size = batch_size
        self.label_source = label_source(spec)
        self._image_forward = image_forward
        self._clip_model = clip_model  # the torch backend's open_clip model, reused for text
        self._encode_text: Callable[[list[str]], np.ndarray] | None = None
        self._text_lock = threading.Lock()
        self._cache_dir = Path(cache_dir) if cache_dir else export_cache.shared_dir()
        self._label_text: np.ndarray | None = None  # zero-shot: (1000, dim) normalised prompt vectors
        self._labels_failed = False
        self._labels_lock = threading.Lock()

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
        chunks = [self._image_forward(pixels[i : i + self.batch_size], False)[0]
                  for i in range(0, len(pixels), self.batch_size)]
        return l2_normalize(np.concatenate(chunks) if chunks else np.empty((0, self.spec.dim), np.float32))

    def has_labels(self) -> bool:
        """Whether embed_labelled can label: always for a classifier head; for a CLIP model once its
        zero-shot text vectors are at hand (made on the first call when missing). A text tower that
        cannot load means no labels, logged once per model_ver."""
        if self.label_source != "zero-shot":
            return self.label_source == "classifier"
        with self._labels_lock:
            if self._label_text is None and not self._labels_failed:
                try:
                    self._label_text = label_text_vectors(self.spec, self._cache_dir, self.embed_text)
                except Exception as exc:
                    self._labels_failed = True
                    _no_labels(self.spec, exc)
        return self._label_text is not None

    def embed_labelled(self, pixels: np.ndarray, k: int = TOP_LABELS) -> Labelled:
        """Embeddings of preprocessed images and their top-k labels, from the same forward."""
        if not self.has_labels():
            raise ValueError(f"{self.spec.model_ver} gives no labels (see the log)")
        vectors, labels, scores = [], [], []
        for i in range(0, len(pixels), self.batch_size):
            features, logits = self._image_forward(pixels[i : i + self.batch_size],
                                                   self.label_source == "classifier")
            vectors.append(l2_normalize(features))
            if logits is None:  # zero-shot: cosine to each class's prompt
                logits = ZERO_SHOT_SCALE * (vectors[-1] @ self._label_text.T)
            top, probs = top_k(softmax(logits), k)
            labels.append(top.astype(np.int16))
            scores.append(probs)
        if not vectors:
            return Labelled(np.empty((0, self.spec.dim), np.float32), np.empty((0, k), np.int16),
                            np.empty((0, k), np.float32))
        return Labelled(np.concatenate(vectors), np.concatenate(labels), np.concatenate(scores))

    def label_images(self, images: Sequence[Image.Image], k: int = TOP_LABELS) -> Labelled:
        """embed_labelled of images; preprocessing runs per batch to bound memory."""
        parts = [self.embed_labelled(self.preprocess(images[i : i + self.batch_size]), k)
                 for i in range(0, len(images), self.batch_size)]
        if not parts:
            return self.embed_labelled(self.preprocess([]), k)
        return Labelled(*(np.concatenate(column) for column in zip(*parts, strict=True)))

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
    cache_dir: where ONNX exports and zero-shot label vectors live (``<home>/models``); default
    :func:`export_cache.shared_dir`.
    threads: intra-op threads (default :func:`default_threads`); give each Spark worker its share.
    verify_images: real photos (thumbnails) to check an ONNX export against torch; only used when
    the export does not exist yet. Call this once on the driver before the executors need the file.
    """
    if backend == "auto":
        backend = _AUTO_BACKEND[spec.family]
    if backend not in ("torch", "onnx"):
        raise ValueError(f"unknown embedding backend {backend!r}: use 'auto', 'torch' or 'onnx'")
    threads = threads or default_threads()
    cache = Path(cache_dir).expanduser() if cache_dir else export_cache.shared_dir()
    # The cache also holds a CLIP model's zero-shot label vectors, for either backend (a torch model
    # loaded twice is one copy: _TORCH_MODELS).
    key = (spec, backend, str(cache), threads, batch_size)
    with _EMBEDDERS_LOCK:  # held while loading: concurrent first callers wait for one load
        embedder = _EMBEDDERS.get(key)
        if embedder is None:
            started = time.perf_counter()
            if backend == "onnx":
                embedder = _load_onnx(spec, cache, threads, batch_size, verify_images)
            else:
                embedder = _load_torch(spec, threads, batch_size, cache)
            log.info("loaded %s in %.1f s", embedder, time.perf_counter() - started)
            _EMBEDDERS[key] = embedder
    return embedder


_WARNED_NO_LABELS: set[str] = set()


def _no_labels(spec: ModelSpec, exc: BaseException) -> None:
    if spec.model_ver not in _WARNED_NO_LABELS:
        _WARNED_NO_LABELS.add(spec.model_ver)
        log.warning("no labels for %s: its text tower cannot embed the class prompts (%s)", spec.model_ver,
                    one_line(exc))


def label_text_vectors(spec: ModelSpec, cache_dir: str | Path,
                       encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(1000, dim) float32 normalised text vectors of the zero-shot prompts: read from the cache,
    else computed with ``encode`` (prompts -> text vectors) and written there atomically."""
    path = label_text_path(spec, cache_dir)
    prompts = zero_shot_prompts()
    if path.exists():
        try:
            cached = np.load(path)
            if cached.shape == (len(prompts), spec.dim) and cached.dtype == np.float32:
                return cached
        except (OSError, ValueError):
            pass
        log.warning("%s is not a %dx%d float32 array: computing it again", path, len(prompts), spec.dim)
    started = time.perf_counter()
    vectors = l2_normalize(np.concatenate([encode(prompts[i : i + _TEXT_BATCH])
                                           for i in range(0, len(prompts), _TEXT_BATCH)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
        tmp.chmod(0o644)  # executors may run as another user
    log.info("zero-shot label vectors of %s: %d prompts in %.1f s, kept in %s", spec.model_ver,
             len(prompts), time.perf_counter() - started, path)
    return vectors


def ensure_labels(spec: ModelSpec, cache_dir: str | Path, threads: int | None = None) -> bool:
    """Make what labelling ``spec`` needs, once per model_ver, on the driver before executors need it
    (a CLIP model's zero-shot text vectors); False when the model gives no labels (said once)."""
    source = label_source(spec)
    if source != "zero-shot":
        return source == "classifier"
    if label_text_path(spec, cache_dir).exists():
        return True
    try:
        encode = _torch_text_encoder(spec, None, threads or default_threads())
        label_text_vectors(spec, cache_dir, encode)
    except Exception as exc:
        _no_labels(spec, exc)
        return False
    return True


Samples = Callable[[], Sequence[Image.Image]]  # real photos to verify a new export on, made only if needed


def catalog_embedder(spec: ModelSpec, backend: str, cache_dir: str | Path, batch_size: int,
                     samples: Samples) -> Embedder:
    """The embedder a catalog's runs and searches share: ONNX exports kept in `cache_dir`, and a
    new export checked against torch on `samples()` (the catalog's thumbnails, or the query)."""
    verify = None
    if backend != "torch" and not export_is_current(spec, cache_dir):
        verify = list(samples()) or None
    return get_embedder(spec, backend=backend, cache_dir=cache_dir, batch_size=batch_size,
                        verify_images=verify)


def ensure_export(spec: ModelSpec, backend: str, cache_dir: str | Path, batch_size: int,
                  samples: Samples) -> None:
    """Make the ONNX export, once per model_ver, on the driver before any executor needs it."""
    if backend != "torch" and not export_is_current(spec, cache_dir):
        catalog_embedder(spec, backend, cache_dir, batch_size, samples)


def export_is_current(spec: ModelSpec, cache_dir: str | Path) -> bool:
    """The export of ``spec`` exists and has every output it needs (an export made before labels
    has no ``logits``; _load_onnx makes it again)."""
    path = onnx_path(spec, cache_dir)
    if not path.exists():
        return False
    if onnx_outputs(spec) == ("features",):
        return True  # what every export has: no need to read it
    if export_cache.sealed_copy(path, onnx_path(spec, export_cache.shared_dir()), _seal_note(spec)):
        return True  # no need to import onnx (~1 s) for what the cache checked when it made the file
    import onnx

    try:
        outputs = {o.name for o in onnx.load(str(path), load_external_data=False).graph.output}
    except Exception:
        return False  # _load_onnx says what is wrong with it
    return set(onnx_outputs(spec)) <= outputs


def _load_onnx(spec: ModelSpec, cache: Path, threads: int, batch_size: int,
               verify_images: Sequence[Image.Image] | None) -> Embedder:
    path = onnx_path(spec, cache)
    if not path.exists():
        _provide_export(spec, path, threads, verify_images)
    session = _onnx_session(path, threads)
    outputs = onnx_outputs(spec)
    have = [o.name for o in session.get_outputs()]
    if not set(outputs) <= set(have):
        log.info("%s has outputs %s, not %s (exported before labels): exporting it again", path, have,
                 list(outputs))
        _provide_export(spec, path, threads, verify_images)
        session = _onnx_session(path, threads)
    exported_ver = session.get_modelmeta().custom_metadata_map.get("model_ver")
    if exported_ver != spec.model_ver:
        raise CheckpointError(f"{path} holds model_ver {exported_ver!r}, expected {spec.model_ver!r}; "
                              "delete it to re-export")
    input_name = session.get_inputs()[0].name
    names = list(outputs)

    def forward(pixels: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray | None]:
        out = session.run(names if logits else names[:1],
                          {input_name: np.ascontiguousarray(pixels, dtype=np.float32)})
        return out[0], out[1] if len(out) > 1 else None

    return Embedder(spec, "onnx", forward, threads=threads, batch_size=batch_size, cache_dir=cache)


def _onnx_session(path: Path, threads: int) -> Any:
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
    return session


def _provide_export(spec: ModelSpec, path: Path, threads: int,
                    verify_images: Sequence[Image.Image] | None) -> None:
    """Put the export of ``spec`` at ``path``: linked from the machine's shared cache, where it is
    exported first if no intact, current copy is there. A cache that cannot be written (a read-only
    home directory) costs an export into ``path`` itself."""
    cached = onnx_path(spec, export_cache.shared_dir())
    try:
        export_cache.provide(cached, lambda tmp: _export_onnx(spec, tmp, threads, verify_images),
                             lambda p: export_is_current(spec, p.parent),
                             dest=None if path.resolve() == cached.resolve() else path, note=_seal_note(spec))
        return
    except OSError as exc:
        log.warning("cannot use the model cache %s (%s): exporting into %s", cached.parent, one_line(exc),
                    path.parent)
    _export_onnx(spec, path, threads, verify_images)


def _seal_note(spec: ModelSpec) -> str:
    return "outputs " + ",".join(onnx_outputs(spec))


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
                              atol=_ONNX_ATOL, outputs=onnx_outputs(spec))
    log.info("exported %s to ONNX (max abs diff to torch %.1e on %d images)", spec.model_ver, diff,
             len(pixels))


def _load_torch(spec: ModelSpec, threads: int, batch_size: int, cache: Path) -> Embedder:
    import torch

    image_module, clip_model = load_torch_model(spec, threads)
    head = onnx_outputs(spec) == ("features", "logits")

    def forward(pixels: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            out = image_module(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        if not isinstance(out, tuple):
            return out.numpy(), None
        # (features, logits) with a classifier head; CoCa's visual returns (pooled, tokens)
        return out[0].numpy(), out[1].numpy() if head and logits else None

    return Embedder(spec, "torch", forward, threads=threads, batch_size=batch_size, clip_model=clip_model,
                    cache_dir=cache)


# Loaded torch models, held weakly: a torch embedder, an ONNX export and a text tower of the same
# spec in one process share one copy, and nothing here keeps a model alive once its users are gone.
_TORCH_MODELS: weakref.WeakValueDictionary[ModelSpec, torch.nn.Module] = weakref.WeakValueDictionary()


def load_torch_model(spec: ModelSpec,
                     threads: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The reference torch model: (image module, open_clip model or None). The image module maps pixels
    to raw features; EfficientNet's to (raw features, ImageNet logits), see _with_classifier."""
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
        head = model._fc
        model._fc = torch.nn.Identity()  # forward() then returns the pooled 1280-d features
        return _with_classifier(model, head).eval()
    open_clip = _import_open_clip()
    try:
        model = open_clip.create_model(spec.arch, pretrained=spec.checkpoint,
                                       force_quick_gelu=spec.quick_gelu)
    except Exception as exc:
        raise CheckpointError(f"cannot load {spec.checkpoint} as open_clip {spec.arch} weights: "
                              f"{one_line(exc)}") from exc
    return model.eval()


def _with_classifier(body: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
    """A module whose forward gives (body's features, head(features)): EfficientNet's pooled features
    and its ImageNet logits in one pass. Exact in eval mode, where the dropout before ``_fc`` is the
    identity (the original forward is pool -> dropout -> _fc)."""
    import torch

    class FeaturesAndLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = body, head

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.body(pixels)
            return features, self.head(features)

    return FeaturesAndLogits()


def _torch_text_encoder(spec: ModelSpec, clip_model: torch.nn.Module | None,
                        threads: int) -> Callable[[list[str]], np.ndarray]:
    import torch

    model = clip_model if clip_model is not None else load_torch_model(spec, threads)[1]
    tokenizer = _import_open_clip().get_tokenizer(spec.arch)

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts)).numpy()

    return encode

