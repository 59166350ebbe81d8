"""An external PostgreSQL by DSN: the system's PostgreSQL 15, which has no pgvector.

The server runs as the `postgres` system user on a free loopback port with password (SCRAM)
authentication for a non-superuser, the way a shared database server would be used. The
catalog falls back to float32 `bytea` vectors and must hold what the embedded catalog holds.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from catalog_snapshot import (
    CLI,
    Archive,
    Reference,
    difference,
    lookalike_run,
    run_env,
    seed_models,
    snapshot,
)

pytest_plugins = ["catalog_snapshot"]
pytestmark = pytest.mark.slow

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
PASSWORD = "n0t in the:logs@all"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(*args: str) -> None:
    # initdb and postgres refuse to run as root.
    subprocess.run(["runuser", "-u", OS_USER, "--", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def external_dsn() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL 15 binaries in {PG_BIN}")
    try:
        pw = pwd.getpwnam(OS_USER)
    except KeyError:
        pytest.skip(f"no {OS_USER!r} system user to run PostgreSQL as")
    # Not under pytest's tmp folders: they are private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="lookalike-pg-"))
    os.chown(base, pw.pw_uid, pw.pw_gid)
    data, port = base / "data", free_port()
    started = False
    try:
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", OS_USER, "--auth-local=trust",
                    "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off", "start")
        started = True
        with psycopg.connect(host=str(base), port=port, user=OS_USER, dbname="postgres",
                             autocommit=True) as admin:
            admin.execute(f"CREATE ROLE lookalike LOGIN PASSWORD '{PASSWORD}'")
            admin.execute("CREATE DATABASE lookalike OWNER lookalike")
        yield f"postgresql://lookalike:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/lookalike"
    finally:
        if started:
            as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base)


def test_external_postgresql_without_pgvector_holds_the_same_catalog(
        external_dsn: str, reference: Reference, archive: Archive, tmp_path: Path) -> None:
    expected = reference.snapshot()
    home = tmp_path / "home"
    home.mkdir()
    seed_models(reference.home, home)
    run = lookalike_run(archive, home, tmp_path, LOOKALIKE_DSN=external_dsn)
    assert run.wait(600) == 0, run.tail()
    assert not (home / "pg").exists(), "an embedded server was started despite the DSN"

    got = snapshot(external_dsn)
    assert got == expected, difference(got, expected)
    with psycopg.connect(external_dsn) as conn:
        assert conn.execute("SELECT value FROM catalog_meta WHERE key = 'vector_type'"
                            ).fetchone() == ("bytea",)
        assert conn.execute("SELECT udt_name FROM information_schema.columns WHERE table_name = "
                            "'image_embeddings' AND column_name = 'emb'").fetchone() == ("bytea",)

    status = subprocess.run([str(CLI), "status", "--home", str(home)], capture_output=True, text=True,
                            env=run_env(tmp_path, LOOKALIKE_DSN=external_dsn), timeout=120)
    assert status.returncode == 0, status.stderr
    assert "127.0.0.1" in status.stdout
    for text in (status.stdout, status.stderr, *run.stdout, *run.stderr):
        assert PASSWORD not in text and quote(PASSWORD, safe="") not in text
