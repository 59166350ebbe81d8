"""Where messages go: the terminal gets stage lines and one-line errors, the log file everything.

The terminal stays quiet: lookalike's warnings, and nothing from libraries (`-v` adds
lookalike's INFO lines and libraries' warnings, `--debug` everything and the traceback of a
failure). The log file, <home>/logs/lookalike.log, always takes lookalike's
DEBUG lines, libraries' INFO lines, the stage lines, every failure's traceback and the JVM's
own output: what a bug report needs.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import tempfile
from pathlib import Path
from typing import IO

from lookalike.layout import Layout

# Stage lines, printed on stderr already: the log file keeps a copy.
CONSOLE = "lookalike.console"
# A failure's traceback: in the log file always, on the terminal with --debug only.
TRACEBACK = "lookalike.traceback"

_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_FALLBACK = Path(tempfile.gettempdir()) / "lookalike.log"
_state: dict[str, Path | None] = {"file": None}


def _ours(name: str) -> bool:
    return name == "lookalike" or name.startswith("lookalike.")


class _TerminalFilter(logging.Filter):
    def __init__(self, ours: int, others: int, debug: bool) -> None:
        super().__init__()
        self.ours, self.others, self.debug = ours, others, debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == CONSOLE or (record.name == TRACEBACK and not self.debug):
            return False
        return record.levelno >= (self.ours if _ours(record.name) else self.others)


class _FileFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _ours(record.name) or record.levelno >= logging.INFO


def setup(verbose: bool = False, debug: bool = False) -> None:
    """The terminal handler on stderr; Python's warnings go through logging (to the file)."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # a second main() in one process (the tests) starts afresh
        if getattr(handler, "lookalike", False):
            root.removeHandler(handler)
            handler.close()
    _state["file"] = None
    root.setLevel(logging.INFO)
    logging.getLogger("lookalike").setLevel(logging.DEBUG)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if debug:
        terminal.addFilter(_TerminalFilter(logging.DEBUG, logging.INFO, debug=True))
    elif verbose:
        terminal.addFilter(_TerminalFilter(logging.INFO, logging.WARNING, debug=False))
    else:
        # Libraries' errors too (py4j's on an interrupted call): what matters surfaces as our line.
        terminal.addFilter(_TerminalFilter(logging.WARNING, logging.CRITICAL + 1, debug=False))
    terminal.lookalike = True  # type: ignore[attr-defined]
    root.addHandler(terminal)
    logging.captureWarnings(True)


def _add_file(path: Path) -> Path:
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=3, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_FileFilter())
    handler.lookalike = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    _state["file"] = path
    return path


def attach_file(home: Path) -> Path:
    """Log to <home>/logs/lookalike.log (rotated at 10 MB); the home must exist. Its path."""
    path = Layout(home).log_file
    try:
        path.parent.mkdir(exist_ok=True)
        return _add_file(path)
    except OSError:
        # A home we may read but not write (an analyst's account): the temporary folder instead.
        return _add_file(_FALLBACK)


def log_file() -> Path | None:
    """The log file of this command, if one is open."""
    return _state["file"]


def ensure_file() -> Path:
    """The log file, opened in the temporary folder when the command has no home to log in
    (a traceback must land somewhere a bug report can take it from)."""
    return log_file() or _add_file(_FALLBACK)


def jvm_output() -> IO[bytes] | None:
    """The log file opened for the JVM's stdout and stderr (its start-up notices, log4j's lines,
    a task's traceback), so the terminal keeps only lookalike's own lines."""
    path = log_file()
    return open(path, "ab") if path is not None else None
