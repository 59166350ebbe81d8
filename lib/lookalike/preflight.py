"""Arguments and state checked before anything starts: no server, no Spark, no row in `runs`.

A refused start costs milliseconds and creates nothing. The writer lock, which needs the
catalog's server, is checked next by lookalike.db.writer, still before Spark starts and
before the run's row in `runs`.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from lookalike.config import Config
from lookalike.layout import Layout


class RefusedStart(RuntimeError):
    """The command cannot start as asked; the message says what to fix (exit 2)."""


def check_dsn(cfg: Config) -> None:
    """The DSN parses as libpq's URI or key=value form (libpq's reason is left out: it can quote
    a fragment of the password)."""
    if not cfg.dsn:
        return
    try:
        conninfo_to_dict(cfg.dsn)
    except psycopg.ProgrammingError:
        source = "LOOKALIKE_DSN" if os.environ.get("LOOKALIKE_DSN") else f"catalog.dsn in {cfg.source}"
        raise RefusedStart(f"{source} is not a PostgreSQL connection string: give "
                           "postgresql://USER@HOST/DBNAME or 'host=HOST dbname=DBNAME user=USER'") from None


def check_roots(roots: list[str]) -> list[str]:
    """The roots as absolute paths; FileNotFoundError for one that is not a folder."""
    resolved = [str(Path(r).resolve()) for r in roots]
    for root in resolved:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"image root is not a directory: {root}")
    return resolved


def check_home(cfg: Config, creates: bool) -> None:
    """The home is a folder, or (for a run, which `creates`) one that is made now; any other
    command needs the catalog to exist, and never makes a folder."""
    home = cfg.home
    if home.exists() and not home.is_dir():
        raise RefusedStart(f"the catalog home {home} is not a folder: give --home a folder")
    if creates:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RefusedStart(f"cannot create the catalog home {home}: {e.strerror}: give --home a "
                               "folder that can be written") from None
        if not os.access(home, os.W_OK | os.X_OK):
            raise RefusedStart(f"cannot write in the catalog home {home}: give --home a folder that can "
                               "be written")
    elif not cfg.dsn and not Layout(home).pg.is_dir():
        raise RefusedStart(f"no catalog in {home}: check --home, or create one with "
                           f"`lookalike run ROOT --home {home}`")


def check(cfg: Config, roots: list[str] | None = None) -> None:
    """Everything a command can be refused for before it starts; `roots` for a run, the one
    command that creates the home (only once the roots are known to be good)."""
    check_dsn(cfg)
    if roots is not None:
        check_roots(roots)
    check_home(cfg, creates=roots is not None)
