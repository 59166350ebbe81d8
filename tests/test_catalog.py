"""lookalike.Catalog on a catalog built by the real pipeline.

This module also builds that catalog for every analyst test (notebooks, report, similar):
`analyst_home()` runs the pipeline once per session on nd-ukbench plus ImageNet photos of six
categories, a resized copy and a broken file with HTML-hostile names, then adds what a later
life of the catalog would hold: the clusters of a retired model, and near-duplicate pairs and
groups when the dedup stage has not filled them (pHash pairs, groups as connected components).
`bytea_copy()` copies it into a second database whose vectors are bytea and whose
near-duplicate tables are empty: the catalog before the dedup stage, without pgvector.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
from conftest import IMAGENET, REPO, UKBENCH
from PIL import Image
from psycopg.types.json import Jsonb

from lookalike import Catalog, db
from lookalike.config import load_config
from lookalike.db.sql import hamming_sql
from lookalike.db.vector_io import vector_to_db
from lookalike.driver.ingest import run

CATEGORIES = ("dog", "bird", "vehicle", "food", "fish", "structure")
PER_CATEGORY = 5
RESIZED_NAME = "odd <b>&amp; \"quoted\" 'name'.jpg"  # a resized copy of ORIGINAL
BROKEN_NAME = "<img src=x onerror=alert(1)>.jpg"
ORIGINAL = "n01440764_tench.JPEG"
RETIRED = "retired-model@0000"
BYTEA_DB = "lookalike_bytea"

_built: dict[str, str] = {}  # "home", "bytea" (a DSN) or "failed": made once per session


def analyst_home(factory: pytest.TempPathFactory) -> Path:
    """The analyst tests' catalog home, built once per test session."""
    if "failed" in _built:  # every module would otherwise spend minutes failing the same way
        pytest.fail(f"the analyst catalog could not be built: {_built['failed']}")
    if "home" not in _built:
        base = factory.mktemp("analyst")
        archive = _archive(base / "archive")
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("LOOKALIKE_DSN", raising=False)
            cfg = load_config(None, base / "home")
            try:
                run(cfg, [str(UKBENCH), str(archive)])
            except Exception as e:
                _built["failed"] = f"{type(e).__name__}: {e}"
                raise
            with db.connect(cfg) as conn:
                _add_retired_model(conn)
                _add_near_duplicates(conn, cfg["neardup"]["phash_radius"])
        _built["home"] = str(cfg.home)
    return Path(_built["home"])


def _archive(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(IMAGENET / "categories.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    for category in CATEGORIES:
        for row in [r for r in rows if r["category"] == category][:PER_CATEGORY]:
            shutil.copy(IMAGENET / row["file"], root / row["file"])
    shutil.copy(IMAGENET / ORIGINAL, root / ORIGINAL)
    with Image.open(IMAGENET / ORIGINAL) as im:
        im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.Resampling.LANCZOS).save(
            root / RESIZED_NAME, "JPEG", quality=85)
    (root / BROKEN_NAME).write_bytes(b"<html>not a picture</html>")
    return root


def _add_retired_model(conn: psycopg.Connection) -> None:
    """What a recluster leaves behind: another model_ver's vectors, clusters and members."""
    vector_type = db.get_meta(conn, "vector_type")
    if vector_type == "vector":
        db.register_vector(conn)
    ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY id LIMIT 3")]
    with conn.transaction():
        # A different dimension too: any query that forgot the model_ver filter fails loudly.
        centroid = vector_to_db(np.array([1.0, 0.0, 0.0]), vector_type)
        cluster_id = conn.execute("INSERT INTO clusters (model_ver, centroid, size) VALUES (%s, %s, %s) "
                                  "RETURNING id", (RETIRED, centroid, len(ids))).fetchone()[0]
        for image_id in ids:
            conn.execute("INSERT INTO image_embeddings (image_id, model_ver, emb) VALUES (%s, %s, %s)",
                         (image_id, RETIRED, centroid))
            conn.execute("INSERT INTO image_cluster (image_id, model_ver, cluster_id, sim_score) "
                         "VALUES (%s, %s, %s, 1.0)", (image_id, RETIRED, cluster_id))


def _add_near_duplicates(conn: psycopg.Connection, radius: int) -> None:
    """pHash pairs and their connected components, unless the dedup stage made them already."""
    if conn.execute("SELECT count(*) FROM near_duplicates").fetchone()[0]:
        return
    distance = hamming_sql("a.phash64", "b.phash64")
    pairs = conn.execute(f"SELECT a.image_id, b.image_id, {distance} FROM image_hashes a "
                         f"JOIN image_hashes b ON a.image_id < b.image_id WHERE {distance} <= %s",
                         (radius,)).fetchall()
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)  # the group_id is the smallest image_id of the group
    with conn.transaction():
        for a, b, d in pairs:
            conn.execute("INSERT INTO near_duplicates (image_id, other_id, method, distance) "
                         "VALUES (%s, %s, 'phash', %s)", (a, b, d))
        for image_id in parent:
            conn.execute("INSERT INTO image_dup_group (image_id, group_id) VALUES (%s, %s)",
                         (image_id, root(image_id)))


def bytea_copy(home: Path) -> str:
    """DSN of a copy of the catalog in another database of its server, with bytea vectors and
    no near-duplicates (made once per session)."""
    if "bytea" in _built:
        return _built["bytea"]
    uri = db.embedded_uri(home)
    dsn = psycopg.conninfo.make_conninfo(uri, dbname=BYTEA_DB)
    with psycopg.connect(uri, autocommit=True) as src, psycopg.connect(uri, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {BYTEA_DB}")
        admin.execute(f"CREATE DATABASE {BYTEA_DB}")
        db.register_vector(src)
        with psycopg.connect(dsn, autocommit=True) as dst:
            dst.execute("CREATE TABLE catalog_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            dst.execute("INSERT INTO catalog_meta VALUES ('vector_type', 'bytea')")
            assert db.ensure_schema(dst) == "bytea"
            with dst.transaction():
                for table in ("runs", "manifests", "images", "image_hashes", "image_paths", "ingest_errors",
                              "image_embeddings", "clusters", "image_cluster"):
                    _copy_table(src, dst, table)
                for key in ("active_model", "active_model_ver"):
                    db.set_meta(dst, key, db.get_meta(src, key))
    _built["bytea"] = dsn
    return dsn


def _copy_table(src: psycopg.Connection, dst: psycopg.Connection, table: str) -> None:
    cur = src.execute(f"SELECT * FROM {table}")
    names = [c.name for c in cur.description]
    rows = [tuple(_bytea_value(v) for v in row) for row in cur]
    if rows:
        with dst.cursor() as out:
            out.executemany(f"INSERT INTO {table} ({', '.join(names)}) "
                            f"VALUES ({', '.join(['%s'] * len(names))})", rows)


def _bytea_value(value: object) -> object:
    if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], list)):
        return Jsonb(value)  # runs.summary, clusters.top_labels (text arrays stay arrays)
    return vector_to_db(value.to_numpy(), "bytea") if hasattr(value, "to_numpy") else value


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analyst_home(tmp_path_factory)


@pytest.fixture
def cat(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Catalog]:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    with Catalog(home=home) as c:
        yield c


@pytest.mark.slow
def test_frames_hold_what_the_tables_hold(cat: Catalog) -> None:
    counts = cat.sql("SELECT (SELECT count(*) FROM images) AS images, (SELECT count(*) FROM image_paths) "
                     "AS paths, (SELECT count(*) FROM ingest_errors) AS errors").iloc[0]
    images, paths = cat.images(), cat.paths()
    assert len(images) == counts["images"] > 40
    assert len(paths) == counts["paths"] == images["paths"].sum()
    assert images["image_id"].is_unique and set(paths["image_id"]) == set(images["image_id"])
    # nd-ukbench stores two photos twice: each is one image with two paths.
    assert sorted(paths.loc[paths["copies"] > 1, "path"].map(lambda p: Path(p).name)) == \
        ["ukbench00120.jpg"] * 2 + ["ukbench09268.jpg"] * 2
    errors = cat.errors()
    assert len(errors) == counts["errors"] == 3
    assert errors.loc[errors["path"].str.endswith(BROKEN_NAME), "error"].tolist() == ["not_an_image"]
    runs = cat.runs()
    assert runs[["kind", "status", "files"]].values.tolist() == [["run", "ok", counts["paths"] + 3]]
    assert runs["seconds"].iloc[0] > 0


@pytest.mark.slow
def test_clusters_are_the_active_models_only(cat: Catalog) -> None:
    active = cat.model_ver
    assert active and active != RETIRED
    clusters = cat.clusters()
    assert not clusters.empty and set(clusters["model_ver"]) == {active}
    (retired_id,), = cat.sql("SELECT id FROM clusters WHERE model_ver = %s", (RETIRED,)).values
    assert retired_id not in set(clusters["cluster_id"])
    members = cat.members()
    assert set(members["cluster_id"]) == set(clusters["cluster_id"])
    assert len(members) == clusters["images"].sum() == len(cat.images())  # one active row per image
    with pytest.raises(KeyError, match="not a cluster of the active model"):
        cat.members(int(retired_id))
    biggest = clusters.iloc[0]
    one = cat.members(int(biggest["cluster_id"]))
    assert len(one) == biggest["images"] and one["sim_score"].is_monotonic_decreasing
    assert (cat.members(limit=2).groupby("cluster_id").size() <= 2).all()
    vectors = cat.embeddings()
    assert len(vectors) == len(cat.images()) and vectors["cluster_id"].notna().all()
    assert {len(v) for v in vectors["embedding"]} == {1280}  # the retired 3-d vectors stay out
    # Bounded: a sample spread over the catalog (every k-th image), each with its own cluster.
    sample = cat.embeddings(limit=5)
    assert 0 < len(sample) <= 5 and set(sample["image_id"]) <= set(vectors["image_id"])
    assert sample["image_id"].max() > vectors["image_id"].median(), "the sample is not spread out"
    by_id = vectors.set_index("image_id")["cluster_id"]
    assert all(by_id[i] == c for i, c in zip(sample["image_id"], sample["cluster_id"], strict=True))


@pytest.mark.slow
def test_groups_keep_the_largest_copy(cat: Catalog) -> None:
    groups, pairs = cat.groups(), cat.near_duplicates()
    assert not pairs.empty and pairs["group_id"].notna().all()
    assert set(groups["image_id"]) == set(pairs["image_id"]) | set(pairs["other_id"])
    for _, g in groups.groupby("group_id"):
        assert g["keep"].sum() == 1 and len(g) == g["group_size"].iloc[0] >= 2
        keeper = g[g["keep"]].iloc[0]
        best = g.sort_values(["pixels", "bytes"], ascending=False).iloc[0]
        assert (keeper["pixels"], keeper["bytes"]) == (best["pixels"], best["bytes"])
        assert keeper["phash_to_keep"] == 0
    # The resized copy with the hostile name sits in its original's group, and the original is kept.
    tench = groups[groups["path"].str.endswith((ORIGINAL, RESIZED_NAME))]
    assert tench["group_id"].nunique() == 1 and len(tench) == 2
    assert tench.loc[tench["keep"], "path"].str.endswith(ORIGINAL).all()


@pytest.mark.slow
def test_thumbnails_and_sql(cat: Catalog, home: Path) -> None:
    image_id = int(cat.images()["image_id"].iloc[0])
    path = cat.thumbnail_path(image_id)
    assert path.is_file() and path.is_relative_to(home / "thumbs")
    thumb = cat.thumbnail(image_id)
    assert thumb.mode == "RGB" and max(thumb.size) == 512
    with pytest.raises(KeyError):
        cat.thumbnail_path(-1)
    frame = cat.sql("SELECT id FROM images WHERE id = %s", (-1,))
    assert frame.empty and list(frame.columns) == ["id"]
    assert isinstance(frame, pd.DataFrame)


@pytest.mark.slow
def test_session_is_read_only_and_closes(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    with Catalog(home=home) as cat:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            cat.sql("DELETE FROM ingest_errors")
        assert len(cat.errors()) == 3
    assert cat.conn.closed


@pytest.mark.slow
def test_dsn_and_bytea_catalog(home: Path) -> None:
    dsn = bytea_copy(home)
    with Catalog(home=home, dsn=dsn) as cat:
        assert cat.vector_type == "bytea" and "lookalike_bytea" in cat.where
        assert cat.groups().empty and cat.near_duplicates().empty
        assert len(cat.embeddings()) == len(cat.images())
        assert cat.thumbnail(int(cat.images()["image_id"].iloc[0])).size


def test_a_missing_home_is_refused_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    with pytest.raises(db.CatalogUnavailable, match="no catalog"):
        Catalog(home=tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_import_lookalike_stays_light() -> None:
    code = ("import sys, lookalike; heavy = {'pandas', 'psycopg', 'pyspark'} & set(sys.modules); "
            "assert not heavy, heavy; assert lookalike.Catalog.__name__ == 'Catalog'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
