"""Full re-cluster, e.g. after a model change: re-embed from thumbnails, cluster anew, switch.

No original is read: every image is embedded again from its stored 512-px thumbnail. The
new model's vectors and clusters are written beside the old ones, and the catalog's active
model switches in one transaction at the end, so until then the old clusters stay in use.
The switch also records how the old clusters map onto the new ones (cluster_transitions).

Images are embedded a manifest's worth at a time (scan.manifest_files), each batch committed
before the next: the driver holds one batch of vectors, not the catalog's (~5 GB at 1M images
of 1280-d), and a killed recluster resumes with the images that have no vector yet.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pyarrow as pa

from lookalike import db
from lookalike.cluster.algorithm import ClusterConfig
from lookalike.cluster.names import carry_analyst_names, refresh_names
from lookalike.cluster.store import cluster_all
from lookalike.config import Config
from lookalike.db import runs, vector_index
from lookalike.db.load import copy_embeddings
from lookalike.db.sql import OPEN_PATH
from lookalike.driver.stages import SparkStages
from lookalike.failures import Interrupted, interruption
from lookalike.layout import Layout
from lookalike.models.registry import resolve_model
from lookalike.progress import say


@dataclass
class ReclusterSummary:
    model: str
    model_ver: str
    images: int
    embedded: int
    clusters: int
    seconds: float
    unplaced_names: list[str]  # analysts' category names no new category took (half its members)

    def describe(self) -> str:
        unplaced = (f"; analysts' names to place again (`lookalike label`): {', '.join(self.unplaced_names)}"
                    if self.unplaced_names else "")
        return (f"recluster: {self.images} images under {self.model} ({self.model_ver}), "
                f"{self.embedded} embedded from thumbnails, {self.clusters} clusters{unplaced} "
                f"({self.seconds:.1f} s)")


def recluster(cfg: Config, model: str | None = None, wait: bool = False) -> ReclusterSummary:
    started = time.monotonic()
    with db.writer(cfg, wait) as (conn, vector_type):
        layout = Layout(cfg.home, runs.catalog_store(conn))  # thumbnails where the catalog keeps them
        old_ver = db.get_meta(conn, "active_model_ver")
        requested = model or db.get_meta(conn, "active_model") or cfg["embed"]["model"]
        spec = resolve_model(requested, clip_checkpoint=cfg["embed"]["clip_checkpoint"] or None)
        name = runs.model_name(requested, spec)
        with runs.recorded_run(conn, "recluster", model_ver=spec.model_ver) as run_id:
            stages = SparkStages(cfg, layout)
            # Stages a killed recluster left behind: their vectors were committed or are made again.
            for leftover in layout.all_stages.glob("recluster-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            todo = _count_to_embed(conn, spec.model_ver)
            say(f"recluster: {todo} of the catalog's images need {spec.model_ver} vectors")
            embedded = 0
            batches = _images_to_embed(conn, spec.model_ver, cfg["scan"]["manifest_files"])
            try:
                for part, rows in enumerate(batches):
                    stage_name = f"recluster-{run_id:06d}-{part:05d}"
                    embeddings = stages.embed(stage_name, rows, spec)
                    with conn.transaction(), conn.cursor() as cur:
                        copy_embeddings(cur, embeddings, vector_type, run_id)
                    shutil.rmtree(layout.stages(stage_name), ignore_errors=True)
                    embedded += rows.num_rows
            except BaseException as e:  # Ctrl-C or SIGTERM: recorded_run marks it interrupted
                if (stop := interruption(e)) is None:
                    raise
                stages.stop()
                raise Interrupted.then(stop, "the vectors made so far are kept: the next recluster "
                                             "embeds the rest") from None
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("DELETE FROM cluster_transitions WHERE new_model_ver = %s", (spec.model_ver,))
                cluster_all(cur, spec.model_ver, ClusterConfig.from_config(cfg["cluster"]), vector_type,
                            layout.scratch, previous_ver=old_ver)
                refresh_names(cur, spec.model_ver)
                unplaced = (carry_analyst_names(cur, old_ver, spec.model_ver)
                            if old_ver and old_ver != spec.model_ver else [])
                images, clusters = cur.execute(
                    "SELECT (SELECT count(*) FROM image_embeddings WHERE model_ver = %(v)s), "
                    "(SELECT count(*) FROM clusters WHERE model_ver = %(v)s)",
                    {"v": spec.model_ver}).fetchone()
                runs.set_active_model(conn, name, spec.model_ver)
                summary = ReclusterSummary(name, spec.model_ver, images, embedded, clusters,
                                           time.monotonic() - started, unplaced)
                runs.finish_run(cur, run_id, vars(summary))
            if vector_type == "vector":
                vector_index.ensure_index(conn, spec.model_ver, spec.dim)
                vector_index.drop_other_indexes(conn, spec.model_ver)
        return summary


_WITHOUT_VECTOR = ("FROM images i WHERE NOT EXISTS (SELECT 1 FROM image_embeddings e "
                   "WHERE e.image_id = i.id AND e.model_ver = %s)")


def _count_to_embed(conn: psycopg.Connection, model_ver: str) -> int:
    return conn.execute(f"SELECT count(*) {_WITHOUT_VECTOR}", (model_ver,)).fetchone()[0]


def _images_to_embed(conn: psycopg.Connection, model_ver: str, batch: int) -> Iterator[pa.Table]:
    """(sha256, thumb, path) of the images without a vector of model_ver, `batch` rows at a time.

    Walked by image_id, so an image that cannot be embedded (an error row, no vector) is not
    offered again within the run.
    """
    last = 0
    while True:
        rows = conn.execute(
            f"SELECT i.id, i.file_sha256, i.thumb_path, {OPEN_PATH.format('i.id')} "
            f"{_WITHOUT_VECTOR} AND i.id > %s ORDER BY i.id LIMIT %s",
            (model_ver, last, batch)).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        _, sha, thumb, path = zip(*rows, strict=True)
        yield pa.table({"sha256": pa.array(sha, pa.string()), "thumb": pa.array(thumb, pa.string()),
                        "path": pa.array(path, pa.string())})
