"""Crash safety: a run SIGKILLed at any stage, then run again, ends with the same catalog.

One home goes through three killed runs and a final one: killed while the scan's Spark job
starts, killed with extract tasks half-way through writing thumbnails, killed inside a
manifest's load transaction after two manifests were loaded. Each kill takes down the whole
process tree (CLI, Spark's JVM, pyspark's daemon and workers) the way an OOM killer or a lost
node would, and each lands where the test checks it did. The final catalog must equal the
uninterrupted reference run's, whole.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg
import pyarrow.parquet as pq
import pytest
from catalog_snapshot import (
    LATE_COPIES,
    Archive,
    CliRun,
    Reference,
    catalog_uri,
    difference,
    embedded_server_pid,
    home_config,
    lookalike_run,
    run_env,
    seed_models,
    snapshot,
    stop_embedded_server,
)

pytest_plugins = ["catalog_snapshot"]

TIMEOUT = 300


def runs_java(run: CliRun) -> bool:
    try:
        children = psutil.Process(run.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if child.name() == "java":
                return True
        except psutil.Error:
            pass  # gone meanwhile
    return False


def until(condition: Callable[[], object], what: str, run: CliRun) -> None:
    """Poll `condition()` every 0.1 s while the run is alive."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert run.proc.poll() is None, f"the run ended before {what}:\n{run.tail()}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT} s:\n{run.tail()}"
        time.sleep(0.1)


def query(home: Path, sql: str, *params: object) -> list[tuple]:
    with catalog_uri(home_config(home)) as uri, psycopg.connect(uri, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def manifest_status(home: Path) -> list[tuple[str, str]]:
    return query(home, "SELECT manifest_id, status FROM manifests ORDER BY manifest_id")


def kill_during_scan(archive: Archive, home: Path, tmp: Path) -> None:
    run = lookalike_run(archive, home, tmp)
    try:
        # The scan walks the tree in Spark tasks (split_dirs = 1): a JVM and no manifest yet.
        until(lambda: runs_java(run) and not list(home.glob("manifests/*")),
              "Spark starting for the scan", run)
    finally:
        run.kill()
    assert manifest_status(home) == []


def kill_during_extract(archive: Archive, home: Path, tmp: Path) -> None:
    run = lookalike_run(archive, home, tmp)
    try:
        # Spark creates the output folder when the job starts; a thumbnail means tasks are working.
        until(lambda: list(home.glob("stages/*/features")) and list(home.glob("thumbs/*/*/*.jpg")),
              "extract tasks writing thumbnails", run)
    finally:
        run.kill()
    features = list(home.glob("stages/*/features"))
    assert features and not any((f / "_SUCCESS").exists() for f in features), "the extract had ended"
    statuses = manifest_status(home)
    assert len(statuses) > 2 and {s for _, s in statuses} == {"scanned"}, statuses


def kill_inside_a_load(archive: Archive, home: Path, tmp: Path) -> str:
    """Killed while the third manifest's load transaction waits, with rows already written.

    The test holds a lock on ingest_errors, which every load writes after images and paths; the
    kill comes once the load is seen waiting for it. Then what the run keeps beside the catalog
    (<home>/index, the dedup indexes) is put back as it was after the first load: the state a
    kill between the second load's commit and its index save leaves. Returns the manifest that
    was being loaded.
    """
    run = lookalike_run(archive, home, tmp)
    index, index_after_first_load = home / "index", tmp / "index-after-first-load"
    with catalog_uri(home_config(home)) as uri, psycopg.connect(uri, autocommit=True) as conn:
        try:
            loads: list[str] = []

            def second_load(line: str | None) -> bool:
                if line is not None and line.startswith("load "):
                    loads.append(line)
                    if len(loads) == 1 and index.is_dir():  # saved before the line is printed
                        shutil.copytree(index, index_after_first_load)
                return len(loads) == 2

            run.wait_for(second_load, TIMEOUT)
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE ingest_errors IN EXCLUSIVE MODE")
            waiting: list[int] = []

            def blocked_load() -> bool:
                waiting[:] = [r[0] for r in conn.execute(
                    "SELECT pid FROM pg_locks WHERE relation = 'ingest_errors'::regclass AND NOT granted")]
                return bool(waiting)

            until(blocked_load, "a load waiting on ingest_errors", run)
            # The waiting transaction has already written: it holds a row lock on images' table.
            (holds,), = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND relation = 'images'::regclass "
                "AND mode = 'RowExclusiveLock' AND granted", (waiting[0],)).fetchall()
            assert holds == 1
        finally:
            run.kill()
            conn.execute("ROLLBACK")
        # The killed client's backend rolls back once it sees the socket closed.
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (waiting[0],)
                           ).fetchone()[0]:
            assert time.monotonic() < deadline, "the killed load's backend did not go away"
            time.sleep(0.1)
    if index_after_first_load.is_dir():
        shutil.rmtree(index)
        shutil.copytree(index_after_first_load, index)
    statuses = manifest_status(home)
    assert [s for _, s in statuses[:2]] == ["loaded", "loaded"], statuses
    interrupted = statuses[2][0]
    assert statuses[2][1] == "scanned", statuses
    # Nothing of the interrupted manifest reached the catalog.
    paths = pq.read_table(home / "manifests" / f"{interrupted}.parquet", columns=["path"])["path"].to_pylist()
    assert query(home, "SELECT count(*) FROM image_paths WHERE path = ANY(%s)", paths) == [(0,)]
    assert query(home, "SELECT count(*) FROM ingest_errors WHERE path = ANY(%s)", paths) == [(0,)]
    return interrupted


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_catalog(reference: Reference, archive: Archive,
                                                         tmp_path: Path) -> None:
    expected = reference.snapshot()
    home = tmp_path / "home"
    home.mkdir()
    seed_models(reference.home, home)
    try:
        kill_during_scan(archive, home, tmp_path)
        kill_during_extract(archive, home, tmp_path)
        interrupted = kill_inside_a_load(archive, home, tmp_path)

        final = lookalike_run(archive, home, tmp_path)
        assert final.wait(TIMEOUT) == 0, final.tail()
        assert any(line.startswith(f"load {interrupted}:") for line in final.stderr), final.tail()
        # The embedded server is stopped when its last user ends, killed users included.
        deadline = time.monotonic() + 30
        while embedded_server_pid(home) is not None:
            assert time.monotonic() < deadline, "the embedded PostgreSQL outlived the last run"
            time.sleep(0.2)

        got = snapshot(home_config(home))
        assert got == expected, difference(got, expected)
        if expected["near_duplicates"]:
            # Pairs across runs: the final run's dedup index must hold what the killed runs loaded,
            # though the index on disk was older than the catalog.
            late = {sha for path, sha in archive.sha256.items() if LATE_COPIES in path}
            paired = {sha for pair in expected["near_duplicates"] for sha in pair[:2]}
            assert late <= paired, "the late copies were not found as near-duplicates"
        assert query(home, "SELECT status FROM runs ORDER BY run_id") == [
            ("interrupted",), ("interrupted",), ("interrupted",), ("ok",)]
        # The resumed manifests were finished, not scanned again: no file is in two manifests.
        registered = [r[0] for r in query(home, "SELECT manifest_id FROM manifests")]
        listed = [p for m in registered for p in
                  pq.read_table(home / "manifests" / f"{m}.parquet", columns=["path"])["path"].to_pylist()]
        assert sorted(listed) == sorted(archive.sha256)
    finally:
        stop_embedded_server(home)


def test_embedded_server_stops_after_its_killed_user(tmp_path: Path) -> None:
    """A process killed while it used the embedded server must not keep it alive for ever."""
    home = tmp_path / "home"
    attach = ("import sys; from pathlib import Path; from lookalike import db; "
              "db.embedded_uri(Path(sys.argv[1])); print('up', flush=True)")
    killed = CliRun([sys.executable, "-c", attach + "; import time; time.sleep(600)", str(home)],
                    run_env(tmp_path))
    try:
        until(lambda: "up" in killed.stdout, "the embedded server up", killed)
    finally:
        killed.kill()
    assert embedded_server_pid(home) is not None
    try:
        later = subprocess.run([sys.executable, "-c", attach, str(home)], env=run_env(tmp_path), timeout=120)
        assert later.returncode == 0
        assert embedded_server_pid(home) is None, "the server outlived its last (living) user"
    finally:
        stop_embedded_server(home)
