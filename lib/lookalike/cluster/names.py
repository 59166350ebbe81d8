"""Names for categories: from their members' labels (lookalike.labels), or an analyst's.

A category's automatic name is the most specific WordNet node that covers at least a set share
of its members' top-5 label votes (lookalike.labels.name_category), else "mixed: a, b, c". A run
renames only the categories it touched; an analyst's name (name_source = 'analyst') is never
replaced by an automatic one, and a recluster hands it to the new category that took at least
half of its members.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import psycopg

from lookalike.labels.hierarchy import NUM_CLASSES, name_category

# Each member's top-5 scores renormalised to one vote, summed per category and class; only the
# members of the categories asked for are read.
_VOTES = """
SELECT cluster_id, class_id, sum(vote)::float8 FROM (
    SELECT ic.cluster_id, l.class_id, l.score / sum(l.score) OVER (PARTITION BY l.image_id) AS vote
    FROM image_cluster ic
    JOIN image_labels l ON l.image_id = ic.image_id AND l.model_ver = ic.model_ver
    WHERE ic.model_ver = %(ver)s AND (%(ids)s::bigint[] IS NULL OR ic.cluster_id = ANY(%(ids)s))
) v GROUP BY 1, 2
"""


def display(name: str | None, cluster_id: int) -> str:
    """How a category is shown: its name, or its number while it has none (no labels yet)."""
    return name or f"category {cluster_id}"


def display_sql(clusters: str) -> str:
    """:func:`display` as an SQL expression over a `clusters` row aliased `clusters`."""
    return f"coalesce({clusters}.name, 'category ' || {clusters}.id)"


def refresh_names(cur: psycopg.Cursor, model_ver: str, cluster_ids: Sequence[int] | None = None) -> int:
    """Name these categories (every one of model_ver when None) from their members' labels, in
    `cur`'s transaction; analysts' names stay. Returns how many were (re)named."""
    ids = None if cluster_ids is None else sorted({int(c) for c in cluster_ids})
    if ids == []:
        return 0
    votes: dict[int, np.ndarray] = {}
    for cluster_id, class_id, weight in cur.execute(_VOTES, {"ver": model_ver, "ids": ids}).fetchall():
        votes.setdefault(cluster_id, np.zeros(NUM_CLASSES))[class_id] = weight
    named = 0
    for cluster_id, weights in votes.items():
        name, labels = name_category(weights[None, :])
        named += cur.execute(
            "UPDATE clusters SET name = %s, name_source = 'auto', top_labels = %s "
            "WHERE id = %s AND name_source IS DISTINCT FROM 'analyst'",
            (name, json.dumps([[label, round(share, 4)] for label, share in labels]), cluster_id)).rowcount
    return named


def name_new_members(cur: psycopg.Cursor, model_ver: str, image_ids: np.ndarray,
                     everything: bool = False) -> dict[str, int]:
    """After new images joined categories (a manifest's commit step): rename the categories they
    touched (every one after a full re-clustering) and count the new images per category name."""
    ids = [int(i) for i in image_ids]
    touched = [r[0] for r in cur.execute("SELECT DISTINCT cluster_id FROM image_cluster WHERE model_ver = %s "
                                         "AND image_id = ANY(%s)", (model_ver, ids)).fetchall()]
    refresh_names(cur, model_ver, None if everything else touched)
    rows = cur.execute("SELECT c.name, c.id, count(*) FROM image_cluster ic "
                       "JOIN clusters c ON c.id = ic.cluster_id "
                       "WHERE ic.model_ver = %s AND ic.image_id = ANY(%s) GROUP BY c.id", (model_ver, ids))
    joined: dict[str, int] = {}
    for name, cluster_id, n in rows.fetchall():
        key = display(name, cluster_id)
        joined[key] = joined.get(key, 0) + n
    return joined


def name_by_analyst(cur: psycopg.Cursor, cluster_id: int, name: str) -> None:
    """An analyst's name for a category of the active model (KeyError if there is no such one)."""
    name = " ".join(name.split())
    if not name:
        raise ValueError("a category name cannot be empty")
    updated = cur.execute(
        "UPDATE clusters SET name = %s, name_source = 'analyst' WHERE id = %s AND model_ver = "
        "(SELECT value FROM catalog_meta WHERE key = 'active_model_ver')", (name, cluster_id)).rowcount
    if not updated:
        raise KeyError(f"no category {cluster_id} of the active model")


def carry_analyst_names(cur: psycopg.Cursor, old_ver: str, new_ver: str) -> list[str]:
    """After a recluster (cluster_transitions recorded): each new category takes the analyst's name
    of the old category that gave it most of its members, when that was at least half of them.
    Returns the analysts' names no new category took, for the analyst to place."""
    rows = cur.execute(
        """
SELECT DISTINCT ON (t.new_cluster_id) t.new_cluster_id, o.name, o.name_source = 'analyst' AND
       t.overlap * 2 >= n.size AS takes
FROM cluster_transitions t
JOIN clusters o ON o.id = t.old_cluster_id AND o.model_ver = t.old_model_ver
JOIN clusters n ON n.id = t.new_cluster_id AND n.model_ver = t.new_model_ver
WHERE t.old_model_ver = %s AND t.new_model_ver = %s
ORDER BY t.new_cluster_id, t.overlap DESC, t.old_cluster_id""", (old_ver, new_ver)).fetchall()
    analysts = {r[0] for r in cur.execute("SELECT name FROM clusters WHERE model_ver = %s AND "
                                          "name_source = 'analyst'", (old_ver,)).fetchall()}
    taken = set()
    for new_id, name, takes in rows:
        if takes:
            cur.execute("UPDATE clusters SET name = %s, name_source = 'analyst' WHERE id = %s",
                        (name, new_id))
            taken.add(name)
    return sorted(analysts - taken)
