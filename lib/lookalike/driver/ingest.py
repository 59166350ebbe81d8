"""One incremental run: scan, then each manifest through extract, embed and one commit step.

A manifest is the unit of incrementality: it is registered as 'scanned' once its Parquet
file is written, each stage's output is kept under the home until the manifest is
'loaded', and a manifest left unfinished by a killed run is completed by the next run
before anything new is scanned.

The commit step is one transaction, in this order: load the files (db.load), their vectors,
the near-duplicate pairs and groups (dedup.store), the categories (cluster.store), and mark
the manifest loaded. Only after it commits do the new images enter the on-disk indexes.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lookalike import db, preflight, store
from lookalike.cluster.algorithm import ClusterConfig
from lookalike.cluster.names import name_new_members
from lookalike.cluster.store import ClusterCounts, assign_new
from lookalike.config import Config
from lookalike.db import load, runs, vector_index
from lookalike.dedup.indexes import DedupIndexes
from lookalike.dedup.pairs import DedupCounts, NearDupConfig, NewImages
from lookalike.dedup.store import dedup
from lookalike.driver import local
from lookalike.driver.stages import SparkStages, local_master_cores
from lookalike.errors import RETRIED
from lookalike.failures import Interrupted, interruption
from lookalike.files import replacing
from lookalike.layout import Layout
from lookalike.models.registry import ModelSpec
from lookalike.progress import plural, run_progress, say
from lookalike.stages import schemas
from lookalike.stages.scan import ScanSettings, plan, rows_to_table


@dataclass
class RunSummary:
    run_id: int = 0
    manifests: int = 0
    counts: load.LoadCounts = field(default_factory=load.LoadCounts)
    clusters: ClusterCounts = field(default_factory=ClusterCounts)
    dups: DedupCounts = field(default_factory=DedupCounts)
    joined: dict[str, int] = field(default_factory=dict)  # new images per category name
    store: store.StoreCounts = field(default_factory=store.StoreCounts)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(d.pop("counts"))
        d.update({f"clusters_{k}": v for k, v in d.pop("clusters").items()})
        d.update({f"near_duplicate_{k}": v for k, v in d.pop("dups").items()})
        d.update({f"store_{k}": v for k, v in d.pop("store").items()})
        return d

    def describe(self) -> str:
        c, k = self.counts, self.clusters
        top = sorted(self.joined.items(), key=lambda kv: (-kv[1], kv[0]))
        where = "; " + ", ".join(f"{n} joined {name}" for name, n in top[:5]) if top else ""
        more = f" and {len(top) - 5} more categories" if len(top) > 5 else ""
        s = self.store
        stored = (f"; store: {s.linked} linked, {s.copied} copied, {s.existing} there already"
                  + (f", {s.removed} sources removed" if s.removed else "")
                  if s.linked + s.copied + s.existing else "")
        return (f"run {self.run_id}: {c.files} files in {plural(self.manifests, 'manifest')}, "
                f"{c.new_images} new images, {c.exact_copies} exact copies, {c.errors} errors{where}{more}; "
                f"{plural(self.dups.pairs, 'near-duplicate pair')}; "
                f"clusters: {k.joined} joined, {k.created} created"
                + (f", {k.refits} full re-clusterings" if k.refits else "")
                + f"{stored} ({self.seconds:.1f} s)")


class Ingest:
    """The driver of one run: the catalog connection, the Spark stages, the model, the indexes."""

    def __init__(self, cfg: Config, conn: psycopg.Connection, vector_type: str,
                 store_root: Path | None = None) -> None:
        self.cfg = cfg
        self.conn = conn
        self.vector_type = vector_type
        self.layout = Layout(cfg.home, store_root)
        self.store = store.StoreSettings.from_config(cfg)
        self.stored = store.StoreCounts()
        self.stages = SparkStages(cfg, self.layout)
        self._model: ModelSpec | None = None
        self._indexes: DedupIndexes | None = None
        self.clusters = ClusterCounts()
        self.dups = DedupCounts()
        self.joined: Counter[str] = Counter()
        self.current: str | None = None  # the manifest being processed

    @property
    def model(self) -> ModelSpec:
        if self._model is None:
            self._model = runs.catalog_model(self.conn, self.cfg, pin=True)
        return self._model

    @property
    def pinned(self) -> bool:
        """Whether this run resolved the model (it had images to embed or index)."""
        return self._model is not None

    @property
    def indexes(self) -> DedupIndexes:
        if self._indexes is None:
            spec = self.model
            self._indexes = DedupIndexes.open(self.conn, self.layout.index, spec.model_ver, spec.dim,
                                              self.vector_type)
        return self._indexes

    # -- scan ---------------------------------------------------------------------------
    def _known_files(self, retry_errors: bool) -> pa.Table:
        """(path, bytes, mtime) already catalogued, plus recorded errors unless retrying them."""
        sql = "SELECT path, bytes, mtime FROM image_paths"
        if not retry_errors:
            retried = ", ".join(f"'{code}'" for code in sorted(RETRIED))
            sql += (" UNION ALL SELECT path, bytes, mtime FROM ingest_errors "
                    f"WHERE bytes IS NOT NULL AND error NOT IN ({retried})")
        paths, sizes, mtimes = [], [], []
        # COPY streams rows without building the whole result set on either side.
        with self.conn.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["text", "int8", "timestamptz"])
            for p, b, m in copy.rows():
                paths.append(p)
                sizes.append(b)
                mtimes.append(m)
        return pa.table({"path": pa.array(paths, pa.string()), "bytes": pa.array(sizes, pa.int64()),
                         "mtime": pa.array(mtimes, pa.timestamp("us", tz="UTC"))})

    def scan(self, roots: list[str], run_id: int, retry_errors: bool) -> list[str]:
        """Enumerate new files into manifests registered as 'scanned'; returns their ids."""
        started = time.monotonic()
        settings = ScanSettings.create(roots, self.cfg["scan"]["extensions"])
        subtrees, top_files = plan(settings, self.cfg["scan"]["split_dirs"])
        found = rows_to_table(top_files)
        if subtrees:
            found = pa.concat_tables([found, self.stages.walk(settings, subtrees)])
        # Links can make one path appear twice; the anti-join drops what is catalogued already.
        firsts = [(c, "first") for c in found.column_names if c != "path"]
        found = found.group_by("path", use_threads=False).aggregate(firsts)
        found = found.rename_columns([c.removesuffix("_first") for c in found.column_names])
        known = self._known_files(retry_errors)
        table = found.join(known, ["path", "bytes", "mtime"], join_type="left anti")
        if self.store.moves:
            self._remove_moved(found.join(known, ["path", "bytes", "mtime"], join_type="inner"))
        table = table.select(schemas.MANIFEST.names).cast(schemas.MANIFEST).sort_by("path")
        ids = self._write_manifests(table, run_id)
        say(f"scan: {table.num_rows} new files in {plural(len(ids), 'manifest')} "
            f"({time.monotonic() - started:.1f} s)")
        return ids

    def _write_manifests(self, table: pa.Table, run_id: int) -> list[str]:
        size = self.cfg["scan"]["manifest_files"]
        ids = []
        self.layout.manifests.mkdir(parents=True, exist_ok=True)
        for i in range(math.ceil(table.num_rows / size)):
            part = table.slice(i * size, size)
            manifest_id = f"r{run_id:06d}-{i:04d}"
            with replacing(self.layout.manifest(manifest_id)) as tmp:
                pq.write_table(part, tmp)
            ids.append(manifest_id)
            runs.register_manifest(self.conn, manifest_id, run_id, part.num_rows,
                                   int(pc.sum(part["bytes"]).as_py() or 0))
        return ids

    def run(self, roots: list[str], run_id: int, retry_errors: bool) -> RunSummary:
        """Unfinished manifests first, then the new files of `roots`, manifest by manifest."""
        summary = RunSummary(run_id=run_id)
        with run_progress(self.layout.progress, run_id) as progress:
            resumed = runs.pending_manifests(self.conn)
            if resumed:
                say(f"resuming {plural(len(resumed), 'unfinished manifest')}")
            progress.files = runs.manifest_files(self.conn, resumed)
            for manifest_id in resumed:
                summary.counts.add(self.process(manifest_id, run_id))
                progress.files_done = summary.counts.files
            new_ids = self.scan(roots, run_id, retry_errors)
            progress.files += runs.manifest_files(self.conn, new_ids)
            for manifest_id in new_ids:
                summary.counts.add(self.process(manifest_id, run_id))
                progress.files_done = summary.counts.files
        if self.vector_type == "vector" and self.pinned:
            vector_index.ensure_index(self.conn, self.model.model_ver, self.model.dim)
        summary.manifests = len(resumed) + len(new_ids)
        summary.clusters = self.clusters
        summary.dups = self.dups
        summary.joined = dict(self.joined)
        summary.store = self.stored
        return summary

    # -- the store ----------------------------------------------------------------------
    def _count_filed(self, features: pa.Table) -> None:
        if "store_action" not in features.column_names:  # a stage written before the store
            return
        actions = Counter(a for a in features["store_action"].to_pylist() if a is not None)
        copied = actions["copy"]
        if copied and self.store.mode != "copy" and not self.stored.copied:
            say(f"store: {copied} files copied, not linked: they are on another filesystem than "
                f"{self.store.root} (or it refuses links)")  # once a run
        self.stored.add(store.StoreCounts(linked=actions["link"], copied=copied, existing=actions["exists"]))

    def _remove_moved(self, rows: pa.Table) -> None:
        """`move`: remove the sources of catalogued files that have their stored copy. Called after a
        manifest commits, and at the scan for sources a killed run left behind after its commit."""
        if rows.num_rows == 0:
            return
        stored = dict(self.conn.execute(
            "SELECT p.path, i.store_path FROM image_paths p JOIN images i ON i.id = p.image_id "
            "WHERE p.path = ANY(%s) AND i.store_path IS NOT NULL", (rows["path"].to_pylist(),)).fetchall())
        mtimes = rows["mtime"].cast(pa.timestamp("us")).cast(pa.int64()).to_pylist()  # µs since the epoch
        removed = 0
        for path, size, mtime in zip(rows["path"].to_pylist(), rows["bytes"].to_pylist(), mtimes,
                                     strict=True):
            if path in stored and store.remove_source(path, size, mtime, stored[path]):
                removed += 1
        self.stored.removed += removed

    # -- one manifest, start to end ---------------------------------------------------
    def new_images(self, features: pa.Table, spec: ModelSpec) -> pa.Table:
        """One row per decodable sha256 of the manifest that has no vector of `spec` yet."""
        good = features.filter(pc.is_null(features["error"])).select(["sha256", "thumb", "path"])
        good = good.group_by("sha256", use_threads=False).aggregate([("thumb", "first"), ("path", "min")])
        good = good.rename_columns(["sha256", "thumb", "path"])
        done = {r[0] for r in self.conn.execute(
            "SELECT i.file_sha256 FROM images i JOIN image_embeddings e ON e.image_id = i.id "
            "WHERE e.model_ver = %s AND i.file_sha256 = ANY(%s)",
            (spec.model_ver, good["sha256"].to_pylist()))}
        return good.filter(pc.invert(pc.is_in(good["sha256"], pa.array(sorted(done), pa.string()))))

    def resume_note(self) -> str:
        """Where the next run starts, for an interrupted run's line and its row in `runs`."""
        pending = [self.current] if self.current else []
        with contextlib.suppress(psycopg.Error):  # the catalog may be what failed
            pending = pending or runs.pending_manifests(self.conn)
        if pending:
            return f"the next run resumes from manifest {pending[0]}"
        return "nothing was half-done: the next run scans again"

    def process(self, manifest_id: str, run_id: int) -> load.LoadCounts:
        self.current = manifest_id
        features = self.stages.extract(manifest_id)
        if self.store.enabled:
            self._count_filed(features)
        spec = self.model
        embeddings = self.stages.embed(manifest_id, self.new_images(features, spec), spec)
        indexes = self.indexes  # opened before the transaction: in step with committed rows only
        started = time.monotonic()
        with self.conn.transaction(), self.conn.cursor() as cur:
            if not load.claim_manifest(cur, manifest_id):
                return load.LoadCounts()
            counts, inserted = load.load_features(cur, features, run_id)
            load.copy_embeddings(cur, embeddings, self.vector_type, run_id)
            new = new_images_for_dedup(features, embeddings, inserted, spec.dim)
            dups = dedup(cur, indexes, new, NearDupConfig.from_config(self.cfg["neardup"]), spec.model_ver,
                         self.vector_type)
            ids, vecs = embedded_ids(cur, embeddings)
            clusters = assign_new(cur, spec.model_ver, ids, vecs,
                                  ClusterConfig.from_config(self.cfg["cluster"]), self.vector_type,
                                  self.layout.scratch)
            joined = name_new_members(cur, spec.model_ver, ids, everything=clusters.refits > 0)
            load.mark_loaded(cur, manifest_id)
        indexes.commit(new)
        if self.store.moves:
            good = features.filter(pc.is_null(features["error"]))
            self._remove_moved(good.select(["path", "bytes", "mtime"]))
        # Loaded: the catalog holds it all (the embeddings stage alone is ~5 KB an image).
        shutil.rmtree(self.layout.stages(manifest_id), ignore_errors=True)
        self.clusters.add(clusters)
        self.dups.add(dups)
        self.joined.update(joined)
        say(f"load {manifest_id}: {counts.new_images} new images, {counts.exact_copies} exact copies, "
            f"{counts.errors} errors ({time.monotonic() - started:.1f} s)")
        self.current = None
        return counts


def run(cfg: Config, roots: list[str], retry_errors: bool = False, wait: bool = False) -> RunSummary:
    """An incremental run over `roots`; resumes unfinished manifests first. With `wait`, waits for
    a run already writing to the catalog instead of raising CatalogBusy."""
    started = time.monotonic()
    roots = preflight.check_roots(roots)
    if cfg["spark"]["local_files"] and local_master_cores(cfg) is not None:
        local.start_workers_early()
    with db.writer(cfg, wait, create=True) as (conn, vector_type):
        store_root = runs.catalog_store(conn, cfg)  # a store other than the catalog's: refused here
        with runs.recorded_run(conn, "run", roots) as run_id:
            ingest = Ingest(cfg, conn, vector_type, store_root)
            try:
                summary = ingest.run(roots, run_id, retry_errors)
            except BaseException as e:  # Ctrl-C or SIGTERM: recorded_run marks the run interrupted
                if (stop := interruption(e)) is None:
                    raise
                ingest.stages.stop()
                raise Interrupted.then(stop, ingest.resume_note()) from None
            summary.seconds = time.monotonic() - started
            with conn.transaction():
                runs.finish_run(conn, run_id, summary.as_dict())
            return summary


def embedded_ids(cur: psycopg.Cursor, embeddings: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(image_id, vector) of the successfully embedded rows, ordered by image_id."""
    ok = embeddings.filter(pc.is_null(embeddings["error"]))
    if ok.num_rows == 0:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    ids = dict(cur.execute("SELECT file_sha256, id FROM images WHERE file_sha256 = ANY(%s)",
                           (ok["sha256"].to_pylist(),)).fetchall())
    image_ids = np.asarray([ids[s] for s in ok["sha256"].to_pylist()], np.int64)
    vectors = np.asarray(ok["vector"].to_pylist(), np.float32)
    order = np.argsort(image_ids)
    return image_ids[order], vectors[order]


def new_images_for_dedup(features: pa.Table, embeddings: pa.Table, inserted: dict[str, int],
                         dim: int) -> NewImages:
    """The images this manifest added, with their hashes and (where embedded) vectors."""
    good = features.filter(pc.is_null(features["error"])).to_pydict()
    first: dict[str, int] = {}
    for row, sha in enumerate(good["sha256"]):
        if sha in inserted and sha not in first:
            first[sha] = row
    vectors = {sha: vec for sha, vec, err in zip(embeddings["sha256"].to_pylist(),
                                                embeddings["vector"].to_pylist(),
                                                embeddings["error"].to_pylist(), strict=True) if err is None}
    shas = sorted(first, key=lambda s: inserted[s])
    n = len(shas)
    out = NewImages(ids=np.asarray([inserted[s] for s in shas], np.int64),
                    phash=np.asarray([good["phash"][first[s]] for s in shas], np.int64),
                    dihedral=np.asarray([good["phash_dihedral"][first[s]] for s in shas],
                                        np.int64).reshape(n, 7),
                    vectors=np.zeros((n, dim), np.float32), has_vector=np.zeros(n, bool))
    for i, sha in enumerate(shas):
        if sha in vectors:
            out.vectors[i] = vectors[sha]
            out.has_vector[i] = True
    return out
