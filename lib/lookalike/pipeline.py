"""One incremental run: scan -> extract -> load, manifest by manifest.

A manifest is the unit of incrementality: it is registered as 'scanned' once its Parquet
file is written, each stage's output is kept under the home until the manifest is
'loaded', and a manifest left unfinished by a killed run is completed by the next run
before anything new is scanned.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from lookalike import db

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
from lookalike.categories import ClusterCounts, assign_new, cluster_config
from lookalike.config import Config
from lookalike.dedup import DedupCounts, DedupIndexes, NewImages, dedup, neardup_config
from lookalike.embed import (
    EMBED_DDL,
    EmbedSettings,
    embed_task_inputs,
    embed_tasks,
    embeddings_table,
    write_task_inputs,
)
from lookalike.extract import ExtractSettings, extract_batches, prepare_thumbs_dir
from lookalike.layout import Layout
from lookalike.load import LoadCounts, copy_embeddings, load_manifest
from lookalike.models import ModelSpec, file_safe, get_embedder, onnx_path, resolve_model
from lookalike.progress import say, stage
from lookalike.scan import MANIFEST_SCHEMA, ScanSettings, plan, rows_to_table, walk

log = logging.getLogger(__name__)

SCAN_DDL = "path string, bytes long, mtime timestamp, error string, message string"
FEATURES_DDL = (
    "path string, bytes long, mtime timestamp, sha256 string, width int, height int, "
    "format string, phash long, dhash long, ahash long, phash_dihedral array<long>, "
    "thumb string, error string, message string"
)


@dataclass
class RunSummary:
    run_id: int = 0
    manifests: int = 0
    counts: LoadCounts = field(default_factory=LoadCounts)
    clusters: ClusterCounts = field(default_factory=ClusterCounts)
    dups: DedupCounts = field(default_factory=DedupCounts)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(d.pop("counts"))
        d.update({f"clusters_{k}": v for k, v in d.pop("clusters").items()})
        d.update({f"near_duplicate_{k}": v for k, v in d.pop("dups").items()})
        return d

    def describe(self) -> str:
        c, k = self.counts, self.clusters
        return (f"run {self.run_id}: {c.files} files in {self.manifests} manifests, "
                f"{c.new_images} new images, {c.exact_copies} exact copies, {c.errors} errors; "
                f"{self.dups.pairs} near-duplicate pairs; "
                f"clusters: {k.joined} joined, {k.created} created, {k.pooled} waiting"
                + (f", {k.refits} full re-clusterings" if k.refits else "")
                + f" ({self.seconds:.1f} s)")


def extract_tasks(files: int, total_bytes: int, task_bytes: int, cores: int) -> int:
    """Spark tasks for extracting `files` originals: about task_bytes each, at least two a core
    (so big and small files balance over the cores), never more than one a file."""
    return max(1, min(files, max(math.ceil(total_bytes / task_bytes), 2 * cores)))


class Runner:
    """Holds the Spark session, the catalog connection and the layout for one run."""

    def __init__(self, cfg: Config, conn: psycopg.Connection, vector_type: str) -> None:
        self.cfg = cfg
        self.conn = conn
        self.vector_type = vector_type
        self.layout = Layout(cfg.home)
        self._spark = None
        self._model: ModelSpec | None = None
        self.clusters = ClusterCounts()
        self.dups = DedupCounts()
        self._indexes: DedupIndexes | None = None

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            from lookalike.spark import get_spark

            self._spark = get_spark(self.cfg)
        return self._spark

    # -- scan ---------------------------------------------------------------------------
    def _known_files(self, retry_errors: bool) -> pa.Table:
        """(path, bytes, mtime) already catalogued, plus recorded errors unless retrying them."""
        sql = "SELECT path, bytes, mtime FROM image_paths"
        if not retry_errors:
            # A thumbnail error describes the disk, not the file: always retried.
            sql += (" UNION ALL SELECT path, bytes, mtime FROM ingest_errors "
                    "WHERE bytes IS NOT NULL AND error <> 'thumbnail'")
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
        for root in settings.roots:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"image root is not a directory: {root}")
        subtrees, top_files = plan(settings, self.cfg["scan"]["split_dirs"])
        found = rows_to_table(top_files)
        if subtrees:
            # Each subtree is one task: the walk of a million files is spread over the executors.
            walked = self.spark.sparkContext.parallelize(subtrees, len(subtrees)).flatMap(
                partial(walk, settings=settings))
            walked_df = self.spark.createDataFrame(walked, schema=SCAN_DDL)
            found = pa.concat_tables([found, walked_df.toArrow().cast(MANIFEST_SCHEMA)])
        # Links can make one path appear twice; the anti-join drops what is catalogued already.
        firsts = [(c, "first") for c in found.column_names if c != "path"]
        found = found.group_by("path", use_threads=False).aggregate(firsts)
        found = found.rename_columns([c.removesuffix("_first") for c in found.column_names])
        known = self._known_files(retry_errors)
        table = found.join(known, ["path", "bytes", "mtime"], join_type="left anti")
        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).sort_by("path")
        ids = self._write_manifests(table, run_id)
        say(f"scan: {table.num_rows} new files in {len(ids)} manifests "
            f"({time.monotonic() - started:.1f} s)")
        return ids

    def _write_manifests(self, table: pa.Table, run_id: int) -> list[str]:
        size = self.cfg["scan"]["manifest_files"]
        ids = []
        self.layout.manifests.mkdir(parents=True, exist_ok=True)
        for i in range(math.ceil(table.num_rows / size)):
            part = table.slice(i * size, size)
            manifest_id = f"r{run_id:06d}-{i:04d}"
            dest = self.layout.manifest(manifest_id)
            tmp = dest.with_suffix(".tmp")
            pq.write_table(part, tmp)
            tmp.replace(dest)
            ids.append(manifest_id)
            # Registered only once its file is whole; the registration is the commit point.
            with self.conn.transaction():
                self.conn.execute(
                    "INSERT INTO manifests (manifest_id, run_id, files, bytes, status) "
                    "VALUES (%s, %s, %s, %s, 'scanned') ON CONFLICT DO NOTHING",
                    (manifest_id, run_id, part.num_rows, int(pc.sum(part["bytes"]).as_py() or 0)))
        return ids

    # -- extract ------------------------------------------------------------------------
    def extract(self, manifest_id: str) -> pa.Table:
        out = self.layout.stage(manifest_id, "features")
        if not Layout.is_complete(out):
            sizes = pq.read_table(self.layout.manifest(manifest_id), columns=["bytes"])["bytes"]
            settings = ExtractSettings.from_config(self.cfg, self.layout.thumbs)
            prepare_thumbs_dir(self.layout.thumbs)  # fail the run once, not every file
            tasks = extract_tasks(len(sizes), pc.sum(sizes).as_py() or 0, self.cfg["extract"]["task_bytes"],
                                  self.spark.sparkContext.defaultParallelism)
            with stage(f"extract {manifest_id}", len(sizes), self.spark):
                df = self.spark.read.parquet(str(self.layout.manifest(manifest_id))).repartition(tasks)
                df.mapInPandas(partial(extract_batches, settings=settings), schema=FEATURES_DDL) \
                    .write.mode("overwrite").parquet(str(out))
        return pq.read_table(out)

    # -- embed --------------------------------------------------------------------------
    @property
    def model(self) -> ModelSpec:
        """The catalog's pinned model: chosen once at creation, changed only by a recluster."""
        if self._model is None:
            self._model = pinned_model(self.cfg, self.conn)
        return self._model

    def _embedder_settings(self, spec: ModelSpec) -> EmbedSettings:
        e = self.cfg["embed"]
        settings = EmbedSettings(spec, e["backend"], str(self.layout.models), e["batch_size"])
        # The ONNX export happens once, here on the driver and verified on real thumbnails,
        # before any executor needs the file.
        if e["backend"] != "torch" and not onnx_path(spec, self.layout.models).exists():
            samples = sorted(self.layout.thumbs.rglob("*.jpg"))[:8]
            get_embedder(spec, backend=e["backend"], cache_dir=self.layout.models,
                         batch_size=e["batch_size"], verify_images=[_rgb(p) for p in samples] or None)
        return settings

    def embed(self, name: str, rows: pa.Table, spec: ModelSpec) -> pa.Table:
        """Embeddings of `rows` (sha256, thumb, path), kept under stages/<name>/embeddings-<model>."""
        out = self.layout.stage(name, "embeddings-" + file_safe(spec.model_ver))
        if not Layout.is_complete(out):
            settings = self._embedder_settings(spec)
            extract = ExtractSettings.from_config(self.cfg, self.layout.thumbs)
            tasks = embed_tasks(rows.num_rows, self.spark.sparkContext.defaultParallelism,
                                settings.batch_size)
            with stage(f"embed {name}", rows.num_rows, self.spark):
                inputs = self.layout.stage(name, "embed-input")
                write_task_inputs(rows.select(["sha256", "thumb", "path"]), inputs, tasks)
                # One task number a partition; spark.range needs no Python worker of its own.
                self.spark.range(tasks, numPartitions=tasks).mapInPandas(
                    partial(embed_task_inputs, folder=str(inputs), settings=settings, extract=extract),
                    schema=EMBED_DDL).write.mode("overwrite") \
                    .option("parquet.enable.dictionary", "false").parquet(str(out))  # all values distinct
        return embeddings_table(pq.read_table(out))

    def new_images(self, features: pa.Table, spec: ModelSpec) -> pa.Table:
        """One row per decodable sha256 of the manifest that has no vector of `spec` yet."""
        good = features.filter(pc.is_null(features["error"])).select(["sha256", "thumb", "path"])
        good = good.group_by("sha256", use_threads=False).aggregate([("thumb", "first"), ("path", "min")])
        good = good.rename_columns(["sha256", "thumb", "path"])
        done = {r[0] for r in self.conn.execute(
            "SELECT i.sha256 FROM images i JOIN image_embeddings e USING (image_id) "
            "WHERE e.model_ver = %s AND i.sha256 = ANY(%s)",
            (spec.model_ver, good["sha256"].to_pylist()))}
        return good.filter(pc.invert(pc.is_in(good["sha256"], pa.array(sorted(done), pa.string()))))

    @property
    def indexes(self) -> DedupIndexes:
        if self._indexes is None:
            spec = self.model
            self._indexes = DedupIndexes.open(self.conn, self.layout.home / "index", spec.model_ver, spec.dim,
                                              self.vector_type)
        return self._indexes

    # -- one manifest, start to end ---------------------------------------------------
    def process(self, manifest_id: str, run_id: int) -> LoadCounts:
        features = self.extract(manifest_id)
        spec = self.model
        embeddings = self.embed(manifest_id, self.new_images(features, spec), spec)
        started = time.monotonic()

        clusters, dups = ClusterCounts(), DedupCounts()
        new: NewImages | None = None
        indexes = self.indexes  # opened before the load's transaction: synced to committed rows only

        def extra(cur: psycopg.Cursor, inserted: dict[str, int]) -> None:
            nonlocal new
            copy_embeddings(cur, embeddings, self.vector_type, run_id)
            new = new_images_for_dedup(features, embeddings, inserted, spec.dim)
            dups.add(dedup(cur, indexes, new, neardup_config(self.cfg["neardup"]), spec.model_ver,
                           self.vector_type))
            ids, vecs = embedded_ids(cur, embeddings)
            clusters.add(assign_new(cur, spec.model_ver, ids, vecs, cluster_config(self.cfg["cluster"]),
                                    self.vector_type, self.layout.home / "scratch"))

        counts = load_manifest(self.conn, manifest_id, run_id, features, extra)
        if new is not None:
            self.indexes.commit(new)
        # Loaded: the catalog holds it all (the embeddings stage alone is ~5 KB an image).
        shutil.rmtree(self.layout.stages(manifest_id), ignore_errors=True)
        self.clusters.add(clusters)
        self.dups.add(dups)
        say(f"load {manifest_id}: {counts.new_images} new images, {counts.exact_copies} exact copies, "
            f"{counts.errors} errors ({time.monotonic() - started:.1f} s)")
        return counts

    def pending_manifests(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT manifest_id FROM manifests WHERE status <> 'loaded' ORDER BY manifest_id").fetchall()
        return [r[0] for r in rows]


def run(cfg: Config, roots: list[str], retry_errors: bool = False, wait: bool = False) -> RunSummary:
    """An incremental run over `roots`; resumes unfinished manifests first. With `wait`, waits for
    a run already writing to the catalog instead of raising CatalogBusy."""
    started = time.monotonic()
    with db.writer(cfg, wait) as (conn, vector_type):
        summary = RunSummary()
        with conn.transaction():
            # We hold the writer lock, so any run still marked running was killed.
            conn.execute("UPDATE runs SET status = 'interrupted', finished_at = now() "
                         "WHERE status = 'running'")
            summary.run_id = conn.execute(
                "INSERT INTO runs (kind, roots) VALUES ('run', %s) RETURNING run_id",
                ([str(Path(r).resolve()) for r in roots],)).fetchone()[0]
        runner = Runner(cfg, conn, vector_type)
        try:
            resumed = runner.pending_manifests()
            if resumed:
                say(f"resuming {len(resumed)} unfinished manifests")
            for manifest_id in resumed:
                summary.counts.add(runner.process(manifest_id, summary.run_id))
            new_ids = runner.scan(roots, summary.run_id, retry_errors)
            for manifest_id in new_ids:
                summary.counts.add(runner.process(manifest_id, summary.run_id))
            summary.manifests = len(resumed) + len(new_ids)
            summary.clusters = runner.clusters
            summary.dups = runner.dups
            summary.seconds = time.monotonic() - started
        except BaseException as e:
            db.mark_run_failed(conn, summary.run_id, e)
            raise
        with conn.transaction():
            conn.execute("UPDATE runs SET status = 'ok', finished_at = now(), summary = %s "
                         "WHERE run_id = %s", (json.dumps(summary.as_dict()), summary.run_id))
        return summary


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def pinned_model(cfg: Config, conn: psycopg.Connection) -> ModelSpec:
    """Resolve the catalog's model, pinning the configured one when the catalog has none yet."""
    e = cfg["embed"]
    checkpoint = e["clip_checkpoint"] or None
    pinned = db.get_meta(conn, "active_model")
    if pinned is None:
        spec = resolve_model(e["model"], clip_checkpoint=checkpoint)
        name = e["model"] if e["model"].startswith("open_clip:") else spec.name
        with conn.transaction():
            db.set_meta(conn, "active_model", name)
            db.set_meta(conn, "active_model_ver", spec.model_ver)
        say(f"model: {name} ({spec.model_ver}) pinned for this catalog")
        return spec
    spec = resolve_model(pinned, clip_checkpoint=checkpoint)
    pinned_ver = db.get_meta(conn, "active_model_ver")
    if spec.model_ver != pinned_ver:
        raise RuntimeError(f"the weights of model {pinned} changed ({pinned_ver} -> {spec.model_ver}); "
                           f"run `lookalike recluster --model {pinned}` to re-embed the catalog")
    if e["model"] not in ("auto", pinned):
        say(f"note: the config asks for model {e['model']} but this catalog uses {pinned}; "
            f"`lookalike recluster --model {e['model']}` switches it")
    return spec


def embedded_ids(cur: psycopg.Cursor, embeddings: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(image_id, vector) of the successfully embedded rows, ordered by image_id."""
    ok = embeddings.filter(pc.is_null(embeddings["error"]))
    if ok.num_rows == 0:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    ids = dict(cur.execute("SELECT sha256, image_id FROM images WHERE sha256 = ANY(%s)",
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
