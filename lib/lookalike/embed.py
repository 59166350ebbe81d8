"""The embed stage: 512-px thumbnails in, one L2-normalised vector per image out.

It reads the thumbnails, never the originals (a missing thumbnail is re-derived from its
original once). The model is loaded once per executor Python worker: get_embedder caches
it per process and Spark reuses its Python workers across tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lookalike.extract import ExtractSettings, extract_file
from lookalike.models import ModelSpec, get_embedder

EMBED_DDL = "sha256 string, model_ver string, vector array<float>, error string, message string"


@dataclass(frozen=True)
class EmbedSettings:
    spec: ModelSpec
    backend: str
    models_dir: str
    batch_size: int
    # Spark runs one task per core, so each worker's model gets one thread.
    threads: int = 1


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
        return im.convert("RGB")


def embed_batches(batches: Iterator[pd.DataFrame], settings: EmbedSettings,
                  extract: ExtractSettings) -> Iterator[pd.DataFrame]:
    """mapInPandas body: rows (sha256, thumb, path) in, (sha256, model_ver, vector, error) out."""
    embedder = get_embedder(settings.spec, backend=settings.backend, cache_dir=settings.models_dir,
                            threads=settings.threads, batch_size=settings.batch_size)
    model_ver = settings.spec.model_ver
    for batch in batches:
        images, ok, failed = [], [], []
        for sha, thumb, path in zip(batch["sha256"], batch["thumb"], batch["path"], strict=True):
            try:
                images.append(_open_thumbnail(sha, thumb, path, extract))
                ok.append(sha)
            except OSError as e:
                failed.append((sha, " ".join(str(e).split())[:300]))
        vectors = embedder.embed_images(images) if images else np.empty((0, settings.spec.dim), np.float32)
        rows = [(sha, model_ver, vec, None, None) for sha, vec in zip(ok, vectors, strict=True)]
        rows += [(sha, model_ver, None, "embed", message) for sha, message in failed]
        yield pd.DataFrame(rows, columns=["sha256", "model_ver", "vector", "error", "message"])
