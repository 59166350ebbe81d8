"""Near-duplicate search: pHash Hamming-radius search (flip/rotation aware) and cosine k-NN over
embeddings, with FAISS indexes; near-duplicate groups are connected components of the pairs.

A pure library (numpy, faiss, pandas, scipy): the dedup job passes the catalog's ids, hashes and
embeddings in and stores the pairs and groups it gets back. Every search is an index lookup,
so a batch costs O(batch) against a catalog of millions: never all-pairs, never an NxN matrix.

Hashes are 64-bit pHashes stored as signed int64 (two's complement, first hash bit most
significant), as in the catalog's BIGINT columns. Embeddings are float32, L2-normalised.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from math import comb
from pathlib import Path

import faiss
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# The 7 non-identity symmetries of the square, in the order of the phash_dihedral columns.
DIHEDRAL = (
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)
METHODS = ("phash", "phash_orient", "embedding")
PAIR_COLUMNS = ["image_id", "other_id", "method", "distance"]
_MASK64 = (1 << 64) - 1


def to_signed64(h: int) -> int:
    """A 64-bit unsigned value (or any int, taken modulo 2**64) as a signed int64."""
    h &= _MASK64
    return h - (1 << 64) if h >= 1 << 63 else h


def hash_to_bytes(arr_int64: np.ndarray) -> np.ndarray:
    """(n, 8) uint8 codes for FAISS binary indexes: the little-endian bytes of each hash.

    Little-endian puts the most significant bit (pHash's DC term, almost always 1) in the last
    bit of the code, the one bit HashIndex's 3x21-bit tables leave out.
    """
    a = np.ascontiguousarray(np.asarray(arr_int64, dtype=np.int64).reshape(-1), dtype="<i8")
    return a.view(np.uint8).reshape(-1, 8)


def _phash64(img: Image.Image) -> int:
    return to_signed64(int(str(imagehash.phash(img, hash_size=8)), 16))


def dihedral_phashes(img: Image.Image) -> list[int]:
    """pHash (imagehash, hash_size 8, as signed int64) of `img` under each transform of DIHEDRAL.

    A flipped or rotated copy of an image has its own pHash close to one of these, so searching
    them against the catalog finds such copies (method "phash_orient"). Converting to grayscale
    first is exact (phash does it anyway) and makes the 7 transposes 3x cheaper.
    """
    gray = img.convert("L")
    return [_phash64(gray.transpose(t)) for t in DIHEDRAL]


def _first_new(existing_sorted: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask of the ids not in `existing_sorted`, keeping only the first of repeated ones."""
    mask = np.zeros(len(ids), dtype=bool)
    mask[np.unique(ids, return_index=True)[1]] = True
    if len(existing_sorted):
        pos = np.minimum(np.searchsorted(existing_sorted, ids), len(existing_sorted) - 1)
        mask &= existing_sorted[pos] != ids
    return mask


def _atomic_write(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to exactly `path`, replacing it only once complete (a crash leaves the old one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- hash index


class HashIndex:
    """Exact Hamming-radius search over 64-bit hashes.

    FAISS IndexBinaryMultiHash with 3 tables of 21 bits (multi-index hashing): a hash within
    radius r of the query agrees with it to within r // 3 bits on at least one of the 3 disjoint
    21-bit slices (pigeonhole), so probing every key within nflip = r // 3 flips of each slice
    and verifying the candidates' full distance misses nothing. The 64th bit, left out of the
    slices, only loosens the bound. Small catalogs and large radii use the same codes scanned flat.

    Chosen by measurement: `python bench/neardup_scale.py --compare-hash --sizes 1000000`, 1M
    realistic pHashes (crops of real photos, see the bench), 10k queries (25% near-duplicates)
    plus 52.5k flipped/rotated ones, 2 shared cores, faiss 1.15.1; seconds per query set:

        index                      phash r=8   phash r=10   orient r=6   memory
        IndexBinaryFlat                  4.4          6.4         24.9    8 B/hash
        MultiHash 4 tables x 16 bits    19.0         31.9         14.3    +54 MB
        MultiHash 3 x 21 (chosen)        1.45         9.0          7.2    +139 MB
        MultiHash 2 x 32                   -            -         46.5
        IndexBinaryIVF 4096 lists     not exact: radius-10 recall 0.63 / 0.84 / 0.97 at nprobe
                                      16 / 64 / 256 (and 85 s to train)

    16-bit slices hold ~15 hashes per key at 1M and drown in candidates, 32-bit ones need
    C(32, <=r/2) probes; 3 x 21 is the balance. A probe costs about as much as 300 popcounts
    of the flat scan, so radii with nflip = 3 (r = 9..11) scan flat below ~1.4M hashes (4.4 s
    vs 9 s at 1M for r=10); at nflip <= 2 (r <= 8) the tables win from ~200k hashes.
    Results are identical to IndexBinaryFlat's in every case (checked by the bench and tests).
    """

    NHASH = 3
    BITS = 21

    def __init__(self, ids: np.ndarray | None = None, hashes: np.ndarray | None = None) -> None:
        self._index = faiss.IndexBinaryMultiHash(64, self.NHASH, self.BITS)
        self._ids = np.empty(0, np.int64)  # faiss position -> image_id
        self._sorted_ids = np.empty(0, np.int64)  # makes add() idempotent
        if ids is not None:
            self.add(ids, hashes)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: np.ndarray, hashes: np.ndarray) -> int:
        """Index the hashes of images not indexed yet (others are skipped); returns how many."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        hashes = np.asarray(hashes, dtype=np.int64).reshape(-1)
        if ids.shape != hashes.shape:
            raise ValueError(f"{len(ids)} ids but {len(hashes)} hashes")
        keep = _first_new(self._sorted_ids, ids)
        if keep.any():
            self._index.add(hash_to_bytes(hashes[keep]))
            self._ids = np.concatenate([self._ids, ids[keep]])
            self._sorted_ids = np.sort(self._ids)
        return int(keep.sum())

    def _use_flat(self, nflip: int) -> bool:
        # Probing costs NHASH * sum(C(21, j), j <= nflip) hash-table lookups per query, each
        # about as dear as 300 popcounts of a flat scan (measured, see above).
        probes = self.NHASH * sum(comb(self.BITS, j) for j in range(nflip + 1))
        return 300 * probes >= len(self)

    def search_radius(self, query: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed hash within Hamming distance `radius` (inclusive) of each query hash.

        Returns (query_row, matched_id, hamming) as int64, int64, int32 arrays, one entry per
        match, grouped by query row.
        """
        if radius < 0:
            raise ValueError(f"radius must be >= 0, not {radius}")
        codes = hash_to_bytes(query)
        if len(self) == 0 or len(codes) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
        nflip = radius // self.NHASH
        if self._use_flat(nflip):
            index = self._index.storage
        else:
            index = self._index
            index.nflip = nflip
        lims, dist, pos = index.range_search(codes, radius + 1)  # FAISS keeps distance < radius
        rows = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims).astype(np.int64))
        return rows, self._ids[pos], dist.astype(np.int32)

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write(path, {"index": faiss.serialize_index_binary(self._index), "ids": self._ids})

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashIndex:
        with np.load(path) as z:
            self = cls()
            self._index = faiss.deserialize_index_binary(z["index"])
            self._ids = z["ids"]
        self._sorted_ids = np.sort(self._ids)
        return self


# --------------------------------------------------------------------------- vector index


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _default_nlist(n: int) -> int:
    # About 2 * sqrt(n) lists, a power of two; a flat scan below 20k vectors.
    return 1 if n < 20_000 else int(2 ** round(np.log2(2 * np.sqrt(n))))


class _RowStore:
    """Fixed-size byte rows in a file: appended as they come (the caller's saved row count is
    the commit point), read back through a memory map whose pages are released after each read,
    so they cost page cache, not process memory."""

    def __init__(self, row_bytes: int, path: Path | None = None, nrows: int = 0) -> None:
        self.row_bytes = row_bytes
        self.path = path
        if path is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the store)
        else:
            if nrows and (not path.exists() or path.stat().st_size < nrows * row_bytes):
                raise ValueError(f"{path} holds fewer than the {nrows} rows its index expects")
            self._file = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115
        self._file.truncate(nrows * row_bytes)  # drops rows a crashed run appended but never committed
        self.nrows = nrows
        self._map: mmap.mmap | None = None

    def append(self, rows: np.ndarray) -> None:
        self._file.seek(self.nrows * self.row_bytes)
        self._file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        self.nrows += len(rows)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.empty((0, self.row_bytes), np.uint8)
        size = self.nrows * self.row_bytes
        if self._map is None or len(self._map) < size:  # rows were appended: map them too
            self._file.flush()
            self._unmap()
            self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ)
            self._map.madvise(mmap.MADV_RANDOM)  # rows are scattered: no read-ahead
        table = np.frombuffer(self._map, np.uint8, count=size).reshape(self.nrows, self.row_bytes)
        out = np.empty((len(rows), self.row_bytes), np.uint8)
        # Each page fault maps up to 64 KB around it (fault-around, even with MADV_RANDOM): read
        # 1024 rows at a time, then unmap them (MADV_DONTNEED keeps them in the page cache, out
        # of our RSS), so reading costs tens of MB, not the file's size.
        for r0 in range(0, len(rows), 1024):
            out[r0 : r0 + 1024] = table[rows[r0 : r0 + 1024]]
            self._map.madvise(mmap.MADV_DONTNEED)
        del table  # the map cannot close while a view of it lives
        return out

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        self._unmap()
        self._file.close()

    def save(self, path: Path) -> None:
        """Make every row durable at `path`, copying them there first if they live elsewhere."""
        self._file.flush()
        if self.path is None or not (path.exists() and path.samefile(self.path)):
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as dst:
                self._file.seek(0)
                shutil.copyfileobj(self._file, dst, 1 << 24)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
            self.close()
            self._file = open(path, "r+b")  # noqa: SIM115
            self.path = path
        else:
            os.fsync(self._file.fileno())


class VectorIndex:
    """Cosine k-NN with a threshold over L2-normalised embeddings, for millions of vectors in RAM.

    Two stages. Candidates: vectors projected on the top `keep_dims` eigenvectors of their
    (uncentred) second moment, re-normalised, 4-bit scalar-quantised in an inverted file
    (128 bytes a vector at 256 dims); the 4k best with an approximate cosine within `margin` of
    the threshold go on. Re-rank: their exact cosine from 8-bit codes of the full vectors (dim
    bytes each), kept in a file beside the saved index and read row by row, so they cost disk,
    not memory. The projection alone reads cosines about 0.02-0.04 high for near-duplicates
    (the differences between near-duplicates spread over many more axes than the photos do),
    which is why the reported cosine always comes from the re-rank.

    VECTOR_MEASUREMENTS_PLACEHOLDER

    The projection, the lists and the 8-bit ranges are learnt from the vectors of the first
    `add` (or `train`): index a representative sample first, and rebuild when the catalog has
    outgrown it (`needs_rebuild`).

    Persistence: a directory with INDEX_FILE and ROWS_FILE. An index created or loaded with a
    directory appends new rows to that directory's ROWS_FILE right away; `save` to the same
    directory then only writes INDEX_FILE, the commit point: a run that dies before it leaves
    rows that the next `load` drops. One writer at a time.
    """

    INDEX_FILE = "vector_index.npz"
    ROWS_FILE = "vectors.sq8"

    def __init__(self, dim: int, *, keep_dims: int = 256, nlist: int | None = None, nprobe: int = 4,
                 margin: float = 0.06, path: str | os.PathLike | None = None) -> None:
        self.dim = dim
        self.keep_dims = min(keep_dims, dim)
        self.nlist = nlist
        self.nprobe = nprobe
        self.margin = margin
        self.trained_on = 0
        self._proj: np.ndarray | None = None  # (dim, keep_dims); None: keep every dimension
        self._ivf: faiss.IndexIVFScalarQuantizer | None = None
        self._sq8: faiss.IndexScalarQuantizer | None = None
        # Full-vector codes go to path/ROWS_FILE as they are added (a temporary file without a
        # path); save() into the same directory then only has to commit them.
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
        self._rows = _RowStore(dim, Path(path) / self.ROWS_FILE if path is not None else None)
        self._row_ids = np.empty(0, np.int64)  # row -> image_id (faiss stores rows as labels)
        self._sorted_ids = np.empty(0, np.int64)  # image_ids ascending ...
        self._sorted_rows = np.empty(0, np.int64)  # ... and their rows

    def __len__(self) -> int:
        return len(self._row_ids)

    @property
    def trained(self) -> bool:
        return self._ivf is not None

    def needs_rebuild(self) -> bool:
        """True once the index holds 16x more vectors than it was trained on (and could use
        more lists): rebuild it from the stored embeddings with a fresh sample."""
        return (self.trained and len(self) > 16 * self.trained_on
                and _default_nlist(len(self)) > self._ivf.nlist)

    def _reduce(self, vecs: np.ndarray) -> np.ndarray:
        if self._proj is None:
            return vecs
        return np.ascontiguousarray(_l2_normalize(vecs @ self._proj))

    def _check(self, vecs: np.ndarray) -> np.ndarray:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vecs.shape}")
        return vecs

    def train(self, sample: np.ndarray, expected_size: int | None = None) -> None:
        """Learn the projection, the lists and the code ranges from a sample of the vectors."""
        sample = self._check(sample)
        n = len(sample)
        if self.keep_dims < self.dim and n >= self.keep_dims:
            # Uncentred, unlike faiss.PCAMatrix: inner products must survive the projection.
            _, eig = np.linalg.eigh(sample.T.astype(np.float64) @ sample / n)
            self._proj = np.ascontiguousarray(eig[:, ::-1][:, : self.keep_dims], dtype=np.float32)
        reduced = self._reduce(sample)
        d = reduced.shape[1]
        nlist = max(1, min(self.nlist or _default_nlist(max(n, expected_size or 0)), n // 16))
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_4bit,
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.cp.niter = 10
        ivf.cp.max_points_per_centroid = 64  # k-means on <= 64 * nlist points: minutes, not hours
        ivf.train(reduced)
        sq8 = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq8.train(sample)
        self._ivf, self._sq8, self.trained_on, self.nlist = ivf, sq8, n, nlist

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
        keep = _first_new(self._sorted_ids, ids)
        if keep.any():
            vecs = vecs[keep]
            rows = np.arange(len(self), len(self) + len(vecs), dtype=np.int64)
            self._ivf.add_with_ids(self._reduce(vecs), rows)
            self._rows.append(self._sq8.sa_encode(vecs))
            self._row_ids = np.concatenate([self._row_ids, ids[keep]])
            self._index_ids()
        return int(keep.sum())

    def _code_params(self) -> tuple[np.ndarray, np.ndarray]:
        """(offset, step) with decoded vector = offset + code * step (faiss QT_8bit, min-max)."""
        trained = faiss.vector_to_array(self._sq8.sq.trained)
        vmin, vdiff = trained[: self.dim], trained[self.dim :]
        return vmin + 0.5 * vdiff / 255, vdiff / 255

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        offset, step = self._code_params()
        return offset + codes.astype(np.float32) * step

    def _index_ids(self) -> None:
        self._sorted_rows = np.argsort(self._row_ids, kind="stable")
        self._sorted_ids = self._row_ids[self._sorted_rows]

    def pair_cosine(self, ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
        """Cosine of the indexed vectors of ids_a[i] and ids_b[i] (8-bit codes); NaN where
        either image is not indexed."""
        ids = np.concatenate([np.asarray(ids_a, np.int64), np.asarray(ids_b, np.int64)])
        out = np.full(len(ids) // 2, np.nan, np.float32)
        if not len(ids) or not len(self):
            return out
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self) - 1)
        known = self._sorted_ids[pos] == ids
        rows = self._sorted_rows[pos]
        half = len(ids) // 2
        both = np.flatnonzero(known[:half] & known[half:])
        for c0 in range(0, len(both), 4096):  # decode a few thousand pairs at a time
            j = both[c0 : c0 + 4096]
            a = self._decode(self._rows.read(rows[j]))
            b = self._decode(self._rows.read(rows[j + half]))
            out[j] = np.einsum("ij,ij->i", a, b)
        return out

    def search(self, vecs: np.ndarray, k: int, min_cosine: float,
               block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The up-to-k nearest indexed vectors with cosine >= min_cosine, for each query.

        Returns (query_row, matched_id, cosine), cosines from the 8-bit full vectors (within
        about 0.002 of the float32 ones). Queries go in blocks to bound memory.
        """
        vecs = self._check(vecs)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if self.trained and len(self) and len(vecs):
            self._ivf.nprobe = min(self.nprobe, self._ivf.nlist)
            for b0 in range(0, len(vecs), block):
                out.append(self._search_block(vecs[b0 : b0 + block], k, min_cosine, b0))
        if not out:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]

    def _search_block(self, q: np.ndarray, k: int, min_cosine: float,
                      offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        approx, cand = self._ivf.search(self._reduce(q), 4 * k)
        qi, ci = np.nonzero((cand >= 0) & (approx >= min_cosine - self.margin))
        rows = cand[qi, ci]
        # q . decode(code) = q . offset + (q * step) . code: score the codes without decoding
        code_offset, code_step = self._code_params()
        q_off, q_step = q @ code_offset, q * code_step
        cos = np.empty(len(rows), np.float32)
        for c0 in range(0, len(rows), 4096):  # a few thousand candidates' codes at a time
            part = slice(c0, c0 + 4096)
            codes = self._rows.read(rows[part]).astype(np.float32)
            cos[part] = q_off[qi[part]] + np.einsum("ij,ij->i", q_step[qi[part]], codes)
        cos = np.minimum(cos, 1.0)  # 8-bit codes can overshoot 1
        ok = cos >= min_cosine
        qi, rows, cos = qi[ok], rows[ok], cos[ok]
        # best k per query: sort by (query, -cosine) and keep each query's first k
        order = np.lexsort((-cos, qi))
        qi, rows, cos = qi[order], rows[order], cos[order]
        first = np.searchsorted(qi, qi, side="left")
        top = np.arange(len(qi)) - first < k
        return qi[top] + offset, self._row_ids[rows[top]], cos[top].astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Save into directory `path` (created if needed): the index file and the row file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.trained:
            raise ValueError("cannot save an untrained VectorIndex: add vectors first")
        self._rows.save(path / self.ROWS_FILE)  # rows first: the index file is the commit point
        meta = {"dim": self.dim, "keep_dims": self.keep_dims, "nprobe": self.nprobe, "margin": self.margin,
                "trained_on": self.trained_on, "nrows": len(self)}
        _atomic_write(path / self.INDEX_FILE, {
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "ivf": faiss.serialize_index(self._ivf),
            "sq8": faiss.serialize_index(self._sq8),
            "proj": self._proj if self._proj is not None else np.empty((0, 0), np.float32),
            "row_ids": self._row_ids,
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        path = Path(path)
        with np.load(path / cls.INDEX_FILE) as z:
            meta = json.loads(z["meta"].tobytes())
            self = cls(meta["dim"], keep_dims=meta["keep_dims"], nprobe=meta["nprobe"], margin=meta["margin"])
            self.trained_on = meta["trained_on"]
            self._ivf = faiss.deserialize_index(z["ivf"])
            self._sq8 = faiss.deserialize_index(z["sq8"])
            self._proj = z["proj"] if z["proj"].size else None
            self._row_ids = z["row_ids"]
        self.nlist = self._ivf.nlist
        self._index_ids()
        self._rows.close()
        self._rows = _RowStore(self.dim, path / cls.ROWS_FILE, meta["nrows"])
        return self


# --------------------------------------------------------------------------- pairs and groups


@dataclass(frozen=True)
class NearDupConfig:
    """Thresholds of find_pairs. Defaults from `bench/neardup_scale.py --calibrate` (real photos
    and their variants through the production hash and embedding code) and its chance-match
    rates; see the module's figures in the integration notes.

    phash_radius: max pHash Hamming distance of a "phash" pair (inclusive).
    orient_radius: the same for a flipped/rotated copy ("phash_orient"); -1 disables it.
    min_cosine: min embedding cosine of an "embedding" pair.
    k: max embedding neighbours per new image.
    verify_radius, verify_cosine: a pHash pair farther apart than verify_radius is kept only if
        the two embeddings have cosine >= verify_cosine (when both are indexed). Unrelated
        photos collide on 64-bit pHashes often enough at catalog scale (about 0.16 per new
        image within 8 bits at 1M, 0.8 at 5M) to chain groups together; their embeddings are
        unrelated (cosine p99.9 0.46), while true copies sit at 0.77 and above.
    max_hash_matches: max pHash matches kept per new image and method, closest first: caps the
        quadratic blow-up of thousands of blank or near-uniform images, all alike, while still
        connecting them into one group.
    """

    phash_radius: int = 8
    orient_radius: int = 5
    min_cosine: float = 0.90
    k: int = 10
    verify_radius: int = 2
    verify_cosine: float = 0.5
    max_hash_matches: int = 50


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({"image_id": np.empty(0, np.int64), "other_id": np.empty(0, np.int64),
                         "method": pd.Series([], dtype=object), "distance": np.empty(0, np.float64)})


def _pairs(query_ids: np.ndarray, matched: np.ndarray, distance: np.ndarray, method: str,
           cap: int | None = None) -> pd.DataFrame:
    """Pair rows from search results: no self-pairs, at most `cap` closest per query image,
    image_id < other_id, one row per pair (the smallest distance)."""
    keep = query_ids != matched
    df = pd.DataFrame({"q": query_ids[keep], "m": matched[keep],
                       "distance": distance[keep].astype(np.float64)})
    if cap is not None:
        df = df.sort_values(["q", "distance", "m"], kind="stable")
        df = df[df.groupby("q", sort=False).cumcount() < cap]
    lo, hi = np.minimum(df.q.to_numpy(), df.m.to_numpy()), np.maximum(df.q.to_numpy(), df.m.to_numpy())
    out = pd.DataFrame({"image_id": lo, "other_id": hi, "method": method, "distance": df.distance.to_numpy()})
    return out.groupby(["image_id", "other_id", "method"], as_index=False, sort=False)["distance"].min()


def _verified(pairs: pd.DataFrame, vector_index: VectorIndex | None, cfg: NearDupConfig) -> pd.DataFrame:
    """Drop hash pairs beyond cfg.verify_radius whose embeddings disagree (see NearDupConfig)."""
    far = (pairs.distance > cfg.verify_radius).to_numpy()
    if vector_index is None or not far.any():
        return pairs
    cos = vector_index.pair_cosine(pairs.image_id.to_numpy()[far], pairs.other_id.to_numpy()[far])
    drop = np.zeros(len(pairs), dtype=bool)
    drop[far] = cos < cfg.verify_cosine  # NaN (not embedded) compares False: kept unverified
    return pairs[~drop]


def find_pairs(new_ids: np.ndarray, new_phash: np.ndarray | None, new_dihedral: np.ndarray | None,
               new_vecs: np.ndarray | None, hash_index: HashIndex | None, vector_index: VectorIndex | None,
               cfg: NearDupConfig | None = None) -> pd.DataFrame:
    """Near-duplicate pairs of a batch of new images, against the catalog and among themselves.

    First adds the new images to both indexes (images already indexed are skipped, so a retried
    batch is not doubled); save the indexes once the pairs are stored. Then one index search per
    method finds matches in the catalog and the batch alike:
    - "phash": pHash within cfg.phash_radius; distance = Hamming distance;
    - "phash_orient": one of the 7 flipped/rotated pHashes (new_dihedral, (n, 7) in DIHEDRAL
      order) within cfg.orient_radius of a pHash, for pairs not already "phash"; distance =
      that Hamming distance;
    - "embedding": among the cfg.k nearest, cosine >= cfg.min_cosine; distance = 1 - cosine.
    pHash pairs beyond cfg.verify_radius must also pass the embedding check of NearDupConfig.
    Pass None for a part that is missing (no embeddings yet, no dihedral hashes) to skip it.

    Returns a DataFrame [image_id, other_id, method, distance], image_id < other_id, one row per
    pair and method, sorted.
    """
    cfg = cfg or NearDupConfig()
    new_ids = np.asarray(new_ids, dtype=np.int64).reshape(-1)
    use_vecs = vector_index is not None and new_vecs is not None
    if use_vecs:
        vector_index.add(new_ids, new_vecs)
    frames = [_empty_pairs()]
    if hash_index is not None and new_phash is not None:
        new_phash = np.asarray(new_phash, dtype=np.int64).reshape(-1)
        hash_index.add(new_ids, new_phash)
        q, matched, dist = hash_index.search_radius(new_phash, cfg.phash_radius)
        phash = _pairs(new_ids[q], matched, dist, "phash", cfg.max_hash_matches)
        if new_dihedral is not None and cfg.orient_radius >= 0:
            dihedral = np.asarray(new_dihedral, dtype=np.int64).reshape(len(new_ids), len(DIHEDRAL))
            q, matched, dist = hash_index.search_radius(dihedral.reshape(-1), cfg.orient_radius)
            orient = _pairs(new_ids[q // len(DIHEDRAL)], matched, dist, "phash_orient", cfg.max_hash_matches)
            known = orient.merge(phash[["image_id", "other_id"]], how="left", indicator=True)["_merge"]
            frames.append(_verified(orient[(known == "left_only").to_numpy()], vector_index, cfg))
        frames.append(_verified(phash, vector_index, cfg))
    if use_vecs:
        q, matched, cos = vector_index.search(new_vecs, cfg.k + 1, cfg.min_cosine)  # +1: itself
        frames.append(_pairs(new_ids[q], matched, np.maximum(1.0 - cos, 0.0), "embedding"))
    out = pd.concat(frames, ignore_index=True)[PAIR_COLUMNS]
    return out.sort_values(["image_id", "other_id", "method"], ignore_index=True)


def merge_groups(pairs: pd.DataFrame, existing: pd.DataFrame) -> pd.DataFrame:
    """Near-duplicate groups after adding `pairs`: the (image_id, group_id) rows to upsert.

    Groups are connected components of all pairs so far, so they only ever merge: a new image
    near two groups joins them into one. group_id is the smallest image_id of the group.
    `existing` holds the current (image_id, group_id) rows; it must include every member of each
    group that has an image in `pairs` (the whole table does). Returns the rows whose group is
    new or changed, sorted by image_id.
    """
    a = pairs["image_id"].to_numpy(np.int64)
    b = pairs["other_id"].to_numpy(np.int64)
    ex_img = existing["image_id"].to_numpy(np.int64)
    ex_grp = existing["group_id"].to_numpy(np.int64)
    touched = np.isin(ex_grp, ex_grp[np.isin(ex_img, np.concatenate([a, b]))])
    src = np.concatenate([a, ex_img[touched]])
    dst = np.concatenate([b, ex_grp[touched]])
    nodes, idx = np.unique(np.concatenate([src, dst]), return_inverse=True)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(src), np.int8), (idx[: len(src)], idx[len(src) :])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # nodes are sorted, so each component's first node is its smallest image_id
    first = np.unique(labels, return_index=True)[1]
    group = nodes[first][labels]
    order = np.argsort(ex_img)
    pos = np.minimum(np.searchsorted(ex_img[order], nodes), max(len(ex_img) - 1, 0))
    if len(ex_img):
        changed = (ex_img[order][pos] != nodes) | (ex_grp[order][pos] != group)
    else:
        changed = np.ones(n, dtype=bool)
    return pd.DataFrame({"image_id": nodes[changed], "group_id": group[changed]})
