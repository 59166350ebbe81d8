"""How a command ends when it cannot finish: one line on stderr and a documented exit code.

    0    done
    1    an unexpected fault (a bug): the line names the log file that holds the traceback
    2    bad input or state: the line says what to fix (a folder, the DSN, a busy catalog, ...)
    130  interrupted by Ctrl-C (SIGINT)
    143  stopped by SIGTERM (a scheduler's stop, systemd, kill)

The traceback goes to the log file always, and to the terminal with --debug (or LOOKALIKE_DEBUG=1).
"""

from __future__ import annotations

import logging
import signal
import sys

import psycopg

from lookalike import logs
from lookalike.errors import one_line

DONE, FAULT, BAD_INPUT = 0, 1, 2

_traceback = logging.getLogger(logs.TRACEBACK)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal. A KeyboardInterrupt, so that SIGTERM unwinds exactly like
    Ctrl-C (pyspark cancels its jobs on both); the message is the line the user sees."""

    def __init__(self, signame: str = "SIGINT", message: str | None = None) -> None:
        super().__init__(message or f"interrupted by {signame}")
        self.signame = signame

    @classmethod
    def then(cls, stop: KeyboardInterrupt, note: str) -> Interrupted:
        """The same stop, its line saying what comes next: 'interrupted by SIGTERM; <note>'."""
        signame = signal_name(stop)
        return cls(signame, f"interrupted by {signame}; {note}")


def signal_name(e: KeyboardInterrupt) -> str:
    """SIGTERM for our handler's Interrupted; a bare KeyboardInterrupt is Ctrl-C."""
    return getattr(e, "signame", "SIGINT")


def interruption(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind `e`: `e` itself, or the one a library turned into another error
    on its way up (a signal that lands while a C extension is being imported surfaces as
    "ImportError: initialization failed", caused by it). None when `e` has no signal behind it."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def interruption_line(stop: KeyboardInterrupt) -> str:
    """What an interruption says: its own message (Interrupted's), else the signal's name."""
    return str(stop) or f"interrupted by {signal_name(stop)}"


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("SIGTERM")


def catch_sigterm() -> None:
    """SIGTERM raises Interrupted in the main thread, so the run unwinds and records it."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return one_line(e, 1000)


def end(e: BaseException, expected: tuple[type[BaseException], ...], debug: bool) -> int:
    """Print the one line for `e`, log its traceback, and return the exit code."""
    stop = interruption(e)
    if stop is not None:
        sig = signal_name(stop)
        code = 128 + int(getattr(signal, sig))
        message = interruption_line(stop)
        _traceback.debug("interrupted", exc_info=e)
    elif isinstance(e, (*expected, OSError, psycopg.OperationalError)):
        # Bad input, or the environment rather than the code (a full disk, an unusable folder,
        # a server that went away): the line says what to look at.
        code, message = BAD_INPUT, _line(e)
        _traceback.debug("failed", exc_info=e)
    else:
        path = logs.ensure_file()
        _traceback.error("unexpected error", exc_info=e)
        code = FAULT
        message = (f"unexpected error: {type(e).__name__}: {one_line(e)} (a bug; the traceback is in "
                   f"{path}: please attach it to a report, or rerun with --debug)")
    print(f"lookalike: {message}", file=sys.stderr, flush=True)
    return code
