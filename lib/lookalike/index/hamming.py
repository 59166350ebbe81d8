"""Exact Hamming-radius search over 64-bit pHashes (multi-index hashing), persistent.

Every search is an index lookup, so a batch costs O(batch) against a catalog of millions:
never all-pairs. Hashes are 64-bit pHashes stored as signed int64 (two's complement, first
hash bit most significant), as in the catalog's BIGINT columns. The index holds each
image_id once: adding a known one again is a no-op, so a retried batch is not doubled.
"""

from __future__ import annotations

import os
from itertools import combinations

import faiss
import numpy as np

from lookalike.index.rows import RowIds, atomic_savez, compute_threads


def hash_to_bytes(arr_int64: np.ndarray) -> np.ndarray:
    """(n, 8) uint8 codes for FAISS binary indexes: the little-endian bytes of each hash.

    Little-endian puts the most significant bit (pHash's DC term, almost always 1) in the last
    bit of the code, the one bit HashIndex's 3x21-bit tables leave out.
    """
    a = np.ascontiguousarray(np.asarray(arr_int64, dtype=np.int64).reshape(-1), dtype="<i8")
    return a.view(np.uint8).reshape(-1, 8)



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
        self._ids = RowIds()  # position -> image_id
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
            parts = list(compute_threads().map(block, range(0, len(q), self.BLOCK)))
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
        atomic_savez(path, {"ids": self._ids.of_row, "codes": self._codes,
                             **{f"perm{t}": self._perm[t] for t in range(self.NHASH)},
                             **{f"start{t}": self._start[t] for t in range(self.NHASH)}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashIndex:
        self = cls()
        with np.load(path) as z:
            self._ids, self._codes = RowIds(z["ids"]), z["codes"]
            self._perm = [z[f"perm{t}"] for t in range(cls.NHASH)]
            self._start = [z[f"start{t}"] for t in range(cls.NHASH)]
        return self


def _flip_masks(bits: int, nflip: int) -> np.ndarray:
    """Every `bits`-bit mask with at most `nflip` bits set."""
    masks = [0]
    for k in range(1, nflip + 1):
        masks += [sum(1 << b for b in c) for c in combinations(range(bits), k)]
    return np.array(masks, np.int64)
