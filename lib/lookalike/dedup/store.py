"""The dedup stage in the catalog: pairs of the new images written, groups merged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import psycopg
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lookalike.db.vector_io import stored_vectors
from lookalike.dedup.indexes import DedupIndexes
from lookalike.dedup.pairs import PAIR_COLUMNS, DedupCounts, NearDupConfig, NewImages, find_pairs

# --------------------------------------------------------------------------- groups


def merge_groups(pairs: pd.DataFrame, existing: pd.DataFrame) -> pd.DataFrame:
    """Connected components of the pairs and the existing groups they touch.

    `existing` holds the whole of every touched group (image_id, group_id). Returns the
    (image_id, group_id) rows that are new or changed, by image_id; group_id is the smallest
    member. Groups only ever merge: a new image near two groups joins them into one.
    """
    edges = [pairs[["image_id", "other_id"]].to_numpy(np.int64),
             existing[["image_id", "group_id"]].to_numpy(np.int64)]
    edges = np.concatenate([e.reshape(-1, 2) for e in edges])
    if not len(edges):
        return pd.DataFrame(columns=["image_id", "group_id"])
    nodes, inverse = np.unique(edges, return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(inverse)), (inverse[:, 0], inverse[:, 1])), shape=(len(nodes),) * 2)
    _, label = connected_components(graph, directed=False)
    smallest = pd.Series(nodes).groupby(label).transform("min").to_numpy()
    groups = pd.DataFrame({"image_id": nodes, "group_id": smallest})
    before = dict(zip(existing["image_id"], existing["group_id"], strict=True))
    changed = [before.get(i) != g for i, g in zip(groups["image_id"], groups["group_id"], strict=True)]
    return groups[changed].reset_index(drop=True)




# --------------------------------------------------------------------------- the stage


def dedup(cur: psycopg.Cursor, indexes: DedupIndexes, new: NewImages, cfg: NearDupConfig,
          model_ver: str, vector_type: str) -> DedupCounts:
    """Pairs of the new images with the catalog and among themselves; groups merged; all in `cur`'s
    transaction."""
    if len(new.ids) == 0:
        return DedupCounts()
    pairs = find_pairs(new, indexes.hashes, indexes.vectors, cfg, stored_vectors(cur, model_ver, vector_type))
    if pairs.empty:
        return DedupCounts()
    cur.execute("CREATE TEMP TABLE stage_pairs (image_id int8, other_id int8, method text, distance float4) "
                "ON COMMIT DROP")
    with cur.copy("COPY stage_pairs FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int8", "text", "float4"])
        for row in pairs[PAIR_COLUMNS].itertuples(index=False):
            copy.write_row((int(row[0]), int(row[1]), row[2], float(row[3])))
    cur.execute("INSERT INTO near_duplicates SELECT * FROM stage_pairs ON CONFLICT DO NOTHING")
    # The whole of every group a pair touches, so a bridging image merges complete groups.
    involved = np.unique(pairs[["image_id", "other_id"]].to_numpy().ravel()).tolist()
    existing = pd.DataFrame(cur.execute(
        "SELECT image_id, group_id FROM image_dup_group WHERE group_id IN "
        "(SELECT group_id FROM image_dup_group WHERE image_id = ANY(%s))", (involved,)).fetchall(),
        columns=["image_id", "group_id"])
    groups = merge_groups(pairs, existing)
    if not groups.empty:
        cur.executemany("INSERT INTO image_dup_group (image_id, group_id) VALUES (%s, %s) "
                        "ON CONFLICT (image_id) DO UPDATE SET group_id = EXCLUDED.group_id",
                        [(int(i), int(g))
                         for i, g in groups[["image_id", "group_id"]].itertuples(index=False)])
    return DedupCounts(pairs=len(pairs), grouped=len(groups))
