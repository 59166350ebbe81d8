"""The content-addressed store of the original design: each original filed by its sha256.

With `[store] root` set, the extract stage files every decodable original at
`<root>/<ab>/<cd>/<sha256>.<ext>` (ext from the detected format) and its thumbnail at
`<root>/thumbs/<ab>/<cd>/<sha256>_512.jpg`. The identity is the content: a name that exists is
never written again, so an exact copy, or the same batch loaded twice, costs nothing.

Modes: `hardlink` links the original into the store (copying when the two are on different
filesystems, or the link is refused); `copy` writes the bytes from the read that hashed them;
`move` files like `hardlink` and, once the manifest's catalog transaction has committed, removes
the source (lookalike.driver.ingest). Every write goes to a unique temporary name under
`<root>/.partial/`, is fsynced and then linked to its final name, so a killed run leaves no
partial file under a final name; the next run removes what is left in `.partial/`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lookalike.counts import Counts
from lookalike.files import LINK_REFUSED, sha256_of

PARTIAL = ".partial"
THUMBS = "thumbs"

# Pillow's format names whose usual extension is not the name in lower case.
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "HEIF": "heic", "JPEG2000": "jp2"}


@dataclass
class StoreCounts(Counts):
    """What a run did to the store: originals linked, copied, found there already, and (move)
    sources removed."""

    linked: int = 0
    copied: int = 0
    existing: int = 0
    removed: int = 0


@dataclass(frozen=True)
class StoreSettings:
    root: str = ""      # "": catalog files where they lie
    mode: str = "hardlink"

    @classmethod
    def from_config(cls, cfg: Any) -> StoreSettings:
        s = cfg["store"]
        root = str(Path(os.path.expanduser(s["root"])).resolve()) if s["root"] else ""
        return cls(root, s["mode"])

    @property
    def enabled(self) -> bool:
        return bool(self.root)

    @property
    def moves(self) -> bool:
        """Sources are removed once the catalog holds them."""
        return self.enabled and self.mode == "move"


class StoreError(OSError):
    """The store could not be written (the disk or its permissions, not the file)."""


class ChangedError(OSError):
    """The source file was replaced while it was being read."""


def extension(fmt: str) -> str:
    """The stored file's extension for a detected format: 'raw:nef' -> 'nef', 'JPEG' -> 'jpg'."""
    if fmt.startswith("raw:"):
        return fmt[4:].lower()
    return _EXTENSIONS.get(fmt, fmt.lower())


def relpath(sha256: str, fmt: str) -> str:
    """<ab>/<cd>/<sha256>.<ext>: two fan-out levels keep directories small at millions."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.{extension(fmt)}"


def prepare(root: str) -> int:
    """Create the store, prove it writable and remove a killed run's temporary files (on the
    driver, holding the writer lock); returns how many were removed."""
    partial = Path(root) / PARTIAL
    try:
        partial.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in partial.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        probe = partial / f"probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write the store: {e.strerror or e}", root) from None
    return removed


def _publish(tmp: Path, final: Path) -> bool:
    """Give `tmp` its final name unless that name exists (never rewritten); True if it was given.
    A hard link is the atomic create-if-absent; a filesystem without links gets a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in LINK_REFUSED:
            raise
        if final.exists():
            return False
        os.replace(tmp, final)
        return True
    return True


@functools.cache
def _device(folder: Path) -> int:
    """The filesystem of the store's .partial/ folder: stat once a process, not twice a file."""
    return os.stat(folder).st_dev


def _close_synced(f: IO[bytes]) -> None:
    """Flush, fsync and close: the bytes are on disk before the file gets its final name."""
    f.flush()
    os.fsync(f.fileno())
    f.close()


class Filing:
    """Files one original into the store, fed by the extract stage's single read of it.

    The reader calls `tee(stat, held)` once the source is open: when the bytes will not be held
    in memory and may have to be copied, it gets a file to write every chunk to as it reads.
    `finish` files it under its sha256 once the format is known; leaving the block without
    finishing (a bad file) removes whatever was written.
    """

    def __init__(self, settings: StoreSettings, source: str) -> None:
        self.settings = settings
        self.source = source
        self.partial = Path(settings.root) / PARTIAL
        self.stat: os.stat_result | None = None
        self._spool: IO[bytes] | None = None
        self._temps: list[Path] = []

    def _temp(self) -> Path:
        """A unique name under .partial/ (not created), removed by discard() if still there."""
        tmp = self.partial / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        self._temps.append(tmp)
        return tmp

    def _links(self, st: os.stat_result) -> bool:
        """Whether this mode links and the source shares the store's filesystem."""
        return self.settings.mode != "copy" and st.st_dev == _device(self.partial)

    def tee(self, st: os.stat_result, held: bool) -> IO[bytes] | None:
        self.stat = st
        if held or self._links(st):
            return None
        self._spool = open(self._temp(), "xb")  # noqa: SIM115 - closed in finish or discard
        return self._spool

    def finish(self, sha256: str, fmt: str, data: bytes | None) -> tuple[str, str]:
        """(absolute stored path, what was done: 'link' | 'copy' | 'exists')."""
        final = Path(self.settings.root) / relpath(sha256, fmt)
        try:
            if final.exists():
                return str(final), "exists"
            assert self.stat is not None, "finish() before the source was read"
            action = "copy"
            if self._links(self.stat):
                tmp = self._temp()
                try:
                    os.link(self.source, tmp, follow_symlinks=True)  # the file, not a link to it
                    action = "link"
                except OSError as e:
                    if e.errno not in LINK_REFUSED:
                        raise
            if action == "link":
                now = os.stat(tmp)
                if (now.st_ino, now.st_size, now.st_mtime_ns) != (self.stat.st_ino, self.stat.st_size,
                                                                   self.stat.st_mtime_ns):
                    raise ChangedError("file changed while it was being read")
            else:
                tmp = self._copy(sha256, data)
            if not _publish(tmp, final):
                action = "exists"  # another task filed the same bytes meanwhile
            return str(final), action
        finally:
            self.discard()

    def _copy(self, sha256: str, data: bytes | None) -> Path:
        """A fsynced temporary copy of the source's bytes, from the read that hashed them."""
        if self._spool is not None:
            tmp = Path(self._spool.name)
            _close_synced(self._spool)
        elif data is not None:
            tmp = self._temp()
            with open(tmp, "xb") as f:
                f.write(data)
                _close_synced(f)
        else:  # grew past the in-memory limit while read, or a refused link: read it again
            tmp = self._temp()
            shutil.copyfile(self.source, tmp)
            if sha256_of(tmp) != sha256:
                raise ChangedError("file changed while it was being read")
            with open(tmp, "rb+") as f:
                _close_synced(f)
        if self.settings.mode == "move" and sha256_of(tmp) != sha256:
            # The source goes once the catalog commits: prove the copy first (from the page cache).
            raise StoreError(errno.EIO, "the stored copy's sha256 differs from the original's")
        return tmp

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.close()
        for tmp in self._temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._temps.clear()


@contextlib.contextmanager
def filing(settings: StoreSettings | None, source: str) -> Iterator[Filing | None]:
    """A Filing for `source`, or None when images are catalogued in place."""
    if settings is None or not settings.enabled:
        yield None
        return
    f = Filing(settings, source)
    try:
        yield f
    finally:
        f.discard()


def remove_source(path: str, size: int, mtime_us: int, stored: str) -> bool:
    """`move`: remove a source the catalog now holds a stored copy of, unless it changed since it
    was read (a new file at the same name is a new image for the next run). True if removed."""
    try:
        st = os.stat(path)
        if st.st_size != size or abs(st.st_mtime_ns // 1000 - mtime_us) > 1:  # µs, via a float
            return False
        stored_st = os.stat(stored)
    except FileNotFoundError:
        return False
    if stored_st.st_size != size:
        return False
    os.unlink(path)
    return True


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Problem:
    """One disagreement between the catalog and the files: what a `verify` line says."""

    kind: str  # missing | size | corrupt | unknown | missing_thumbnail
    path: str
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class VerifyCounts:
    images: int = 0
    stored_checked: int = 0
    thumbnails_checked: int = 0
    unknown: int = 0
    temporary: int = 0  # in .partial/: a run in progress, or a killed one's (the next run removes them)


def _stored_files(root: Path) -> Iterator[Path]:
    """Every file under the store's <ab>/<cd>/ folders (not thumbs/, not .partial/)."""
    for top in sorted(os.scandir(root), key=lambda e: e.name):
        if top.name in (THUMBS, PARTIAL) or not top.is_dir(follow_symlinks=False):
            if top.is_file(follow_symlinks=False):
                yield Path(top.path)
            continue
        for sub in sorted(os.scandir(top.path), key=lambda e: e.name):
            if sub.is_dir(follow_symlinks=False):
                yield from (Path(f.path) for f in sorted(os.scandir(sub.path), key=lambda e: e.name))
            else:
                yield Path(sub.path)


def verify(rows: Iterator[tuple[int, str | None, str, int, str]], root: Path | None, thumbs: Path,
           full: bool, counts: VerifyCounts) -> Iterator[Problem]:
    """Check the files the catalog's images point at: (image_id, store_path, sha256, bytes,
    thumb_path) rows. Each stored original must be there with its size (with `full`, its sha256),
    each thumbnail there; and, with a store, every file in it must be one the catalog knows."""
    known: set[str] = set()
    for image_id, stored, sha256, size, thumb in rows:
        counts.images += 1
        if stored is not None:
            known.add(stored)
            counts.stored_checked += 1
            try:
                actual = os.stat(stored).st_size
            except FileNotFoundError:
                yield Problem("missing", stored, f"image {image_id}'s stored original is not there")
            else:
                if actual != size:
                    yield Problem("size", stored, f"image {image_id}: {actual} bytes, the catalog says "
                                                  f"{size}")
                elif full and sha256_of(Path(stored)) != sha256:
                    yield Problem("corrupt", stored, f"image {image_id}: its sha256 is not {sha256}")
        counts.thumbnails_checked += 1
        if not (thumbs / thumb).is_file():
            yield Problem("missing_thumbnail", str(thumbs / thumb),
                          f"image {image_id}'s thumbnail is not there")
    if root is None:
        return
    partial = root / PARTIAL
    counts.temporary = sum(1 for _ in partial.iterdir()) if partial.is_dir() else 0
    for file in _stored_files(root):
        if str(file) not in known:
            counts.unknown += 1
            yield Problem("unknown", str(file), "a file in the store that no catalogued image names")
