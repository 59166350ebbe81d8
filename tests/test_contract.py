"""The catalog contract (schema version 2): the design's tables and queries verbatim, the vector
index, the migration of a real version 1 catalog, and `lookalike sql` read-only by default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg
import pytest
from catalog_snapshot import difference, snapshot
from conftest import REPO
from test_catalog import analyst_home, bytea_copy

from lookalike import Catalog, cli, db
from lookalike.config import load_config
from lookalike.db.migrations import SCHEMA_VERSION, CatalogTooNew

pytestmark = pytest.mark.slow

# The design's five tables, each column named as DESIGN.md has it.
DESIGN_QUERIES = [
    "SELECT id, file_sha256, path_original, width, height, bytes, format, created_at FROM images",
    "SELECT image_id, phash64, dhash64, ahash64 FROM image_hashes",
    "SELECT image_id, model_ver, emb FROM image_embeddings",
    "SELECT id, model_ver, size, centroid, created_at, updated_at FROM clusters",
    "SELECT image_id, cluster_id, joined_at, sim_score FROM image_cluster",
]
# What version 1 called what version 2 renamed (table, v2 column, v1 column); None: new in v2.
CAPTURE = ["taken_at", "taken_at_source", "taken_offset_min", "camera_make", "camera_model", "lens",
           "orientation", "gps_lat", "gps_lon", "decode_path"]
V1_COLUMNS = {
    "images": {"id": "image_id", "file_sha256": "sha256", "created_at": "first_seen_at",
               "path_original": None, "store_path": None, **dict.fromkeys(CAPTURE)},
    "image_hashes": {"phash64": "phash", "dhash64": "dhash", "ahash64": "ahash"},
    "image_embeddings": {"emb": "embedding"},
    "clusters": {"id": "cluster_id", "name": None, "name_source": None, "top_labels": None},
    "image_cluster": {"joined_at": None},
}
V1_TABLES = ["runs", "manifests", "images", "image_hashes", "image_paths", "image_path_history",
             "ingest_errors", "image_embeddings", "clusters", "image_cluster", "near_duplicates",
             "image_dup_group", "cluster_transitions", "catalog_meta"]  # v1's cluster_pool: left empty


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analyst_home(tmp_path_factory)


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)


def readme_queries() -> list[str]:
    """The analyst queries of the README's catalog reference, exactly as printed."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("A few analyst queries"):]
    sql = block[block.index("```sql") + len("```sql"):block.index("```", block.index("```sql") + 6)]
    return [q.strip() for q in sql.split(";") if q.strip()]


def test_the_designs_queries_run_verbatim(home: Path) -> None:
    with Catalog(home=home) as cat:
        for query in DESIGN_QUERIES:
            assert not cat.sql(query).empty, query
        version = cat.sql("SELECT value FROM catalog_meta WHERE key = 'schema_version'")["value"][0]
        assert int(version) == SCHEMA_VERSION
        assert cat.sql("SELECT indexdef FROM pg_indexes WHERE tablename = 'images'")["indexdef"].str.contains(
            r"\(created_at\)").any()
        # path_original is the first path the bytes were found at.
        assert cat.sql("SELECT count(*) AS n FROM images i WHERE path_original <> "
                       "(SELECT min(path) FROM image_paths p WHERE p.image_id = i.id)")["n"][0] == 0


def test_the_readme_queries_run_as_printed(home: Path) -> None:
    queries = readme_queries()
    assert len(queries) == 5
    with Catalog(home=home) as cat:
        for query in queries:
            frame = cat.sql(query)
            assert list(frame.columns), query
        assert len(cat.sql(queries[3])) == 10  # the kNN query finds its 10


def test_the_knn_query_is_served_by_the_vector_index(home: Path) -> None:
    with Catalog(home=home) as cat:
        (model_ver,) = cat.sql("SELECT value FROM catalog_meta WHERE key = 'active_model_ver'")["value"]
        knn = readme_queries()[3].replace("effnet-lite0@imagenet-57934424", model_ver)
        # The catalog is small, so the planner may rightly prefer a scan: forbid it to see that
        # the index serves this query shape (bench/vector_index.py shows it chosen at 1M).
        with cat.conn.transaction():
            cat.conn.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in cat.conn.execute("EXPLAIN " + knn))
        assert re.search(r"Index Scan using image_embeddings_ann_\w+", plan), plan


def test_a_version_1_catalog_is_migrated_in_place_losing_nothing(home: Path) -> None:
    v1 = _v1_copy(home, "lookalike_v1")
    before = snapshot(v1)
    cfg = load_config(None, home)
    with db.connect(cfg, v1) as conn:
        version = conn.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'").fetchone()
        assert version == ("1",)
        db.ensure_schema(conn)  # what a run does first
        assert db.get_meta(conn, "schema_version") == str(SCHEMA_VERSION)
        assert conn.execute("SELECT count(*) FROM images WHERE path_original = '' OR path_original IS NULL"
                            ).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM image_cluster WHERE joined_at IS NULL").fetchone() == (0,)
    after = snapshot(v1)
    versions = (before["meta"].pop("schema_version"), after["meta"].pop("schema_version"))
    assert versions == ("1", str(SCHEMA_VERSION))
    assert after["other_tables"].pop("image_labels") == 0  # new in version 2
    assert before.pop("cluster_pool") == {}  # gone in version 2 (it was empty here)
    assert after == before, difference(after, before)
    # A reader (a notebook) opening a version 1 catalog migrates it too.
    reader = _v1_copy(home, "lookalike_v1_reader")
    with Catalog(home=home, dsn=reader) as cat:
        version = cat.sql("SELECT value FROM catalog_meta WHERE key = 'schema_version'")["value"][0]
        assert version == str(SCHEMA_VERSION)
        assert not cat.similar(int(cat.sql("SELECT min(id) AS i FROM images")["i"][0]), k=3).empty


def test_a_catalog_newer_than_the_code_is_refused_in_one_line(
        home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    newer = _v1_copy(home, "lookalike_newer")
    with psycopg.connect(newer, autocommit=True) as conn:
        conn.execute("UPDATE catalog_meta SET value = '99' WHERE key = 'schema_version'")
        with pytest.raises(CatalogTooNew, match="schema version 99"):
            db.ensure_schema(conn)
    monkeypatch.setenv("LOOKALIKE_DSN", newer)
    assert cli.main(["status", "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"schema version 99, newer than this lookalike's {SCHEMA_VERSION}" in err


@pytest.mark.parametrize("statement", [
    "CREATE TABLE x (a int)", "UPDATE images SET width = 0", "DELETE FROM ingest_errors",
    "DROP TABLE near_duplicates", "INSERT INTO catalog_meta VALUES ('x', 'y')"])
def test_sql_is_read_only_unless_asked(home: Path, statement: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(db.embedded_uri(home))  # a DSN: attaching by Config would stop the server after
    assert cli.main(["sql", statement, "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "read-only transaction" in err and "--write" in err
    after = snapshot(db.embedded_uri(home))
    assert after == before, difference(after, before)


def test_sql_writes_with_write_and_prints_lf_csv_json_and_tables(home: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sql", "CREATE TABLE analyst_notes (note text)", "--write", "--home", str(home)]) == 0
    assert cli.main(["sql", "DROP TABLE analyst_notes", "--write", "--home", str(home)]) == 0
    capsys.readouterr()
    query = "SELECT id, format, path_original FROM images ORDER BY id LIMIT 3"
    assert cli.main(["sql", query, "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and out.splitlines()[0] == "id,format,path_original" and len(out.splitlines()) == 4
    assert cli.main(["sql", query, "--format", "json", "--home", str(home)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [set(r) for r in rows] == [{"id", "format", "path_original"}] * 3
    assert cli.main(["sql", query, "--format", "table", "--home", str(home)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[0].strip() == "id" and set(table[1]) <= {"-", "+"} and table[-1] == "(3 rows)"


def test_a_failing_query_is_one_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sql", "SELEC 1", "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lookalike: syntax error") and "\n" not in err
    assert cli.main(["sql", "SELECT pg_sleep(5)", "--timeout", "0.2", "--home", str(home)]) == 2
    assert "statement timeout" in capsys.readouterr().err


def test_knn_on_a_bytea_catalog_says_it_needs_pgvector(home: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_DSN", bytea_copy(home))
    knn = readme_queries()[3]
    assert cli.main(["sql", knn, "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs pgvector" in err
    for query in DESIGN_QUERIES:  # everything else works
        assert cli.main(["sql", query, "--home", str(home)]) == 0


def _v1_copy(home: Path, name: str) -> str:
    """A version 1 catalog in database `name` of the analyst catalog's server: the version 1 DDL
    (tests/resources/schema_v1.sql) filled with the real rows of the analyst catalog's run."""
    uri = db.embedded_uri(home)
    dsn = psycopg.conninfo.make_conninfo(uri, dbname=name)
    with psycopg.connect(uri, autocommit=True) as src, psycopg.connect(uri, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
        with psycopg.connect(dsn, autocommit=True) as dst, dst.transaction():
            dst.execute("CREATE EXTENSION IF NOT EXISTS vector")
            ddl = (REPO / "tests" / "resources" / "schema_v1.sql").read_text()
            dst.execute(ddl.replace("{vector}", "vector"))
            for table in V1_TABLES:
                renamed = V1_COLUMNS.get(table, {})
                columns = [r[0] for r in src.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
                    "AND table_name = %s ORDER BY ordinal_position", (table,))]
                kept = [c for c in columns if renamed.get(c, c) is not None]
                names = [renamed.get(c, c) for c in kept]
                source = f"COPY (SELECT {', '.join(kept)} FROM {table}) TO STDOUT (FORMAT BINARY)"
                target = f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
                with src.cursor().copy(source) as out, dst.cursor().copy(target) as into:
                    for data in out:
                        into.write(data)
            dst.execute("UPDATE catalog_meta SET value = '1' WHERE key = 'schema_version'")
            for table, column in (("runs", "run_id"), ("images", "image_id"), ("clusters", "cluster_id")):
                dst.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                            f"(SELECT coalesce(max({column}), 1) FROM {table}))")
    return dsn
