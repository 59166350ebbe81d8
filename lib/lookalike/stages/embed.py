"""The embed stage: 512-px thumbnails in, one L2-normalised vector and its top-5 labels per image out.

It reads the thumbnails, never the originals (a missing thumbnail is re-derived from its
original once). The model is loaded once per executor Python worker: get_embedder caches
it per process and Spark reuses its Python workers across tasks.

The model forward is the cost that should dominate (bench/embed.py compares the stage with
the forward alone), so the work around it is kept small:
- A worker decodes each thumbnail and writes the model's input straight into one
  (batch, 3, H, W) array, runs the model on it while it is still in cache, and reuses it for the
  next batch; with as many intra-op threads as the task has cores (Spark runs one task per core).
- Thumbnails are decoded by simplejpeg straight into an array (Pillow's libjpeg-turbo, same
  pixels), and EfficientNet-Lite0's reference transform (TF's legacy bicubic resize) is one
  compiled kernel, tf_preprocess: together 0.35 ms an image less than Pillow and numpy/scipy.
- One task per core (embed_tasks), each reading its rows from a Parquet file the driver wrote
  (write_task_inputs): a task costs a fixed ~0.1-0.2 s besides its images.
- Labels come from the same forward (the classifier head is one more output of the graph; CLIP
  models compare the vector with text vectors made once per model_ver): softmax and top-5 in
  numpy, a few microseconds an image (bench/embed.py measures the stage with and without them).
"""

from __future__ import annotations

import io
import itertools
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
from PIL import Image

from lookalike.errors import IngestError, one_line
from lookalike.models.preprocess import pixel_writer
from lookalike.models.registry import ModelSpec
from lookalike.models.runtime import get_embedder
from lookalike.stages import schemas
from lookalike.stages.extract import ExtractSettings, extract_file

# Rows of a task's input read at a time, and so rows of output handed back to Spark at a time.
TASK_INPUT_BATCH = 64

# The vector leaves the worker as the bytes of its float32 array: Spark then copies one binary
# value per row, where array<float> costs it (and Arrow in the worker) 1280 elements to convert
# and Parquet 1280 values to encode: 0.45 vs 0.09 ms of CPU per image (JVM + worker, measured on
# 10,000 rows with a stub in place of the model).
# embeddings_table turns the column back into list<float> when the stage's Parquet is read.


@dataclass(frozen=True)
class EmbedSettings:
    spec: ModelSpec
    backend: str
    models_dir: str
    batch_size: int
    # Intra-op threads per worker. 0: the task's share of the cores (spark.task.cpus, usually 1):
    # Spark already runs one task per core, so more threads would only oversubscribe them.
    threads: int = 0
    # Top-5 labels beside each vector (runtime.ensure_labels on the driver says whether the model
    # gives any); False skips the classifier head and writes null labels.
    labels: bool = True


def task_cpus() -> int:
    """The cores Spark gives the running task (spark.task.cpus); 1 outside a Spark task."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return max(1, context.cpus()) if context is not None else 1


def read_thumbnail(sha256: str, thumb: str, path: str | None, extract: ExtractSettings) -> np.ndarray:
    """The stored thumbnail decoded to (h, w, 3) uint8 RGB; if it was lost, made again from the
    original (same sha256 only)."""
    file = Path(extract.thumbs_dir) / thumb
    if not file.exists():
        if path is None:  # every path of the image has since failed to read
            raise OSError("thumbnail missing and no original of the image is catalogued")
        row = extract_file(path, extract)
        if row["error"] is not None:
            raise OSError(f"thumbnail missing and the original failed: {row['message']}")
        if row["sha256"] != sha256:
            raise OSError("thumbnail missing and the original's bytes have changed since")
    data = file.read_bytes()
    try:
        # libjpeg-turbo as in Pillow, same settings (exact DCT, smooth chroma upsampling): the same
        # pixels (tested), decoded straight into an array, 0.15 ms an image sooner.
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        pass  # not a JPEG extract wrote: Pillow decodes it, or says what is wrong with it
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # decode errors: OSError


def embed_tasks(rows: int, parallelism: int, batch_size: int) -> int:
    """How many Spark tasks the embed stage runs ``rows`` images in.

    One per core (``parallelism``): a task has a fixed cost beside its images (a worker round trip,
    one Parquet part file and its commit: ~0.1-0.2 s of CPU), so one large task per core is
    cheapest. Only when there is less than a model batch per core are there fewer tasks, each at
    least one batch.
    """
    return max(1, min(parallelism, math.ceil(rows / batch_size)))


def task_input(folder: str | Path, task: int) -> Path:
    """The Parquet file of rows that embed task `task` embeds (written by write_task_inputs)."""
    return Path(folder) / f"part-{task:05d}.parquet"


def write_task_inputs(rows: pa.Table, folder: Path, tasks: int) -> None:
    """`rows` (sha256, thumb, path) cut into `tasks` Parquet files of consecutive rows, one a task.

    The tasks carry only their number: rows sent inside the tasks (~250 bytes each) would make
    ~125 MB tasks for a re-embed of 1M images on 2 cores, and Spark warned of "a task of very large
    size" from ~8k rows. `folder` is in the home, which executors share.
    """
    shutil.rmtree(folder, ignore_errors=True)  # a killed attempt's files
    folder.mkdir(parents=True)
    bounds = np.linspace(0, rows.num_rows, tasks + 1).astype(int)
    for task in range(tasks):
        pq.write_table(rows.slice(int(bounds[task]), int(bounds[task + 1] - bounds[task])),
                       task_input(folder, task))


def embed_task_inputs(tasks: Iterator[pd.DataFrame], folder: str, settings: EmbedSettings,
                      extract: ExtractSettings) -> Iterator[pd.DataFrame]:
    """mapInPandas body over spark.range(tasks): each task number in, embed_batches' rows out for
    the rows of its write_task_inputs file."""
    for task in tasks:
        for number in task["id"]:
            with pq.ParquetFile(task_input(folder, int(number))) as rows:
                batches = (b.to_pandas() for b in rows.iter_batches(batch_size=TASK_INPUT_BATCH))
                yield from embed_batches(batches, settings, extract)


def embed_batches(batches: Iterator[pd.DataFrame], settings: EmbedSettings,
                  extract: ExtractSettings) -> Iterator[pd.DataFrame]:
    """mapInPandas body: rows (sha256, thumb, path) in, (sha256, model_ver, vector, error, message,
    labels, label_scores) out, the vector as the bytes of a float32 array, the labels as int16 class
    indices and float32 probabilities, most probable first (schemas.EMBEDDINGS)."""
    embedder = get_embedder(settings.spec, backend=settings.backend, cache_dir=settings.models_dir,
                            threads=settings.threads or task_cpus(), batch_size=settings.batch_size)
    model_ver = settings.spec.model_ver
    labelled = settings.labels and embedder.has_labels()
    write_pixels = pixel_writer(settings.spec.preprocess)
    # One model batch of input, reused: its pixels are still in cache when the model reads them
    # (an array for a whole Arrow batch, 64 images or 38 MB, was 0.45 ms of CPU an image slower
    # at 10,000 images: its pixels had left the cache by the time the model read them).
    buffer = np.empty((settings.batch_size, 3, *settings.spec.preprocess.size), np.float32)
    for batch in batches:
        rows: list[tuple[Any, ...]] = []
        todo = zip(batch["sha256"], batch["thumb"], batch["path"], strict=True)
        while chunk := list(itertools.islice(todo, settings.batch_size)):
            ok: list[str] = []
            for sha, thumb, path in chunk:
                try:
                    image = read_thumbnail(sha, thumb, path, extract)
                except OSError as e:
                    rows.append((sha, model_ver, None, IngestError.EMBED.value, one_line(e), None, None))
                    continue
                write_pixels(image, buffer[len(ok)])
                ok.append(sha)
            if labelled:
                vectors, labels, scores = embedder.embed_labelled(buffer[: len(ok)])
                rows += [(sha, model_ver, v.tobytes(), None, None, lab, score)
                         for sha, v, lab, score in zip(ok, vectors, labels, scores, strict=True)]
            else:
                vectors = embedder.embed_pixels(buffer[: len(ok)])
                rows += [(sha, model_ver, v.tobytes(), None, None, None, None)
                         for sha, v in zip(ok, vectors, strict=True)]
        yield pd.DataFrame(rows, columns=schemas.EMBEDDINGS.names)


def embeddings_table(stage: pa.Table) -> pa.Table:
    """The stage's Parquet output with its binary vectors as list<float> again: buffers reinterpreted,
    no per-element conversion; ``labels`` and ``label_scores`` as schemas.EMBEDDINGS types them (all
    null in a stage output written before labels).

    A null vector (an error row) stays null; every other one is ``dim`` float32 values.
    """
    if "vector" not in stage.column_names:
        return stage  # no part file (nothing to embed)
    stage = _label_columns(stage)
    if not pa.types.is_binary(stage.schema.field("vector").type):
        return stage  # already converted
    if stage.num_rows == 0:
        return stage.set_column(stage.schema.get_field_index("vector"), "vector",
                                pa.array([], pa.list_(pa.float32())))
    binary = stage["vector"].combine_chunks()
    offsets = np.frombuffer(binary.buffers()[1], np.int32, len(binary) + 1, 4 * binary.offset)
    if np.any(offsets % 4):
        raise ValueError("embedding vectors must be whole float32 arrays")
    floats = offsets // 4
    values = pa.Array.from_buffers(pa.float32(), int(floats[-1] - floats[0]), [None, binary.buffers()[2]],
                                   offset=int(floats[0]))
    vectors = pa.ListArray.from_arrays(pa.array(floats - floats[0], pa.int32()), values,
                                       mask=binary.is_null())
    return stage.set_column(stage.schema.get_field_index("vector"), "vector", vectors)


def _label_columns(stage: pa.Table) -> pa.Table:
    for name in ("labels", "label_scores"):
        want = schemas.EMBEDDINGS.field(name).type
        if name not in stage.column_names:
            stage = stage.append_column(pa.field(name, want), pa.nulls(stage.num_rows, want))
        else:  # Spark's Parquet names the list item 'element' (the types compare equal nonetheless)
            stage = stage.set_column(stage.schema.get_field_index(name), name, stage[name].cast(want))
    return stage
