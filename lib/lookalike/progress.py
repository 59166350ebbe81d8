"""Stage progress for the person or the scheduler log watching a run.

Every stage prints a start line and an end line (what a log needs). While a Spark stage runs,
its progress (files and bytes done, rate, time left for the manifest and for the whole run)
is read from Spark's status tracker: tasks hold a fixed share of the files, so finished tasks
count finished files. It is a live line on a terminal, a plain line every LOG_EVERY_S
elsewhere, and <home>/progress.json for `lookalike status` in another terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.files import replacing

_console = logging.getLogger("lookalike.console")  # the log file's copy (lookalike.logs.CONSOLE)


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 manifest', '3 manifests' ('1 category', '3 categories' with nouns="categories")."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    _console.info(message)


# A plain progress line this often when stderr is not a terminal (a cron log: no carriage returns).
LOG_EVERY_S = 30.0
# The progress file for `lookalike status` is rewritten this often.
FILE_EVERY_S = 3.0


@dataclass
class RunProgress:
    """A run's totals, for the whole run's time left and for `lookalike status` elsewhere."""

    path: Path  # <home>/progress.json
    run_id: int
    files: int = 0  # of every manifest this run takes through, once known
    files_done: int = 0  # in manifests already loaded

    def write(self, **now: object) -> None:
        """The progress file, replaced whole (a reader never sees half of it)."""
        record = {**now, "pid": os.getpid(), "run_id": self.run_id, "updated": time.time()}
        with contextlib.suppress(OSError), replacing(self.path) as tmp:  # never worth failing a run for
            tmp.write_text(json.dumps(record))

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


_run: dict[str, RunProgress | None] = {"current": None}


@contextmanager
def run_progress(path: Path, run_id: int) -> Iterator[RunProgress]:
    """Progress of one run: its stages report to it until the block ends, and the file goes."""
    progress = RunProgress(path, run_id)
    _run["current"] = progress
    try:
        yield progress
    finally:
        _run["current"] = None
        progress.close()


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress file of a run still alive (a killed run's file is stale), else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and _alive(record.get("pid")) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:  # nan (a file's null): no rate yet
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(p: dict[str, Any]) -> str:
    """One progress line, from a watcher's numbers or a progress file's."""
    done, files = p["files_done"], p["files"]
    parts = [f"{done}/{files} files"]
    if p.get("bytes"):
        parts.append(f"{_size(p['bytes_done'])}/{_size(p['bytes'])}")
    parts.append(f"{p['rate']:.1f} files/s")
    parts.append(f"{_duration(p['left_s'])} left")
    if p.get("run_files", 0) > files:
        parts.append(f"run: {_duration(p.get('run_left_s'))} left")
    return f"{p['label']}: {', '.join(parts)}"


def _live(spark: Any, label: str, files: int, total_bytes: int, stop: threading.Event,
          started: float) -> None:
    tracker = spark.sparkContext.statusTracker()
    terminal = sys.stderr.isatty()
    run = _run["current"]
    last_line = last_file = time.monotonic()
    while not stop.wait(1.0):
        done = total = 0
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        if not total:
            continue
        # Tasks hold about equal shares of files and bytes, so finished tasks count both.
        files_done = files * done // total
        now = time.monotonic()
        rate = files_done / (now - started) if now > started else 0.0
        left = (files - files_done) / rate if rate > 0 else float("nan")
        p: dict[str, Any] = {"label": label, "files_done": files_done, "files": files, "rate": rate,
                             "left_s": left, "bytes": total_bytes, "bytes_done": total_bytes * done // total,
                             "run_files": run.files if run is not None else files, "run_left_s": None}
        if run is not None and run.files > files:
            # The other manifests at this stage's rate (extract, the slow stage, sets the pace).
            later = max(run.files - run.files_done - files, 0)
            p["run_left_s"] = left + later / rate if rate > 0 else float("nan")
        if terminal:
            print(f"\r{describe(p)}   ", end="", file=sys.stderr, flush=True)
        elif now - last_line >= LOG_EVERY_S:
            say(describe(p))
            last_line = now
        if run is not None and now - last_file >= FILE_EVERY_S:
            run.write(**{k: (None if isinstance(v, float) and v != v else v) for k, v in p.items()})
            last_file = now


@contextmanager
def stage(label: str, files: int, spark: Any = None, total_bytes: int = 0) -> Iterator[None]:
    """Announce a stage over `files` files (`total_bytes` of originals, if it reads them); while
    a Spark stage runs, show live progress on a terminal, a plain line every LOG_EVERY_S in a
    log, and keep the run's progress file for `lookalike status`."""
    say(f"{label}: {files} files ...")
    started = time.monotonic()
    stop = threading.Event()
    watcher = None
    if spark is not None:
        watcher = threading.Thread(target=_live, args=(spark, label, files, total_bytes, stop, started),
                                   daemon=True)
        watcher.start()
    try:
        yield
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr)
    took = time.monotonic() - started
    say(f"{label}: {files} files done, {files / max(took, 1e-9):.1f} files/s ({took:.1f} s)")
