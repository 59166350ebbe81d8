"""Writing files so that a reader, or a run killed half-way, never sees half of one."""

from __future__ import annotations

import contextlib
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
