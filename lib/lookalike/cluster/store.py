"""Similarity categories in the catalog: clusters and image_cluster for one model_ver.

The algorithms live in lookalike.cluster.algorithm; this module reads and writes their state.
New images join clusters incrementally inside their manifest's transaction; those close to no
cluster start new ones at once, so every embedded image has exactly one row when its manifest
commits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

from lookalike import db
from lookalike.cluster import space
from lookalike.cluster.algorithm import (
    ClusterConfig,
    assign,
    assign_incremental,
    cluster_mapping,
    fit_clusters,
    should_refit,
)
from lookalike.counts import Counts
from lookalike.db.vector_io import chunks, read_vectors, spilled_vectors, vector_to_db
from lookalike.labels.hierarchy import TOP_LABELS
from lookalike.progress import say


@dataclass
class ClusterCounts(Counts):
    joined: int = 0   # new images placed in an existing cluster
    created: int = 0  # clusters created
    refits: int = 0   # full clusterings of the whole model_ver (the catalog had doubled)


def fit_size_key(model_ver: str) -> str:
    """catalog_meta key: how many vectors of model_ver its clusters were last fitted on."""
    return f"cluster_fit_images:{model_ver}"


def space_key(model_ver: str) -> str:
    """catalog_meta key: the space model_ver's centroids are in (cluster.space.space_name); a
    catalog clustered before labels joined it has none: its embeddings alone."""
    return f"cluster_space:{model_ver}"


def _labels(cur: psycopg.Cursor, model_ver: str, image_ids: np.ndarray,
            cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, scores), each (len(image_ids), 5), of these images' top labels; -1 where an
    image has fewer (none: a catalog labelled before its model had labels). Not read, (n, 0),
    when labels do not count (label_weight 0)."""
    kept = TOP_LABELS if cfg.label_weight > 0 else 0
    classes = np.full((len(image_ids), kept), -1, np.int64)
    scores = np.zeros((len(image_ids), kept), np.float32)
    if not kept:
        return classes, scores
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    few = len(image_ids) <= 10_000  # a run's batch; a full clustering reads the model's every label
    query = psycopg.ClientCursor(cur.connection).mogrify(
        "SELECT image_id, rank, class_id, score FROM image_labels WHERE model_ver = %s"
        + (" AND image_id = ANY(%s)" if few else ""),
        (model_ver, [int(i) for i in image_ids]) if few else (model_ver,))
    with cur.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int2", "int2", "float4"])
        for image_id, rank, class_id, score in copy.rows():
            row = row_of.get(image_id)
            if row is not None and 1 <= rank <= TOP_LABELS:
                classes[row, rank - 1] = class_id
                scores[row, rank - 1] = score
    return classes, scores


def category_vectors(cur: psycopg.Cursor, model_ver: str, image_ids: np.ndarray, vecs: np.ndarray,
                     cfg: ClusterConfig) -> np.ndarray:
    """What these images are clustered on: their embeddings joined with their labels."""
    return space.joined(vecs, *_labels(cur, model_ver, image_ids, cfg), cfg.label_weight)


def _existing(cur: psycopg.Cursor, model_ver: str, vector_type: str) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    ids, centroids = read_vectors(cur, "SELECT id, centroid FROM clusters WHERE model_ver = %s "
                                       "ORDER BY id", (model_ver,), vector_type)
    sizes = dict(cur.execute("SELECT id, size FROM clusters WHERE model_ver = %s",
                             (model_ver,)).fetchall())
    return ids, centroids, np.asarray([sizes[i] for i in ids], np.int64)


def _store_clusters(cur: psycopg.Cursor, model_ver: str, centroids: np.ndarray, sizes: np.ndarray,
                    vector_type: str, keep: dict[int, int]) -> np.ndarray:
    """The rows of a new clustering of model_ver; cluster `j` keeps the old id keep[j] where it
    has one (updated in place, its members' rows and names stay), the others get new ids, and
    the old clusters nobody kept go (with their membership rows). Returns the id of each."""
    ids = np.zeros(len(centroids), np.int64)
    for j, (centroid, size) in enumerate(zip(centroids, sizes, strict=True)):
        if j in keep:
            cur.execute("UPDATE clusters SET centroid = %s, size = %s, updated_at = now() WHERE id = %s",
                        (vector_to_db(centroid, vector_type), int(size), keep[j]))
            ids[j] = keep[j]
    cur.execute("DELETE FROM clusters WHERE model_ver = %s AND id <> ALL(%s)",
                (model_ver, sorted(keep.values())))
    fresh = np.asarray([j for j in range(len(centroids)) if j not in keep], np.int64)
    ids[fresh] = _insert_clusters(cur, model_ver, centroids[fresh], sizes[fresh], vector_type)
    return ids


def _insert_clusters(cur: psycopg.Cursor, model_ver: str, centroids: np.ndarray, sizes: np.ndarray,
                     vector_type: str) -> np.ndarray:
    ids = []
    for centroid, size in zip(centroids, sizes, strict=True):
        ids.append(cur.execute("INSERT INTO clusters (model_ver, centroid, size) VALUES (%s, %s, %s) "
                               "RETURNING id",
                               (model_ver, vector_to_db(centroid, vector_type), int(size))).fetchone()[0])
    return np.asarray(ids, np.int64)


def inherited_ids(before: dict[int, int], image_ids: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """New cluster -> the old cluster id it keeps: the old cluster that gave it most of its
    members, when that is at least half of them; an old id goes to one new cluster only (the one
    it gave the most), so a split keeps the id on its larger part and a merge on its main source."""
    old = np.asarray([before.get(int(i), -1) for i in image_ids], np.int64)
    has = old >= 0
    if not has.any():
        return {}
    members = np.bincount(labels, minlength=int(labels.max()) + 1)
    pairs = pd.DataFrame({"new": labels[has], "old": old[has]}).value_counts().rename("overlap").reset_index()
    pairs = pairs[pairs["overlap"] * 2 >= members[pairs["new"].to_numpy()]]
    pairs = pairs.sort_values(["overlap", "new"], ascending=[False, True])
    pairs = pairs.drop_duplicates("new").drop_duplicates("old")
    return {int(n): int(o) for n, o in zip(pairs["new"], pairs["old"], strict=True)}


def _write_members(cur: psycopg.Cursor, model_ver: str, image_ids: np.ndarray, cluster_ids: np.ndarray,
                   sims: np.ndarray) -> None:
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS stage_members (image_id int8, cluster_id int8, "
                "sim_score float4) ON COMMIT DROP")
    cur.execute("TRUNCATE stage_members")
    with cur.copy("COPY stage_members FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int8", "float4"])
        for row in zip(image_ids.tolist(), cluster_ids.tolist(), sims.tolist(), strict=True):
            copy.write_row(row)
    cur.execute("INSERT INTO image_cluster (image_id, model_ver, cluster_id, sim_score) "
                "SELECT image_id, %s, cluster_id, sim_score FROM stage_members "
                "ON CONFLICT (image_id, model_ver) DO UPDATE SET cluster_id = EXCLUDED.cluster_id, "
                "sim_score = EXCLUDED.sim_score, joined_at = CASE WHEN image_cluster.cluster_id = "
                "EXCLUDED.cluster_id THEN image_cluster.joined_at ELSE now() END", (model_ver,))


def fit_and_write(cur: psycopg.Cursor, model_ver: str, ids: np.ndarray,
                  batches: Callable[[], Iterable[np.ndarray]], n: int, cfg: ClusterConfig,
                  vector_type: str, before: dict[int, int] | None = None) -> ClusterCounts:
    """A full clustering of `n` vectors streamed by `batches` (in `ids` order) for model_ver, in
    place of its clusters. With `before` (image_id -> cluster_id of the same model), categories
    that persist keep their ids (inherited_ids)."""
    result = fit_clusters(batches, n, cfg)
    labels, sims = [], []
    for batch in batches():
        lab, sim = assign(result.centroids, batch)
        labels.append(lab)
        sims.append(sim)
    label = np.concatenate(labels)
    keep = inherited_ids(before, ids, label) if before else {}
    cluster_ids = _store_clusters(cur, model_ver, result.centroids, result.sizes, vector_type, keep)
    _write_members(cur, model_ver, ids, cluster_ids[label], np.concatenate(sims))
    db.set_meta(cur.connection, fit_size_key(model_ver), str(n))  # should_refit measures growth from here
    db.set_meta(cur.connection, space_key(model_ver), space.space_name(cfg.label_weight))
    return ClusterCounts(joined=0, created=len(cluster_ids) - len(keep))


def cluster_all(cur: psycopg.Cursor, model_ver: str, cfg: ClusterConfig, vector_type: str, scratch: Path,
                previous_ver: str | None = None) -> ClusterCounts:
    """Every vector of model_ver clustered anew, in place of its clusters (in `cur`'s transaction).

    Within a model, categories that persist keep their ids. How the clusters of previous_ver
    (model_ver's own by default; the old model's after a model change) map onto the new ones
    goes to cluster_transitions.
    """
    previous_ver = previous_ver or model_ver
    before = assignment(cur, previous_ver)
    counts = ClusterCounts()
    with spilled_vectors(cur.connection, model_ver, vector_type, scratch) as (ids, vectors):
        if len(ids):
            classes, scores = _labels(cur, model_ver, ids, cfg)

            def batches() -> Iterable[np.ndarray]:  # joined chunk by chunk: never all in memory
                done = 0
                for chunk in chunks(vectors):
                    rows = slice(done, done + len(chunk))
                    done += len(chunk)
                    yield space.joined(chunk, classes[rows], scores[rows], cfg.label_weight)

            counts = fit_and_write(cur, model_ver, ids, batches, len(ids), cfg, vector_type,
                                   before if previous_ver == model_ver else None)
        else:
            cur.execute("DELETE FROM clusters WHERE model_ver = %s", (model_ver,))
    record_transitions(cur, previous_ver, before, model_ver)
    return counts


def refit(cur: psycopg.Cursor, model_ver: str, cfg: ClusterConfig, vector_type: str,
          scratch: Path) -> ClusterCounts:
    """cluster_all within one model, when the catalog has grown refit_growth-fold since its last fit."""
    counts = cluster_all(cur, model_ver, cfg, vector_type, scratch)
    counts.refits = 1
    return counts


def assignment(cur: psycopg.Cursor, model_ver: str) -> dict[int, int]:
    """image_id -> cluster_id of every image with a row for model_ver."""
    return dict(cur.execute("SELECT image_id, cluster_id FROM image_cluster WHERE model_ver = %s",
                            (model_ver,)).fetchall())


def record_transitions(cur: psycopg.Cursor, old_ver: str, before: dict[int, int], new_ver: str) -> None:
    """Overlap counts between the clusters images had before (`before`) and the ones they have now."""
    after = assignment(cur, new_ver)
    shared = sorted(set(before) & set(after))
    if not shared:
        return
    mapping = cluster_mapping(np.asarray([before[i] for i in shared]), np.asarray([after[i] for i in shared]))
    with cur.copy("COPY cluster_transitions (old_model_ver, old_cluster_id, new_model_ver, new_cluster_id, "
                  "overlap) FROM STDIN") as copy:
        for o, n, overlap in mapping[["old_cluster", "new_cluster", "overlap"]].itertuples(index=False):
            copy.write_row((old_ver, int(o), new_ver, int(n), int(overlap)))


def assign_new(cur: psycopg.Cursor, model_ver: str, image_ids: np.ndarray, vecs: np.ndarray,
               cfg: ClusterConfig, vector_type: str, scratch: Path) -> ClusterCounts:
    """Place new images; those close to no category start new ones at once. The first images of
    a model get a full fit, and so does the whole model_ver each time the catalog has grown
    refit_growth-fold since its last fit (an archive's first load arrives as many manifests:
    without it, the clusters fitted on the first one would shape all the others). Their vectors
    must already be in image_embeddings."""
    if len(image_ids) == 0:
        return ClusterCounts()
    cluster_ids, centroids, sizes = _existing(cur, model_ver, vector_type)
    if len(cluster_ids) == 0:
        joined = category_vectors(cur, model_ver, image_ids, vecs, cfg)
        return fit_and_write(cur, model_ver, image_ids, lambda: [joined], len(joined), cfg, vector_type)
    fitted_on = int(db.get_meta(cur.connection, fit_size_key(model_ver)) or 0)
    n_now = cur.execute("SELECT count(*) FROM image_embeddings WHERE model_ver = %s",
                        (model_ver,)).fetchone()[0]
    was = db.get_meta(cur.connection, space_key(model_ver)) or space.space_name(0)
    if was != space.space_name(cfg.label_weight):
        say(f"clusters: categories were made of {was}, the configuration now says "
            f"{space.space_name(cfg.label_weight)}: clustering all {n_now} {model_ver} vectors again")
        return refit(cur, model_ver, cfg, vector_type, scratch)
    if should_refit(fitted_on, n_now, cfg):
        say(f"clusters: the catalog grew from {fitted_on} to {n_now} {model_ver} vectors since its last "
            "clustering: clustering them all again")
        return refit(cur, model_ver, cfg, vector_type, scratch)
    # The batch's labels are read only here: a refit above reads every image's itself.
    res = assign_incremental(centroids, sizes, category_vectors(cur, model_ver, image_ids, vecs, cfg), cfg)
    for idx in res.changed.tolist():
        cur.execute("UPDATE clusters SET centroid = %s, size = %s, updated_at = now() WHERE id = %s",
                    (vector_to_db(res.centroids[idx], vector_type), int(res.sizes[idx]),
                     int(cluster_ids[idx])))
    new_ids = _insert_clusters(cur, model_ver, res.centroids[res.new], res.sizes[res.new], vector_type)
    all_cluster_ids = np.concatenate([cluster_ids, new_ids])
    _write_members(cur, model_ver, image_ids, all_cluster_ids[res.cluster], res.sim)
    joined = int((res.cluster < len(cluster_ids)).sum())
    return ClusterCounts(joined=joined, created=len(new_ids))
