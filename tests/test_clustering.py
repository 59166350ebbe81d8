"""Clustering core: streamed fit + merge, nearest-centroid assignment, incremental runs, mapping."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from lookalike.cluster.algorithm import (
    ClusterConfig,
    assign,
    assign_incremental,
    cluster_mapping,
    derive_k,
    fit_clusters,
    merge_centroids,
    should_refit,
    ward_groups,
)

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def blobs(centres: np.ndarray, n_each: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n_each unit vectors around each centre (member-to-centre cosine ~ 1/sqrt(1 + spread^2))."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_each)
    noise = rng.standard_normal((len(labels), centres.shape[1])) * spread / np.sqrt(centres.shape[1])
    return unit(centres[labels] + noise), labels


@pytest.fixture(scope="module")
def centres() -> np.ndarray:
    # Nearly orthogonal random directions: well separated.
    return unit(np.random.default_rng(0).standard_normal((6, DIM)))


def stream(x: np.ndarray, size: int = 97) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (x[i : i + size] for i in range(0, len(x), size))


def test_derive_k() -> None:
    cfg = ClusterConfig.defaults(k_per_sqrt_n=1.0, k_max=500)
    assert derive_k(10_000, cfg) == 100
    assert derive_k(10**8, cfg) == 500
    assert derive_k(3, ClusterConfig.defaults(k=10)) == 3  # never more clusters than vectors


def test_should_refit() -> None:
    cfg = ClusterConfig.defaults(refit_growth=2.0)
    assert not should_refit(1000, 1999, cfg)
    assert should_refit(1000, 2000, cfg)
    assert should_refit(0, 1, cfg)


def test_fit_recovers_separated_clusters_by_merging_overclustered_pieces(centres: np.ndarray) -> None:
    # Arrives ordered by blob, as archives arrive by folder: the uniform sample must cope.
    x, truth = blobs(centres, 300, 0.4, seed=1)
    cfg = ClusterConfig.defaults(k_per_sqrt_n=1.0, merge_cosine=0.8, batch_size=256, seed=3)
    fit = fit_clusters(stream(x), len(x), cfg)
    assert fit.k_fit == derive_k(len(x), cfg) == 42  # over-clustered: 42 categories of 6 blobs
    assert len(fit.centroids) == 6  # ... merged back into the blobs
    np.testing.assert_allclose(np.linalg.norm(fit.centroids, axis=1), 1, atol=1e-5)
    labels, cos = assign(fit.centroids, x)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert fit.sizes.dtype == np.int64 and fit.sizes.sum() == len(x)
    np.testing.assert_array_equal(np.bincount(labels, minlength=6), fit.sizes)  # sizes agree with assign
    assert cos.min() > 0.8


def test_fit_without_merge_keeps_k_and_drops_empty(centres: np.ndarray) -> None:
    x, _ = blobs(centres[:2], 50, 0.3, seed=4)
    fit = fit_clusters(stream(x), len(x), ClusterConfig.defaults(k=8, merge_cosine=1.01))
    assert fit.k_fit == 8 and 2 <= len(fit.sizes) <= 8
    assert (fit.sizes > 0).all() and fit.sizes.sum() == len(x)


def test_fit_streams_batches_and_never_needs_the_full_array(centres: np.ndarray) -> None:
    calls = []

    def batches() -> Iterator[np.ndarray]:
        # Regenerated on every call, like reading Parquet row groups: no full array exists.
        calls.append(1)
        for i in range(12):
            yield blobs(centres, 20 + i, 0.4, seed=100 + i)[0]

    n = sum(6 * (20 + i) for i in range(12))
    # A sample of 5 rows per category (645 of 1,836): the rest is streamed through MiniBatchKMeans.
    cfg = ClusterConfig.defaults(merge_cosine=0.8, batch_size=128, passes=2, init_per_cluster=5)
    fit = fit_clusters(batches, n, cfg)
    assert len(calls) == cfg.passes + 3  # sample, 2 partial_fit passes, exact pass, counting pass
    assert fit.sizes.sum() == n
    assert len(fit.centroids) == 6

    # A collection that fits in one sample is clustered by Lloyd on the sample: no mini-batch passes.
    calls.clear()
    whole = fit_clusters(batches, n, ClusterConfig.defaults(merge_cosine=0.8, batch_size=128))
    assert len(calls) == 3  # sample, exact pass, counting pass
    assert whole.sizes.sum() == n and len(whole.centroids) == 6


def test_merge_joins_near_identical_centroids() -> None:
    rng = np.random.default_rng(5)
    a, b = unit(rng.standard_normal((2, DIM)))
    a2 = unit(a + 0.01 * rng.standard_normal(DIM))
    vecs = np.stack([a, b, a2])
    merged, weights, group = merge_centroids(vecs, np.array([3.0, 5.0, 1.0]), merge_cosine=0.95)
    assert len(merged) == 2
    assert group[0] == group[2] != group[1]
    np.testing.assert_allclose(weights[group[0]], 4.0)
    np.testing.assert_allclose(merged[group[0]], unit(3 * a + a2), atol=1e-6)  # size-weighted mean
    np.testing.assert_allclose(merged[group[1]], b, atol=1e-6)


def test_merge_does_not_chain() -> None:
    # a-b and b-c are 0.90 apart, a-c only 0.62: b merges with one of them, never all three.
    ang = np.deg2rad([0.0, 25.8, 51.6])
    vecs = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    merged, _, group = merge_centroids(vecs, np.ones(3), merge_cosine=0.85)
    assert len(merged) == 2 and group[0] != group[2]


def test_merge_keeps_fixed_clusters_apart_and_their_indices() -> None:
    rng = np.random.default_rng(6)
    a, b = unit(rng.standard_normal((2, DIM)))
    a_twin = unit(a + 0.01 * rng.standard_normal(DIM))
    vecs = np.stack([a, a_twin, b, unit(a + 0.02 * rng.standard_normal(DIM)), unit(rng.standard_normal(DIM))])
    # Rows 0-2 exist already: 0 and 1 are near-identical but must both survive.
    merged, _, group = merge_centroids(vecs, np.ones(5), merge_cosine=0.95, n_fixed=3)
    assert list(group[:3]) == [0, 1, 2]
    assert group[3] in (0, 1)  # the new near-copy of a is absorbed by an existing cluster
    assert group[4] == 3  # the distinct new one is appended
    assert len(merged) == 4


def test_assign_nearest_and_empty(centres: np.ndarray) -> None:
    x, truth = blobs(centres, 10, 0.2, seed=7)
    labels, cos = assign(centres, x, batch_size=7)
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_allclose(cos, np.sum(x * centres[labels], axis=1), atol=1e-5)
    labels, cos = assign(np.empty((0, DIM), np.float32), x)
    assert (labels == -1).all() and np.isneginf(cos).all()


def test_assign_incremental_joins_or_starts_a_category_at_once(centres: np.ndarray) -> None:
    existing, new_blob = centres[:3], centres[5]
    sizes = np.array([100, 50, 10], dtype=np.int64)
    cfg = ClusterConfig.defaults(join_cosine=0.7, merge_cosine=0.9)
    near0, _ = blobs(existing[:1], 20, 0.3, seed=8)
    novel, _ = blobs(new_blob[None], 20, 0.3, seed=9)

    # Run 1: 20 join cluster 0; the 20 novel ones fit none and start a category together, at once.
    r1 = assign_incremental(existing, sizes, np.concatenate([near0, novel]), cfg)
    assert (r1.cluster[:20] == 0).all() and (r1.cluster[20:] == 3).all()
    assert list(r1.new) == [3] and list(r1.changed) == [0]
    np.testing.assert_array_equal(r1.sizes, [120, 50, 10, 20])
    np.testing.assert_array_equal(r1.centroids[1:3], unit(existing[1:]))  # untouched clusters unchanged
    np.testing.assert_allclose(r1.centroids[0], unit(100 * existing[0] + near0.sum(0)), atol=1e-5)
    assert np.dot(r1.centroids[3], new_blob) > 0.95
    np.testing.assert_allclose(r1.sim[20:], novel @ r1.centroids[3], atol=1e-5)

    # Run 2: 15 more of the new kind join the category the first batch started.
    more, _ = blobs(new_blob[None], 15, 0.3, seed=10)
    r2 = assign_incremental(r1.centroids, r1.sizes, more, cfg)
    assert (r2.cluster == 3).all() and len(r2.new) == 0 and list(r2.changed) == [3]
    np.testing.assert_array_equal(r2.sizes, [120, 50, 10, 35])
    np.testing.assert_allclose(r2.sim, more @ r2.centroids[3], atol=1e-5)


def test_assign_incremental_seeds_close_to_existing_are_absorbed(centres: np.ndarray) -> None:
    # join_cosine so strict that nothing joins; the seed lands on cluster 1 and merges into it.
    cfg = ClusterConfig.defaults(join_cosine=0.999, merge_cosine=0.9)
    near1, _ = blobs(centres[1:2], 40, 0.2, seed=11)
    r = assign_incremental(centres[:3], np.array([5, 5, 5]), near1, cfg)
    assert len(r.new) == 0 and list(r.changed) == [1]
    assert (r.cluster == 1).all()
    np.testing.assert_array_equal(r.sizes, [5, 45, 5])


def test_assign_incremental_from_nothing_and_stable_indices(centres: np.ndarray) -> None:
    cfg = ClusterConfig.defaults(join_cosine=0.7, merge_cosine=0.9)
    x, truth = blobs(centres[:2], 30, 0.3, seed=12)
    r = assign_incremental(np.empty((0, DIM)), np.empty(0, np.int64), x, cfg)
    assert len(r.centroids) == len(r.new) >= 2
    assert adjusted_rand_score(truth, r.cluster) == 1.0
    # However few: a single image that fits nothing is a category of its own.
    r1 = assign_incremental(centres[:1], np.array([10]), x[30:31], ClusterConfig.defaults(join_cosine=0.999))
    assert list(r1.new) == [1] and list(r1.cluster) == [1] and list(r1.sizes) == [10, 1]


def test_cluster_mapping_counts() -> None:
    old = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    new = np.array([5, 5, 6, 6, 6, 7, 7, 7, 5])
    m = cluster_mapping(old, new)
    assert list(m.columns) == ["old_cluster", "new_cluster", "overlap"]
    got = {(int(o), int(n)): int(c) for o, n, c in m.itertuples(index=False)}
    assert got == {(0, 5): 2, (0, 6): 1, (1, 6): 2, (2, 7): 3, (2, 5): 1}
    assert m["overlap"].sum() == len(old)
    assert list(m["old_cluster"]) == [0, 0, 1, 2, 2] and list(m["overlap"]) == [2, 1, 2, 3, 1]
    with pytest.raises(ValueError):
        cluster_mapping(old, new[:-1])


def test_the_joined_space_weighs_labels_by_the_hierarchy() -> None:
    from lookalike.cluster import space
    from lookalike.labels.hierarchy import load

    names = list(load().names)

    def labelled(*labels: str) -> tuple[np.ndarray, np.ndarray]:
        return np.array([[names.index(label), -1] for label in labels]), np.array([[0.9, 0.0]] * len(labels))

    beagle, pug, cat, bus = space.label_vectors(*labelled("beagle", "pug", "tabby", "school bus"))
    assert beagle @ pug > beagle @ cat > beagle @ bus >= 0  # two dogs, then two carnivores, then apart
    assert not space.label_vectors(np.array([[-1, -1]]), np.zeros((1, 2))).any()  # no labels: no part

    rng = np.random.default_rng(0)
    emb = unit(rng.standard_normal((4, DIM)))
    classes, scores = labelled("beagle", "pug", "tabby", "school bus")
    for w in (0.0, 0.3, 0.75):
        joined = space.joined(emb, classes, scores, w)
        assert np.allclose(np.linalg.norm(joined, axis=1), 1, atol=1e-5)
        labels = space.label_vectors(classes, scores)
        # The joined cosine is the weighted sum of the two parts' cosines.
        expected = (1 - w) * emb @ emb.T + w * labels @ labels.T
        np.testing.assert_allclose(joined @ joined.T, expected, atol=1e-5)
    assert space.joined(emb, classes, scores, 0.0).shape == emb.shape


def test_ward_groups_is_wards_method_on_the_weighted_points() -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    rng = np.random.default_rng(7)
    means = rng.standard_normal((120, 6))
    weights = rng.integers(1, 5, len(means))
    for k in (2, 9, 40):
        # Unit weights: scipy's Ward on the points themselves; weight w: the point repeated w times.
        plain = ward_groups(means, np.ones(len(means)), k)
        assert adjusted_rand_score(fcluster(linkage(means, "ward"), k, "maxclust"), plain) == 1.0
        weighted = ward_groups(means, weights, k)
        repeated = np.repeat(means, weights, axis=0)
        assert adjusted_rand_score(fcluster(linkage(repeated, "ward"), k, "maxclust"),
                                   np.repeat(weighted, weights)) == 1.0
        assert sorted(set(weighted)) == list(range(k))
    assert list(ward_groups(means[:3], np.ones(3), 5)) == [0, 1, 2]  # fewer points than groups


def test_fit_keeps_small_groups_apart_where_kmeans_alone_splits_the_dense_one(centres: np.ndarray) -> None:
    # One dense group of 600 and five of 20: k-means with 6 centroids spends several on the dense
    # group and lumps small ones together; 18 pieces joined by Ward find the six groups.
    sizes = [600, 20, 20, 20, 20, 20]
    found = {1: 0, 3: 0}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        truth = np.repeat(np.arange(6), sizes)
        x = unit(centres[truth] + rng.standard_normal((len(truth), DIM)) * 0.4 / np.sqrt(DIM))
        for pieces in found:
            cfg = ClusterConfig.defaults(k=6, merge_cosine=1.01, fine_per_cluster=pieces, seed=seed)
            fit = fit_clusters(stream(x), len(x), cfg)
            assert fit.k_fit == 6 and len(fit.centroids) <= 6
            found[pieces] += adjusted_rand_score(truth, assign(fit.centroids, x)[0]) == 1.0
    assert found[3] >= 3 and found[3] > found[1], found
