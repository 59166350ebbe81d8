"""The pgvector index that serves nearest-neighbour queries on the active model's vectors.

image_embeddings keeps every model's vectors (a recluster writes the new model's beside the
old ones), and a pgvector index needs one fixed dimension: so each model_ver gets a partial
expression index, HNSW over the vectors cast to halfvec(D) (half the size of vector(D): a
1280-d HNSW element fills a whole 8 kB page as vector, half of one as halfvec), with cosine
distance. bench/vector_index.py measured the choice (README, "At scale").

The query form the index serves (knn_sql): the cast and the model_ver filter must appear as
written, or the planner scans every vector:

    SELECT image_id FROM image_embeddings WHERE model_ver = 'effnet-lite0@imagenet-57934424'
    ORDER BY emb::halfvec(1280) <=> '[...]'::halfvec(1280) LIMIT 10;

with model_ver written as a literal (a partial index is used only where the planner sees that
its predicate holds; a bound parameter of a prepared statement may hide it).

The index is built when a run or a recluster ends without one (a bulk build is far faster
than a million inserts into it), and kept current by every later insert.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import psycopg

from lookalike.errors import one_line
from lookalike.progress import say

log = logging.getLogger(__name__)

# hnsw.ef_search for the searches lookalike runs: recall@10 ~0.98 at 100k (bench/vector_index.py).
EF_SEARCH = 100
# What one element of the graph takes while pgvector builds it: the halfvec (2 bytes a
# dimension) plus its neighbour lists and tuple headers (m=16: 32 neighbours on layer 0).
GRAPH_BYTES_OVER_VECTOR = 512
# The share of this machine's memory a build may take: a graph that does not fit in
# maintenance_work_mem is built by inserting into the on-disk index, several times slower.
BUILD_MEMORY_SHARE = 0.25


def index_name(model_ver: str) -> str:
    """A stable name per model_ver, within PostgreSQL's 63 characters."""
    return "image_embeddings_ann_" + hashlib.sha256(model_ver.encode()).hexdigest()[:16]


def knn_sql(model_ver: str, dim: int, operator: str = "<=>") -> str:
    """The nearest-neighbour query the index serves: parameters (vector, exclude, k), the vector as
    text or a pgvector value; returns (image_id, distance). model_ver is written into the query,
    not bound: a partial index serves only a query whose predicate the planner can see (a
    prepared statement's generic plan could not). The index orders by the halfvec distance; the
    distance returned is the full-precision one (re-rank by it)."""
    expr = f"emb::halfvec({dim})"
    return (f"SELECT image_id, (emb {operator} %(vector)s::vector)::float8 AS distance "
            f"FROM image_embeddings WHERE model_ver = {_literal(model_ver)} "
            "AND image_id IS DISTINCT FROM %(exclude)s "
            f"ORDER BY {expr} {operator} %(vector)s::halfvec({dim}) LIMIT %(k)s")


def _literal(text: str) -> str:
    """A SQL string literal, its % doubled for the parameter placeholders around it."""
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


def has_index(conn: psycopg.Connection, model_ver: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (index_name(model_ver),)).fetchone()[0] is not None


def ensure_index(conn: psycopg.Connection, model_ver: str, dim: int) -> None:
    """Build the model's index if it has none (pgvector catalogs only); drop those of models the
    catalog has left. A failure (an old pgvector without halfvec) is logged: searches still work,
    by a scan."""
    if has_index(conn, model_ver):
        return
    started = time.monotonic()
    try:
        with conn.transaction():
            _size_the_build(conn, model_ver, dim)
            conn.execute(f"CREATE INDEX {index_name(model_ver)} ON image_embeddings USING hnsw "
                         f"((emb::halfvec({dim})) halfvec_cosine_ops) "
                         f"WHERE model_ver = {_literal(model_ver).replace('%%', '%')}")
    except psycopg.Error as e:
        log.warning("no vector index for %s: %s", model_ver, one_line(e))
        return
    say(f"vector index: built for {model_ver} in {time.monotonic() - started:.1f} s")


def _size_the_build(conn: psycopg.Connection, model_ver: str, dim: int) -> None:
    """Give this build the memory its whole graph needs (PostgreSQL's default 64 MB holds ~20k
    1280-d vectors), within BUILD_MEMORY_SHARE of the machine, and every core but one as a
    parallel worker: for this transaction only."""
    vectors = conn.execute("SELECT count(*) FROM image_embeddings WHERE model_ver = %s",
                           (model_ver,)).fetchone()[0]
    need_mb = vectors * (2 * dim + GRAPH_BYTES_OVER_VECTOR) * 1.1 / 2**20
    machine_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    memory_mb = int(max(64, min(need_mb, machine_mb * BUILD_MEMORY_SHARE)))
    conn.execute(f"SET LOCAL maintenance_work_mem = '{memory_mb}MB'")
    conn.execute(f"SET LOCAL max_parallel_maintenance_workers = {max(0, (os.cpu_count() or 1) - 1)}")


def drop_other_indexes(conn: psycopg.Connection, keep_model_ver: str) -> None:
    """The indexes of models other than the active one (GBs at 1M vectors each)."""
    keep = index_name(keep_model_ver)
    for (name,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'image_embeddings' "
                                "AND indexname LIKE 'image_embeddings_ann_%%' AND indexname <> %s",
                                (keep,)).fetchall():
        with conn.transaction():
            conn.execute(f'DROP INDEX IF EXISTS "{name}"')
