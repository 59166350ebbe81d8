"""The dedup stage: new images against the whole catalog, near-duplicate pairs and groups stored.

find_pairs searches the indexes of lookalike.neardup; DedupIndexes keeps them beside the
catalog (<home>/index) from run to run and brings them up to date where they disagree with it
(a run killed between a commit and the index save); dedup writes near_duplicates and
image_dup_group inside the manifest's transaction.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lookalike.models import file_safe
from lookalike.neardup import TRAIN_SAMPLE, ExactVectorIndex, HashIndex, VectorIndex
from lookalike.progress import say
from lookalike.vectors import VECTOR_CHUNK, chunks, read_vectors, spilled_vectors

# Up to this many vectors the search is exact (a flat index, 256 MB at 1280-d); beyond, the
# compressed VectorIndex, whose projection and quantiser need that much data to be trained well.
EXACT_UP_TO = 50_000
PAIR_COLUMNS = ["image_id", "other_id", "method", "distance"]

VectorSearch = ExactVectorIndex | VectorIndex
# Stored float32 vectors of some image_ids (those it has), e.g. from the catalog.
StoredVectors = Callable[[np.ndarray], dict[int, np.ndarray]]


@dataclass(frozen=True)
class NearDupConfig:
    """Thresholds of find_pairs; conf/lookalike.toml [neardup] says how they were calibrated."""

    phash_radius: int = 8       # Hamming bits between pHashes of near-duplicates
    orient_radius: int = 8      # the same, for a flipped or rotated pHash of the new image
    min_cosine: float = 0.80    # embedding cosine of near-duplicates (crops, watermarks)
    k: int = 10                 # embedding neighbours looked at per new image
    verify_radius: int = 2      # pHash pairs farther apart than this need ...
    verify_cosine: float = 0.5  # ... embeddings at least this alike (where both have one)
    max_hash_matches: int = 50  # pHash matches kept per new image and method, closest first


def neardup_config(cfg: dict) -> NearDupConfig:
    return NearDupConfig(**{k: cfg[k] for k in NearDupConfig.__dataclass_fields__})


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


# --------------------------------------------------------------------------- pairs


def find_pairs(new: NewImages, hashes: HashIndex, vectors: VectorSearch, cfg: NearDupConfig,
               exact: StoredVectors) -> pd.DataFrame:
    """Near-duplicate pairs of the new images with the catalog's indexes and with each other.

    - "phash": pHash within phash_radius; distance = Hamming bits;
    - "phash_orient": a flipped or rotated pHash of the new image within orient_radius, for
      pairs the plain pHash did not find;
    - "embedding": among the k nearest, cosine >= min_cosine; distance = 1 - cosine.
    A pHash pair more than verify_radius bits apart is kept only if the two embeddings have
    cosine >= verify_cosine (or one is missing): at catalog scale chance matches within 8 bits
    come at 0.09 per new image at 1M, 0.39 over the 7 transformed hashes, and would chain
    unrelated groups together. Each new image keeps its max_hash_matches closest pHash matches
    per method: thousands of blank images are all alike.

    Cosines within the compressed index's error of min_cosine are decided on the stored
    float32 vectors, `exact(ids)`: which side of the threshold a candidate falls on does not
    depend on the index's kind or training (whether it is found at all may, see VectorIndex).
    Returns [image_id, other_id, method, distance], image_id < other_id, one row per pair and
    method (the smallest distance), sorted.
    """
    parts = [*_hash_pairs(new, hashes, vectors, cfg), _embedding_pairs(new, vectors, cfg, exact)]
    pairs = pd.concat([p for p in parts if len(p)] or [parts[-1]], ignore_index=True)
    pairs = pairs[pairs["a"] != pairs["b"]].copy()  # the batch finds itself
    pairs["image_id"], pairs["other_id"] = (np.minimum(pairs["a"], pairs["b"]),
                                            np.maximum(pairs["a"], pairs["b"]))
    pairs["distance"] = pairs["distance"].clip(lower=0)
    pairs = pairs.groupby(["image_id", "other_id", "method"], as_index=False)["distance"].min()
    # A flipped/rotated match only counts where the plain pHash missed the pair.
    plain = pairs.loc[pairs["method"] == "phash", ["image_id", "other_id"]]
    orient = pairs[pairs["method"] == "phash_orient"].merge(plain, how="left", indicator=True)
    orient = orient[orient["_merge"] == "left_only"].drop(columns="_merge")
    pairs = pd.concat([pairs[pairs["method"] != "phash_orient"], orient], ignore_index=True)
    return pairs.sort_values(["image_id", "other_id", "method"]).reset_index(drop=True)[PAIR_COLUMNS]


def _matches(new: NewImages, rows: np.ndarray, other: np.ndarray, distance: np.ndarray,
             method: str) -> pd.DataFrame:
    return pd.DataFrame({"a": new.ids[rows], "b": other, "method": method,
                         "distance": np.asarray(distance, np.float32)})


def _hash_pairs(new: NewImages, hashes: HashIndex, vectors: VectorSearch,
                cfg: NearDupConfig) -> list[pd.DataFrame]:
    batch = HashIndex(new.ids, new.phash)  # pairs among the new images
    out = []
    for method, queries, radius in (("phash", new.phash[:, None], cfg.phash_radius),
                                    ("phash_orient", new.dihedral, cfg.orient_radius)):
        found = [index.search_radius(queries.ravel(), radius) for index in (hashes, batch)]
        m = pd.DataFrame({"row": np.concatenate([f[0] for f in found]) // queries.shape[1],
                          "other": np.concatenate([f[1] for f in found]),
                          "distance": np.concatenate([f[2] for f in found])})
        m = m[new.ids[m["row"].to_numpy()] != m["other"].to_numpy()]  # not itself, before the cap
        m = m.sort_values(["row", "distance", "other"]).drop_duplicates(["row", "other"])
        m = m[m.groupby("row").cumcount() < cfg.max_hash_matches]
        rows, other, dist = (m[c].to_numpy() for c in ("row", "other", "distance"))
        keep = _verified(new, rows, other, dist, vectors, cfg)
        out.append(_matches(new, rows[keep], other[keep], dist[keep], method))
    return out


def _verified(new: NewImages, rows: np.ndarray, other: np.ndarray, distance: np.ndarray,
              vectors: VectorSearch, cfg: NearDupConfig) -> np.ndarray:
    """Mask of the pHash matches to keep: close ones, and farther ones whose embeddings agree."""
    check = np.flatnonzero((distance > cfg.verify_radius) & new.has_vector[rows])
    cos = np.full(len(rows), np.nan, np.float32)
    if len(check):
        order = np.argsort(new.ids)
        pos = order[np.minimum(np.searchsorted(new.ids, other[check], sorter=order), len(order) - 1)]
        in_batch = new.ids[pos] == other[check]
        # The other image is new too (its vector is at hand) or in the catalog's index.
        b = in_batch & new.has_vector[pos]
        cos[check[b]] = np.einsum("ij,ij->i", new.vectors[rows[check[b]]], new.vectors[pos[b]])
        c = check[~in_batch]
        cos[c] = vectors.cosine_with(other[c], new.vectors[rows[c]])
    return ~(cos < cfg.verify_cosine)  # NaN, a vector missing: kept unverified


def _embedding_pairs(new: NewImages, vectors: VectorSearch, cfg: NearDupConfig,
                     exact: StoredVectors) -> pd.DataFrame:
    with_vec = np.flatnonzero(new.has_vector)
    queries = np.ascontiguousarray(new.vectors[with_vec], np.float32)
    if not len(queries):
        return _matches(new, with_vec, with_vec, np.empty(0), "embedding")
    err = vectors.cosine_error
    rows, matched, cos = vectors.search(queries, cfg.k, cfg.min_cosine - err)
    # Only cosines within the index's error of the threshold can fall on the wrong side of it:
    # those are decided on the stored vectors. Fetching every candidate instead (up to k a new
    # image) would cost ~4 s per 10k new images from PostgreSQL (0.04 ms a vector, measured by
    # bench/neardup_scale.py --pg-fetch); the band holds about one a new image in that bench,
    # whose same-scene photos crowd around 0.80.
    near = np.flatnonzero(cos < cfg.min_cosine + err)
    if len(near):
        stored = exact(np.unique(matched[near]))
        nan = np.full(queries.shape[1], np.nan, np.float32)
        cos[near] = np.einsum("ij,ij->i", queries[rows[near]],
                              np.stack([stored.get(int(i), nan) for i in matched[near]]))
    ok = cos >= cfg.min_cosine
    parts = [_matches(new, with_vec[rows[ok]], matched[ok], 1.0 - cos[ok], "embedding")]
    # Among the batch: exact cosines too, candidates as cheap as the index can make them.
    r, c, cos = vectors.search_among(queries, cfg.k, cfg.min_cosine)
    parts.append(_matches(new, with_vec[r], new.ids[with_vec[c]], 1.0 - cos, "embedding"))
    return pd.concat(parts, ignore_index=True)


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


# --------------------------------------------------------------------------- indexes on disk


def new_vector_index(folder: Path, dim: int, size: int, sample: np.ndarray) -> VectorSearch:
    """An empty vector index for `size` vectors in `folder`: exact up to EXACT_UP_TO, else a
    VectorIndex trained on `sample` (TRAIN_SAMPLE vectors are enough; it may be a memory map)."""
    if size <= EXACT_UP_TO:
        return ExactVectorIndex(dim, path=folder / "exact")
    index = VectorIndex(dim, path=folder / "ivf")
    index.train(sample, expected_size=size)
    return index


class DedupIndexes:
    """The catalog's pHash index and the vector index of one model_ver, under <home>/index.

    On disk: phash.npz, and vectors-<model_ver>/exact or /ivf (while the vector index is
    exact, then compressed). Each file is replaced or committed atomically, and an index is
    trusted only as far as it agrees with the catalog (count and sum of its image_ids): a run
    killed between its commit and the save leaves an index behind the catalog, which the next
    open brings up to date.
    """

    HASH_FILE = "phash.npz"

    def __init__(self, folder: Path, model_ver: str, hashes: HashIndex, vectors: VectorSearch) -> None:
        self.folder = folder
        self.model_ver = model_ver
        self.hashes = hashes
        self.vectors = vectors

    @staticmethod
    def vector_folder(folder: Path, model_ver: str) -> Path:
        return folder / ("vectors-" + file_safe(model_ver))

    @classmethod
    def load(cls, folder: Path, model_ver: str, dim: int) -> DedupIndexes:
        """The indexes as last saved, empty ones where there are none (the catalog unchecked)."""
        hash_file, vec_folder = folder / cls.HASH_FILE, cls.vector_folder(folder, model_ver)
        hashes = HashIndex.load(hash_file) if hash_file.exists() else HashIndex()
        vectors: VectorSearch
        if (vec_folder / "ivf" / VectorIndex.INDEX_FILE).exists():  # saved after its exact one
            vectors = VectorIndex.load(vec_folder / "ivf")
        elif (vec_folder / "exact" / ExactVectorIndex.INDEX_FILE).exists():
            vectors = ExactVectorIndex.load(vec_folder / "exact")
        else:
            vectors = ExactVectorIndex(dim, path=vec_folder / "exact")
        if vectors.dim != dim:
            raise ValueError(f"{vec_folder} holds {vectors.dim}-d vectors, not {dim}-d")
        return cls(folder, model_ver, hashes, vectors)

    @classmethod
    def open(cls, conn: psycopg.Connection, folder: Path, model_ver: str, dim: int,
             vector_type: str) -> DedupIndexes:
        """The saved indexes, brought up to date with the catalog."""
        try:
            index = cls.load(folder, model_ver, dim)
        except Exception as e:  # whatever is wrong with them, they are rebuilt
            say(f"dedup: the saved indexes are unusable ({e}); rebuilding them")
            shutil.rmtree(folder, ignore_errors=True)
            index = cls.load(folder, model_ver, dim)
        index._sync_hashes(conn)
        index._sync_vectors(conn, vector_type)
        for other in folder.glob("vectors-*"):  # of models the catalog has left: GBs at 1M
            if other != cls.vector_folder(folder, model_ver):
                shutil.rmtree(other, ignore_errors=True)
        return index

    def _sync_hashes(self, conn: psycopg.Connection) -> None:
        count, total = conn.execute("SELECT count(*), coalesce(sum(image_id), 0) "
                                    "FROM image_hashes").fetchone()
        if (len(self.hashes), int(self.hashes.ids.sum())) == (count, total):
            return
        say(f"dedup: indexing the catalog's {count} pHashes")
        rows = conn.execute("SELECT image_id, phash FROM image_hashes ORDER BY image_id").fetchall()
        self.hashes = HashIndex(np.asarray([r[0] for r in rows], np.int64),
                                np.asarray([r[1] for r in rows], np.int64))
        self._save_hashes()

    def _sync_vectors(self, conn: psycopg.Connection, vector_type: str) -> None:
        count, total = conn.execute("SELECT count(*), coalesce(sum(image_id), 0) FROM image_embeddings "
                                    "WHERE model_ver = %s", (self.model_ver,)).fetchone()
        if (len(self.vectors), int(self.vectors.ids.sum())) == (count, total):
            return
        stored = np.asarray([r[0] for r in conn.execute(
            "SELECT image_id FROM image_embeddings WHERE model_ver = %s", (self.model_ver,))], np.int64)
        missing = np.setdiff1d(stored, self.vectors.ids)
        if np.isin(self.vectors.ids, stored).all() and len(missing) <= len(self.vectors):
            # Behind the catalog (a run killed before its save): add what it lacks.
            say(f"dedup: adding {len(missing)} vectors the index lacks")
            with conn.cursor() as cur:
                for start in range(0, len(missing), VECTOR_CHUNK):
                    self._add_vectors(*_vectors_by_id(cur, self.model_ver, vector_type,
                                                      missing[start:start + VECTOR_CHUNK]))
        else:
            say(f"dedup: indexing the catalog's {count} vectors")
            self._rebuild_vectors(conn, vector_type)
        self._save_vectors()

    def _rebuild_vectors(self, conn: psycopg.Connection, vector_type: str) -> None:
        folder = self.vector_folder(self.folder, self.model_ver)
        shutil.rmtree(folder, ignore_errors=True)
        with spilled_vectors(conn, self.model_ver, vector_type, self.folder / "scratch") as (ids, vecs):
            self.vectors = new_vector_index(folder, self.vectors.dim, len(ids),  # trained on a view
                                            vecs[::max(1, len(ids) // TRAIN_SAMPLE)])
            start = 0
            for chunk in chunks(vecs):
                self.vectors.add(ids[start:start + len(chunk)], chunk)
                start += len(chunk)

    def _add_vectors(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if isinstance(self.vectors, ExactVectorIndex) and len(self.vectors) + len(ids) > EXACT_UP_TO:
            # Outgrown: the compressed index, trained on the vectors so far and these.
            known = self.vectors.vectors()
            sample = np.concatenate([known, vecs])
            index = new_vector_index(self.vector_folder(self.folder, self.model_ver), self.vectors.dim,
                                     len(sample), sample)
            index.add(self.vectors.ids, known)
            self.vectors = index
        self.vectors.add(ids, vecs)

    def commit(self, new: NewImages) -> None:
        """After the manifest's transaction committed: the new images become searchable."""
        self.hashes.add(new.ids, new.phash)
        self._add_vectors(new.ids[new.has_vector], new.vectors[new.has_vector])
        self.save()

    def _save_hashes(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hashes.save(self.folder / self.HASH_FILE)

    def _save_vectors(self) -> None:
        folder = self.vector_folder(self.folder, self.model_ver)
        if len(self.vectors) == 0:
            return  # nothing to keep (and VectorIndex cannot save untrained)
        kind = "ivf" if isinstance(self.vectors, VectorIndex) else "exact"
        self.vectors.save(folder / kind)
        if kind == "ivf":
            shutil.rmtree(folder / "exact", ignore_errors=True)  # outgrown, now that ivf is saved

    def save(self) -> None:
        self._save_hashes()
        self._save_vectors()


# --------------------------------------------------------------------------- the stage


def _vectors_by_id(cur: psycopg.Cursor, model_ver: str, vector_type: str,
                   ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return read_vectors(cur, "SELECT image_id, embedding FROM image_embeddings "
                             "WHERE model_ver = %s AND image_id = ANY(%s)",
                        (model_ver, np.asarray(ids).tolist()), vector_type)


def stored_vectors(cur: psycopg.Cursor, model_ver: str, vector_type: str) -> StoredVectors:
    """The catalog's float32 vectors of model_ver, by image_id (within `cur`'s transaction)."""
    def fetch(ids: np.ndarray) -> dict[int, np.ndarray]:
        found, vecs = _vectors_by_id(cur, model_ver, vector_type, ids)
        return dict(zip(found.tolist(), vecs, strict=True))
    return fetch


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
