"""Stage progress for the person or the scheduler log watching a run.

Every stage prints a start line and an end line (what a log needs). On a terminal, a Spark
stage also shows a live line with files done, rate and time left, read from Spark's status
tracker: tasks hold a fixed number of files, so finished tasks count finished files.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_console = logging.getLogger("lookalike.console")  # the log file's copy (lookalike.logs.CONSOLE)


def plural(n: int, noun: str) -> str:
    """'1 manifest', '3 manifests'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    _console.info(message)


def _live(spark: Any, label: str, files: int, stop: threading.Event, started: float) -> None:
    tracker = spark.sparkContext.statusTracker()
    while not stop.wait(1.0):
        done = total = 0
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        if not total:
            continue
        files_done = files * done // total
        took = time.monotonic() - started
        rate = files_done / took if took > 0 else 0.0
        left = (files - files_done) / rate if rate > 0 else float("nan")
        print(f"\r{label}: {files_done}/{files} files, {rate:.1f} files/s, {left:.0f} s left   ",
              end="", file=sys.stderr, flush=True)


@contextmanager
def stage(label: str, files: int, spark: Any = None) -> Iterator[None]:
    """Announce a stage over `files` files; on a terminal, show live progress while it runs."""
    say(f"{label}: {files} files ...")
    started = time.monotonic()
    stop = threading.Event()
    watcher = None
    if spark is not None and sys.stderr.isatty():
        watcher = threading.Thread(target=_live, args=(spark, label, files, stop, started), daemon=True)
        watcher.start()
    try:
        yield
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
            print("\r", end="", file=sys.stderr)
    took = time.monotonic() - started
    say(f"{label}: {files} files done, {files / max(took, 1e-9):.1f} files/s ({took:.1f} s)")
