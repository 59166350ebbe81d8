"""Build a catalog of N images (default 1,000,000) through the product's own load path, for
measuring the analyst surfaces at scale (#21).

    python bench/big_catalog.py --home /data/big [--n 1000000] [--weeks 8] [--seed 0]

Every manifest goes through lookalike.driver.ingest.Ingest.process, the function a run uses:
the same binary COPY into the catalog, the same near-duplicate search and clustering, the same
category names, one transaction a manifest. Only the two Spark stages are replaced: the files'
features and vectors are synthetic, but shaped like a real archive's:
  - vectors of the default model's dimension drawn around a few thousand centres of Zipf-like
    sizes (members at cosine ~0.7 to one another, unrelated pairs ~0.2), with each centre's top-5
    ImageNet labels, so categories get real names;
  - planted near-duplicate groups (a few pHash bits and a small vector change from an earlier
    image) and exact copies (the same bytes at another path, several paths per image);
  - thumbnails pointing at a small pool of real ones made from ../shared/data/imagenet-dev;
  - a few hundred ingest errors, EXIF-like capture times and cameras, several runs over
    simulated weeks.
It prints each run's time, the vector index build, and the catalog's size on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from lookalike import db
from lookalike.config import Config, load_config
from lookalike.db import runs, vector_index
from lookalike.driver.ingest import Ingest, RunSummary
from lookalike.labels.hierarchy import load as load_hierarchy
from lookalike.models.registry import ModelSpec
from lookalike.stages import schemas
from lookalike.stages.extract import ExtractSettings, extract_file, features_frame

HERE = Path(__file__).resolve().parent
IMAGENET = HERE.parent.parent / "shared" / "data" / "imagenet-dev"
MANIFEST_FILES = 20_000
CAMERAS = [("Canon", "EOS R5"), ("NIKON CORPORATION", "NIKON Z 6_2"), ("SONY", "ILCE-7M4"),
           ("Apple", "iPhone 14 Pro"), ("FUJIFILM", "X-T5")]


class SyntheticArchive:
    """Files 0..n-1 of a synthetic archive: what the extract and embed stages would have made."""

    def __init__(self, n: int, dim: int, seed: int, thumbs: list[str], centres: int = 3000,
                 near_dup_share: float = 0.03, copy_share: float = 0.02, errors: int = 300) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.dim, self.seed, self.thumbs = n, dim, seed, thumbs
        self.centres = rng.standard_normal((centres, dim)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        sizes = 1.0 / np.arange(1, centres + 1) ** 0.8  # a few large categories, a long tail
        self.centre_of = rng.choice(centres, n, p=sizes / sizes.sum())
        # Each centre's labels: 5 classes under one node of 5-60 classes (dogs, birds, vehicles, ...),
        # as a real category's members share a part of the hierarchy.
        nodes = [ix for ix in load_hierarchy().members.values() if 5 <= len(ix) <= 60]
        self.centre_classes = np.stack([rng.choice(nodes[int(rng.integers(0, len(nodes)))], 5, replace=False)
                                        for _ in range(centres)])
        # Which earlier file each file repeats: exactly (the same bytes) or nearly (a variant).
        kind = rng.random(n)
        self.copy_of = np.full(n, -1)
        self.near_of = np.full(n, -1)
        for i in np.flatnonzero((kind < copy_share) & (np.arange(n) > 10)):
            self.copy_of[i] = rng.integers(0, i)
        for i in np.flatnonzero((kind >= copy_share) & (kind < copy_share + near_dup_share)
                                & (np.arange(n) > 10)):
            self.near_of[i] = rng.integers(max(0, i - 50_000), i)  # near in time, as re-saves are
        self.bad = set(rng.choice(n, min(errors, n), replace=False).tolist())
        self.start = datetime(2021, 1, 1, tzinfo=UTC)

    # -- one file ------------------------------------------------------------------------
    def identity(self, i: int) -> int:
        """The file whose bytes file i holds (itself, or the one it is an exact copy of)."""
        while self.copy_of[i] >= 0:
            i = int(self.copy_of[i])
        return i

    @staticmethod
    def sha(i: int) -> str:
        return hashlib.sha256(f"synthetic image {i}".encode()).hexdigest()

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    def phash(self, i: int) -> int:
        if self.near_of[i] >= 0:  # a variant: a few bits from its original
            base = self.phash(int(self.near_of[i]))
            flips = self._rng(i).choice(64, int(self._rng(i).integers(1, 4)), replace=False)
            for bit in flips:
                base ^= 1 << int(bit)
            return int(np.int64(np.uint64(base & (2**64 - 1))))
        return int(self._rng(i).integers(-(2**63), 2**63 - 1))

    def vector(self, i: int) -> np.ndarray:
        rng = self._rng(i)
        if self.near_of[i] >= 0:
            v = self.vector(int(self.near_of[i])) + 0.08 * rng.standard_normal(self.dim) / math.sqrt(self.dim)
        else:
            v = self.centres[self.centre_of[i]] + 0.65 * rng.standard_normal(self.dim) / math.sqrt(self.dim)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def feature_row(self, i: int, week: int) -> dict:
        row = dict.fromkeys(schemas.FEATURES.names)
        rng = self._rng(i)
        mtime = self.start + timedelta(weeks=week, seconds=int(rng.integers(0, 7 * 86400)))
        row.update(path=f"/archive/week{week:03d}/{i // 1000:04d}/IMG_{i:07d}.jpg",
                   bytes=int(rng.integers(10, 50) << 20), mtime=mtime)
        if i in self.bad:
            row.update(error="decode", message="cannot decode: broken data stream when reading image file")
            return row
        same = self.identity(i)
        r = self._rng(same)
        make, model = CAMERAS[int(r.integers(0, len(CAMERAS)))]
        row.update(sha256=self.sha(same), width=6000, height=4000, format="JPEG", phash=self.phash(same),
                   dhash=int(r.integers(-(2**63), 2**63 - 1)), ahash=int(r.integers(-(2**63), 2**63 - 1)),
                   phash_dihedral=[int(x) for x in r.integers(-(2**63), 2**63 - 1, 7)],
                   thumb=self.thumbs[same % len(self.thumbs)],
                   taken_at=self.start - timedelta(days=int(r.integers(0, 5 * 365))),
                   taken_at_source="exif", camera_make=make, camera_model=model, orientation=1,
                   decode_path="decode", bytes=int(r.integers(10, 50) << 20))
        return row

    def labels(self, i: int) -> tuple[list[int], list[float]]:
        """The top 5 classes of file i: its centre's, in an order and with scores of its own."""
        rng = self._rng(i)
        classes = self.centre_classes[self.centre_of[i]].copy()
        rng.shuffle(classes[1:])
        scores = np.sort(rng.dirichlet(np.ones(6) * 0.7)[:5])[::-1]
        scores[0] = max(scores[0], 0.35)
        return [int(c) for c in classes], [float(s) for s in scores]


class SyntheticStages:
    """Stands in for driver.stages.SparkStages: the extract and embed outputs of a manifest."""

    def __init__(self, archive: SyntheticArchive, manifests: dict[str, tuple[range, int]]) -> None:
        self.archive = archive
        self.manifests = manifests  # manifest_id -> (file indices, week)
        self.index_of: dict[str, int] = {}

    def extract(self, manifest_id: str) -> pa.Table:
        files, week = self.manifests[manifest_id]
        rows = [self.archive.feature_row(i, week) for i in files]
        for i, row in zip(files, rows, strict=True):
            if row["sha256"] is not None:
                self.index_of[row["sha256"]] = self.archive.identity(i)
        return pa.Table.from_pandas(features_frame(rows), schema=schemas.FEATURES, preserve_index=False)

    def embed(self, name: str, rows: pa.Table, spec: ModelSpec) -> pa.Table:
        idx = [self.index_of[s] for s in rows["sha256"].to_pylist()]
        vectors = (np.stack([self.archive.vector(i) for i in idx]) if idx
                   else np.empty((0, spec.dim), np.float32))
        offsets = pa.array(np.arange(len(idx) + 1, dtype=np.int32) * spec.dim)
        labelled = [self.archive.labels(i) for i in idx]
        return pa.table({
            "sha256": rows["sha256"],
            "model_ver": pa.array([spec.model_ver] * len(idx), pa.string()),
            "vector": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32())),
            "error": pa.nulls(len(idx), pa.string()),
            "message": pa.nulls(len(idx), pa.string()),
            "labels": pa.array([c for c, _ in labelled], pa.list_(pa.int16())),
            "label_scores": pa.array([s for _, s in labelled], pa.list_(pa.float32())),
        })


def thumbnail_pool(thumbs_dir: Path, count: int) -> list[str]:
    """Real thumbnails (made by the extract stage) of `count` imagenet-dev photos."""
    settings = ExtractSettings(str(thumbs_dir))
    pool = []
    for photo in sorted(IMAGENET.glob("*.JPEG"))[:count]:
        row = extract_file(str(photo), settings)
        if row["error"] is None:
            pool.append(row["thumb"])
    return pool


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(cfg: Config, n: int, weeks: int = 8, seed: int = 0, thumbnails: int = 64,
          say: Callable[[str], None] = print) -> RunSummary:
    """Catalog n synthetic files into cfg's (new) catalog, one run a simulated week; returns the
    totals. Used by main() and by the tests' small synthetic catalog."""
    with db.writer(cfg, create=True) as (conn, vector_type):
        if conn.execute("SELECT count(*) FROM images").fetchone()[0]:
            raise SystemExit(f"{cfg.home} already holds a catalog: give a new home")
        ingest = Ingest(cfg, conn, vector_type, runs.catalog_store(conn, cfg))
        spec = ingest.model
        pool = thumbnail_pool(ingest.layout.thumbs, thumbnails)
        archive = SyntheticArchive(n, spec.dim, seed, pool, centres=min(3000, max(10, n // 50)),
                                   errors=min(300, max(3, n // 1000)))
        per_week = math.ceil(n / weeks)
        total = RunSummary()
        for week in range(weeks):
            week_files = range(week * per_week, min(n, (week + 1) * per_week))
            if not week_files:
                break
            run_started = time.monotonic()
            with runs.recorded_run(conn, "run", [f"/archive/week{week:03d}"]) as run_id:
                manifests = {}
                for k, first in enumerate(range(week_files.start, week_files.stop, MANIFEST_FILES)):
                    files = range(first, min(week_files.stop, first + MANIFEST_FILES))
                    manifest_id = f"r{run_id:06d}-{k:04d}"
                    runs.register_manifest(conn, manifest_id, run_id, len(files), 0)
                    manifests[manifest_id] = (files, week)
                ingest.stages = SyntheticStages(archive, manifests)  # type: ignore[assignment]
                summary = RunSummary(run_id=run_id, manifests=len(manifests))
                for manifest_id in manifests:
                    summary.counts.add(ingest.process(manifest_id, run_id))
                summary.seconds = time.monotonic() - run_started
                with conn.transaction():
                    runs.finish_run(conn, run_id, summary.as_dict())
            total.counts.add(summary.counts)
            say(f"week {week}: {len(week_files)} files, {summary.counts.new_images} new images, "
                f"{summary.counts.exact_copies} exact copies, {summary.counts.errors} errors "
                f"in {summary.seconds:.0f} s")
        index_started = time.monotonic()
        if vector_type == "vector":
            vector_index.ensure_index(conn, spec.model_ver, spec.dim)
        total.seconds = time.monotonic() - index_started  # the vector index's build
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a new catalog home")
    ap.add_argument("--n", type=int, default=1_000_000, help="files (default 1,000,000)")
    ap.add_argument("--weeks", type=int, default=8, help="runs, one per simulated week (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="TOML overriding conf/lookalike.toml (as for a run)")
    a = ap.parse_args()
    cfg = load_config(a.config, a.home)
    started = time.monotonic()
    total = build(cfg, a.n, a.weeks, a.seed, say=lambda line: print(line, flush=True))
    loaded = time.monotonic() - started - total.seconds
    with db.connect(cfg) as conn:
        database = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    c = total.counts
    print(f"built {a.n:,} files ({c.new_images:,} images, {c.exact_copies:,} exact copies, {c.errors} "
          f"errors) in {loaded:.0f} s + vector index {total.seconds:.0f} s")
    print(f"on disk: database {database / 2**30:.2f} GiB, near-duplicate indexes "
          f"{folder_bytes(cfg.home / 'index') / 2**30:.2f} GiB, thumbnails: a pool of 64 real ones shared")


if __name__ == "__main__":
    main()
