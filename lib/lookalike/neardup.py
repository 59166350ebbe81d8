"""Near-duplicate search indexes: exact Hamming-radius search over 64-bit pHashes, and cosine
k-NN over embeddings, exact for small catalogs and compressed for millions; all persistent.

A pure library (numpy, faiss): lookalike.dedup finds the pairs with these indexes and keeps
them beside the catalog. Every search is an index lookup, so a batch costs O(batch) against a
catalog of millions: never all-pairs, never an NxN matrix.

Hashes are 64-bit pHashes stored as signed int64 (two's complement, first hash bit most
significant), as in the catalog's BIGINT columns. Embeddings are float32, L2-normalised.
Indexes hold each image_id once: adding a known one again is a no-op, so a retried batch is
not doubled.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import faiss
import numpy as np


def hash_to_bytes(arr_int64: np.ndarray) -> np.ndarray:
    """(n, 8) uint8 codes for FAISS binary indexes: the little-endian bytes of each hash.

    Little-endian puts the most significant bit (pHash's DC term, almost always 1) in the last
    bit of the code, the one bit HashIndex's 3x21-bit tables leave out.
    """
    a = np.ascontiguousarray(np.asarray(arr_int64, dtype=np.int64).reshape(-1), dtype="<i8")
    return a.view(np.uint8).reshape(-1, 8)


def _first_new(existing_sorted: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask of the ids not in `existing_sorted`, keeping only the first of repeated ones."""
    mask = np.zeros(len(ids), dtype=bool)
    mask[np.unique(ids, return_index=True)[1]] = True
    if len(existing_sorted):
        pos = np.minimum(np.searchsorted(existing_sorted, ids), len(existing_sorted) - 1)
        mask &= existing_sorted[pos] != ids
    return mask


class _RowIds:
    """The image_id of each row of an index (rows numbered as added), looked up by image_id."""

    def __init__(self, of_row: np.ndarray | None = None) -> None:
        self.of_row = np.empty(0, np.int64) if of_row is None else np.asarray(of_row, np.int64)
        self._order = np.argsort(self.of_row, kind="stable")  # rows by ascending image_id
        self._sorted = self.of_row[self._order]

    def __len__(self) -> int:
        return len(self.of_row)

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        """Mask of the ids without a row yet, keeping only the first of repeated ones."""
        return _first_new(self._sorted, ids)

    def append(self, ids: np.ndarray) -> np.ndarray:
        """New rows for `ids` (unknown ones, see `unknown`); returns their row numbers."""
        rows = np.arange(len(self), len(self) + len(ids), dtype=np.int64)
        order = np.argsort(ids)
        at = np.searchsorted(self._sorted, ids[order])  # a merge: O(n), not a re-sort
        self._sorted = np.insert(self._sorted, at, ids[order])
        self._order = np.insert(self._order, at, rows[order])
        self.of_row = np.concatenate([self.of_row, ids])
        return rows

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The row of each id; -1 where it has none."""
        ids = np.asarray(ids, np.int64)
        if not len(self):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, ids), len(self) - 1)
        return np.where(self._sorted[pos] == ids, self._order[pos], -1)


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
        this class (numpy MIH 3x21)      0.25     1.4      0.13      1.4    44 B/hash + 24 MB
        (one thread; blocks of queries now go to threads: 1.7x on 2 cores)

    All exact ones agree with IndexBinaryFlat hash for hash. FAISS's MultiHash keeps its tables
    in std::unordered_map and gathers candidates in a std::unordered_set: at 5M it took ~1 GB
    and 25 s (phash r=8) + 16 s (orient r=5) in the scale bench, against ~0.2 GB and <1 s here.
    """

    NHASH = 3
    BITS = 21
    FLAT_FROM_NFLIP = 4  # C(21, <=4) = 7547 probes per slice: scanning is cheaper
    BLOCK = 1024  # queries per vectorised step: bounds the candidate arrays to tens of MB

    def __init__(self, ids: np.ndarray | None = None, hashes: np.ndarray | None = None) -> None:
        self._ids = _RowIds()  # position -> image_id
        self._codes = np.empty(0, np.uint64)  # position -> hash
        # per slice: positions sorted by slice value, and where each value's run starts
        self._perm = [np.empty(0, np.int32) for _ in range(self.NHASH)]
        self._start = [np.zeros((1 << self.BITS) + 1, np.int32) for _ in range(self.NHASH)]
        self._flat: faiss.IndexBinaryFlat | None = None
        if ids is not None:
            self.add(ids, hashes)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """The indexed image_ids."""
        return self._ids.of_row

    def _slice(self, codes: np.ndarray, t: int) -> np.ndarray:
        return ((codes >> np.uint64(self.BITS * t)) & np.uint64((1 << self.BITS) - 1)).astype(np.int64)

    def add(self, ids: np.ndarray, hashes: np.ndarray) -> int:
        """Index the hashes of images not indexed yet (others are skipped); returns how many."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        hashes = np.asarray(hashes, dtype=np.int64).reshape(-1)
        if ids.shape != hashes.shape:
            raise ValueError(f"{len(ids)} ids but {len(hashes)} hashes")
        keep = self._ids.unknown(ids)
        if not keep.any():
            return 0
        codes = hashes[keep].view(np.uint64)
        pos = self._ids.append(ids[keep]).astype(np.int32)
        for t in range(self.NHASH):
            key = self._slice(codes, t)
            order = np.argsort(key, kind="stable")
            # insert each new position at the end of its key's run; shift the later runs
            self._perm[t] = np.insert(self._perm[t], self._start[t][key[order] + 1], pos[order])
            self._start[t][1:] += np.cumsum(np.bincount(key, minlength=1 << self.BITS), dtype=np.int32)
        self._codes = np.concatenate([self._codes, codes])
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

            def block(b0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                return self._search_block(q[b0 : b0 + self.BLOCK], b0, radius, probes)

            # Blocks in threads: 1.7x faster on 2 cores (the gathers and sorts let go of the GIL).
            parts = list(_threads().map(block, range(0, len(q), self.BLOCK)))
            rows, pos, dist = (np.concatenate(x) for x in zip(*parts, strict=True))
        return rows, self._ids.of_row[pos], dist.astype(np.int32)

    def _search_block(self, q: np.ndarray, offset: int, radius: int,
                      probes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = []
        for t in range(self.NHASH):
            keys = (self._slice(q, t)[:, None] ^ probes[None, :]).ravel()  # query-major
            # np.take: half the time of fancy indexing for these random gathers
            first, last = np.take(self._start[t], keys), np.take(self._start[t], keys + 1)
            count = last - first
            total = int(count.sum())
            if total == 0:
                continue
            # positions first..last-1 of every probed run, flattened (runs are query-major, so
            # the query of each comes from a repeat over the queries, not over the runs)
            run_start = np.cumsum(count) - count  # where each run goes in the flattened output
            pos = np.take(self._perm[t], np.arange(total) + np.repeat(first - run_start, count))
            row = np.repeat(np.arange(len(q)), count.reshape(len(q), -1).sum(axis=1))
            dist = np.bitwise_count(np.take(self._codes, pos) ^ q[row])
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
        _atomic_write(path, {"ids": self._ids.of_row, "codes": self._codes,
                             **{f"perm{t}": self._perm[t] for t in range(self.NHASH)},
                             **{f"start{t}": self._start[t] for t in range(self.NHASH)}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashIndex:
        self = cls()
        with np.load(path) as z:
            self._ids, self._codes = _RowIds(z["ids"]), z["codes"]
            self._perm = [z[f"perm{t}"] for t in range(cls.NHASH)]
            self._start = [z[f"start{t}"] for t in range(cls.NHASH)]
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
THREADS = 4
IO_THREADS = 16


@functools.cache
def _threads() -> ThreadPoolExecutor:
    """Threads for numpy work, which lets go of the GIL: the 2 cores."""
    return ThreadPoolExecutor(THREADS, thread_name_prefix="neardup")


@functools.cache
def _io_threads() -> ThreadPoolExecutor:
    """Threads that only wait on the disk: rows not in page cache, many reads in flight."""
    return ThreadPoolExecutor(IO_THREADS, thread_name_prefix="neardup-io")


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

    _nowait = hasattr(os, "RWF_NOWAIT")  # class-wide: off once the kernel refuses it

    def append(self, rows: np.ndarray) -> None:
        self._file.seek(self.nrows * self.row_bytes)
        self._file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        self.nrows += len(rows)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows asked for, in that order; each distinct row is read once, in file order."""
        rows = np.asarray(rows, np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = self.read_sorted(uniq)
        return out if len(uniq) == len(rows) and (uniq == rows).all() else out[inverse]

    def read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Distinct rows in ascending order (what `read` reads).

        One pread a row, not a memory map: a map faults in whole page-cache folios (up to 2 MB
        each for a freshly written file), which blew the RSS up by ~1 GB at 1M rows. Rows in
        page cache are read here, one thread (RWF_NOWAIT: a read that would wait on the disk
        fails instead); only the others go to IO_THREADS threads, which keep that many reads
        in flight. (Rows of a 1280-d index: 217k warm ones in 0.36 s in one thread, 0.88 s in
        4; random cold ones 65 us each in one thread, 25 in 4, 12-17 in 16 or more.)
        """
        self._file.flush()
        fd, size = self._file.fileno(), self.row_bytes
        out = np.empty((len(rows), size), np.uint8)
        buf = memoryview(out.reshape(-1))
        at = (rows * size).tolist()
        cold = range(len(at))
        if self._nowait:
            cold = []
            for j, a in enumerate(at):
                try:
                    if os.preadv(fd, [buf[j * size : (j + 1) * size]], a, os.RWF_NOWAIT) == size:
                        continue
                except BlockingIOError:
                    pass
                except OSError:  # RWF_NOWAIT refused (an old kernel, some file systems)
                    _RowStore._nowait = False
                    cold = range(len(at))
                    break
                cold.append(j)

        def fill(part: range | list[int]) -> None:
            for j in part:
                got = 0
                while got < size:  # the whole row, whatever a short read left
                    n = os.preadv(fd, [buf[j * size + got : (j + 1) * size]], at[j] + got)
                    if n == 0:
                        raise EOFError(f"row {rows[j]} is past the end of {self.path or 'the rows'}")
                    got += n

        nparts = min(IO_THREADS, len(cold) // 16)
        if nparts <= 1:
            fill(cold)
        else:
            list(_io_threads().map(fill, [cold[i::nparts] for i in range(nparts)]))
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


class _DecodedRows:
    """Rows of a _RowStore as float32 vectors, decoded a slice at a time (a training sample)."""

    def __init__(self, store: _RowStore, rows: np.ndarray) -> None:
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
        self._rows = _RowStore(dim, Path(path) / self.ROWS_FILE if path is not None else None)
        self._ids = _RowIds()  # row -> image_id (faiss stores rows as labels)

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
        return np.ascontiguousarray(_l2_normalize(vecs @ self._proj))

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
        self.train(_DecodedRows(self._rows, np.sort(rng.choice(n, min(n, TRAIN_SAMPLE), replace=False))),
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
        qi, rows, cos = _best(qi, rows, cos, k, min_cosine)
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
        nxt = _threads().submit(self._rows.read_sorted, uniq[:step])
        for c, u0 in enumerate(range(0, len(uniq), step)):
            codes = nxt.result()
            if u0 + step < len(uniq):  # its reads wait on the disk while these are scored
                nxt = _threads().submit(self._rows.read_sorted, uniq[u0 + step : u0 + 2 * step])
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
        return _best(qi, other, cos, k, min_cosine)

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
        meta = {"dim": self.dim, "keep_dims": self.keep_dims, "bits": self.bits,
                "candidates": self.candidates, "nprobe": self.nprobe, "margin": self.margin,
                "trained_on": self.trained_on, "nrows": len(self), "lists": lists}
        _atomic_write(path / self.INDEX_FILE, {
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
            self._ids = _RowIds(z["row_ids"])
        self._ivf = faiss.read_index(str(path / meta["lists"]))
        self.nlist = self._ivf.nlist
        self._rows.close()
        self._rows = _RowStore(self.dim, path / cls.ROWS_FILE, meta["nrows"])
        return self


def _best(qi: np.ndarray, found: np.ndarray, cos: np.ndarray, k: int,
          min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's best k of its (found, cos) candidates with cos >= min_cosine, by query."""
    ok = cos >= min_cosine
    qi, found, cos = qi[ok], found[ok], cos[ok]
    order = np.lexsort((-cos, qi))  # by query, best first
    qi, found, cos = qi[order], found[order], cos[order]
    top = np.arange(len(qi)) - np.searchsorted(qi, qi, side="left") < k
    return qi[top].astype(np.int64), found[top], cos[top].astype(np.float32)


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
        self._ids = _RowIds()
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
        self._rows = _RowStore(4 * dim, Path(path) / self.ROWS_FILE if path is not None else None, _nrows)

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
        return _best(qi[mine], other[mine], sims[mine], k, min_cosine)

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
        _atomic_write(path / self.INDEX_FILE, {"dim": np.int64(self.dim), "row_ids": self._ids.of_row})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExactVectorIndex:
        path = Path(path)
        with np.load(path / cls.INDEX_FILE) as z:
            dim, row_ids = int(z["dim"]), z["row_ids"]
        self = cls(dim, path, _nrows=len(row_ids))
        self._ids = _RowIds(row_ids)
        for r0 in range(0, len(row_ids), 65536):  # chunks: no second full copy in memory
            r1 = min(r0 + 65536, len(row_ids))
            self._flat.add(self._rows.read_range(r0, r1).view(np.float32))
        return self
