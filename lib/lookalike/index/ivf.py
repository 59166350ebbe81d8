"""Compressed cosine k-NN for millions of vectors: PCA, IVF lists, 8-bit re-rank codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

from lookalike.files import replacing
from lookalike.index.exact import ExactVectorIndex
from lookalike.index.rows import RowIds, RowStore, atomic_savez, best_k, compute_threads
from lookalike.vectors import l2_normalize

# --------------------------------------------------------------------------- vector index



# Full vectors for the re-rank: 8 bits a coordinate over [-1, 1], fixed (unit vectors cannot
# leave it), so no training can go stale: cosines within ~0.002 (rms) of float32.
_CODE_STEP = np.float32(2 / 255)
_CODE_OFFSET = np.float32(-1 + 1 / 255)  # decoded value = offset + code * step (bin centres)


def _encode(vecs: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((vecs + 1) * 127.5), 0, 255).astype(np.uint8)


def _decode(codes: np.ndarray) -> np.ndarray:
    return _CODE_OFFSET + codes.astype(np.float32) * _CODE_STEP


# Bits a coordinate of the projected vectors in the lists (faiss scalar quantisers).
_SQ_TYPES = {4: faiss.ScalarQuantizer.QT_4bit, 6: faiss.ScalarQuantizer.QT_6bit,
             8: faiss.ScalarQuantizer.QT_8bit}


def _default_nlist(n: int) -> int:
    # ~500 vectors a list (a power of two), so a probe scans as much at 5M as at 1M: search
    # time stays flat while the coarse quantizer's share (nlist dot products) stays small.
    # One list (a flat scan) below 20k vectors.
    return 1 if n < 20_000 else int(2 ** round(np.log2(n / 500)))


# Vectors the projection and the lists are learnt from (k-means takes 64 a list: 8192 lists for
# 5M vectors), read TRAIN_BLOCK at a time.
TRAIN_SAMPLE = 500_000
TRAIN_BLOCK = 65_536


class DecodedRows:
    """Rows of a RowStore as float32 vectors, decoded a slice at a time (a training sample)."""

    def __init__(self, store: RowStore, rows: np.ndarray) -> None:
        self._store, self._rows = store, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, part: slice) -> np.ndarray:
        return _decode(self._store.read(self._rows[part]))


class VectorIndex:
    """Cosine k-NN with a threshold over L2-normalised embeddings, for millions of vectors in RAM.

    Two stages. Candidates: vectors projected on the top `keep_dims` (128) eigenvectors of their
    (uncentred) second moment, re-normalised, `bits`-bit (8) scalar-quantised in an inverted
    file (128 bytes a vector); the `candidates` x k (2k) best with an approximate cosine within
    `margin` of the threshold go on. Re-rank: their exact cosine from 8-bit codes of the full
    vectors (dim bytes each), kept in a file beside the saved index and read row by row, so
    they cost disk, not memory. The projection alone reads cosines about 0.05-0.1 high (the
    differences between photos spread over many more axes than the photos do), which is why
    the reported cosine always comes from the re-rank.

    Why 8 bits on 128 dims and 2k candidates (formerly 4 bits on 256 dims, 4k): the
    re-rank reads a row per distinct candidate, and at 5M (6.4 GB of rows) most of them are not
    in page cache next to a catalog's database: each is then a disk read (13-17 us with 16 in
    flight here), and the 4k candidates' 337k distinct rows were most of what 5M cost over 1M.
    What needed 4k was the 4-bit rounding, not the projection: it scrambles the order of a
    query's many neighbours near the threshold. Of the true best 10 among a query's 40
    candidates, the best 20 by approximate cosine held 0.88 with 4 bits on 256 dims, 0.94 with
    ranges fitted by faiss's RS_optim, 0.98 with 8 bits on 128 dims (0.999 unquantised). So 2k
    candidates find what 4k did, half the rows are read, and the list scan is cheaper too.

    Measured with `python bench/neardup_scale.py --compare-vector --sizes 1000000`: 1M x 1280
    embeddings drawn from a model fitted to real EfficientNet-Lite0 ones (it reproduces their
    projection error on real near-duplicate pairs: +0.017 +- 0.015 vs +0.018 +- 0.017 at 512
    dims), 10k queries (25% near-duplicates), exact float32 top-50 of 1000 as truth, k=10,
    recall capped at k per query; 2048 lists, 128 B/vector in RAM each; 2 cores, one run. (The
    4-bit rows read lower than the figures 4 bits were chosen on, 0.997/0.994/0.993 at nprobe
    4, though the former code's results are identical to these: the bench's data has changed.)

        lists           cand. search nprobe  recall/precision at cosine 0.85 / 0.90 / 0.95
        4 bit, 256d      4k  re-rank   4    0.986/0.987  0.971/0.968  0.938/0.945  (2.7 cpu-s)
        4 bit, 256d      4k  re-rank   8    0.986/0.987  0.972/0.969  0.945/0.945  (4.1 cpu-s)
        4 bit, 256d      2k  re-rank   8    0.970/0.986  0.931/0.970  0.925/0.944  (3.8 cpu-s)
        8 bit, 128d      4k  re-rank   8    0.990/0.987  0.975/0.967  0.945/0.945  (2.1 cpu-s)
        8 bit, 128d      2k  re-rank   4    0.989/0.988  0.973/0.967  0.945/0.945  (1.3 cpu-s)
        8 bit, 128d      2k  re-rank   8    0.989/0.988  0.973/0.967  0.945/0.945  (1.7 cpu-s)
        4 bit, 256d      -   compressed 4   0.897/0.453  0.819/0.244  0.952/0.120  cosines +0.07 high
        8 bit, 128d      -   compressed 4   0.970/0.428  0.957/0.216  1.000/0.078  cosines +0.09 high

    Re-ranked cosines are within 0.002 (rms) of the float32 ones (the 8-bit codes use the fixed
    range [-1, 1]). nprobe is 8, not 4, by default: in the scale bench at 5M (4096 lists then)
    planted near-duplicates were found at 0.975 with 4 and 0.992 with 8 (0.998 at 1M either
    way): near-duplicates of outlying photos can fall in a neighbouring list. With the 8-bit
    lists the scale bench finds them at 0.997 (1M) and 0.995 (5M, 8192 lists).

    The projection and the lists are learnt from the vectors of the first `add` (or `train`,
    given a sample and the expected size). Once the index holds 4x what it was trained for,
    the next `add` retrains on a sample of the stored vectors and re-indexes them all (a
    catalog that started small; seconds at 100k, a few minutes at millions; geometric, so
    cheap overall). The full-vector codes need no training.

    Persistence: a directory with INDEX_FILE (the commit point), ROWS_FILE and the lists file
    INDEX_FILE names. An index created or loaded with a directory appends new rows to that
    directory's ROWS_FILE right away; a run that dies before `save` leaves rows that the next
    `load` drops. One writer at a time.
    """

    INDEX_FILE = "vector_index.npz"
    ROWS_FILE = "vectors.sq8"
    # Reported cosines are within this of the float32 ones: a unit query against 8-bit codes
    # errs by q . (rounding error), sd = step / sqrt(12) = 0.0023 whatever the dimension
    # (measured 0.0023, at most 0.010 over 200k near-duplicate pairs); 0.015 is 6.6 sd.
    cosine_error = 0.015

    def __init__(self, dim: int, *, keep_dims: int = 128, bits: int = 8, candidates: int = 2,
                 nlist: int | None = None, nprobe: int = 8, margin: float = 0.06,
                 path: str | os.PathLike | None = None) -> None:
        if bits not in _SQ_TYPES:
            raise ValueError(f"bits must be one of {sorted(_SQ_TYPES)}, not {bits}")
        self.dim = dim
        self.keep_dims = min(keep_dims, dim)
        self.bits = bits
        self.candidates = candidates
        self.nlist = nlist
        self.nprobe = nprobe
        self.margin = margin
        self.trained_on = 0
        self._proj: np.ndarray | None = None  # (dim, keep_dims); None: keep every dimension
        self._ivf: faiss.IndexIVFScalarQuantizer | None = None
        # Full-vector codes go to path/ROWS_FILE as they are added (a temporary file without a
        # path); save() into the same directory then only has to commit them.
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
        self._rows = RowStore(dim, Path(path) / self.ROWS_FILE if path is not None else None)
        self._ids = RowIds()  # row -> image_id (faiss stores rows as labels)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """The indexed image_ids."""
        return self._ids.of_row

    @property
    def trained(self) -> bool:
        return self._ivf is not None

    def _reduce(self, vecs: np.ndarray) -> np.ndarray:
        if self._proj is None:
            return vecs
        return np.ascontiguousarray(l2_normalize(vecs @ self._proj))

    def _check(self, vecs: np.ndarray) -> np.ndarray:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vecs.shape}")
        return vecs

    def train(self, sample: np.ndarray, expected_size: int | None = None) -> None:
        """Learn the projection and the lists from a sample of the vectors (replacing any).

        The sample is read 64k rows at a time (a memory map, or anything sliceable), and held
        only projected: k-means wants 64 vectors a list, 500k for 5M vectors' 8192 lists, which
        are 2.6 GB at 1280-d but 0.26 GB at 128.
        """
        n = len(sample)
        blocks = range(0, n, TRAIN_BLOCK)
        if self.keep_dims < self.dim and n >= self.keep_dims:
            # Uncentred, unlike faiss.PCAMatrix: inner products must survive the projection.
            moment = np.zeros((self.dim, self.dim))
            for b0 in blocks:
                part = self._check(sample[b0 : b0 + TRAIN_BLOCK])
                moment += part.T @ part  # float32 products, float64 sums
            _, eig = np.linalg.eigh(moment / n)
            self._proj = np.ascontiguousarray(eig[:, ::-1][:, : self.keep_dims], dtype=np.float32)
        reduced = np.concatenate([self._reduce(self._check(sample[b0 : b0 + TRAIN_BLOCK])) for b0 in blocks])
        d = reduced.shape[1]
        nlist = max(1, min(self.nlist or _default_nlist(max(n, expected_size or 0)), n // 16))
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, _SQ_TYPES[self.bits],
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.cp.niter = 10
        ivf.cp.max_points_per_centroid = 64  # k-means on <= 64 * nlist points: minutes, not hours
        ivf.train(reduced)
        self._ivf, self.trained_on, self.nlist = ivf, max(n, expected_size or 0), nlist

    def _rebuild(self) -> None:
        """Retrain on a sample of the stored vectors and index them all again."""
        n = len(self)
        rng = np.random.default_rng(n)
        self.train(DecodedRows(self._rows, np.sort(rng.choice(n, min(n, TRAIN_SAMPLE), replace=False))),
                   expected_size=n)
        for r0 in range(0, n, 100_000):
            r1 = min(r0 + 100_000, n)
            self._ivf.add_with_ids(self._reduce(_decode(self._rows.read_range(r0, r1))), np.arange(r0, r1))

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> int:
        """Index the vectors of images not indexed yet (others are skipped); returns how many.
        Trains on these vectors first if the index is untrained."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = self._check(vecs)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids but {len(vecs)} vectors")
        if not self.trained:
            if len(ids) == 0:
                return 0
            self.train(vecs)
        keep = self._ids.unknown(ids)
        if keep.any():
            vecs = vecs[keep]
            self._ivf.add_with_ids(self._reduce(vecs), self._ids.append(ids[keep]))
            self._rows.append(_encode(vecs))
            if len(self) >= 4 * self.trained_on:
                # Trained for a quarter of what it holds (a catalog that began small): the
                # projection and lists no longer fit it.
                self._rebuild()
        return int(keep.sum())

    def cosine_with(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        """Cosine of the indexed vector of ids[i] (its 8-bit code) with vecs[i]; NaN where ids[i]
        is not indexed."""
        rows = self._ids.rows(ids)
        out = np.full(len(rows), np.nan, np.float32)
        known = np.flatnonzero(rows >= 0)
        for c0 in range(0, len(known), 4096):  # decode a few thousand at a time
            j = known[c0 : c0 + 4096]
            out[j] = np.einsum("ij,ij->i", _decode(self._rows.read(rows[j])), self._check(vecs[j]))
        return out

    def search(self, vecs: np.ndarray, k: int, min_cosine: float,
               block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The up-to-k nearest indexed vectors with cosine >= min_cosine, for each query.

        Returns (query_row, matched_id, cosine), cosines from the 8-bit full vectors (within
        about 0.002 of the float32 ones). The lists are searched a block of queries at a time
        (bounded memory), then the candidates of all of them re-ranked together: each stored
        row is read once, however many queries it is a candidate of (a scene's photos share
        theirs: at 1M, 10k queries' 400k candidates were 217k rows), and in file order.
        """
        vecs = self._check(vecs)
        if not (self.trained and len(self) and len(vecs)):
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        self._ivf.nprobe = min(self.nprobe, self._ivf.nlist)
        qi_parts, row_parts = [], []
        for b0 in range(0, len(vecs), block):
            approx, cand = self._ivf.search(self._reduce(vecs[b0 : b0 + block]), self.candidates * k)
            qi, ci = np.nonzero((cand >= 0) & (approx >= min_cosine - self.margin))
            qi_parts.append(qi + b0)
            row_parts.append(cand[qi, ci])
        qi, rows = np.concatenate(qi_parts), np.concatenate(row_parts)
        cos = np.minimum(self._rerank(vecs, qi, rows), 1.0)  # 8-bit codes can overshoot 1
        qi, rows, cos = best_k(qi, rows, cos, k, min_cosine)
        return qi, self._ids.of_row[rows], cos

    RERANK_ROWS = 4096  # distinct rows read at a time (5 MB at 1280-d), the next while one is scored

    def _rerank(self, vecs: np.ndarray, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosine of vecs[qi[i]] with the 8-bit code of row rows[i], for each i."""
        cos = np.empty(len(rows), np.float32)
        if not len(rows):
            return cos
        uniq, inverse = np.unique(rows, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # candidates by row
        step = self.RERANK_ROWS
        bounds = np.searchsorted(inverse[order], np.arange(0, len(uniq) + step, step))
        # q . decode(code) = q . offset + (q . code) * step: score the codes without decoding
        q_off = vecs.sum(axis=1) * _CODE_OFFSET
        nxt = compute_threads().submit(self._rows.read_sorted, uniq[:step])
        for c, u0 in enumerate(range(0, len(uniq), step)):
            codes = nxt.result()
            if u0 + step < len(uniq):  # its reads wait on the disk while these are scored
                nxt = compute_threads().submit(self._rows.read_sorted, uniq[u0 + step : u0 + 2 * step])
            mine = order[bounds[c] : bounds[c + 1]]
            for p0 in range(0, len(mine), 4096):  # bounded gathers: 4096 pairs are 40 MB
                p = mine[p0 : p0 + 4096]
                dots = np.einsum("ij,ij->i", vecs[qi[p]], codes[inverse[p] - u0].astype(np.float32))
                cos[p] = q_off[qi[p]] + dots * _CODE_STEP
        return cos

    def search_among(self, vecs: np.ndarray, k: int,
                     min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The up-to-k nearest others of each of `vecs` among `vecs` themselves (a batch not
        indexed yet), exact cosine >= min_cosine: (row, other_row, cosine).

        Candidates from a flat scan of the projected vectors (a fifth of the full-dimension
        flops: 10k x 10k x 1280 took 1.2-7 s on the 2 busy cores), the best 4k within `margin`;
        then exact float32 cosines.
        """
        vecs = self._check(vecs)
        if not self.trained or len(vecs) < 2:
            return ExactVectorIndex.search_among(vecs, k, min_cosine)
        reduced = self._reduce(vecs)
        flat = faiss.IndexFlatIP(reduced.shape[1])
        flat.add(reduced)
        approx, cand = flat.search(reduced, min(4 * (k + 1), len(vecs)))
        qi, ci = np.nonzero((cand >= 0) & (approx >= min_cosine - self.margin))
        other = cand[qi, ci]
        qi, other = qi[qi != other], other[qi != other]
        cos = np.empty(len(qi), np.float32)
        for c0 in range(0, len(qi), 16384):  # bounded gathers: 16k pairs are 160 MB at 1280-d
            part = slice(c0, c0 + 16384)
            cos[part] = np.einsum("ij,ij->i", vecs[qi[part]], vecs[other[part]])
        return best_k(qi, other, cos, k, min_cosine)

    def save(self, path: str | os.PathLike) -> None:
        """Save into directory `path` (created if needed): rows, lists, then INDEX_FILE."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.trained:
            raise ValueError("cannot save an untrained VectorIndex: add vectors first")
        self._rows.save(path / self.ROWS_FILE)
        # The lists go to a file of their own, named by size, written by faiss straight from
        # memory (serialising them into the npz would hold a second copy: +680 MB at 5M).
        lists = f"lists-{len(self)}.faiss"
        with replacing(path / lists) as tmp:
            faiss.write_index(self._ivf, str(tmp))
        meta = {"dim": self.dim, "keep_dims": self.keep_dims, "bits": self.bits,
                "candidates": self.candidates, "nprobe": self.nprobe, "margin": self.margin,
                "trained_on": self.trained_on, "nrows": len(self), "lists": lists}
        atomic_savez(path / self.INDEX_FILE, {
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "proj": self._proj if self._proj is not None else np.empty((0, 0), np.float32),
            "row_ids": self._ids.of_row,
        })
        for old in path.glob("lists-*.faiss"):  # committed: earlier lists are garbage now
            if old.name != lists:
                old.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        path = Path(path)
        with np.load(path / cls.INDEX_FILE) as z:
            meta = json.loads(z["meta"].tobytes())
            # indexes saved before bits and candidates were settings: 4-bit codes, 4k candidates
            self = cls(meta["dim"], keep_dims=meta["keep_dims"], bits=meta.get("bits", 4),
                       candidates=meta.get("candidates", 4), nprobe=meta["nprobe"], margin=meta["margin"])
            self.trained_on = meta["trained_on"]
            self._proj = z["proj"] if z["proj"].size else None
            self._ids = RowIds(z["row_ids"])
        self._ivf = faiss.read_index(str(path / meta["lists"]))
        self.nlist = self._ivf.nlist
        self._rows.close()
        self._rows = RowStore(self.dim, path / cls.ROWS_FILE, meta["nrows"])
        return self
