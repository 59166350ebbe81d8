"""Full re-cluster, e.g. after a model change: re-embed from thumbnails, cluster anew, switch.

No original is read: every image is embedded again from its stored 512-px thumbnail. The
new model's vectors and clusters are written beside the old ones, and the catalog's active
model switches in one transaction at the end, so until then the old clusters stay in use.
The switch also records how the old clusters map onto the new ones (cluster_transitions).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass

import psycopg
import pyarrow as pa

from lookalike import db
from lookalike.categories import assignment, cluster_config, fit_and_write, record_transitions
from lookalike.config import Config
from lookalike.load import copy_embeddings
from lookalike.models import resolve_model
from lookalike.progress import say
from lookalike.vectors import chunks, spilled_vectors


@dataclass
class ReclusterSummary:
    model: str
    model_ver: str
    images: int
    embedded: int
    clusters: int
    seconds: float

    def describe(self) -> str:
        return (f"recluster: {self.images} images under {self.model} ({self.model_ver}), "
                f"{self.embedded} embedded from thumbnails, {self.clusters} clusters ({self.seconds:.1f} s)")


def recluster(cfg: Config, model: str | None = None, wait: bool = False) -> ReclusterSummary:
    from lookalike.pipeline import Runner  # the Spark-side stages

    started = time.monotonic()
    with db.writer(cfg, wait) as (conn, vector_type):
        old_name = db.get_meta(conn, "active_model")
        old_ver = db.get_meta(conn, "active_model_ver")
        name = model or old_name or cfg["embed"]["model"]
        spec = resolve_model(name, clip_checkpoint=cfg["embed"]["clip_checkpoint"] or None)
        name = name if name.startswith("open_clip:") else spec.name
        with conn.transaction():
            run_id = conn.execute("INSERT INTO runs (kind, model_ver) VALUES ('recluster', %s) "
                                  "RETURNING run_id", (spec.model_ver,)).fetchone()[0]
        try:
            runner = Runner(cfg, conn, vector_type)
            rows = _images_to_embed(conn, spec.model_ver)
            say(f"recluster: {rows.num_rows} of the catalog's images need {spec.model_ver} vectors")
            if rows.num_rows:
                embeddings = runner.embed(f"recluster-{run_id:06d}", rows, spec)
                with conn.transaction(), conn.cursor() as cur:
                    copy_embeddings(cur, embeddings, vector_type, run_id)
            n_clusters = 0
            with spilled_vectors(conn, spec.model_ver, vector_type, cfg.home / "scratch") as (ids, vectors), \
                    conn.transaction(), conn.cursor() as cur:
                before = assignment(cur, old_ver) if old_ver else {}
                cur.execute("DELETE FROM clusters WHERE model_ver = %s", (spec.model_ver,))
                cur.execute("DELETE FROM cluster_transitions WHERE new_model_ver = %s", (spec.model_ver,))
                if len(ids):
                    counts = fit_and_write(cur, spec.model_ver, ids, lambda: chunks(vectors), len(ids),
                                           cluster_config(cfg["cluster"]), vector_type)
                    n_clusters = counts.created
                if before:
                    record_transitions(cur, old_ver, before, spec.model_ver)
                db.set_meta(conn, "active_model", name)
                db.set_meta(conn, "active_model_ver", spec.model_ver)
                summary = ReclusterSummary(name, spec.model_ver, len(ids), rows.num_rows, n_clusters,
                                           time.monotonic() - started)
                cur.execute("UPDATE runs SET status = 'ok', finished_at = now(), summary = %s "
                            "WHERE run_id = %s", (json.dumps(vars(summary)), run_id))
        except BaseException as e:
            db.mark_run_failed(conn, run_id, e)
            raise
        shutil.rmtree(runner.layout.stages(f"recluster-{run_id:06d}"), ignore_errors=True)
        return summary


def _images_to_embed(conn: psycopg.Connection, model_ver: str) -> pa.Table:
    """(sha256, thumb, path) of every image without a vector of model_ver."""
    rows = conn.execute(
        "SELECT i.sha256, i.thumb_path, min(p.path) FROM images i JOIN image_paths p USING (image_id) "
        "WHERE NOT EXISTS (SELECT 1 FROM image_embeddings e WHERE e.image_id = i.image_id "
        "AND e.model_ver = %s) GROUP BY i.image_id ORDER BY i.image_id", (model_ver,)).fetchall()
    cols = list(zip(*rows, strict=True)) if rows else [[], [], []]
    return pa.table({"sha256": pa.array(cols[0], pa.string()), "thumb": pa.array(cols[1], pa.string()),
                     "path": pa.array(cols[2], pa.string())})

