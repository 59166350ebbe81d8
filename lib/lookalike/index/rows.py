"""What the persistent indexes share: image_id <-> row bookkeeping, row files, atomic saves."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lookalike.files import replacing


def first_new(existing_sorted: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask of the ids not in `existing_sorted`, keeping only the first of repeated ones."""
    mask = np.zeros(len(ids), dtype=bool)
    mask[np.unique(ids, return_index=True)[1]] = True
    if len(existing_sorted):
        pos = np.minimum(np.searchsorted(existing_sorted, ids), len(existing_sorted) - 1)
        mask &= existing_sorted[pos] != ids
    return mask


class RowIds:
    """The image_id of each row of an index (rows numbered as added), looked up by image_id."""

    def __init__(self, of_row: np.ndarray | None = None) -> None:
        self.of_row = np.empty(0, np.int64) if of_row is None else np.asarray(of_row, np.int64)
        self._order = np.argsort(self.of_row, kind="stable")  # rows by ascending image_id
        self._sorted = self.of_row[self._order]

    def __len__(self) -> int:
        return len(self.of_row)

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        """Mask of the ids without a row yet, keeping only the first of repeated ones."""
        return first_new(self._sorted, ids)

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


def atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to exactly `path`, replacing it only once complete (a crash leaves the old one)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)




THREADS = 4
IO_THREADS = 16


@functools.cache
def compute_threads() -> ThreadPoolExecutor:
    """Threads for numpy work, which lets go of the GIL: the 2 cores."""
    return ThreadPoolExecutor(THREADS, thread_name_prefix="neardup")


@functools.cache
def io_threads() -> ThreadPoolExecutor:
    """Threads that only wait on the disk: rows not in page cache, many reads in flight."""
    return ThreadPoolExecutor(IO_THREADS, thread_name_prefix="neardup-io")


class RowStore:
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
                    RowStore._nowait = False
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
            list(io_threads().map(fill, [cold[i::nparts] for i in range(nparts)]))
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
            with replacing(path, fsync=True) as tmp, open(tmp, "wb") as dst:
                self._file.seek(0)
                shutil.copyfileobj(self._file, dst, 1 << 24)
            self.close()
            self._file = open(path, "r+b")  # noqa: SIM115
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            self.path = path
        else:
            os.fsync(self._file.fileno())




def best_k(qi: np.ndarray, found: np.ndarray, cos: np.ndarray, k: int,
          min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's best k of its (found, cos) candidates with cos >= min_cosine, by query."""
    ok = cos >= min_cosine
    qi, found, cos = qi[ok], found[ok], cos[ok]
    order = np.lexsort((-cos, qi))  # by query, best first
    qi, found, cos = qi[order], found[order], cos[order]
    top = np.arange(len(qi)) - np.searchsorted(qi, qi, side="left") < k
    return qi[top].astype(np.int64), found[top], cos[top].astype(np.float32)
