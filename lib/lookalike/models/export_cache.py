"""The machine's shared cache of model exports: made once per model_ver, for every catalog home.

An ONNX export costs seconds of torch tracing and checking (EfficientNet-Lite0: ~6-10 s on 2
cores; ViT-B-32 more), and a scheduled run on a new home would pay it again. The cache lives in
$XDG_CACHE_HOME/lookalike/models (default ~/.cache/lookalike/models); each home gets a hard link
(or a copy, across filesystems) in its own models/ folder, where executors on a cluster read it.

A cached file is trusted only if its bytes match the sha256 in its sidecar (``<name>.sha256``,
written after the file): a file cut short, damaged on disk or edited is made again. A file lock
(``<name>.lock``) serialises the processes that would make the same file at once: the later one
waits, then takes the file the first one made. Every write is atomic (lookalike.files.replacing).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lookalike.files import LINK_REFUSED, locked, replacing, sha256_of
from lookalike.layout import machine_cache

log = logging.getLogger(__name__)

def shared_dir() -> Path:
    """The cache folder shared by every home of this user on this machine."""
    return machine_cache("models")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _seal(path: Path) -> list[str]:
    """The sidecar's lines: the sha256, then the note given when the file was made."""
    try:
        return _sidecar(path).read_text().splitlines()
    except OSError:
        return []


def is_intact(path: Path) -> bool:
    """The file exists and its bytes have the sha256 its sidecar recorded when it was made."""
    recorded = _seal(path)[:1]
    try:
        return bool(recorded) and sha256_of(path) == recorded[0]
    except OSError:
        return False


def sealed_copy(path: Path, cached: Path, note: str) -> bool:
    """Whether `path` is a link to `cached`, sealed with `note` when it was made: what the cache
    checked then holds without reading the file again."""
    try:
        return _seal(cached)[1:2] == [note] and os.path.samefile(path, cached)
    except OSError:
        return False


def provide(cached: Path, make: Callable[[Path], None], usable: Callable[[Path], bool],
            dest: Path | None = None, note: str = "") -> None:
    """Make sure `cached` is intact and `usable`, calling make(tmp) under the lock if it is not
    (the result is renamed onto `cached`, then sealed with its sha256 and `note`); then, still
    under the lock, put a link to it (or a copy) at `dest`."""
    with locked(cached):
        if not (is_intact(cached) and usable(cached)):
            if cached.exists():
                log.warning("%s does not match its recorded sha256 or is out of date: making it again",
                            cached)
            _sidecar(cached).unlink(missing_ok=True)  # no stale seal on a file being replaced
            with replacing(cached) as tmp:
                make(tmp)
                tmp.chmod(0o644)  # executors may run as another user
            _write_seal(cached, note)
            log.info("made %s", cached)
        elif _seal(cached)[1:2] != [note]:
            _write_seal(cached, note)  # checked by `usable` just now: sealed_copy may say so
        if dest is not None:
            install(cached, dest)


def _write_seal(path: Path, note: str) -> None:
    with replacing(_sidecar(path)) as tmp:
        tmp.write_text(f"{sha256_of(path)}\n{note}\n")
        tmp.chmod(0o644)


def install(source: Path, dest: Path) -> None:
    """`dest` atomically becomes the same bytes as `source`: a hard link, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in LINK_REFUSED:
                raise
            shutil.copyfile(source, tmp)
