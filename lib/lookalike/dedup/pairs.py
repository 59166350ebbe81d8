"""THE near-duplicate rule: which pairs of images are near-duplicates, and by which method.

find_pairs is the one definition, used by a run's dedup stage (lookalike.dedup.store) and by
`similar` for a file outside the catalog (lookalike.read.search); it searches the indexes of
lookalike.index, which lookalike.dedup.indexes keeps beside the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lookalike.config import load_config
from lookalike.counts import Counts
from lookalike.db.vector_io import StoredVectors
from lookalike.index import VectorSearch
from lookalike.index.hamming import HashIndex

PAIR_COLUMNS = ["image_id", "other_id", "method", "distance"]


@dataclass(frozen=True)
class NearDupConfig:
    """Thresholds of find_pairs; their values, and how they were calibrated, are in
    conf/lookalike.toml [neardup] (the one place defaults live)."""

    phash_radius: int       # Hamming bits between pHashes of near-duplicates
    orient_radius: int      # the same, for a flipped or rotated pHash of the new image
    min_cosine: float       # embedding cosine of near-duplicates (crops, watermarks)
    k: int                  # embedding neighbours looked at per new image
    verify_radius: int      # pHash pairs farther apart than this need ...
    verify_cosine: float    # ... embeddings at least this alike (where both have one)
    max_hash_matches: int   # pHash matches kept per new image and method, closest first

    @classmethod
    def from_config(cls, section: dict[str, Any], **overrides: Any) -> NearDupConfig:
        """From a config's [neardup] section (`cfg["neardup"]`), with some values overridden."""
        return cls(**{**{k: section[k] for k in cls.__dataclass_fields__}, **overrides})

    @classmethod
    def defaults(cls, **overrides: Any) -> NearDupConfig:
        """conf/lookalike.toml's values (for tests and benchmarks that build no Config)."""
        return cls.from_config(load_config()["neardup"], **overrides)


@dataclass
class DedupCounts(Counts):
    pairs: int = 0
    grouped: int = 0  # images whose group is new or changed


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
