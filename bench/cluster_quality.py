"""Clustering quality on real photos: purity / NMI against the coarse category, incremental vs full.

    .venv/bin/python bench/cluster_quality.py [--quick] [--sweep] [--data DIR]

Embeds imagenet-dev (500 photos, one per ImageNet class, 28 coarse categories) with the default
offline model (EfficientNet-Lite0, lookalike.models), caching the vectors under /tmp, then
compares, averaged over seeds: lookalike's clustering (k-means pieces + Ward + merge), plain
MiniBatchKMeans with the same k (no merging) and faiss.Kmeans with the same k.

It also measures the adjusted Rand index between incremental assignment (5 arrival batches: the
first fitted, the rest via assign_incremental) and one full clustering of the same data, next
to two ceilings: the ARI between two full clusterings with different seeds, and how much a
deterministic clustering (Ward) changes when it sees 80% or the first fifth of the images
(subset_stability). imagenet-dev has no stable partition (one photo per class; Ward stays
near 0.2-0.4 at 3 to 45 clusters), so the same is measured on
synthetic embeddings with real cluster structure (bench/cluster_scale.py's generator), and
with should_refit's policy. --sweep prints the grids the defaults were chosen on (~5 min).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from sklearn.cluster import AgglomerativeClustering, MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from cluster_scale import EMBEDDINGS_ALONE, Synthetic

from lookalike.cluster.algorithm import (
    ClusterConfig,
    assign,
    assign_incremental,
    derive_k,
    fit_clusters,
    should_refit,
)
from lookalike.models.registry import resolve_model
from lookalike.models.runtime import get_embedder

DATA = Path("/work/shared/data/imagenet-dev")
CACHE = Path("/tmp/lookalike-bench")
MODEL = "effnet-lite0"


def embed_folder(paths: list[Path]) -> np.ndarray:
    """L2-normalised embeddings of image files with the default offline model, cached under /tmp."""
    key = hashlib.sha1("\n".join(str(p) for p in paths).encode()).hexdigest()[:12]
    cache = CACHE / f"{MODEL}-{key}.npy"
    if cache.exists():
        return np.load(cache)
    t = time.perf_counter()
    images = [Image.open(p).convert("RGB") for p in paths]
    vecs = get_embedder(resolve_model(MODEL), verify_images=images[:8]).embed_images(images)
    print(f"embedded {len(paths)} images with {MODEL} in {time.perf_counter() - t:.1f}s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return vecs


def purity(truth: np.ndarray, labels: np.ndarray) -> float:
    _, t = np.unique(truth, return_inverse=True)
    _, lab = np.unique(labels, return_inverse=True)
    table = np.zeros((lab.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (lab, t), 1)
    return float(table.max(axis=1).sum() / len(truth))


def batches_of(x: np.ndarray, size: int = 128) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (x[i : i + size] for i in range(0, len(x), size))


def run_ours(x: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    return assign(fit_clusters(batches_of(x), len(x), cfg).centroids, x)[0]


def run_mbk(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    return MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed).fit(x).labels_


def run_faiss(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def run_incremental(x: np.ndarray, cfg: ClusterConfig, n_batches: int = 5, refit: bool = False) -> np.ndarray:
    """Catalog labels after x arrived in n_batches: the first fitted, the rest incremental.

    refit: follow should_refit, i.e. fit everything seen so far again whenever it has doubled.
    """
    parts = np.array_split(np.arange(len(x)), n_batches)
    labels = np.full(len(x), -1, dtype=np.int64)
    n_fit = 0
    for i, part in enumerate(parts):
        seen = np.concatenate(parts[: i + 1])
        if i == 0 or (refit and should_refit(n_fit, len(seen), cfg)):
            fit = fit_clusters(batches_of(x[seen]), len(seen), cfg)
            labels[seen] = assign(fit.centroids, x[seen])[0]
            cents, sizes, n_fit = fit.centroids, fit.sizes, len(seen)
            continue
        res = assign_incremental(cents, sizes, x[part], cfg)
        labels[part] = res.cluster
        cents, sizes = res.centroids, res.sizes
    return labels


@dataclass
class Stats:
    """Per-seed figures of one configuration on one data set."""

    clusters: list[int] = field(default_factory=list)
    purity: list[float] = field(default_factory=list)
    nmi: list[float] = field(default_factory=list)
    inc_clusters: list[int] = field(default_factory=list)
    inc_nmi: list[float] = field(default_factory=list)
    ari_inc_full: list[float] = field(default_factory=list)  # incremental vs full, same seed
    ari_full_full: list[float] = field(default_factory=list)  # full vs full, next seed: the ceiling
    ari_refit_full: list[float] = field(default_factory=list)  # incremental + should_refit vs full

    def mean(self, name: str) -> float:
        return float(np.mean(getattr(self, name)))


def evaluate(
    x: np.ndarray,
    truth: np.ndarray,
    cfg: ClusterConfig,
    seeds: list[int],
    incremental: bool = True,
    refit: bool = False,
) -> Stats:
    """Full fit (and incremental arrival) per seed; each seed also shuffles the arrival order."""
    st = Stats()
    fulls = []
    for s in seeds:
        perm = np.random.default_rng(s).permutation(len(x))
        c = replace(cfg, seed=s)
        full = np.empty(len(x), dtype=np.int64)
        full[perm] = run_ours(x[perm], c)
        fulls.append(full)
        st.clusters.append(len(np.unique(full)))
        st.purity.append(purity(truth, full))
        st.nmi.append(normalized_mutual_info_score(truth, full))
        if incremental:
            inc = np.empty(len(x), dtype=np.int64)
            inc[perm] = run_incremental(x[perm], c)
            st.inc_clusters.append(len(np.unique(inc)))
            st.inc_nmi.append(normalized_mutual_info_score(truth, inc))
            st.ari_inc_full.append(adjusted_rand_score(full, inc))
        if refit:
            inc = np.empty(len(x), dtype=np.int64)
            inc[perm] = run_incremental(x[perm], c, refit=True)
            st.ari_refit_full.append(adjusted_rand_score(full, inc))
    st.ari_full_full = [adjusted_rand_score(a, b) for a, b in itertools.pairwise(fulls)]
    return st


def compare(x: np.ndarray, truth: np.ndarray, cfg: ClusterConfig, seeds: list[int]) -> None:
    k = derive_k(len(x), cfg)
    rows: dict[str, list[tuple[float, float, int]]] = {
        "lookalike (pieces + Ward + merge)": [],
        f"MiniBatchKMeans k={k}": [],
        f"faiss.Kmeans k={k}": [],
    }
    for s in seeds:
        perm = np.random.default_rng(s).permutation(len(x))
        xs, ts = x[perm], truth[perm]
        labels = (run_ours(xs, replace(cfg, seed=s)), run_mbk(xs, k, s), run_faiss(xs, k, s))
        for name, lab in zip(rows, labels, strict=True):
            rows[name].append((purity(ts, lab), normalized_mutual_info_score(ts, lab), len(np.unique(lab))))
    print(
        f"\n== imagenet-dev: {len(x)} images, {len(np.unique(truth))} coarse categories, {len(seeds)} seeds"
    )
    print(f"{'method':26s} {'purity':>13s} {'NMI':>13s} {'clusters':>9s}")
    for name, vals in rows.items():
        a = np.array(vals)
        print(
            f"{name:26s} {a[:, 0].mean():6.3f} ±{a[:, 0].std():.3f}"
            f" {a[:, 1].mean():6.3f} ±{a[:, 1].std():.3f} {a[:, 2].mean():9.1f}"
        )


def report_incremental(name: str, st: Stats, truth_name: str) -> None:
    print(f"incremental (5 arrival batches) vs one full clustering, {name}:")
    print(
        f"  ARI incremental vs full {st.mean('ari_inc_full'):.3f} (min {min(st.ari_inc_full):.3f}); "
        f"ceiling = ARI full vs full with another seed {st.mean('ari_full_full'):.3f}"
    )
    print(
        f"  clusters full {st.mean('clusters'):.1f} / incremental {st.mean('inc_clusters'):.1f}; "
        f"NMI vs {truth_name} full {st.mean('nmi'):.3f} / incremental {st.mean('inc_nmi'):.3f}"
    )
    refit = st.mean("ari_refit_full")
    print(f"  with should_refit (a full fit whenever the collection doubled): ARI {refit:.3f}")


def subset_stability(x: np.ndarray, clusters: int, seeds: list[int]) -> tuple[float, float]:
    """How far any clustering that sees part of the data can agree with one that sees all of it.

    Ward agglomerative clustering is deterministic (no seed, no arrival order), so it isolates
    the data's own stability: Ward on all images vs Ward on a random 80% of them, ARI on the
    images both saw; and Ward on the first 20% (the first arrival batch) with every other image
    given the nearest of its centroids, ARI on all images.
    """
    ward = AgglomerativeClustering(n_clusters=clusters, linkage="ward")
    full = ward.fit_predict(x)
    most, first = [], []
    for s in seeds:
        perm = np.random.default_rng(s).permutation(len(x))
        sub = perm[: int(0.8 * len(x))]
        most.append(adjusted_rand_score(full[sub], ward.fit_predict(x[sub])))
        sub = perm[: len(x) // 5]
        lab = ward.fit_predict(x[sub])
        centroids = np.stack([x[sub][lab == c].mean(axis=0) for c in range(lab.max() + 1)])
        first.append(adjusted_rand_score(full, assign(centroids / np.linalg.norm(centroids, axis=1,
                                                                                  keepdims=True), x)[0]))
    return float(np.mean(most)), float(np.mean(first))


def structured(n: int = 20_000, centres: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings with real cluster structure (bench/cluster_scale.py's generator)."""
    return Synthetic.make(centres, 512, seed=1).chunk(0, n)


def sweep(
    x: np.ndarray, truth: np.ndarray, sx: np.ndarray, struth: np.ndarray, cfg: ClusterConfig, seeds: list[int]
) -> None:
    print("\n== sweep 1: k rule x merge_cosine, imagenet-dev (MBK column: plain MiniBatchKMeans, same k)")
    print(
        f"{'k/sqrt(n)':>9s} {'merge':>6s} {'k':>4s} {'clusters':>8s} {'purity':>7s} {'NMI':>6s}"
        f" {'MBK NMI':>8s} {'nn-centroid cos':>15s}"
    )
    for kf in (0.5, 1.0, 2.0, 4.0):
        k = derive_k(len(x), replace(cfg, k_per_sqrt_n=kf))
        mbk = np.mean([normalized_mutual_info_score(truth, run_mbk(x, k, s)) for s in seeds])
        for mc in (0.75, 0.8, 0.85, 0.9, 1.01):
            c = replace(cfg, k_per_sqrt_n=kf, merge_cosine=mc)
            st = evaluate(x, truth, c, seeds, incremental=False)
            # Median cosine of each unmerged centroid to its nearest other: rises with cluster size.
            nn = ""
            if mc > 1:
                fit = fit_clusters(batches_of(x), len(x), c)
                cc = fit.centroids @ fit.centroids.T
                np.fill_diagonal(cc, -1)
                nn = f"{np.median(cc.max(axis=1)):.3f}"
            print(
                f"{kf:9.1f} {mc:6.2f} {k:4d} {st.mean('clusters'):8.1f} {st.mean('purity'):7.3f}"
                f" {st.mean('nmi'):6.3f} {mbk:8.3f} {nn:>15s}"
            )
    print("\n== sweep 2: join_cosine (k rule, merge at defaults); ARI = incremental vs full")
    print(
        f"{'join':>5s} | imagenet-dev: {'ARI':>5s} {'clusters':>8s} {'NMI':>6s}"
        f" | structured: {'ARI':>5s} {'clusters':>8s}"
    )
    for jc in (0.35, 0.4, 0.45, 0.5):
        c = replace(cfg, join_cosine=jc)
        a, b = evaluate(x, truth, c, seeds), evaluate(sx, struth, c, seeds[:1])
        print(
            f"{jc:5.2f} | {'':13s} {a.mean('ari_inc_full'):5.3f} {a.mean('inc_clusters'):8.1f}"
            f" {a.mean('inc_nmi'):6.3f} | {'':11s} {b.mean('ari_inc_full'):5.3f}"
            f" {b.mean('inc_clusters'):8.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--quick", action="store_true", help="2 seeds instead of 5")
    ap.add_argument("--sweep", action="store_true", help="also print the grids the defaults were chosen on")
    args = ap.parse_args()
    faiss.omp_set_num_threads(2)
    with open(args.data / "categories.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    x = embed_folder([args.data / r["file"] for r in meta])
    truth = np.array([r["category"] for r in meta])
    sx, struth = structured()
    seeds = list(range(2 if args.quick else 5))
    cfg = ClusterConfig.defaults(**EMBEDDINGS_ALONE)  # embeddings without labels
    t = time.perf_counter()
    print(cfg)
    compare(x, truth, cfg, seeds)
    st = evaluate(x, truth, cfg, seeds, refit=True)
    report_incremental("imagenet-dev", st, "coarse category")
    most, first = subset_stability(x, round(st.mean("clusters")), seeds)
    print(
        f"  the data's own ceiling, deterministic Ward with as many clusters: ARI {most:.3f} between all"
        f" images and 80% of them; {first:.3f} between all and the first fifth + nearest centroid"
    )
    print(
        f"\n== structured embeddings: {len(sx)} x {sx.shape[1]}, {len(np.unique(struth))} generating centres"
    )
    report_incremental("structured", evaluate(sx, struth, cfg, seeds[:2], refit=True), "generating centre")
    if args.sweep:
        sweep(x, truth, sx, struth, cfg, seeds)
    print(f"\nbench time {time.perf_counter() - t:.0f}s")


if __name__ == "__main__":
    main()
