"""Faults: the catalog server dying mid-run, an unusable thumbnail folder, a SIGTERM turned into
another error by a library, and DSN secrets.

A real PostgreSQL 15 (the system's, started here as the postgres user on a private socket
and a loopback port, with password authentication) is the external catalog: it can be
stopped for real. The tests skip where those binaries or root are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from hostile import photos, share_models
from psycopg import sql

from lookalike import cli, db, failures
from lookalike.config import load_config
from lookalike.layout import Layout
from lookalike.models import runtime
from lookalike.stages.extract import prepare_thumbs_dir

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "lookalike"
PASSWORD = "Zq7-s3cret words"  # with a space: the key=value form must quote it
SECRETS = ("Zq7", "s3cret", quote(PASSWORD))  # no part of it may show


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uri(port: int, dbname: str) -> str:
    return f"postgresql://{USER}:{quote(PASSWORD)}@127.0.0.1:{port}/{dbname}"


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def one_message(err: str) -> str:
    """The single `lookalike:` line of a failed command; no traceback around it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lookalike:")]
    assert len(lines) == 1, err
    return lines[0]


@dataclass
class Postgres:
    data: Path
    port: int

    def ctl(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                        *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        # After an immediate stop the old postmaster may still be exiting: wait for its pid file.
        deadline = time.monotonic() + 60
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.ctl("-w", "-l", str(self.data.parent / "log"), "-o",
                 f"-k {self.data.parent} -h 127.0.0.1 -p {self.port}", "start")

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=str(self.data.parent), port=self.port, user="postgres", dbname=dbname,
                               autocommit=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists() or not shutil.which("runuser"):
        pytest.skip("needs root and the system PostgreSQL 15 binaries")
    # Not under pytest's tmp folder: that one is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="lookalike-pg15-"))
    shutil.chown(base, "postgres", "postgres")
    server = Postgres(base / "data", free_port())
    try:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(server.data),
                        "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        server.start()
        with server.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(USER),
                                                                             sql.Literal(PASSWORD)))
        yield server
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(server.data),
                        "-m", "immediate", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def catalog_db(pg: Postgres) -> Iterator[str]:
    """A fresh database owned by the password-protected role; its name."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with pg.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                   sql.Identifier(USER)))
    yield name
    with pg.admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    root.mkdir()
    for src in photos()[:3]:
        shutil.copyfile(src, root / src.name)
    return root


# -- secrets -------------------------------------------------------------------------------

@pytest.mark.parametrize("dsn", [
    uri(5432, "cat"),
    f"postgresql://{USER}:{quote(PASSWORD)}@db.example/cat?sslmode=require",
    f"postgresql://{USER}@db.example/cat?password={quote(PASSWORD)}&sslmode=require",
    f"host=db.example user={USER} password='{PASSWORD}' dbname=cat",
    f"host=db.example password = 'it\\'s {PASSWORD}' dbname=cat",
    f"host=db.example password={quote(PASSWORD)} dbname=cat",
])
def test_redact_dsn_hides_every_form_of_password(dsn: str) -> None:
    shown = db.redact_dsn(dsn)
    assert_no_secret(shown)
    assert "***" in shown


def test_status_never_shows_the_password(pg: Postgres, catalog_db: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    with db.connect(load_config(None, tmp_path / "home"), uri(pg.port, catalog_db)) as conn:
        db.ensure_schema(conn)  # what a first run does: status never creates a catalog
    # The real command line, debug logging on.
    env = {**os.environ, "LOOKALIKE_DSN": uri(pg.port, catalog_db)}
    proc = subprocess.run([str(Path(sys.executable).parent / "lookalike"), "status", "--debug", "--home",
                           str(tmp_path / "home")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{USER}:***@127.0.0.1:{pg.port}/{catalog_db}" in proc.stdout
    assert_no_secret(proc.stdout, proc.stderr)
    # The key=value form, with the quoted password.
    monkeypatch.setenv("LOOKALIKE_DSN", f"host=127.0.0.1 port={pg.port} dbname={catalog_db} user={USER} "
                                        f"password='{PASSWORD}'")
    assert cli.main(["status", "--debug", "--home", str(tmp_path / "home")]) == 0
    out, err = capsys.readouterr()
    assert "password=***" in out
    assert_no_secret(out, err, caplog.text)


@pytest.mark.parametrize("command", ["status", "run"])
def test_unreachable_catalog_is_one_line_without_the_password(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there: connection refused
    monkeypatch.setenv("LOOKALIKE_DSN", uri(port, "cat"))
    args = [command, "--home", str(tmp_path / "home")] + ([str(tmp_path)] if command == "run" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    message = one_message(err)
    assert "cannot reach the catalog" in message and "refused" in message
    assert_no_secret(err, caplog.text)


# -- the thumbnail folder ------------------------------------------------------------------

def test_prepare_thumbs_dir_proves_the_folder_takes_files(tmp_path: Path) -> None:
    thumbs = tmp_path / "a" / "thumbs"
    prepare_thumbs_dir(thumbs)
    prepare_thumbs_dir(thumbs)  # idempotent
    assert thumbs.is_dir() and not list(thumbs.iterdir())  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OSError, match="cannot write thumbnails") as info:
        prepare_thumbs_dir(blocker)
    assert info.value.filename == str(blocker)


def test_unusable_thumbnail_folder_stops_the_run_before_loading(
        pg: Postgres, catalog_db: str, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOOKALIKE_DSN", uri(pg.port, catalog_db))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thumbs").write_text("a file where the thumbnail folder should be")
    assert cli.main(["run", str(archive), "--home", str(home)]) == 2
    assert str(home / "thumbs") in one_message(capsys.readouterr().err)
    with pg.admin(catalog_db) as conn:
        counts = conn.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM ingest_errors), "
                              "(SELECT string_agg(status, ',') FROM runs)").fetchone()
    assert counts == (0, 0, "failed")  # not one file recorded as a per-file 'thumbnail' error


# -- a signal that a library turned into another error -------------------------------------

def test_a_sigterm_a_library_turned_into_another_error_still_interrupts_the_run(
        pg: Postgres, catalog_db: str, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM that lands while onnxruntime's C extension is being imported (the embed's start)
    surfaces as 'ImportError: initialization failed', caused by it: seen once in the suite's
    SIGTERM test, which then read 'unexpected error' and exit 1. The run is interrupted all the
    same: exit 143, the one line that says where the next run resumes, the run recorded so."""
    monkeypatch.setenv("LOOKALIKE_DSN", uri(pg.port, catalog_db))

    def sigterm_during_import(*args: object, **kwargs: object) -> None:
        try:
            raise failures.Interrupted("SIGTERM")
        except failures.Interrupted as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.setattr(runtime, "catalog_embedder", sigterm_during_import)
    assert cli.main(["run", str(archive), "--home", str(tmp_path / "home")]) == 128 + signal.SIGTERM
    line = one_message(capsys.readouterr().err)
    assert line == "lookalike: interrupted by SIGTERM; the next run resumes from manifest r000001-0000"
    with pg.admin(catalog_db) as conn:
        recorded = conn.execute("SELECT status, message FROM runs").fetchall()
    assert recorded == [("interrupted", line.removeprefix("lookalike: "))]


# -- the server going away -----------------------------------------------------------------

@pytest.mark.slow
def test_catalog_down_at_load_time_keeps_stages_and_the_next_run_loads_them(
        pg: Postgres, catalog_db: str, archive: Path, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LOOKALIKE_DSN", uri(pg.port, catalog_db))
    home = tmp_path / "home"
    share_models(home, tmp_path_factory.getbasetemp() / "models")
    cfg = load_config(None, home)
    with db.connect(cfg) as conn:
        db.ensure_schema(conn)
    # The moment the load writes its first image, the server shuts down hard (as a crash or an
    # operator would): a real server stopping under a real connection, at load time exactly.
    stop = f"{PG_BIN / 'pg_ctl'} stop -D {pg.data} -m immediate --no-wait"
    with pg.admin(catalog_db) as conn:
        conn.execute(sql.SQL(
            "CREATE FUNCTION crash() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN "
            "EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', {}); PERFORM pg_sleep(60); RETURN NULL; END $$"
        ).format(sql.Literal(stop)))
        conn.execute("CREATE TRIGGER crash BEFORE INSERT ON images EXECUTE FUNCTION crash()")

    argv = ["run", str(archive), "--home", str(home)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "lost the catalog" in one_message(err)
    assert_no_secret(err, caplog.text)
    layout = Layout(cfg.home)
    (manifest,) = [p.stem for p in layout.manifests.glob("*.parquet")]
    done = layout.stage(manifest, "features") / "_SUCCESS"
    assert done.exists()

    pg.start()
    with pg.admin(catalog_db) as conn:
        conn.execute("DROP TRIGGER crash ON images")
        assert conn.execute("SELECT count(*) FROM images").fetchone() == (0,)  # the load rolled back
        assert conn.execute("SELECT status FROM manifests").fetchall() == [("scanned",)]

    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "resuming 1 unfinished manifest" in err
    assert "3 files in 1 manifest, 3 new images" in out
    # Loaded from the kept stage, not extracted again; once loaded, the stage is dropped.
    assert not [line for line in err.splitlines() if line.startswith("extract ")], err
    assert not layout.stages(manifest).exists()
    with pg.admin(catalog_db) as conn:
        assert conn.execute("SELECT count(*) FROM image_paths").fetchone() == (3,)
        runs = conn.execute("SELECT status FROM runs ORDER BY run_id").fetchall()
    assert runs == [("interrupted",), ("ok",)]
