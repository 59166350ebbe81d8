"""The lifecycle of what writes to the catalog: runs, manifests, and the catalog's model.

A run (an incremental `run` or a `recluster`) is a row in `runs` from its start: 'running',
then 'ok' with its summary, 'failed' with the reason, or 'interrupted': by Ctrl-C or SIGTERM
(its message names the signal), or found still 'running' by the next writer (it was killed).
The catalog's embedding model is chosen once, when the first run pins it, and changed only
by a recluster; its store (lookalike.store) once, by its first run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg

from lookalike import db
from lookalike.config import Config, ConfigError
from lookalike.errors import one_line
from lookalike.failures import interruption, interruption_line
from lookalike.models.registry import OPEN_CLIP_PREFIX, ModelSpec, resolve_model
from lookalike.progress import say
from lookalike.store import StoreSettings


class ModelMismatch(RuntimeError):
    """The catalog's model cannot be used as configured here (other weights, none pinned yet)."""


@contextmanager
def recorded_run(conn: psycopg.Connection, kind: str, roots: Sequence[str] | None = None,
                 model_ver: str | None = None) -> Iterator[int]:
    """A row in `runs` for the block: its run_id. The caller holds the writer lock, so any run
    still marked running was killed: it is marked interrupted. An exception leaving the block
    marks the run failed with its one-line reason (interrupted, for Ctrl-C and SIGTERM);
    `finish_run` marks it ok."""
    with conn.transaction():
        conn.execute("UPDATE runs SET status = 'interrupted', finished_at = now(), message = 'found still "
                     "running by the next run: killed (SIGKILL, a lost machine) or cut off from the "
                     "catalog' WHERE status = 'running'")
        run_id = conn.execute("INSERT INTO runs (kind, roots, model_ver) VALUES (%s, %s, %s) "
                              "RETURNING run_id",
                              (kind, list(roots) if roots is not None else None, model_ver)).fetchone()[0]
    try:
        yield run_id
    except BaseException as e:
        # Ctrl-C or SIGTERM: 'interrupted', the message naming the signal (failures.Interrupted).
        stop = interruption(e)
        if stop is not None:
            status, message = "interrupted", interruption_line(stop)
        else:
            status, message = "failed", one_line(e, 500)
        # Best effort: when the catalog itself went away, the original error is what matters.
        with contextlib.suppress(psycopg.Error), conn.transaction():
            conn.execute("UPDATE runs SET status = %s, finished_at = now(), message = %s WHERE run_id = %s",
                         (status, message or type(e).__name__, run_id))
        raise


def finish_run(conn: psycopg.Connection | psycopg.Cursor, run_id: int, summary: dict[str, object]) -> None:
    """Mark the run ok with its summary (inside the caller's transaction, if it has one)."""
    conn.execute("UPDATE runs SET status = 'ok', finished_at = now(), summary = %s WHERE run_id = %s",
                 (json.dumps(summary), run_id))


def pending_manifests(conn: psycopg.Connection) -> list[str]:
    """Manifests registered but not loaded (a killed run's): the next run finishes them first."""
    rows = conn.execute("SELECT manifest_id FROM manifests WHERE status <> 'loaded' ORDER BY manifest_id")
    return [r[0] for r in rows.fetchall()]


def manifest_files(conn: psycopg.Connection, manifest_ids: list[str]) -> int:
    """The files of these manifests, for a run's progress."""
    return conn.execute("SELECT coalesce(sum(files), 0) FROM manifests WHERE manifest_id = ANY(%s)",
                        (manifest_ids,)).fetchone()[0]


def register_manifest(conn: psycopg.Connection, manifest_id: str, run_id: int, files: int,
                      total_bytes: int) -> None:
    """The manifest's Parquet file is whole: registering it is the scan's commit point."""
    with conn.transaction():
        conn.execute("INSERT INTO manifests (manifest_id, run_id, files, bytes, status) "
                     "VALUES (%s, %s, %s, %s, 'scanned') ON CONFLICT DO NOTHING",
                     (manifest_id, run_id, files, total_bytes))


# --------------------------------------------------------------------------- the catalog's model


def model_name(requested: str, spec: ModelSpec) -> str:
    """What the catalog records as its model: open_clip models by the user's full spec."""
    return requested if requested.startswith(OPEN_CLIP_PREFIX) else spec.name


def catalog_model(conn: psycopg.Connection, cfg: Config, pin: bool = False) -> ModelSpec:
    """The catalog's model resolved on this machine, the one place that decides it.

    With `pin` (a writing run), a catalog without a model pins the configured one. Raises
    ModelMismatch when there is none and `pin` is off, or when this machine's weights for it
    differ from the ones the catalog's vectors were made with.
    """
    e = cfg["embed"]
    checkpoint = e["clip_checkpoint"] or None
    pinned = db.get_meta(conn, "active_model")
    if pinned is None:
        if not pin:
            raise ModelMismatch("the catalog has no embedding model yet: `lookalike run` embeds the images")
        spec = resolve_model(e["model"], clip_checkpoint=checkpoint)
        name = model_name(e["model"], spec)
        with conn.transaction():
            set_active_model(conn, name, spec.model_ver)
        say(f"model: {name} ({spec.model_ver}) pinned for this catalog")
        return spec
    spec = resolve_model(pinned, clip_checkpoint=checkpoint)
    pinned_ver = db.get_meta(conn, "active_model_ver")
    if spec.model_ver != pinned_ver:
        raise ModelMismatch(f"the weights of model {pinned} here give {spec.model_ver}, but the catalog's "
                            f"vectors are {pinned_ver}; run `lookalike recluster --model {pinned}` to "
                            "re-embed the catalog")
    if pin and e["model"] not in ("auto", pinned):
        say(f"note: the config asks for model {e['model']} but this catalog uses {pinned}; "
            f"`lookalike recluster --model {e['model']}` switches it")
    return spec


def set_active_model(conn: psycopg.Connection, name: str, model_ver: str) -> None:
    db.set_meta(conn, "active_model", name)
    db.set_meta(conn, "active_model_ver", model_ver)


# --------------------------------------------------------------------------- the catalog's store


def _where(root: str) -> str:
    return f"files its images in the store {root}" if root else "catalogues files where they lie"


def catalog_store(conn: psycopg.Connection, cfg: Config | None = None) -> Path | None:
    """The catalog's store root (None: files are catalogued in place).

    With `cfg` (a writing run), a catalog's first run records the configured `[store] root`;
    later runs must name the same one (ConfigError otherwise: one catalog, one store, or its
    rows would point into two). A catalog from before the store has none.
    """
    recorded = db.get_meta(conn, "store_root")
    if cfg is not None:
        wanted = StoreSettings.from_config(cfg).root
        if recorded is None:
            empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM images)").fetchone()[0]
            recorded = wanted if empty else ""
            with conn.transaction():
                db.set_meta(conn, "store_root", recorded)
        if wanted != recorded:
            raise ConfigError(f"this catalog {_where(recorded)}, but [store] root is "
                              f"{wanted or 'empty'}: a catalog keeps the store it was created with")
    return Path(recorded) if recorded else None
