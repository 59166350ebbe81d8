"""Pure search indexes (numpy, faiss), persistent, each image_id held once.

- hamming: exact Hamming-radius search over 64-bit pHashes (multi-index hashing);
- exact: cosine k-NN by a flat scan, for catalogs of up to tens of thousands of vectors;
- ivf: compressed cosine k-NN for millions (PCA, IVF lists, 8-bit re-rank codes);
- rows: what they share (image_id <-> row bookkeeping, row files, atomic saves).

The two vector indexes are interchangeable behind VectorSearch; lookalike.dedup picks one by size.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

Matches = tuple[np.ndarray, np.ndarray, np.ndarray]  # (query_row, matched image_id or row, cosine)


class VectorSearch(Protocol):
    """Cosine k-NN over L2-normalised float32 vectors keyed by image_id."""

    dim: int
    cosine_error: float  # how far a reported cosine may be from the float32 one

    def __len__(self) -> int: ...

    @property
    def ids(self) -> np.ndarray: ...

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> int: ...

    def search(self, vecs: np.ndarray, k: int, min_cosine: float) -> Matches: ...

    def search_among(self, vecs: np.ndarray, k: int, min_cosine: float) -> Matches: ...

    def cosine_with(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray: ...

    def save(self, path: str | os.PathLike) -> None: ...
