"""Similarity categories: streamed MiniBatchKMeans, Ward joining, FAISS merging, incremental assignment.

Pure library (numpy, scikit-learn, faiss): no catalog or Spark code. Vectors are L2-normalised
float32 embeddings, so the inner product is the cosine and Euclidean k-means on them is
(approximately) spherical k-means.

Full clustering (`fit_clusters`), in two stages. k-means cuts the collection into
`fine_per_cluster` times more pieces than the categories wanted: spherical Lloyd on a reservoir
sample starts MiniBatchKMeans, whose partial_fit then runs over the streamed batches (a
collection that fits in the sample gets Lloyd on all of it instead). One exact pass gives each
piece its members' sum and count, and Ward's method joins the pieces into the k categories
(size-weighted, on the pieces' means: no second pass). k-means alone spends its centroids where
the images are dense (59 dogs of imagenet-dev's 500 images got 4-5 categories) and lumps small
distinct groups together (spiders with crabs); Ward joins what costs least to join, which keeps
those apart: bench/category_quality.py. Categories closer than `merge_cosine` are then merged
(union-find over a FAISS range search), and a final counting pass gives each its exact size under
nearest-centroid assignment (so `assign` reproduces `sizes`). Empty categories are dropped.

Incremental runs (`assign_incremental`): a new image joins its nearest cluster when the cosine
is >= `join_cosine` (the centroid moves as a size-weighted running mean); the images that fit
no cluster start new ones at once, with their batch-mates that are close to them: they are
clustered as a full fit of them would be (pieces joined by Ward, merged at `merge_cosine`), and
seeds within `merge_cosine` of an existing cluster are absorbed into it. Existing cluster indices
are stable: they are never renumbered, removed or merged with each other (a later full
re-clustering may merge what a batch started). Every image has its category when the call returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pandas as pd
from scipy import sparse
from threadpoolctl import threadpool_limits

from lookalike.config import load_config
from lookalike.vectors import l2_normalize

if TYPE_CHECKING:
    from sklearn.cluster import MiniBatchKMeans

__all__ = [
    "ClusterConfig",
    "Clustering",
    "IncrementalResult",
    "assign",
    "assign_incremental",
    "cluster_mapping",
    "derive_k",
    "fit_clusters",
    "merge_centroids",
    "should_refit",
    "ward_groups",
]


@dataclass(frozen=True)
class ClusterConfig:
    """Clustering parameters. The first six are the configuration's (conf/lookalike.toml
    [cluster], the one place their values live); the rest are the algorithm's own, chosen with
    bench/cluster_quality.py --sweep and bench/category_quality.py on EfficientNet-Lite0 outputs."""

    k: int | None  # categories before merging; None: derive_k(n)
    k_per_sqrt_n: float  # derived k = k_per_sqrt_n * sqrt(n), clipped to [1, k_max]
    merge_cosine: float  # centroids (and merged groups) at least this close become one cluster
    join_cosine: float  # a new image joins its nearest cluster at this cosine or above
    refit_growth: float  # should_refit once the collection has grown this much since the fit
    label_weight: float  # labels' share of the clustered likeness (lookalike.cluster.space)
    k_max: int = 4096  # bounds the fit time of very large archives (k-means pieces included)
    # k-means pieces per category, joined by Ward (fit_clusters): imagenet-dev's right-level names
    # 0.840 / 0.854 / 0.856 with 1 (k-means alone) / 3 / 5 pieces; the fit's k-means cost grows with it.
    fine_per_cluster: int = 3
    init_per_cluster: int = 40  # sample rows per category for the Lloyd initialisation
    batch_size: int = 4096  # MiniBatchKMeans step size
    passes: int = 2  # partial_fit passes over the data after the warm start
    seed: int = 0

    @classmethod
    def from_config(cls, section: dict[str, Any], **overrides: Any) -> ClusterConfig:
        """From a config's [cluster] section: k = 0 derives k, refit_growth = 0 never refits."""
        values = {"k": section["k"] or None, "k_per_sqrt_n": section["k_per_sqrt_n"],
                  "merge_cosine": section["merge_cosine"],
                  "join_cosine": section["join_cosine"],
                  "refit_growth": section["refit_growth"] or float("inf"),
                  "label_weight": section["label_weight"]}
        return cls(**{**values, **overrides})

    @classmethod
    def defaults(cls, **overrides: Any) -> ClusterConfig:
        """conf/lookalike.toml's values (for tests and benchmarks that build no Config)."""
        return cls.from_config(load_config()["cluster"], **overrides)


@dataclass
class Clustering:
    """A full clustering; index i of both arrays is cluster i."""

    centroids: np.ndarray  # (m, d) float32, L2-normalised
    sizes: np.ndarray  # (m,) int64, members under nearest-centroid assignment
    k_fit: int  # categories before merging and dropping empties (k-means cut fine_per_cluster times more)


@dataclass
class IncrementalResult:
    """Outcome of one incremental run, a row per new vector. Existing clusters keep their index;
    new clusters are appended (indices `new`)."""

    centroids: np.ndarray  # (m', d) float32, normalised; m' >= m
    sizes: np.ndarray  # (m',) int64
    cluster: np.ndarray  # (rows,) int64, each row's cluster
    sim: np.ndarray  # (rows,) float32, cosine of the row to that cluster's (updated) centroid
    new: np.ndarray  # int64 indices of clusters created in this run
    changed: np.ndarray  # int64 indices of existing clusters whose centroid and size changed


def derive_k(n: int, cfg: ClusterConfig) -> int:
    """Categories for n vectors (before merging): cfg.k when set, else k_per_sqrt_n * sqrt(n) up to k_max."""
    k = cfg.k if cfg.k is not None else min(round(cfg.k_per_sqrt_n * math.sqrt(n)), cfg.k_max)
    return int(max(1, min(k, n)))


def _pieces(k: int, n: int, cfg: ClusterConfig) -> int:
    """k-means pieces for k categories of n vectors: fine_per_cluster * k, within k_max and n.

    k_max caps the pieces too (the k-means cost and Ward's m x m matrix): from about 200k images
    (k_per_sqrt_n 3) a category has fewer than 3 pieces, at 1M 1.4, and from about 1.9M one, where
    the fit is k-means alone (and each category holds hundreds of images, no longer small groups).
    """
    return int(max(k, min(cfg.fine_per_cluster * k, cfg.k_max, n)))


def should_refit(n_at_fit: int, n_now: int, cfg: ClusterConfig) -> bool:
    """Whether incremental runs have grown the collection enough to warrant a full fit.

    Incremental runs keep cluster indices stable but only add clusters; a full fit re-derives k
    for the current size and re-balances the clusters. Mostly matters during the first load of
    an archive, which arrives as many manifests after a fit on the first one.
    """
    return n_at_fit <= 0 or n_now >= cfg.refit_growth * n_at_fit



def _chunks(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cut the caller's batches (any sizes, e.g. Parquet row groups) into steps of `size` rows."""
    buf: list[np.ndarray] = []
    held = 0
    for b in batches:
        b = np.asarray(b, dtype=np.float32)
        while len(b):
            take = b[: size - held]
            b = b[len(take) :]
            buf.append(take)
            held += len(take)
            if held == size:
                yield np.concatenate(buf) if len(buf) > 1 else np.ascontiguousarray(buf[0])
                buf, held = [], 0
    if held:
        yield np.concatenate(buf)


def _reservoir(batches: Iterable[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform sample of `size` rows from a stream: keep the rows with the smallest random keys.

    A uniform sample (not the stream's first rows) matters because archives arrive ordered by
    folder or date, and a prefix would seed k-means with one corner of the data.
    """
    keys = np.empty(0, dtype=np.float64)
    rows = np.empty((0, 0), dtype=np.float32)
    for b in batches:
        b = np.asarray(b, dtype=np.float32)
        bk = rng.random(len(b))
        if len(keys) + len(b) > size:  # drop rows that cannot make the sample before stacking
            cut = np.partition(np.concatenate([keys, bk]), size - 1)[size - 1]
            keep = bk <= cut
            b, bk = b[keep], bk[keep]
        keys = np.concatenate([keys, bk])
        rows = np.concatenate([rows, b]) if len(rows) else b.copy()
        if len(keys) > size:
            top = np.argpartition(keys, size - 1)[:size]
            keys, rows = keys[top], rows[top]
    return rows


def _flat_ip(centroids: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def assign(centroids: np.ndarray, vecs: np.ndarray, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each vector: (labels int64, cosine float32). No centroids: -1, -inf."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    labels = np.full(len(vecs), -1, dtype=np.int64)
    cos = np.full(len(vecs), -np.inf, dtype=np.float32)
    if len(centroids) == 0 or len(vecs) == 0:
        return labels, cos
    index = _flat_ip(centroids)
    for i in range(0, len(vecs), batch_size):
        d, lab = index.search(vecs[i : i + batch_size], 1)
        labels[i : i + batch_size] = lab[:, 0]
        cos[i : i + batch_size] = d[:, 0]
    return labels, cos


def _group_sum(labels: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """Per-label sum of rows, (m, d) float64, via a sparse one-hot product.

    np.add.at is ~50x slower, and sorting plus a float64 copy of the rows costs more memory than
    the rows themselves (the fit's peak at 1280 dimensions).
    """
    onehot = sparse.csr_matrix(
        (np.ones(len(labels), dtype=rows.dtype), (labels, np.arange(len(labels)))), shape=(m, len(labels))
    )
    return np.asarray(onehot @ rows, dtype=np.float64)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)


def merge_centroids(
    vectors: np.ndarray, weights: np.ndarray, merge_cosine: float, n_fixed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge centroids closer than merge_cosine: FAISS range search for candidate pairs, union-find.

    `vectors` are centroids (normalised, or un-normalised member means for an exact merge),
    `weights` their sizes; a merged centroid is the size-weighted mean, re-normalised.
    Candidate pairs are taken in decreasing cosine, and two groups are united only while
    their merged centroids are still >= merge_cosine apart: plain single linkage would chain
    a-b-c into one cluster even when a and c are far apart. Real embeddings share one dominant
    direction, so the cosine between neighbouring centroids rises with cluster size (0.56 to
    0.84 on imagenet-dev from 6 to 45 images per cluster): a threshold near that level merges
    most of a collection, hence the high default.

    The first `n_fixed` rows are existing clusters that must survive: two of them never end
    up in one group, and a group holding one keeps its index. Returns (merged normalised
    centroids, merged weights, group of each input row); fixed rows map to themselves and the
    other groups are numbered from n_fixed on, in input order.
    """
    n = len(vectors)
    w = np.asarray(weights, dtype=np.float64)
    group_sum = np.asarray(vectors, dtype=np.float64) * w[:, None]  # valid at union-find roots
    uf = _UnionFind(n)
    fixed = np.zeros(n, dtype=bool)
    fixed[:n_fixed] = True
    if n > 1:
        unit = l2_normalize(vectors)
        # Range search keeps memory linear in the pairs found; its radius is exclusive, so nudge it.
        radius = float(np.nextafter(np.float32(merge_cosine), np.float32(-1)))
        lims, sims, nbrs = _flat_ip(unit).range_search(unit, radius)
        src = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
        pair = (src < nbrs) & ~(fixed[src] & fixed[nbrs])  # each edge once; existing pairs never merge
        src, dst, sims = src[pair], nbrs[pair], sims[pair]
        for e in np.argsort(-sims, kind="stable"):
            a, b = uf.find(src[e]), uf.find(dst[e])
            if a == b or (fixed[a] and fixed[b]):
                continue
            sa, sb = group_sum[a], group_sum[b]
            if sa @ sb < merge_cosine * np.linalg.norm(sa) * np.linalg.norm(sb):
                continue
            if fixed[b]:  # a fixed row stays the root, so its group keeps the existing index
                a, b = b, a
            uf.parent[b] = a
            group_sum[a] = sa + sb
    roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    new_roots = np.unique(roots[roots >= n_fixed])
    index_of = np.full(n, -1, dtype=np.int64)
    index_of[:n_fixed] = np.arange(n_fixed)
    index_of[new_roots] = n_fixed + np.arange(len(new_roots))
    group = index_of[roots]
    m = n_fixed + len(new_roots)
    sums = _group_sum(group, np.asarray(vectors, dtype=np.float64) * w[:, None], m)
    return l2_normalize(sums), np.bincount(group, weights=w, minlength=m), group


def ward_groups(means: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Ward's agglomeration of weighted points into k groups: the group (0..k-1) of each row.

    Row i stands for weights[i] > 0 points at means[i] (a k-means piece), and the result is what
    Ward's method on those points would give once it has joined them into k groups: each step
    joins the two groups whose union adds the least to the within-group sum of squares,
    w_a w_b / (w_a + w_b) * |mean_a - mean_b|^2. scipy's and scikit-learn's Ward take no
    weights, hence this: the nearest-neighbour chain (O(m^2) time, an m x m float64 matrix;
    m <= k_max), then the joins in increasing cost, so the cut at k groups is the greedy one.
    """
    m = len(means)
    if k >= m:
        return np.arange(m, dtype=np.int64)
    x = np.asarray(means, dtype=np.float64)
    size = np.asarray(weights, dtype=np.float64).copy()
    sq = np.einsum("ij,ij->i", x, x)
    dist = x @ x.T  # squared distances of the means, built in place: one m x m array
    dist *= -2
    dist += sq[:, None]
    dist += sq[None, :]
    np.maximum(dist, 0, out=dist)
    alive = np.ones(m, dtype=bool)
    joins: list[tuple[float, int, int]] = []
    chain: list[int] = []
    while len(joins) < m - 1:
        if not chain:
            chain.append(int(np.argmax(alive)))
        a = chain[-1]
        cost = size[a] * size / (size[a] + size) * dist[a]
        cost[~alive] = np.inf
        cost[a] = np.inf
        b = int(np.argmin(cost))
        if len(chain) > 1 and cost[chain[-2]] <= cost[b]:  # ties go back down the chain: no cycles
            b = chain[-2]
        if len(chain) < 2 or b != chain[-2]:
            chain.append(b)
            continue
        # a and b are each other's nearest: join b into a (Lance-Williams for centroid distances).
        del chain[-2:]
        joins.append((float(cost[b]), a, b))
        total = size[a] + size[b]
        row = (size[a] * dist[a] + size[b] * dist[b]) / total - size[a] * size[b] * dist[a, b] / total**2
        np.maximum(row, 0, out=row)  # rounding
        dist[a], dist[:, a] = row, row
        dist[a, a] = 0
        size[a] = total
        alive[b] = False
    # Ward's costs never fall as groups grow, so the joins sorted by cost replay the greedy order; the
    # sort is stable, so at equal costs a join still comes after the joins that made its groups.
    joins.sort(key=lambda join: join[0])
    uf = _UnionFind(m)
    for _, a, b in joins[: m - k]:
        uf.parent[uf.find(b)] = uf.find(a)
    _, group = np.unique([uf.find(i) for i in range(m)], return_inverse=True)
    return group.astype(np.int64)


def _join_pieces(sums: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means pieces (their members' sums and counts) joined by Ward into k categories: the
    categories' member sums (float64) and counts (int64). Empty pieces are dropped first."""
    live = counts > 0
    sums, counts = sums[live], counts[live]
    group = ward_groups(sums / counts[:, None], counts, k)
    m = int(group.max()) + 1
    return _group_sum(group, sums, m), np.bincount(group, weights=counts, minlength=m).astype(np.int64)


def _kmeans_plusplus(rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k seeds by greedy k-means++ (scikit-learn's variant: 2 + log k candidates a step, the one
    that most lowers the potential kept). Written here because importing scikit-learn costs ~0.9 s,
    most of a small run's clustering; it is still needed, and imported, for MiniBatchKMeans."""
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows, dtype=np.float32)
    trials = 2 + int(math.log(k))
    norms = np.einsum("ij,ij->i", rows, rows)

    def sq_dist(idx: np.ndarray) -> np.ndarray:  # (len(idx), n) squared distances, never below 0
        return np.maximum(norms[idx, None] + norms[None, :] - 2 * rows[idx] @ rows.T, 0)

    chosen = [int(rng.integers(len(rows)))]
    closest = sq_dist(np.asarray(chosen))[0]
    for _ in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        if cum[-1] <= 0:  # fewer distinct rows than k: any row not chosen yet
            chosen.append(int(rng.choice(np.setdiff1d(np.arange(len(rows)), chosen))))
            continue
        candidates = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1]), len(rows) - 1)
        potentials = np.minimum(sq_dist(candidates), closest)
        best = int(np.argmin(potentials.sum(axis=1)))
        chosen.append(int(candidates[best]))
        closest = potentials[best]
    return rows[chosen]


def _lloyd(sample: np.ndarray, k: int, cfg: ClusterConfig, niter: int = 10) -> np.ndarray:
    """k centroids of the sample: spherical Lloyd (FAISS) from k-means++ seeds."""
    lloyd = faiss.Kmeans(
        sample.shape[1], k, niter=niter, seed=cfg.seed, spherical=True,
        min_points_per_centroid=1, max_points_per_centroid=len(sample),
    )  # fmt: skip
    # k-means++ on a 3k subsample: spread-out seeds at a fraction of k-means++'s cost on all of it.
    sub = sample[np.random.default_rng(cfg.seed).permutation(len(sample))[: 3 * k]]
    with threadpool_limits(1, user_api="blas"):  # tiny products: BLAS threads only add overhead
        seeds = _kmeans_plusplus(sub, k, cfg.seed)
    lloyd.train(np.ascontiguousarray(sample, dtype=np.float32), init_centroids=seeds)
    return lloyd.centroids


def _warm_kmeans(sample: np.ndarray, k: int, cfg: ClusterConfig) -> MiniBatchKMeans:
    """MiniBatchKMeans started from spherical Lloyd (FAISS) on the sample, its counts warmed on it.

    Started the usual way (centroids on data points, counts at zero, so each centroid jumps to
    the mean of its first few batch members), MiniBatchKMeans collapses on embeddings: in high
    dimensions a mean of many vectors is closer to a new vector than any single vector is, so the
    centroids that become means first capture everything and the rest stay near-empty. Measured
    on 100k synthetic vectors, k=632: median cluster size 1 and ARI 0.12 against the generating
    centres, versus median ~80 and ARI 0.32-0.37 started this way. Lloyd iterations turn all
    centroids into means at once; one partial_fit step over the sample then gives each centroid
    a weight of about `init_per_cluster / fine_per_cluster` (the sample is sized per category, the
    centroids are its pieces: ~13 rows each), so later batches refine it instead of replacing it
    (bench/cluster_scale.py, 1M vectors, 4,096 pieces: ARI 0.94 against the generating centres).
    """
    # Imported here: sklearn takes ~0.9 s to import, and only a collection larger than one
    # sample needs it.
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(
        n_clusters=k, init=_lloyd(sample, k, cfg), n_init=1, batch_size=cfg.batch_size,
        compute_labels=False,
        # Reassigning starved centroids moves them onto single vectors: the collapse above.
        reassignment_ratio=0.0, random_state=cfg.seed,
    )  # fmt: skip
    return km.partial_fit(sample)


def _member_stats(
    batches: Iterable[np.ndarray], centroids: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One pass: per-centroid sum of its nearest members and their count."""
    index = _flat_ip(centroids)
    sums = np.zeros(centroids.shape, dtype=np.float64)
    counts = np.zeros(len(centroids), dtype=np.int64)
    for chunk in _chunks(batches, max(batch_size, 65536)):
        lab = index.search(chunk, 1)[1][:, 0]
        sums += _group_sum(lab, chunk, len(centroids))
        counts += np.bincount(lab, minlength=len(centroids))
    return sums, counts


def fit_clusters(batches: Callable[[], Iterable[np.ndarray]], n: int, cfg: ClusterConfig) -> Clustering:
    """Full clustering of a streamed collection of n normalised float32 vectors.

    `batches()` must yield the same vectors each time it is called (any batch sizes); it is
    called passes + 3 times (sample, partial_fit passes, exact pass, counting pass), and no
    more than one batch plus the sample, the centroids and Ward's m x m matrix (m = the
    k-means pieces, at most k_max: 134 MB at 4,096) is held in memory.
    """
    k = derive_k(n, cfg)
    rng = np.random.default_rng(cfg.seed)
    sample = _reservoir(batches(), min(n, max(cfg.init_per_cluster * k, cfg.batch_size)), rng)
    if not len(sample):
        raise ValueError("fit_clusters: the batches yielded no vectors")
    k = min(k, len(sample))
    pieces = _pieces(k, len(sample), cfg)
    if len(sample) == n:
        # The whole collection is the sample: Lloyd on all of it is what the mini-batches
        # approximate (and needs no scikit-learn import: a small run's clustering).
        fitted = _lloyd(sample, pieces, cfg, niter=20)
    else:
        km = _warm_kmeans(sample, pieces, cfg)
        for _ in range(cfg.passes):
            for chunk in _chunks(batches(), cfg.batch_size):
                # Shuffle within the step: stream order is often by folder/date.
                km.partial_fit(chunk[rng.permutation(len(chunk))])
        fitted = km.cluster_centers_
    del sample

    # One exact pass: each piece's members' sum and count, which Ward joins into k categories.
    sums, counts = _join_pieces(*_member_stats(batches(), l2_normalize(fitted), cfg.batch_size), k)
    # Merging un-normalised means weighted by counts is the exact mean of the merged members.
    centroids, _, _ = merge_centroids(sums / counts[:, None], counts, cfg.merge_cosine)

    # Sizes under nearest-centroid assignment, so that `assign` agrees with them.
    _, sizes = _member_stats(batches(), centroids, cfg.batch_size)
    live = sizes > 0
    return Clustering(centroids=centroids[live], sizes=sizes[live], k_fit=k)


def _seed(vecs: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seed centroids (normalised) and their sizes: `vecs` clustered as a full fit of them would be."""
    k = derive_k(len(vecs), cfg)
    pieces = l2_normalize(_lloyd(vecs, _pieces(k, len(vecs), cfg), cfg, niter=20))
    sums, _ = _join_pieces(*_member_stats([vecs], pieces, len(vecs)), k)
    seeds = l2_normalize(sums)
    used = np.bincount(assign(seeds, vecs)[0], minlength=len(seeds))
    return seeds[used > 0], used[used > 0]


def assign_incremental(centroids: np.ndarray, sizes: np.ndarray, vecs: np.ndarray,
                       cfg: ClusterConfig) -> IncrementalResult:
    """Place new vectors in an existing clustering; those that fit none start new clusters.

    Joins are decided against the centroids as they were at the start of the call and applied
    together, so the outcome does not depend on row order.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    m = len(sizes)
    d = np.asarray(vecs).shape[-1] if m == 0 else np.asarray(centroids).shape[1]
    centroids = l2_normalize(np.asarray(centroids).reshape(m, d))
    rows = l2_normalize(np.asarray(vecs).reshape(-1, d))

    nearest, cos = assign(centroids, rows)
    cluster = np.where(cos >= cfg.join_cosine, nearest, -1)
    targets = centroids
    alone = np.flatnonzero(cluster < 0)
    if len(alone):
        seeds, seed_sizes = _seed(rows[alone], cfg)
        # Seeds within merge_cosine of an existing cluster are absorbed by it (existing rows are
        # fixed: they keep their index and never merge with each other); the other seed groups
        # are appended as new clusters.
        targets, _, _ = merge_centroids(
            np.concatenate([centroids, seeds]),
            np.concatenate([sizes, seed_sizes]),
            cfg.merge_cosine,
            n_fixed=m,
        )
        cluster[alone] = assign(targets, rows[alone])[0]

    # Size-weighted running means: the old centroid counts as `size` members.
    added = np.bincount(cluster, minlength=len(targets))
    sums = _group_sum(cluster, rows, len(targets))
    sums[:m] += centroids * sizes[:, None]
    # Seeds that attracted nobody are dropped; the survivors are numbered after the existing ones.
    keep = np.concatenate([np.ones(m, dtype=bool), added[m:] > 0])
    renumber = np.cumsum(keep) - 1
    cluster = renumber[cluster]
    touched = keep & (added > 0)
    out_centroids = targets[keep].copy()
    out_centroids[touched[keep]] = l2_normalize(sums[touched])
    out_centroids[:m][added[:m] == 0] = centroids[added[:m] == 0]  # untouched: unchanged
    out_sizes = (np.concatenate([sizes, np.zeros(len(targets) - m, dtype=np.int64)]) + added)[keep]
    sim = np.einsum("ij,ij->i", rows, out_centroids[cluster]).astype(np.float32)
    return IncrementalResult(
        centroids=out_centroids,
        sizes=out_sizes,
        cluster=cluster,
        sim=sim,
        new=np.arange(m, len(out_centroids), dtype=np.int64),
        changed=np.flatnonzero(added[:m] > 0).astype(np.int64),
    )


def cluster_mapping(old_labels: np.ndarray, new_labels: np.ndarray) -> pd.DataFrame:
    """How the images of each old cluster spread over the new clusters (after a recluster).

    One row per (old_cluster, new_cluster) pair sharing images, with the number shared;
    sorted by old_cluster, then overlap descending.
    """
    old_labels, new_labels = np.asarray(old_labels), np.asarray(new_labels)
    if old_labels.shape != new_labels.shape:
        raise ValueError("old_labels and new_labels must label the same images")
    df = pd.DataFrame({"old_cluster": old_labels, "new_cluster": new_labels})
    out = df.groupby(["old_cluster", "new_cluster"], sort=False).size().reset_index(name="overlap")
    out["overlap"] = out["overlap"].astype(np.int64)
    return out.sort_values(
        ["old_cluster", "overlap", "new_cluster"], ascending=[True, False, True], ignore_index=True
    )
