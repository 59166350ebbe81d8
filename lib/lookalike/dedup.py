"""The dedup stage in the catalog: new images against the whole catalog, pairs and groups stored.

The search algorithms live in lookalike.neardup. This module keeps their indexes beside the
catalog (<home>/index), rebuilt from the catalog whenever they disagree with it (a run killed
between a commit and the index save), and writes near_duplicates and image_dup_group inside
the manifest's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import psycopg
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lookalike.neardup import HashIndex, VectorIndex
from lookalike.progress import say
from lookalike.vectors import chunks, read_vectors, spill_vectors

# Cosine margin below min_cosine within which the compressed index's hits are re-checked.
CANDIDATE_SLACK = 0.1
# Vectors used to train the IVF quantiser when an index is built from the catalog.
TRAIN_SAMPLE = 100_000
# Up to this many vectors the search is exact (a flat index, 256 MB at 1280-d); beyond, the
# compressed VectorIndex, whose projection and quantiser need that much data to be trained well.
EXACT_UP_TO = 50_000


class ExactVectorIndex:
    """Exact cosine k-NN over every vector: for catalogs too small to train a compressed index."""

    def __init__(self, dim: int) -> None:
        self._index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return self._index.ntotal

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self._index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.asarray(ids, np.int64))

    def search(self, vecs: np.ndarray, k: int,
               min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self) == 0 or len(vecs) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        sims, ids = self._index.search(np.ascontiguousarray(vecs, np.float32), k)
        rows, cols = np.nonzero((sims >= min_cosine) & (ids >= 0))
        return rows.astype(np.int64), ids[rows, cols], sims[rows, cols]


@dataclass(frozen=True)
class NearDupConfig:
    phash_radius: int = 8    # Hamming bits between pHashes of near-duplicates
    orient_radius: int = 8   # the same, for a flipped or rotated pHash of the new image
    min_cosine: float = 0.80  # embedding cosine of near-duplicates (crops, watermarks)
    k: int = 10              # embedding neighbours looked at per new image


@dataclass
class DedupCounts:
    pairs: int = 0
    grouped: int = 0  # images whose group is new or changed

    def add(self, other: DedupCounts) -> None:
        self.pairs += other.pairs
        self.grouped += other.grouped


@dataclass
class NewImages:
    """What the dedup stage needs of a manifest's new images, ordered by image_id."""

    ids: np.ndarray        # int64
    phash: np.ndarray      # int64
    dihedral: np.ndarray   # (n, 7) int64
    vectors: np.ndarray    # (n, d) float32; rows of images without a vector are zero
    has_vector: np.ndarray  # bool


def neardup_config(cfg: dict) -> NearDupConfig:
    return NearDupConfig(phash_radius=cfg["phash_radius"], orient_radius=cfg["orient_radius"],
                         min_cosine=cfg["min_cosine"], k=cfg["k"])


class DedupIndexes:
    """The catalog's pHash index (persisted under <home>/index) and the vector index of a model_ver."""

    def __init__(self, folder: Path, hashes: HashIndex, vectors: ExactVectorIndex | VectorIndex,
                 source: tuple[psycopg.Connection, str, int, str]) -> None:
        self.folder = folder
        self.hashes = hashes
        self.vectors = vectors
        self._source = source  # where to rebuild the vector index from
        self._built_with = len(vectors)

    @staticmethod
    def _catalog_state(conn: psycopg.Connection) -> dict[str, int]:
        count, last = conn.execute("SELECT count(*), coalesce(max(image_id), 0) FROM image_hashes").fetchone()
        return {"hashes": count, "max_image_id": last}

    @classmethod
    def open(cls, conn: psycopg.Connection, folder: Path, model_ver: str, dim: int,
             vector_type: str) -> DedupIndexes:
        hash_path, state_path = folder / "phash.npz", folder / "phash.json"
        want = cls._catalog_state(conn)
        if state_path.exists() and json.loads(state_path.read_text()) == want:
            hashes = HashIndex.load(hash_path)
        else:
            say(f"dedup: indexing the catalog's {want['hashes']} pHashes")
            rows = conn.execute("SELECT image_id, phash FROM image_hashes ORDER BY image_id").fetchall()
            hashes = HashIndex(np.asarray([r[0] for r in rows], np.int64),
                               np.asarray([r[1] for r in rows], np.int64))
        vectors = build_vector_index(conn, model_ver, dim, vector_type, folder / "scratch")
        index = cls(folder, hashes, vectors, (conn, model_ver, dim, vector_type))
        index.save(want)
        return index

    def save(self, state: dict[str, int]) -> None:
        """The hash index, then the state that vouches for it (atomic renames both)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hashes.save(self.folder / "phash.npz")
        tmp = self.folder / "phash.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.folder / "phash.json")

    def commit(self, conn: psycopg.Connection, new: NewImages) -> None:
        """After the manifest's transaction committed: the new images become searchable."""
        self.hashes.add(new.ids, new.phash)
        grown = len(self.vectors) + int(new.has_vector.sum())
        if grown > EXACT_UP_TO and grown > 2 * self._built_with:
            # Retrain on the catalog as it is now, so the quantiser follows the collection.
            conn_, model_ver, dim, vector_type = self._source
            self.vectors = build_vector_index(conn_, model_ver, dim, vector_type, self.folder / "scratch")
            self._built_with = len(self.vectors)
        elif new.has_vector.any():
            self.vectors.add(new.ids[new.has_vector], new.vectors[new.has_vector])
        self.save(self._catalog_state(conn))


def build_vector_index(conn: psycopg.Connection, model_ver: str, dim: int, vector_type: str,
                       scratch: Path) -> ExactVectorIndex | VectorIndex:
    """The vector index of every catalogued vector of model_ver: exact while the catalog is small."""
    vec_ids, vecs = spill_vectors(conn, model_ver, vector_type, scratch)
    index: ExactVectorIndex | VectorIndex
    if len(vec_ids) <= EXACT_UP_TO:
        index = ExactVectorIndex(dim)
    else:
        index = VectorIndex(dim)
        step = max(1, len(vec_ids) // TRAIN_SAMPLE)
        index.train(np.asarray(vecs[::step], np.float32), expected_size=len(vec_ids))
    start = 0
    for chunk in chunks(vecs):
        index.add(vec_ids[start:start + len(chunk)], chunk)
        start += len(chunk)
    return index


def find_pairs(new: NewImages, hashes: HashIndex, vectors: ExactVectorIndex | VectorIndex, cfg: NearDupConfig,
               exact: Callable[[np.ndarray], dict[int, np.ndarray]]) -> pd.DataFrame:
    """Near-duplicate pairs of the new images with the catalog's indexes and with each other.

    pHash within phash_radius; a flipped or rotated pHash of the new image within orient_radius
    (pairs the plain pHash did not find); embedding cosine >= min_cosine among the k nearest.
    One row per pair and method, image_id < other_id, the smallest distance kept.

    The vector index is compressed and trained on the catalog as it was, so it only proposes
    candidates (with CANDIDATE_SLACK); `exact(ids)` returns the stored vectors, and the
    threshold is applied to exact cosines: the same pairs whatever the index's history.
    """
    parts: list[pd.DataFrame] = []

    def collect(rows: np.ndarray, matched: np.ndarray, dist: np.ndarray, method: str) -> None:
        if len(rows):
            parts.append(pd.DataFrame({"a": new.ids[rows], "b": matched, "method": method,
                                       "distance": dist.astype(np.float32)}))

    # The catalog's index, then the batch's own hashes for pairs among the new images.
    for index in (hashes, HashIndex(new.ids, new.phash)):
        collect(*index.search_radius(new.phash, cfg.phash_radius), "phash")
        for col in range(new.dihedral.shape[1]):
            collect(*index.search_radius(new.dihedral[:, col], cfg.orient_radius), "phash_orient")
    with_vec = np.flatnonzero(new.has_vector)
    if len(with_vec):
        queries = new.vectors[with_vec]
        rows, matched, _ = vectors.search(queries, cfg.k, cfg.min_cosine - CANDIDATE_SLACK)
        if len(rows):
            stored = exact(np.unique(matched))
            cos = np.einsum("ij,ij->i", queries[rows], np.stack([stored[i] for i in matched]))
            ok = cos >= cfg.min_cosine
            collect(with_vec[rows[ok]], matched[ok], 1.0 - cos[ok], "embedding")
        # Among the batch: exact inner products over a flat index of the batch itself.
        batch = faiss.IndexFlatIP(queries.shape[1])
        batch.add(np.ascontiguousarray(queries, dtype=np.float32))
        sims, cols = batch.search(np.ascontiguousarray(queries, dtype=np.float32),
                                  min(cfg.k + 1, len(queries)))
        r, c = np.nonzero((sims >= cfg.min_cosine) & (cols >= 0))
        collect(with_vec[r], new.ids[with_vec[cols[r, c]]], 1.0 - sims[r, c], "embedding")
    if not parts:
        return pd.DataFrame(columns=["image_id", "other_id", "method", "distance"])
    pairs = pd.concat(parts, ignore_index=True)
    pairs = pairs[pairs["a"] != pairs["b"]].copy()
    pairs["image_id"] = np.minimum(pairs["a"], pairs["b"])
    pairs["other_id"] = np.maximum(pairs["a"], pairs["b"])
    pairs["distance"] = pairs["distance"].clip(lower=0)
    pairs = pairs.groupby(["image_id", "other_id", "method"], as_index=False)["distance"].min()
    # A flipped/rotated match only counts where the plain pHash missed the pair.
    plain = pairs.loc[pairs["method"] == "phash", ["image_id", "other_id"]]
    orient = pairs[pairs["method"] == "phash_orient"].merge(plain, how="left", indicator=True)
    orient = orient[orient["_merge"] == "left_only"].drop(columns="_merge")
    pairs = pd.concat([pairs[pairs["method"] != "phash_orient"], orient], ignore_index=True)
    return pairs.sort_values(["image_id", "other_id", "method"]).reset_index(drop=True)


def merge_groups(pairs: pd.DataFrame, existing: pd.DataFrame) -> pd.DataFrame:
    """Connected components of the pairs and the existing groups they touch.

    `existing` holds the whole of every touched group (image_id, group_id). Returns the
    (image_id, group_id) rows that are new or changed; group_id is the smallest member.
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


def dedup(cur: psycopg.Cursor, indexes: DedupIndexes, new: NewImages, cfg: NearDupConfig,
          model_ver: str, vector_type: str) -> DedupCounts:
    """Pairs of the new images with the catalog and among themselves; groups merged; all in `cur`'s
    transaction."""
    if len(new.ids) == 0:
        return DedupCounts()
    def exact(ids: np.ndarray) -> dict[int, np.ndarray]:
        found, vecs = read_vectors(cur, "SELECT image_id, embedding FROM image_embeddings "
                                        "WHERE model_ver = %s AND image_id = ANY(%s)",
                                   (model_ver, ids.tolist()), vector_type)
        return dict(zip(found.tolist(), vecs, strict=True))

    pairs = find_pairs(new, indexes.hashes, indexes.vectors, cfg, exact)
    if pairs.empty:
        return DedupCounts()
    cur.execute("CREATE TEMP TABLE stage_pairs (image_id int8, other_id int8, method text, distance float4) "
                "ON COMMIT DROP")
    with cur.copy("COPY stage_pairs FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int8", "text", "float4"])
        for row in pairs[["image_id", "other_id", "method", "distance"]].itertuples(index=False):
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
