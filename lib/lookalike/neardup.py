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
import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import combinations
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


def _merge_sorted(existing_sorted: np.ndarray, new: np.ndarray) -> np.ndarray:
    """`existing_sorted` with `new` merged in, still sorted: O(n) instead of a re-sort."""
    new = np.sort(new)
    return np.insert(existing_sorted, np.searchsorted(existing_sorted, new), new)


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
    """Exact Hamming-radius search over 64-bit hashes: multi-index hashing in numpy.

    Each hash is cut into 3 slices of 21 bits (bits 0-20, 21-41, 42-62; bit 63, pHash's
    all-but-constant DC term, is left out). A hash within radius r of the query agrees with it
    to within nflip = r // 3 bits on at least one slice (pigeonhole), so probing, in each of 3
    tables sorted by slice value, every key within nflip flips of the query's slice and checking
    the full distance of what is there misses nothing. Radii past 11 (nflip >= 4, thousands of
    probes) scan all hashes with FAISS IndexBinaryFlat instead.

    Chosen by measurement: `python bench/neardup_scale.py --compare-hash --sizes 1000000`, 1M
    realistic pHashes (crops of real photos, see the bench), 10k queries (25% near-duplicates)
    and 52.5k flipped/rotated ones, 2 shared (busy) cores, faiss 1.15.1; seconds per query set:

        index                          phash r=8  r=10   orient r=5  r=8    memory
        faiss IndexBinaryFlat            2.4      1.6      8.6       8.6    8 B/hash
        faiss IndexBinaryMultiHash 3x21  0.85     5.5      0.38      4.1    +196 MB at 1M
        faiss IndexBinaryMultiHash 4x16 15.8     16.3     12.0     127
        faiss IndexBinaryMultiHash 2x32   -        -       3.4        -
        faiss IndexBinaryIVF 4096       not exact: r=10 recall 0.63 / 0.84 / 0.97 at nprobe
                                        16 / 64 / 256 (0.2 / 0.5 / 7.0 s)
        this class (numpy MIH 3x21)      0.25     1.4      0.13      1.4    36 B/hash + 24 MB

    All exact ones agree with IndexBinaryFlat hash for hash. FAISS's MultiHash keeps its tables
    in std::unordered_map and gathers candidates in a std::unordered_set: at 5M it took ~1 GB
    and 25 s (phash r=8) + 16 s (orient r=5) in the scale bench, against ~0.2 GB and <1 s here.
    """

    NHASH = 3
    BITS = 21
    FLAT_FROM_NFLIP = 4  # C(21, <=4) = 7547 probes per slice: scanning is cheaper
    BLOCK = 1024  # queries per vectorised step: bounds the candidate arrays to tens of MB

    def __init__(self, ids: np.ndarray | None = None, hashes: np.ndarray | None = None) -> None:
        self._ids = np.empty(0, np.int64)  # position -> image_id
        self._codes = np.empty(0, np.uint64)  # position -> hash
        self._sorted_ids = np.empty(0, np.int64)  # makes add() idempotent
        # per slice: positions sorted by slice value, and where each value's run starts
        self._perm = [np.empty(0, np.int32) for _ in range(self.NHASH)]
        self._start = [np.zeros((1 << self.BITS) + 1, np.int32) for _ in range(self.NHASH)]
        self._flat: faiss.IndexBinaryFlat | None = None
        if ids is not None:
            self.add(ids, hashes)

    def __len__(self) -> int:
        return len(self._ids)

    def _slice(self, codes: np.ndarray, t: int) -> np.ndarray:
        return ((codes >> np.uint64(self.BITS * t)) & np.uint64((1 << self.BITS) - 1)).astype(np.int64)

    def add(self, ids: np.ndarray, hashes: np.ndarray) -> int:
        """Index the hashes of images not indexed yet (others are skipped); returns how many."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        hashes = np.asarray(hashes, dtype=np.int64).reshape(-1)
        if ids.shape != hashes.shape:
            raise ValueError(f"{len(ids)} ids but {len(hashes)} hashes")
        keep = _first_new(self._sorted_ids, ids)
        if not keep.any():
            return 0
        codes = hashes[keep].view(np.uint64)
        pos = np.arange(len(self), len(self) + len(codes), dtype=np.int32)
        for t in range(self.NHASH):
            key = self._slice(codes, t)
            order = np.argsort(key, kind="stable")
            # insert each new position at the end of its key's run; shift the later runs
            self._perm[t] = np.insert(self._perm[t], self._start[t][key[order] + 1], pos[order])
            self._start[t][1:] += np.cumsum(np.bincount(key, minlength=1 << self.BITS), dtype=np.int32)
        self._ids = np.concatenate([self._ids, ids[keep]])
        self._codes = np.concatenate([self._codes, codes])
        self._sorted_ids = _merge_sorted(self._sorted_ids, ids[keep])
        self._flat = None
        return int(keep.sum())

    def search_radius(self, query: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed hash within Hamming distance `radius` (inclusive) of each query hash.

        Returns (query_row, matched_id, hamming) as int64, int64, int32 arrays, one entry per
        match, sorted by query row.
        """
        if radius < 0:
            raise ValueError(f"radius must be >= 0, not {radius}")
        q = np.asarray(query, dtype=np.int64).reshape(-1).view(np.uint64)
        if len(self) == 0 or len(q) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
        nflip = radius // self.NHASH
        if nflip >= self.FLAT_FROM_NFLIP:
            rows, pos, dist = self._search_flat(q, radius)
        else:
            probes = _flip_masks(self.BITS, nflip)
            parts = [self._search_block(q[b0 : b0 + self.BLOCK], b0, radius, probes)
                     for b0 in range(0, len(q), self.BLOCK)]
            rows, pos, dist = (np.concatenate(x) for x in zip(*parts, strict=True))
        return rows, self._ids[pos], dist.astype(np.int32)

    def _search_block(self, q: np.ndarray, offset: int, radius: int,
                      probes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = []
        for t in range(self.NHASH):
            keys = self._slice(q, t)[:, None] ^ probes[None, :]  # (queries, probes)
            first, last = self._start[t][keys].ravel(), self._start[t][keys + 1].ravel()
            count = last - first
            total = int(count.sum())
            if total == 0:
                continue
            # positions first..last-1 of every probed run, flattened, and the query of each
            run_of = np.repeat(np.arange(len(count)), count)
            within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
            pos = self._perm[t][first[run_of] + within]
            row = run_of // len(probes)
            dist = np.bitwise_count(self._codes[pos] ^ q[row])
            ok = dist <= radius
            found.append((row[ok].astype(np.int64) << 32) | pos[ok].astype(np.int64))
        if not found:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
        pairs = np.unique(np.concatenate(found))  # a hash close on two slices is found twice
        rows, pos = pairs >> 32, pairs & 0xFFFFFFFF
        return rows + offset, pos, np.bitwise_count(self._codes[pos] ^ q[rows])

    def _search_flat(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._flat is None:
            self._flat = faiss.IndexBinaryFlat(64)
            self._flat.add(hash_to_bytes(self._codes.view(np.int64)))
        lims, dist, pos = self._flat.range_search(hash_to_bytes(q.view(np.int64)), radius + 1)  # d < r + 1
        return np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims.astype(np.int64))), pos, dist

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write(path, {"ids": self._ids, "codes": self._codes,
                             **{f"perm{t}": self._perm[t] for t in range(self.NHASH)},
                             **{f"start{t}": self._start[t] for t in range(self.NHASH)}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashIndex:
        self = cls()
        with np.load(path) as z:
            self._ids, self._codes = z["ids"], z["codes"]
            self._perm = [z[f"perm{t}"] for t in range(cls.NHASH)]
            self._start = [z[f"start{t}"] for t in range(cls.NHASH)]
        self._sorted_ids = np.sort(self._ids)
        return self


def _flip_masks(bits: int, nflip: int) -> np.ndarray:
    """Every `bits`-bit mask with at most `nflip` bits set."""
    masks = [0]
    for k in range(1, nflip + 1):
        masks += [sum(1 << b for b in c) for c in combinations(range(bits), k)]
    return np.array(masks, np.int64)


# --------------------------------------------------------------------------- vector index


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


# Full vectors for the re-rank: 8 bits a coordinate over [-1, 1], fixed (unit vectors cannot
# leave it), so no training can go stale: cosines within ~0.002 (rms) of float32.
_CODE_STEP = np.float32(2 / 255)
_CODE_OFFSET = np.float32(-1 + 1 / 255)  # decoded value = offset + code * step (bin centres)


def _encode(vecs: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((vecs + 1) * 127.5), 0, 255).astype(np.uint8)


def _decode(codes: np.ndarray) -> np.ndarray:
    return _CODE_OFFSET + codes.astype(np.float32) * _CODE_STEP


def _default_nlist(n: int) -> int:
    # ~500 vectors a list (a power of two), so a probe scans as much at 5M as at 1M: search
    # time stays flat while the coarse quantizer's share (nlist dot products) stays small.
    # One list (a flat scan) below 20k vectors.
    return 1 if n < 20_000 else int(2 ** round(np.log2(n / 500)))


class _RowStore:
    """Fixed-size byte rows in a file: appended as they come (the caller's saved row count is
    the commit point), read back with pread, so they cost page cache, not process memory."""

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
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # scattered reads: no read-ahead
        self.nrows = nrows

    def append(self, rows: np.ndarray) -> None:
        self._file.seek(self.nrows * self.row_bytes)
        self._file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        self.nrows += len(rows)

    def read(self, rows: np.ndarray) -> np.ndarray:
        # One pread a row, not a memory map: a map faults in whole page-cache folios (up to
        # 2 MB each for a freshly written file), which blew the RSS up by ~1 GB at 1M rows.
        self._file.flush()
        fd, size = self._file.fileno(), self.row_bytes
        out = np.empty((len(rows), size), np.uint8)
        for j, r in enumerate(rows.tolist()):
            out[j] = np.frombuffer(os.pread(fd, size, r * size), np.uint8)
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        self._file.flush()
        data = os.pread(self._file.fileno(), (stop - start) * self.row_bytes, start * self.row_bytes)
        return np.frombuffer(data, np.uint8).reshape(stop - start, self.row_bytes)

    def close(self) -> None:
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
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
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

    Measured with `python bench/neardup_scale.py --compare-vector --sizes 1000000`: 1M x 1280
    embeddings drawn from a model fitted to real EfficientNet-Lite0 ones (it reproduces their
    projection error on real near-duplicate pairs: +0.017 +- 0.015 vs +0.018 +- 0.017 at 512
    dims), 10k queries (25% near-duplicates), exact float32 top-50 of 1000 as truth, k=10,
    recall capped at k per query; 2048 lists:

        RAM/vector   search   nprobe  recall/precision at cosine 0.85 / 0.90 / 0.95
        64 B (128d)  re-rank     4    0.987/0.996  0.978/0.992  0.993/0.980
        128 B (256d) re-rank     2    0.996/0.997  0.993/0.992  0.993/0.980
        128 B (256d) re-rank     4    0.997/0.997  0.994/0.992  0.993/0.980   (2.6 cpu-s)
        128 B (256d) re-rank     8    0.997/0.997  0.994/0.992  0.993/0.980   (4.3 cpu-s)
        192 B (384d) re-rank     4    0.996/0.996  0.992/0.992  0.986/0.986
        128 B (256d) compressed  4    0.900/0.457  0.815/0.242  0.925/0.114   cosines +0.06 high

    Re-ranked cosines were within 0.001 of the float32 ones (0.002 rms now that the 8-bit codes
    use the fixed range [-1, 1]). nprobe is 8, not 4, by default: in the scale bench at 5M
    (4096 lists then) planted near-duplicates were found at 0.975 with 4 and 0.992 with 8
    (0.998 at 1M either way): near-duplicates of outlying photos can fall in a neighbouring
    list. nprobe=4 halves the list scanning.

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

    def __init__(self, dim: int, *, keep_dims: int = 256, nlist: int | None = None, nprobe: int = 8,
                 margin: float = 0.06, path: str | os.PathLike | None = None) -> None:
        self.dim = dim
        self.keep_dims = min(keep_dims, dim)
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
        self._rows = _RowStore(dim, Path(path) / self.ROWS_FILE if path is not None else None)
        self._row_ids = np.empty(0, np.int64)  # row -> image_id (faiss stores rows as labels)
        self._sorted_ids = np.empty(0, np.int64)  # image_ids ascending ...
        self._sorted_rows = np.empty(0, np.int64)  # ... and their rows

    def __len__(self) -> int:
        return len(self._row_ids)

    @property
    def trained(self) -> bool:
        return self._ivf is not None

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
        """Learn the projection and the lists from a sample of the vectors (replacing any)."""
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
        self._ivf, self.trained_on, self.nlist = ivf, max(n, expected_size or 0), nlist

    def _rebuild(self) -> None:
        """Retrain on a sample of the stored vectors and index them all again."""
        n = len(self)
        rng = np.random.default_rng(n)
        sample = np.sort(rng.choice(n, min(n, 500_000), replace=False))  # k-means takes 64/list of it
        self.train(_decode(self._rows.read(sample)), expected_size=n)
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
        keep = _first_new(self._sorted_ids, ids)
        if keep.any():
            vecs = vecs[keep]
            rows = np.arange(len(self), len(self) + len(vecs), dtype=np.int64)
            self._ivf.add_with_ids(self._reduce(vecs), rows)
            self._rows.append(_encode(vecs))
            new = ids[keep]
            order = np.argsort(new)
            at = np.searchsorted(self._sorted_ids, new[order])  # merge: O(n), not a re-sort
            self._sorted_ids = np.insert(self._sorted_ids, at, new[order])
            self._sorted_rows = np.insert(self._sorted_rows, at, rows[order])
            self._row_ids = np.concatenate([self._row_ids, new])
            if len(self) >= 4 * self.trained_on:
                # Trained for a quarter of what it holds (a catalog that began small): the
                # projection and lists no longer fit it.
                self._rebuild()
        return int(keep.sum())

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
            a = _decode(self._rows.read(rows[j]))
            b = _decode(self._rows.read(rows[j + half]))
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
        q_off, q_step = q.sum(axis=1) * _CODE_OFFSET, q * _CODE_STEP
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
        """Save into directory `path` (created if needed): rows, lists, then INDEX_FILE."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self.trained:
            raise ValueError("cannot save an untrained VectorIndex: add vectors first")
        self._rows.save(path / self.ROWS_FILE)
        # The lists go to a file of their own, named by size, written by faiss straight from
        # memory (serialising them into the npz would hold a second copy: +680 MB at 5M).
        lists = f"lists-{len(self)}.faiss"
        faiss.write_index(self._ivf, str(path / (lists + ".tmp")))
        os.replace(path / (lists + ".tmp"), path / lists)
        meta = {"dim": self.dim, "keep_dims": self.keep_dims, "nprobe": self.nprobe, "margin": self.margin,
                "trained_on": self.trained_on, "nrows": len(self), "lists": lists}
        _atomic_write(path / self.INDEX_FILE, {
            "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "proj": self._proj if self._proj is not None else np.empty((0, 0), np.float32),
            "row_ids": self._row_ids,
        })
        for old in path.glob("lists-*.faiss"):  # committed: earlier lists are garbage now
            if old.name != lists:
                old.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        path = Path(path)
        with np.load(path / cls.INDEX_FILE) as z:
            meta = json.loads(z["meta"].tobytes())
            self = cls(meta["dim"], keep_dims=meta["keep_dims"], nprobe=meta["nprobe"], margin=meta["margin"])
            self.trained_on = meta["trained_on"]
            self._proj = z["proj"] if z["proj"].size else None
            self._row_ids = z["row_ids"]
        self._ivf = faiss.read_index(str(path / meta["lists"]))
        self.nlist = self._ivf.nlist
        self._index_ids()
        self._rows.close()
        self._rows = _RowStore(self.dim, path / cls.ROWS_FILE, meta["nrows"])
        return self


# --------------------------------------------------------------------------- pairs and groups


@dataclass(frozen=True)
class NearDupConfig:
    """Thresholds of find_pairs.

    Defaults from `python bench/neardup_scale.py --calibrate ND_DIR`: 40 real photos x 14
    variants plus 460 distractors, through extract's 512-px thumbnail, hashing's pHash,
    dihedral_phashes and the EfficientNet-Lite0 embedder; chance matches from crops of different
    real photos. Distances are orig vs variant.

    phash_radius (8): resized, recompressed, PNG, grey, EXIF-rotated copies are at 0-2 bits,
        brightness/colour changes at <= 6, watermarks at 0-18 (75% within 8); crops at 16+ are
        left to the embeddings. Different photos: 1.6e-7 of pairs within 8 bits (0.16 chance
        matches per new image at 1M), 5e-7 within 10 (imagededup's default; 2.5 at 5M).
    orient_radius (5): mirrored and rotated copies are 0-2 bits from one of the 7 transformed
        hashes of the original; searching 7 hashes multiplies chance matches by 2-6 (4.7e-8
        of pairs within 4 bits, 1.3e-7 within 6: 0.13 per new image at 1M). -1 disables it.
    min_cosine (0.90): colour, PNG, EXIF, watermark copies >= 0.95; mirrored >= 0.92;
        brightness and JPEG q40 mostly >= 0.90 (min 0.77); 90% crops 82% >= 0.90 (98% >= 0.85).
        Different photos: max 0.71, p99.9 0.46; photos of one scene reach 0.85-0.9.
    k (10): embedding neighbours per new image (groups connect through any of them).
    verify_radius (2), verify_cosine (0.5): a pHash pair more than verify_radius bits apart is
        kept only if the two embeddings have cosine >= verify_cosine (when both are indexed).
        At catalog scale chance matches chain groups together (a 5M catalog gives each new
        image ~0.8 within 8 bits); their embeddings are unrelated (cosine p99.9 0.46) while
        pHash-found copies sit at 0.77 and above, rotated ones at 0.39+ (but at 0-2 bits).
    max_hash_matches (50): pHash matches kept per new image and method, closest first: caps the
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
