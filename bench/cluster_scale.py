"""Clustering at archive scale: full-fit time and peak memory, incremental assignment time.

    .venv/bin/python bench/cluster_scale.py [--quick] [--n N] [--dim D] [--centres C]

Streams N synthetic embeddings (default 1M x 512, --quick 100k) with realistic structure:
C centres (default 3000) grouped under super-centres around a shared mean direction (real
CNN/CLIP embeddings all share one, pairwise cosines are mostly positive), lognormal cluster
sizes and per-cluster spreads, L2-normalised. Chunks are regenerated deterministically on every
pass, as a Parquet reader would re-read them, so no full copy of the data is ever held.
Targets on 2 cores: full fit <= 10 min and <= 8 GB peak RSS; 10k new images assigned <= 5 s.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from lookalike.cluster.algorithm import ClusterConfig, assign, assign_incremental, fit_clusters

# Synthetic embeddings have no labels: they are clustered in the embeddings-alone space, with the
# join cosine bench/cluster_quality.py's sweep 2 chose for it (conf/lookalike.toml's is for the
# space joined with labels).
EMBEDDINGS_ALONE = {"label_weight": 0.0, "join_cosine": 0.40}


@dataclass
class Synthetic:
    """A generator of clustered unit vectors; chunk i is the same array on every call."""

    centres: np.ndarray  # (C, d) float32, normalised
    spread: np.ndarray  # (C,) noise scale: member-to-centre cosine is about 1/sqrt(1 + spread^2)
    weight: np.ndarray  # (C,) probability of each centre
    seed: int

    @classmethod
    def make(cls, n_centres: int, dim: int, seed: int = 0) -> Synthetic:
        """Calibrated on EfficientNet-Lite0 features of imagenet-dev: median pairwise cosine ~0.15
        (real 0.18), norm of the mean vector ~0.4 (real 0.43), member-to-centre cosine ~0.55."""
        rng = np.random.default_rng(seed)
        common = _unit(rng.standard_normal((1, dim)))[0]
        n_super = max(1, n_centres // 20)
        supers = rng.standard_normal((n_super, dim)) / np.sqrt(dim) + 1.5 * common
        parent = rng.integers(n_super, size=n_centres)
        centres = _unit(supers[parent] + 1.5 * rng.standard_normal((n_centres, dim)) / np.sqrt(dim))
        weight = rng.lognormal(0.0, 1.0, n_centres)
        return cls(
            centres=centres, spread=rng.uniform(1.0, 2.0, n_centres), weight=weight / weight.sum(), seed=seed
        )

    def chunk(self, i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, true centre) of chunk i."""
        rng = np.random.default_rng([self.seed, i])
        labels = rng.choice(len(self.centres), size=size, p=self.weight)
        noise = rng.standard_normal((size, self.centres.shape[1]), dtype=np.float32)
        noise *= (self.spread[labels] / np.sqrt(self.centres.shape[1])).astype(np.float32)[:, None]
        return _unit(self.centres[labels] + noise), labels

    def batches(self, n: int, chunk: int = 50_000, start: int = 0) -> Callable[[], Iterator[np.ndarray]]:
        """Callable streaming chunks start.. of n vectors in total (a fresh pass on each call)."""
        sizes = [min(chunk, n - o) for o in range(0, n, chunk)]
        return lambda: (self.chunk(start + i, s)[0] for i, s in enumerate(sizes))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k vectors instead of 1M")
    ap.add_argument("--n", type=int)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centres", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    faiss.omp_set_num_threads(args.threads)
    cfg = ClusterConfig.defaults(**EMBEDDINGS_ALONE)
    data = Synthetic.make(args.centres, args.dim)
    stream = data.batches(n)

    t = time.perf_counter()
    for _ in stream():
        pass
    gen_s = time.perf_counter() - t
    print(
        f"{n} x {args.dim}, {args.centres} centres; generating one pass takes {gen_s:.1f}s "
        f"(a Parquet read stands in for it in production)"
    )

    t, c = time.perf_counter(), cpu_s()
    fit = fit_clusters(stream, n, cfg)
    fit_s, fit_cpu = time.perf_counter() - t, cpu_s() - c
    print(
        f"full fit: {fit_s:.1f}s wall ({fit_s / 60:.2f} min; {fit_cpu:.0f}s CPU on {args.threads} threads, "
        f"generating the passes included), k={fit.k_fit} -> {len(fit.sizes)} clusters after merge, "
        f"sizes median {np.median(fit.sizes):.0f} max {fit.sizes.max()}, peak RSS {peak_rss_gb():.2f} GB"
    )

    # Agreement with the generating centres on one chunk (clusters are coarser than centres).
    vecs, truth = data.chunk(0, 50_000)
    ari = adjusted_rand_score(truth, assign(fit.centroids, vecs)[0])
    print(f"ARI vs generating centres (50k sample): {ari:.3f}")

    new, _ = data.chunk(10**6, 10_000)  # chunk ids past the fitted ones: unseen vectors
    t = time.perf_counter()
    _, cos = assign(fit.centroids, new)
    assign_s = time.perf_counter() - t
    t = time.perf_counter()
    res = assign_incremental(fit.centroids, fit.sizes, new, cfg)
    inc_s = time.perf_counter() - t
    print(
        f"10k new images: assign {assign_s:.3f}s, assign_incremental {inc_s:.3f}s "
        f"({int((cos >= cfg.join_cosine).sum())} joined, {int((cos < cfg.join_cosine).sum())} fit none -> "
        f"{len(res.new)} new clusters, {len(res.changed)} clusters changed)"
    )
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
