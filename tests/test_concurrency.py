"""One writer per catalog: a run started while another is writing exits 2 with one clear line.

A scheduler that fires while the previous run is still going must not double-load anything;
failing fast (exit 2) lets cron's next tick pick the work up instead of piling runs up.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import psycopg
import pytest
from catalog_snapshot import (
    MANIFEST_FILES,
    Archive,
    Reference,
    catalog_uri,
    home_config,
    lookalike_run,
    snapshot,
    stop_embedded_server,
)

from lookalike import db

pytest_plugins = ["catalog_snapshot"]

BUSY = "lookalike: another lookalike run is writing to this catalog; try again when it ends (or pass --wait)"


def writer_lock_holders(home: Path) -> int:
    # A bigint advisory key shows in pg_locks as classid (high 32 bits) and objid (low 32 bits).
    with catalog_uri(home_config(home)) as uri, psycopg.connect(uri, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s AND objsubid = 1",
            (db.WRITER_LOCK_KEY >> 32, db.WRITER_LOCK_KEY & 0xFFFFFFFF)).fetchone()[0]


@pytest.mark.slow
def test_second_run_exits_2_while_the_first_completes(reference: Reference, archive: Archive,
                                                      tmp_path: Path) -> None:
    # The suite's reference run is the first writer while it is still in flight (it is when
    # this module runs first, as it does in a whole-suite run); otherwise make one.
    first, home = reference.run, reference.home
    if not reference.running():
        home = tmp_path / "home"
        first = lookalike_run(archive, home, tmp_path)
    try:
        # The first stage line is printed under the writer lock.
        first.wait_for(lambda line: line is not None and line.startswith("scan"), timeout=300)
        assert writer_lock_holders(home) == 1

        second = lookalike_run(archive, home, tmp_path)
        assert second.wait(120) == 2, second.tail()
        assert first.proc.poll() is None, "the first run ended before the second tried: not concurrent"
        assert second.stderr == [BUSY]
        assert first.wait(600) == 0, first.tail()
    finally:
        if first is not reference.run:
            first.kill()
            stop_embedded_server(home)

    snap = reference.snapshot() if first is reference.run else snapshot(home_config(home))
    archive.check(snap)  # every file exactly once: nothing was loaded twice
    with catalog_uri(home_config(home)) as uri, psycopg.connect(uri, autocommit=True) as conn:
        assert conn.execute("SELECT status FROM runs").fetchall() == [("ok",)]
        (loaded,), = conn.execute("SELECT count(*) FROM manifests WHERE status = 'loaded'").fetchall()
    assert loaded == -(-len(archive.sha256) // MANIFEST_FILES)


@pytest.mark.slow
def test_sigterm_interrupts_the_run_and_a_waiting_run_completes_it(archive: Archive, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = lookalike_run(archive, home, tmp_path)
    waiter = None
    try:
        first.wait_for(lambda line: line is not None and line.startswith("extract"), timeout=300)
        waiter = lookalike_run(archive, home, tmp_path, "--wait")
        waiter.wait_for(lambda line: line is not None and "waiting for it to end" in line, timeout=120)
        first.proc.send_signal(signal.SIGTERM)  # what a scheduler's stop or systemd sends
        assert first.wait(120) == 128 + signal.SIGTERM, first.tail()
        assert first.stderr[-1].startswith("lookalike: interrupted by SIGTERM"), first.tail()
        assert waiter.wait(600) == 0, waiter.tail()
    finally:
        first.kill()
        if waiter is not None:
            waiter.kill()
    try:
        snap = snapshot(home_config(home))
        with catalog_uri(home_config(home)) as uri, psycopg.connect(uri, autocommit=True) as conn:
            runs = conn.execute("SELECT status, message FROM runs ORDER BY run_id").fetchall()
    finally:
        stop_embedded_server(home)
    assert [status for status, _ in runs] == ["interrupted", "ok"]
    assert runs[0][1].startswith("interrupted by SIGTERM; the next run resumes from manifest r000001-")
    archive.check(snap)  # the waiting run finished what the stopped one had begun


def test_first_runs_on_a_fresh_catalog_agree_on_the_vector_type(home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first runs: B decides on pgvector while A, whose CREATE EXTENSION lost the race
    (it is not concurrency-safe), creates the catalog with bytea. Both must use what was stored."""
    home.mkdir()
    with catalog_uri(home_config(home)) as uri, psycopg.connect(uri, autocommit=True) as a, \
            psycopg.connect(uri, autocommit=True) as b:
        types: dict[str, str] = {}
        first = threading.Thread(target=lambda: types.update(a=db.ensure_schema(a)))
        real = db._has_pgvector

        def has_pgvector(conn: psycopg.Connection) -> bool:
            if conn is a:
                return False
            first.start()
            first.join(timeout=3)  # A creates the catalog now, unless B's decision holds it back
            return real(conn)

        monkeypatch.setattr(db, "_has_pgvector", has_pgvector)
        types["b"] = db.ensure_schema(b)
        first.join(60)
        assert types == {"a": db.get_meta(a, "vector_type"), "b": db.get_meta(a, "vector_type")}
