"""Writing files so that a reader, or a run killed half-way, never sees half of one; and a file's
sha256, the identity lookalike checks files by."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(dest: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `dest` to write; renamed onto `dest` when the block ends well,
    removed when it fails. The name is unique per process, so two writers never share it; with
    `fsync` the bytes reach the disk before the rename (what a crash must not lose)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# Why link(2) may refuse where a copy still works: another filesystem, a filesystem without hard
# links, a protected source (fs.protected_hardlinks), too many links to one inode.
LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive use of `path` among the processes of this machine (an flock on a file beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 8 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
