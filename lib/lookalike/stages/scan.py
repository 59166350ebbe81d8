"""Enumerate image roots in parallel into manifest rows (path, bytes, mtime, error, message).

The driver expands the top of each tree breadth-first until it holds enough directories,
then Spark tasks walk those subtrees: no single-threaded walk of a million files. Symlinks
are followed only when their target lies inside a root; a directory already visited in a
walk is never entered again, so symlink loops end. Non-regular files with an image name
(FIFOs, sockets, devices) and links leading outside the roots become error rows: the
catalog says why they were not catalogued, and nothing outside the roots is read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from lookalike.errors import IngestError
from lookalike.stages import schemas

Row = tuple[str, int, datetime, str | None, str | None]


@dataclass(frozen=True)
class ScanSettings:
    roots: tuple[str, ...]
    extensions: frozenset[str]

    @classmethod
    def create(cls, roots: Iterable[str], extensions: Iterable[str]) -> ScanSettings:
        real = tuple(os.path.realpath(os.path.abspath(r)) for r in roots)
        return cls(real, frozenset(e.lower() for e in extensions))

    def inside_roots(self, real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots)

    def wants(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.extensions


def _mtime(st: os.stat_result) -> datetime:
    # Microseconds: what PostgreSQL's timestamptz and Spark's timestamp hold.
    return datetime.fromtimestamp(st.st_mtime_ns // 1000 / 1e6, tz=UTC)


def _why_broken(link: str) -> str:
    try:
        os.stat(link)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop: it never reaches a file"
    return "symbolic link points to nothing"


def _storable(row: Row) -> Row:
    """Arrow and PostgreSQL text hold UTF-8 only. A name that is not (say, from an old Latin-1
    system) is reported under a readable stand-in instead of failing the whole scan."""
    try:
        row[0].encode("utf-8")
        return row
    except UnicodeEncodeError:
        shown = row[0].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return (shown, row[1], row[2], IngestError.BAD_NAME.value,
                "file name is not valid UTF-8; rename it to catalogue it")


def _classify(entry_path: str, settings: ScanSettings, visited: set[tuple[int, int]]) -> tuple[
        str, object]:
    """('dir', real path) | ('file', Row) | ('skip', None) for one directory entry."""
    name = os.path.basename(entry_path)
    try:
        lst = os.lstat(entry_path)
    except OSError:
        return "skip", None
    if stat.S_ISLNK(lst.st_mode):
        real = os.path.realpath(entry_path)
        if not os.path.exists(real):
            if settings.wants(name):
                return "file", (entry_path, lst.st_size, _mtime(lst), IngestError.BROKEN_LINK.value,
                                _why_broken(entry_path))
            return "skip", None
        if not settings.inside_roots(real):
            if settings.wants(name) or os.path.isdir(real):
                return "file", (entry_path, lst.st_size, _mtime(lst), IngestError.OUTSIDE_ROOT.value,
                                "symbolic link leads outside the scanned roots; not followed")
            return "skip", None
        parent = os.path.realpath(os.path.dirname(entry_path))
        if parent == real or parent.startswith(real.rstrip("/") + "/"):
            return "skip", None  # a link to its own ancestor: a loop however it is walked
        try:
            st = os.stat(entry_path)
        except OSError:
            return "skip", None
    else:
        st = lst
    if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in visited:
            return "skip", None  # a loop, or a directory reached twice through links
        visited.add(key)
        return "dir", entry_path
    if not settings.wants(name):
        return "skip", None
    if stat.S_ISREG(st.st_mode):
        return "file", (entry_path, st.st_size, _mtime(st), None, None)
    return "file", (entry_path, st.st_size, _mtime(st), IngestError.NOT_A_FILE.value,
                    "not a regular file (FIFO, socket or device)")


def _list_dir(path: str, settings: ScanSettings, visited: set[tuple[int, int]]) -> tuple[
        list[str], list[Row]]:
    dirs: list[str] = []
    files: list[Row] = []
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        files.append(_storable((path, 0, datetime.fromtimestamp(0, tz=UTC), IngestError.UNREADABLE.value,
                                f"cannot list directory: {e.strerror or e}")))
        return dirs, files
    for name in names:
        kind, value = _classify(os.path.join(path, name), settings, visited)
        if kind == "dir":
            dirs.append(value)  # type: ignore[arg-type]
        elif kind == "file":
            files.append(_storable(value))  # type: ignore[arg-type]
    return dirs, files


def plan(settings: ScanSettings, split_dirs: int) -> tuple[list[str], list[Row]]:
    """Breadth-first from the roots until `split_dirs` directories wait: (subtrees, files seen)."""
    visited: set[tuple[int, int]] = set()
    frontier: deque[str] = deque()
    files: list[Row] = []
    for root in settings.roots:
        st = os.stat(root)
        if (st.st_dev, st.st_ino) not in visited:
            visited.add((st.st_dev, st.st_ino))
            frontier.append(root)
    while frontier and len(frontier) < split_dirs:
        dirs, found = _list_dir(frontier.popleft(), settings, visited)
        frontier.extend(dirs)
        files.extend(found)
    return list(frontier), files


def walk(subtree: str, settings: ScanSettings) -> Iterator[Row]:
    """Every wanted file under one subtree (a Spark task's share)."""
    st = os.stat(subtree)
    visited = {(st.st_dev, st.st_ino)}
    stack = [subtree]
    while stack:
        dirs, files = _list_dir(stack.pop(), settings, visited)
        yield from files
        stack.extend(reversed(dirs))


def rows_to_table(rows: list[Row]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in schemas.MANIFEST]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schemas.MANIFEST,
                                                                          strict=True)],
                                schema=schemas.MANIFEST)
