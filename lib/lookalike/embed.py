"""The embed stage: 512-px thumbnails in, one L2-normalised vector per image out.

It reads the thumbnails, never the originals (a missing thumbnail is re-derived from its
original once). The model is loaded once per executor Python worker: get_embedder caches
it per process and Spark reuses its Python workers across tasks.

The model forward is the cost that should dominate (bench/embed.py compares the stage with
the forward alone), so the work around it is kept small:
- A worker decodes each thumbnail and writes the model's input straight into one (n, 3, H, W)
  array reused for the whole task, then runs the model on it batch by batch, with as many
  intra-op threads as the task has cores (Spark runs one task per core).
- EfficientNet-Lite0's reference transform (TF's legacy bicubic resize, models.py) is computed
  as two sparse products that add the same float32 terms in the same order: the pixels are
  bit-identical to models.preprocess_image (tested), at a quarter of its cost.
- Tasks are large (embed_tasks): each costs a fixed ~0.1-0.2 s besides its images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
from PIL import Image

from lookalike import models
from lookalike.extract import ExtractSettings, extract_file
from lookalike.models import ModelSpec, Preprocess, get_embedder

EMBED_DDL = "sha256 string, model_ver string, vector array<float>, error string, message string"

# Images per Spark task, at most: about 10 s of one core's work with EfficientNet-Lite0.
ROWS_PER_TASK = 1024

PixelWriter = Callable[[Image.Image, np.ndarray], None]  # writes one image's (3, H, W) model input


@dataclass(frozen=True)
class EmbedSettings:
    spec: ModelSpec
    backend: str
    models_dir: str
    batch_size: int
    # Intra-op threads per worker. 0: the task's share of the cores (spark.task.cpus, usually 1):
    # Spark already runs one task per core, so more threads would only oversubscribe them.
    threads: int = 0


def task_cpus() -> int:
    """The cores Spark gives the running task (spark.task.cpus); 1 outside a Spark task."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return max(1, context.cpus()) if context is not None else 1


def _open_thumbnail(sha256: str, thumb: str, path: str, extract: ExtractSettings) -> Image.Image:
    """The stored thumbnail; if it was lost, made again from the original (same sha256 only)."""
    file = Path(extract.thumbs_dir) / thumb
    if not file.exists():
        row = extract_file(path, extract)
        if row["error"] is not None:
            raise OSError(f"thumbnail missing and the original failed: {row['message']}")
        if row["sha256"] != sha256:
            raise OSError("thumbnail missing and the original's bytes have changed since")
    with Image.open(file) as im:
        im.load()  # decode errors surface here, as OSError
        return im if im.mode == "RGB" else im.convert("RGB")  # extract writes RGB: no copy


@functools.lru_cache(maxsize=256)
def _tf_bicubic_matrix(n_in: int, n_out: int) -> scipy.sparse.csr_array:
    """TF's legacy bicubic resize along one axis as a sparse (n_out, n_in) matrix.

    Each row holds its 4 taps in TF's order, edge-clamped duplicates kept (not summed), so the
    product adds the same float32 terms in the same order as models._tf_resize_bicubic.
    """
    weights, index = models._tf_bicubic_taps(n_in, n_out)
    return scipy.sparse.csr_array(
        (np.ascontiguousarray(weights.T).ravel(), np.ascontiguousarray(index.T).ravel(),
         np.arange(0, 4 * n_out + 1, 4)), shape=(n_out, n_in))


_PIXEL = np.dtype((np.void, 12))  # one float32 RGB pixel as a single item


def _swap_axes(pixels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows, cols * 3) float32 RGB -> (cols, rows * 3): whole pixels moved, 2x faster than float by float."""
    return np.ascontiguousarray(pixels.reshape(rows, cols * 3).view(_PIXEL).T).view(np.float32)


def _tf_efficientnet_writer(pp: Preprocess) -> PixelWriter:
    mean = np.asarray(pp.mean, np.float32)[:, None, None]
    std = np.asarray(pp.std, np.float32)[:, None, None]
    height, width = pp.size

    def write(image: Image.Image, out: np.ndarray) -> None:
        image = image if image.mode == "RGB" else image.convert("RGB")
        w, h = image.size
        # The centred square crop of models._tf_efficientnet_pixels, cut by PIL: only it is copied out.
        crop = max(1, int(height / (height + models._CROP_PADDING) * min(h, w)))
        top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
        src = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32).reshape(crop, crop * 3)
        rows = _tf_bicubic_matrix(crop, height) @ src  # rows first, as TF: (height, crop * 3)
        resized = _tf_bicubic_matrix(crop, width) @ _swap_axes(rows, height, crop)  # (width, height * 3)
        hwc = _swap_axes(resized, width, height).reshape(height, width, 3)
        np.subtract(hwc.transpose(2, 0, 1), mean, out=out)
        out /= std

    return write


def pixel_writer(pp: Preprocess) -> PixelWriter:
    """Writes the model's reference transform of an RGB image into a (3, H, W) float32 slot."""
    if pp.kind == "tf-efficientnet":
        return _tf_efficientnet_writer(pp)

    def write(image: Image.Image, out: np.ndarray) -> None:
        out[...] = models.preprocess_image(image, pp)  # open_clip: PIL's C resize, already cheap

    return write


def embed_tasks(rows: int, parallelism: int, batch_size: int) -> int:
    """How many Spark tasks the embed stage splits ``rows`` images into.

    A task has a fixed cost beside its images (a worker round trip, one Parquet part file and
    its commit: ~0.1-0.2 s of CPU), so tasks are large, up to ROWS_PER_TASK images. Their count
    is a multiple of ``parallelism`` (the cores) so that the last wave keeps every core busy,
    and no task is smaller than one model batch.
    """
    waves = math.ceil(rows / (parallelism * ROWS_PER_TASK))
    return max(1, min(parallelism * waves, math.ceil(rows / batch_size)))


def embed_batches(batches: Iterator[pd.DataFrame], settings: EmbedSettings,
                  extract: ExtractSettings) -> Iterator[pd.DataFrame]:
    """mapInPandas body: rows (sha256, thumb, path) in, (sha256, model_ver, vector, error) out."""
    embedder = get_embedder(settings.spec, backend=settings.backend, cache_dir=settings.models_dir,
                            threads=settings.threads or task_cpus(), batch_size=settings.batch_size)
    model_ver = settings.spec.model_ver
    write_pixels = pixel_writer(settings.spec.preprocess)
    # One input array for the whole task: a fresh one per batch (tens of MB) would be new
    # memory, page-faulted in again every batch.
    buffer = np.empty((0, 3, *settings.spec.preprocess.size), np.float32)
    for batch in batches:
        if len(batch) > len(buffer):
            buffer = np.empty((len(batch), *buffer.shape[1:]), np.float32)
        ok: list[str] = []
        failed: list[tuple[str, str]] = []
        for sha, thumb, path in zip(batch["sha256"], batch["thumb"], batch["path"], strict=True):
            try:
                image = _open_thumbnail(sha, thumb, path, extract)
            except OSError as e:
                failed.append((sha, " ".join(str(e).split())[:300]))
                continue
            write_pixels(image, buffer[len(ok)])
            ok.append(sha)
        vectors = embedder.embed_pixels(buffer[: len(ok)])
        rows = [(sha, model_ver, vec, None, None) for sha, vec in zip(ok, vectors, strict=True)]
        rows += [(sha, model_ver, None, "embed", message) for sha, message in failed]
        yield pd.DataFrame(rows, columns=["sha256", "model_ver", "vector", "error", "message"])
