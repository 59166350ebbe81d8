"""Exact cosine k-NN (a flat scan) for catalogs too small to train the compressed index."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from lookalike.index.rows import RowIds, RowStore, atomic_savez, best_k


class ExactVectorIndex:
    """Exact cosine k-NN over float32 vectors (a flat inner-product scan): for catalogs too small
    to train VectorIndex's projection and lists (256 MB at 50k x 1280).

    Persistence as VectorIndex's: a directory with ROWS_FILE (the float32 vectors, appended as
    they are added) and INDEX_FILE (ids and row count: the commit point).
    """

    INDEX_FILE = "exact_index.npz"
    ROWS_FILE = "vectors.f32"
    cosine_error = 0.0

    def __init__(self, dim: int, path: str | os.PathLike | None = None, *, _nrows: int = 0) -> None:
        self.dim = dim
        self._flat = faiss.IndexFlatIP(dim)  # labels are rows
        self._ids = RowIds()
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
        self._rows = RowStore(4 * dim, Path(path) / self.ROWS_FILE if path is not None else None, _nrows)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """The indexed image_ids."""
        return self._ids.of_row

    def vectors(self) -> np.ndarray:
        """Every indexed vector, in row order (a view of the index's own memory)."""
        return faiss.rev_swig_ptr(self._flat.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> int:
        """Index the vectors of images not indexed yet (others are skipped); returns how many."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(ids), self.dim)
        keep = self._ids.unknown(ids)
        if keep.any():
            self._ids.append(ids[keep])
            self._flat.add(vecs[keep])
            self._rows.append(vecs[keep].view(np.uint8))
        return int(keep.sum())

    def search(self, vecs: np.ndarray, k: int,
               min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The up-to-k nearest vectors with cosine >= min_cosine, for each query: (query_row,
        matched_id, cosine)."""
        if len(self) == 0 or len(vecs) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        sims, rows = self._flat.search(np.ascontiguousarray(vecs, np.float32), min(k, len(self)))
        qi, col = np.nonzero((sims >= min_cosine) & (rows >= 0))
        return qi.astype(np.int64), self._ids.of_row[rows[qi, col]], sims[qi, col]

    @staticmethod
    def search_among(vecs: np.ndarray, k: int,
                     min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The up-to-k nearest others of each of `vecs` among `vecs` themselves, cosine >=
        min_cosine: (row, other_row, cosine), by a flat scan."""
        vecs = np.ascontiguousarray(vecs, np.float32)
        if len(vecs) < 2:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        flat = faiss.IndexFlatIP(vecs.shape[1])
        flat.add(vecs)
        sims, other = flat.search(vecs, min(k + 1, len(vecs)))  # +1: itself
        qi = np.repeat(np.arange(len(vecs)), other.shape[1])
        other, sims = other.ravel(), sims.ravel()
        mine = (other >= 0) & (other != qi)
        return best_k(qi[mine], other[mine], sims[mine], k, min_cosine)

    def cosine_with(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        """Cosine of the indexed vector of ids[i] with vecs[i]; NaN where ids[i] is not indexed."""
        rows = self._ids.rows(ids)
        out = np.full(len(rows), np.nan, np.float32)
        known = np.flatnonzero(rows >= 0)
        if len(known):
            out[known] = np.einsum("ij,ij->i", self.vectors()[rows[known]],
                                   np.asarray(vecs, np.float32)[known])
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Save into directory `path` (created if needed): rows, then INDEX_FILE."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._rows.save(path / self.ROWS_FILE)
        atomic_savez(path / self.INDEX_FILE, {"dim": np.int64(self.dim), "row_ids": self._ids.of_row})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExactVectorIndex:
        path = Path(path)
        with np.load(path / cls.INDEX_FILE) as z:
            dim, row_ids = int(z["dim"]), z["row_ids"]
        self = cls(dim, path, _nrows=len(row_ids))
        self._ids = RowIds(row_ids)
        for r0 in range(0, len(row_ids), 65536):  # chunks: no second full copy in memory
            r1 = min(r0 + 65536, len(row_ids))
            self._flat.add(self._rows.read_range(r0, r1).view(np.float32))
        return self
