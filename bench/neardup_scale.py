"""Scale bench of the production dedup path: a batch of new images against catalogs of 1M and 5M.

    python bench/neardup_scale.py [--quick] [--sizes N ...] [--batch 10000] [--dim 1280]
    python bench/neardup_scale.py --pg-fetch 100000            # stored-vector fetch from PostgreSQL
    python bench/neardup_scale.py --compare-hash [--sizes N]   # binary index types, exactness
    python bench/neardup_scale.py --compare-vector [--sizes N] # VectorIndex recall vs exact
    python bench/neardup_scale.py --calibrate ND_DIR           # distances per variant
        ND_DIR: python ../shared/tools/make_neardup_set.py ../shared/data/imagenet-dev ND_DIR --bases 40

Catalogs are drawn to look like a real archive, not uniform noise:
- pHashes are computed (vectorised, same DCT definition as imagehash) from random crops of the
  real photos in shared/data (ImageNet dev set and the high-res photos), flipped at random;
  catalog hashes are such real-crop hashes with a few random bits changed (never the DC bit).
  (Chance matches between crops of different photos: --calibrate prints them per radius.)
- Embeddings follow a Gaussian model fitted to 4000 EfficientNet-Lite0 embeddings of crops of
  the same photos: the mean vector's norm, and per-principal-axis variance profiles of the whole
  set, of crops of the same photo (one "scene") and of near-duplicate pairs (orig vs resized,
  recompressed, recoloured, watermarked... copies), interpolated log-log at a few knots. Items
  are scene centre + within-scene noise; near-duplicates add the near-duplicate noise profile.
  (Cosines: unrelated median 0.23, same scene 0.72, near-duplicates 0.85-0.995, as measured.)

Each size runs in two child processes so that figures are not mixed up. `build` generates the
catalog chunk by chunk into the production indexes (dedup.new_vector_index, as a rebuild from
the catalog makes them), saves them with DedupIndexes.save under <work>/index, and writes every
catalog vector as float32 to a .npy file. `query` loads them with DedupIndexes.load, as a run
does, and times dedup.find_pairs on a batch of new images (30% planted near-duplicates of
catalog images, some flipped or rotated), then DedupIndexes.commit. find_pairs reads the stored
vectors of candidates near min_cosine: PostgreSQL is stood in for by rows of that float32 file
(a pread per vector, from page cache or disk; no SQL). What the real fetch costs per vector is
measured apart with --pg-fetch (binary COPY from the embedded PostgreSQL); given --pg-ms, the
summary adds it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.db.vector_io import vector_to_db
from lookalike.dedup.indexes import EXACT_UP_TO, DedupIndexes, new_vector_index
from lookalike.dedup.pairs import NearDupConfig, NewImages, find_pairs
from lookalike.index.hamming import HashIndex, hash_to_bytes
from lookalike.index.ivf import TRAIN_SAMPLE, VectorIndex, _default_nlist

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# --------------------------------------------------------------------------- realistic pHashes

# numpy versions of hashing.DIHEDRAL on (..., H, W) arrays (checked against PIL in the tests'
# spirit: identical pixels), so a crop's 8 orientations cost one DCT each, not a PIL transpose.
_DIHEDRAL_NP = (
    lambda a: a,
    lambda a: a[..., :, ::-1],
    lambda a: a[..., ::-1, :],
    lambda a: np.rot90(a, 1, axes=(-2, -1)),
    lambda a: np.rot90(a, 2, axes=(-2, -1)),
    lambda a: np.rot90(a, 3, axes=(-2, -1)),
    lambda a: np.swapaxes(a, -1, -2),
    lambda a: np.swapaxes(np.rot90(a, 2, axes=(-2, -1)), -1, -2),
)


def _compose_table() -> np.ndarray:
    """table[a, b] = c where applying transform a then b equals transform c (0 = identity)."""
    x = np.arange(16.0).reshape(4, 4)
    imgs = [f(x) for f in _DIHEDRAL_NP]
    return np.array([[next(c for c, y in enumerate(imgs) if np.array_equal(fb(fa(x)), y))
                      for fb in _DIHEDRAL_NP] for fa in _DIHEDRAL_NP])


COMPOSE = _compose_table()


def load_photo_integrals(max_side: int = 192) -> list[np.ndarray]:
    """Summed-area tables of the real photos in shared/data, grayscale, longest side max_side."""
    files = sorted((DATA / "imagenet-dev").glob("*.JPEG")) + sorted((DATA / "photos-hires").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no photos under {DATA}")
    out = []
    for f in files:
        with Image.open(f) as im:
            im.draft("L", (2 * max_side, 2 * max_side))
            g = im.convert("L")
        g.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        a = np.asarray(g, dtype=np.float64)
        out.append(np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0))))
    return out


# The 8 lowest DCT-II basis rows for 32 samples, unnormalised like scipy.fft.dct (type 2):
# pHash only reads the top-left 8x8 coefficients, so two small matmuls replace two full DCTs.
_DCT8 = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)


def phash_arrays(arr: np.ndarray) -> np.ndarray:
    """imagehash.phash of (n, 32, 32) grayscale arrays (its own 32x32 input) as signed int64."""
    low = (_DCT8 @ arr.astype(np.float64) @ _DCT8.T).reshape(len(arr), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64).view(np.int64)


def crop_hashes(integrals: list[np.ndarray], n: int, rng: np.random.Generator,
                sources: list[np.ndarray] | None = None) -> np.ndarray:
    """(n, 8) pHashes of random crops (35-100% of each side) of the real photos, randomly mirrored:
    column 0 is the crop's pHash, columns 1..7 those of its DIHEDRAL transforms. The photo each
    crop comes from is appended to `sources` when given."""
    src = rng.integers(0, len(integrals), n)
    arr = np.empty((n, 32, 32), np.float32)
    grid = np.arange(33) / 32
    for s in np.unique(src):
        rows = np.flatnonzero(src == s)
        integ = integrals[s]
        h, w = integ.shape[0] - 1, integ.shape[1] - 1
        size = rng.uniform(0.35, 1.0, (len(rows), 2)) * (h, w)
        corner = rng.random((len(rows), 2)) * ((h, w) - size)
        ys = np.round(corner[:, :1] + size[:, :1] * grid).astype(np.int64)
        xs = np.round(corner[:, 1:] + size[:, 1:] * grid).astype(np.int64)
        cum = integ[ys[:, :, None], xs[:, None, :]]  # box sums by the summed-area table: area means
        sums = cum[:, 1:, 1:] - cum[:, :-1, 1:] - cum[:, 1:, :-1] + cum[:, :-1, :-1]
        area = np.diff(ys, axis=1)[:, :, None] * np.diff(xs, axis=1)[:, None, :]
        arr[rows] = sums / np.maximum(area, 1)
    mirror = rng.random(n) < 0.5
    arr[mirror] = arr[mirror, :, ::-1]
    if sources is not None:
        sources.append(src)
    return np.stack([phash_arrays(np.ascontiguousarray(f(arr))) for f in _DIHEDRAL_NP], axis=1)


def flip_bits(hashes: np.ndarray, nbits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each hash with nbits[i] distinct random bits flipped, never bit 63 (pHash's DC term)."""
    nbits = np.broadcast_to(nbits, hashes.shape)
    keys = rng.random((len(hashes), 63))
    ranks = keys.argsort(axis=1).argsort(axis=1)
    flips = ranks < nbits[:, None]
    masks = (flips.astype(np.uint64) << np.arange(63, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    return (hashes.view(np.uint64) ^ masks).view(np.int64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a.view(np.uint64) ^ b.view(np.uint64)).astype(np.int64)


# --------------------------------------------------------------------------- realistic embeddings

# log10 of the per-principal-axis variance of EfficientNet-Lite0 embeddings at axis ranks KNOTS
# (of 1280), measured on 4000 crops of the photos in shared/data (geometric-mean smoothed):
# all crops, crop minus its photo's mean ("within a scene"), and near-duplicate differences
# (variant minus original for resize/jpeg/crop90/bright/colour/watermark/png/hflip copies).
KNOTS = np.array([1, 2, 3, 5, 9, 16, 27, 47, 82, 142, 246, 426, 738, 1280])
LOG_VAR = {
    "total": (-1.83, -1.86, -1.88, -2.03, -2.12, -2.21, -2.33,
              -2.48, -2.65, -2.87, -3.15, -3.49, -3.90, -4.40),
    "within": (-2.64, -2.69, -2.74, -2.92, -2.92, -2.97, -3.05,
               -3.14, -3.24, -3.37, -3.53, -3.70, -3.98, -4.44),
    "dup": (-3.18, -3.10, -3.12, -3.63, -3.50, -3.70, -3.72,
            -3.82, -3.90, -3.99, -4.12, -4.26, -4.36, -4.43),
}
TOTAL_VAR = {"total": 0.768, "within": 0.261, "dup": 0.081}  # summed over axes
MEAN_NORM = 0.48  # norm of the mean embedding: unrelated photos have cosine ~0.23


class EmbeddingModel:
    """Gaussian model of real embeddings: scene centres, photos around them, near-duplicates."""

    def __init__(self, dim: int, n_scenes: int, seed: int) -> None:
        rank = np.log(np.arange(1, dim + 1) * 1280 / dim)
        sd = {}
        for k, logv in LOG_VAR.items():
            v = 10 ** np.interp(rank, np.log(KNOTS), logv)
            sd[k] = v * TOTAL_VAR[k] / v.sum()
        self.sd_within = np.sqrt(sd["within"]).astype(np.float32)
        self.sd_dup = np.sqrt(sd["dup"]).astype(np.float32)
        sd_between = np.sqrt(np.maximum(sd["total"] - sd["within"], 0.05 * sd["total"])).astype(np.float32)
        rng = np.random.default_rng(seed)
        # The mean sits mostly on the high-variance axes (measured: 28% of its energy on the top 10).
        mean = sd["total"] ** 0.75 * rng.choice([-1.0, 1.0], dim)
        mean *= MEAN_NORM / np.linalg.norm(mean)
        offsets = sd_between * rng.standard_normal((n_scenes, dim), np.float32)
        self.centres = (mean + offsets).astype(np.float32)
        self.dim = dim

    def photos(self, scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Photos stray from their scene by varying amounts (lognormal): same-scene cosines then
        # spread 0.54 / 0.72 / 0.84 (10th / 50th / 90th percentile), measured 0.56 / 0.73 / 0.85.
        spread = np.exp(rng.normal(0.0, 0.4, (len(scene), 1))).astype(np.float32)
        noise = rng.standard_normal((len(scene), self.dim), np.float32)
        return nd_normalize(self.centres[scene] + spread * self.sd_within * noise)

    def near_dups(self, x: np.ndarray, strength: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Copies of x; strength 1 is the measured average near-duplicate (cosine ~0.96)."""
        noise = self.sd_dup * rng.standard_normal(x.shape, np.float32)
        return nd_normalize(x + np.asarray(strength, np.float32).reshape(-1, 1) * noise)


def nd_normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# --------------------------------------------------------------------------- catalog and batch

CHUNK = 100_000
POOL = 100_000  # real-crop pHashes; catalog images beyond it are derived from them


def catalog_hashes(pool: np.ndarray, start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
    """pHashes of catalog images start..stop-1. Image i < len(pool) is the crop pool[i] itself,
    a couple of bits off (an "original"); later ones are 8-16 bits off pool[i % len(pool)]:
    other photos with the same bit statistics."""
    i = np.arange(start, stop)
    nbits = np.where(i < len(pool), rng.integers(0, 3, len(i)), rng.integers(8, 17, len(i)))
    return flip_bits(pool[i % len(pool), 0], nbits, rng)


def catalog_chunk(model: EmbeddingModel, pool: np.ndarray, start: int, stop: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Catalog images start..stop-1 as (ids start+1..stop, phash, vectors), reproducibly."""
    rng = np.random.default_rng([seed, start])
    phash = catalog_hashes(pool, start, stop, rng)
    vecs = model.photos(rng.integers(0, len(model.centres), stop - start), rng)
    return np.arange(start + 1, stop + 1), phash, vecs


def make_batch(model: EmbeddingModel, integrals: list[np.ndarray], pool: np.ndarray, partners: dict,
               n_catalog: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """New images: 25% near-duplicates of catalog originals, 5% flipped/rotated copies, the rest
    fresh crops and photos. `partners` has the originals' ids, phash and vectors."""
    rng = np.random.default_rng([seed, 999])
    n_dup, n_rot = size // 4, size // 20
    n_fresh = size - n_dup - n_rot
    pid, pph, pvec = partners["ids"], partners["phash"], partners["vecs"]
    root = pid - 1  # originals are images i < len(pool): their crop is pool[i]
    d = slice(0, n_dup)
    r = slice(n_dup, n_dup + n_rot)
    nbits = np.where(rng.random(n_dup) < 0.9, rng.integers(0, 7, n_dup), rng.integers(7, 11, n_dup))
    phash = [flip_bits(pph[d], nbits, rng)]
    dihedral = [np.stack([flip_bits(pool[root[d], t], nbits, rng) for t in range(1, 8)], axis=1)]
    vecs = [model.near_dups(pvec[d].copy(), rng.uniform(0.3, 2.0, n_dup), rng)]
    turn = rng.integers(1, 8, n_rot)  # the copy is the original under DIHEDRAL[turn - 1]
    nbits = rng.integers(0, 5, n_rot)
    phash.append(flip_bits(pool[root[r], turn], nbits, rng))
    dihedral.append(np.stack([flip_bits(pool[root[r], COMPOSE[turn, t]], nbits, rng) for t in range(1, 8)],
                             axis=1))
    vecs.append(model.near_dups(pvec[r].copy(), rng.uniform(1.0, 3.0, n_rot), rng))
    fresh = crop_hashes(integrals, n_fresh, rng)
    phash.append(fresh[:, 0])
    dihedral.append(fresh[:, 1:])
    vecs.append(model.photos(rng.integers(0, len(model.centres), n_fresh), rng))
    partner = np.concatenate([pid[: n_dup + n_rot], np.zeros(n_fresh, np.int64)])
    kind = np.array(["dup"] * n_dup + ["rot"] * n_rot + ["fresh"] * n_fresh)
    return {"ids": np.arange(n_catalog + 1, n_catalog + size + 1), "phash": np.concatenate(phash),
            "dihedral": np.concatenate(dihedral), "vecs": np.concatenate(vecs), "partner": partner,
            "kind": kind,
            "partner_phash": np.concatenate([pph[: n_dup + n_rot], np.zeros(n_fresh, np.int64)]),
            "partner_cos": np.concatenate([(vecs[0] * pvec[d]).sum(1), (vecs[1] * pvec[r]).sum(1),
                                           np.zeros(n_fresh, np.float32)])}


MODEL_VER = "bench"
METHODS = ("phash", "phash_orient", "embedding")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_avg() -> float:
    return os.getloadavg()[0]


def build(n: int, dim: int, batch: int, work: Path, seed: int) -> dict:
    """Generate a catalog of n images chunk by chunk into the production indexes, save them as
    DedupIndexes does, the float32 vectors beside them (PostgreSQL's stand-in), and the batch."""
    t0 = time.time()
    integrals = load_photo_integrals()
    rng = np.random.default_rng(seed)
    pool = crop_hashes(integrals, min(POOL, n), rng)
    model = EmbeddingModel(dim, max(n // 200, 10), seed)
    # originals that the batch will copy: drawn now, their vectors caught on the way past
    partner_ids = np.sort(rng.choice(np.arange(1, min(POOL, n) + 1), batch // 4 + batch // 20, replace=False))
    partners = {"ids": partner_ids, "phash": np.zeros(len(partner_ids), np.int64),
                "vecs": np.zeros((len(partner_ids), dim), np.float32)}
    # The .npy header from numpy, the rows by pwrite: a memory map's dirty pages would count in
    # this process's RSS (20 GB at 5M) and crowd the index out of page cache.
    header = np.lib.format.open_memmap(work / "stored.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    offset = header.offset
    del header
    stored = os.open(work / "stored.npy", os.O_WRONLY)
    # A rebuild from the catalog trains on every len // TRAIN_SAMPLE-th vector: as many photos.
    sample = model.photos(rng.integers(0, len(model.centres), min(n, TRAIN_SAMPLE)), rng)
    t_gen = time.time() - t0
    t = time.time()
    folder = work / "index"
    vectors = new_vector_index(DedupIndexes.vector_folder(folder, MODEL_VER), dim, n, sample)
    t_train = time.time() - t
    del sample
    hashes = HashIndex()
    t_add_hash = t_add_vec = 0.0
    for start in range(0, n, CHUNK):
        t = time.time()
        ids, phash, vecs = catalog_chunk(model, pool, start, min(start + CHUNK, n), seed)
        sel = np.isin(partner_ids, ids)
        partners["phash"][sel] = phash[partner_ids[sel] - ids[0]]
        partners["vecs"][sel] = vecs[partner_ids[sel] - ids[0]]
        os.pwrite(stored, np.ascontiguousarray(vecs, np.float32).tobytes(), offset + start * dim * 4)
        t_gen += time.time() - t
        t = time.time()
        hashes.add(ids, phash)
        t_add_hash += time.time() - t
        t = time.time()
        vectors.add(ids, vecs)
        t_add_vec += time.time() - t
    os.close(stored)
    t = time.time()
    new = make_batch(model, integrals, pool, partners, n, batch, seed)
    t_gen += time.time() - t
    t = time.time()
    DedupIndexes(folder, MODEL_VER, hashes, vectors).save()
    t_save = time.time() - t
    np.savez(work / "batch.npz", **new)
    index_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    return {"n": n, "generate_s": t_gen, "train_vec_s": t_train, "add_hash_s": t_add_hash,
            "add_vec_s": t_add_vec, "save_s": t_save, "index_disk_mb": index_mb,
            "vector_index": type(vectors).__name__, "build_peak_rss_mb": peak_rss_mb()}


class FileVectors:
    """PostgreSQL's stand-in for find_pairs' stored vectors: float32 rows of the .npy file (ids
    are 1..n), one pread each, with what was asked for and how long it took counted. (Not a
    memory map: its page faults map whole page-cache folios of a freshly written file into this
    process, +1 GB of RSS for 2k rows, which a PostgreSQL server would not add here.)"""

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r")  # only for the header: no row is touched
        self._offset, self._row = header.offset, header.shape[1] * 4
        del header
        self._fd = os.open(path, os.O_RDONLY)
        self.calls = self.vectors = 0
        self.seconds = 0.0

    def __call__(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        t = time.time()
        ids = np.sort(np.asarray(ids, np.int64))
        at = self._offset + (ids - 1) * self._row
        found = {i: np.frombuffer(os.pread(self._fd, self._row, a), np.float32)
                 for i, a in zip(ids.tolist(), at.tolist(), strict=True)}
        self.calls += 1
        self.vectors += len(ids)
        self.seconds += time.time() - t
        return found


def query(work: Path, cfg: NearDupConfig, repeats: int) -> dict:
    """Load the saved indexes as a run does, find the batch's pairs, check them against what was
    planted, then commit the batch (add + save)."""
    b = dict(np.load(work / "batch.npz"))
    new = NewImages(ids=b["ids"], phash=b["phash"], dihedral=b["dihedral"], vectors=b["vecs"],
                    has_vector=np.ones(len(b["ids"]), bool))
    t = time.time()
    indexes = DedupIndexes.load(work / "index", MODEL_VER, new.vectors.shape[1])
    t_load = time.time() - t
    stored = FileVectors(work / "stored.npy")
    gc.collect()
    rss_loaded = peak_rss_mb()
    t, c, load = time.time(), cpu_s(), load_avg()
    pairs = find_pairs(new, indexes.hashes, indexes.vectors, cfg, stored)
    t_find, c_find = time.time() - t, cpu_s() - c
    out = {"n": len(indexes.hashes), "batch": len(new.ids), "index": type(indexes.vectors).__name__,
           "load_s": t_load, "find_pairs_s": t_find, "find_pairs_cpu_s": c_find,
           "load_avg_before": load, "load_avg_after": load_avg(),
           "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
           "stored_fetches": stored.calls, "stored_vectors": stored.vectors, "stored_s": stored.seconds}
    # The same batch again (the indexes now in page cache), to see through the shared cores' noise.
    again = []
    for _ in range(repeats):
        t, load = time.time(), load_avg()
        find_pairs(new, indexes.hashes, indexes.vectors, cfg, stored)
        again.append(f"{time.time() - t:.2f}s@{load:.2f}")
    out["again"] = " ".join(again)
    out.update({f"pairs_{m}": int((pairs.method == m).sum()) for m in METHODS})
    # planted pairs: found by the method that should find them, and by any
    found = set(zip(pairs.image_id, pairs.other_id, pairs.method, strict=True))
    dup, rot = b["kind"] == "dup", b["kind"] == "rot"
    key = [(int(p), int(i)) for p, i in zip(b["partner"], b["ids"], strict=True)]
    ham = hamming(b["phash"], b["partner_phash"])
    want_ph = dup & (ham <= cfg.phash_radius)
    want_emb = (dup | rot) & (b["partner_cos"] >= cfg.min_cosine)
    got = {m: np.array([(*k, m) in found for k in key]) for m in METHODS}
    out["planted_phash_recall"] = got["phash"][want_ph].mean()
    ham_orient = hamming(b["dihedral"], b["partner_phash"][:, None]).min(axis=1)
    want_orient = rot & (ham_orient <= cfg.orient_radius)
    out["planted_orient_recall"] = (got["phash_orient"] | got["phash"])[want_orient].mean()
    out["planted_embedding_recall"] = got["embedding"][want_emb].mean()
    out["planted_any_recall"] = np.logical_or.reduce([got[m] for m in METHODS])[dup | rot].mean()
    # pHash pairs that nobody planted (chance collisions of unrelated photos), per new image
    planted = {k for k, d in zip(key, dup | rot, strict=True) if d}
    for m in ("phash", "phash_orient"):
        ph = pairs[pairs.method == m]
        chance = sum((a, b_) not in planted for a, b_ in zip(ph.image_id, ph.other_id, strict=True))
        out[f"unplanted_{m}_per_image"] = chance / len(new.ids)
    t = time.time()
    indexes.commit(new)
    out["commit_s"] = time.time() - t
    out["peak_rss_with_commit_mb"] = peak_rss_mb()
    return out


def pg_fetch(n: int, dim: int, seed: int) -> None:
    """The stored-vector fetch find_pairs makes (dedup.stored_vectors: binary COPY by image_id),
    timed against an embedded PostgreSQL catalog of n random vectors."""
    from lookalike import db
    from lookalike.config import load_config
    from lookalike.db.vector_io import stored_vectors

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="neardup_pg_") as home:
        cfg = load_config(None, home)
        conn = db.connect(cfg)
        vt = db.ensure_schema(conn)
        t = time.time()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY images (id, file_sha256, path_original, width, height, format, bytes, "
                          "thumb_path) FROM STDIN") as copy:
                for i in range(1, n + 1):
                    copy.write_row((i, f"{i:064x}", "x", 1, 1, "JPEG", 1, "x"))
            with cur.copy("COPY image_embeddings (image_id, model_ver, emb) FROM STDIN "
                          "(FORMAT BINARY)") as copy:
                copy.set_types(["int8", "text", vt])
                for start in range(1, n + 1, CHUNK):
                    vecs = nd_normalize(rng.standard_normal((min(CHUNK, n + 1 - start), dim), np.float32))
                    for j, v in enumerate(vecs):
                        copy.write_row((start + j, MODEL_VER, vector_to_db(v, vt)))
        conn.execute("VACUUM ANALYZE image_embeddings")
        print(f"embedded PostgreSQL catalog of {n:,} x {dim} vectors (column type {vt}) "
              f"in {time.time() - t:.0f}s")
        for m in (100, 1000, 10_000):
            ids = np.sort(rng.choice(np.arange(1, n + 1), m, replace=False))
            with conn.cursor() as cur:
                fetch = stored_vectors(cur, MODEL_VER, vt)
                t, load = time.time(), load_avg()
                got = fetch(ids)
                dt = time.time() - t
            assert len(got) == m
            print(f"  fetch {m:>6,} stored vectors: {dt:6.3f}s = {dt / m * 1e3:.3f} ms/vector "
                  f"(load average {load:.2f})")
        conn.close()


# --------------------------------------------------------------------------- index comparisons


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def compare_hash(n: int, nq: int, seed: int) -> None:
    """FAISS binary index types on realistic pHashes: build, memory, query time, exactness."""
    import faiss

    integrals = load_photo_integrals()
    rng = np.random.default_rng(seed)
    pool = crop_hashes(integrals, min(POOL, n), rng)
    cat = np.concatenate([catalog_hashes(pool, s, min(s + CHUNK, n), rng) for s in range(0, n, CHUNK)])
    n_dup = nq // 4
    fresh = crop_hashes(integrals, nq - n_dup, rng)
    dups = flip_bits(cat[rng.integers(0, min(POOL, n), n_dup)], rng.integers(0, 9, n_dup), rng)
    q = hash_to_bytes(np.concatenate([dups, fresh[:, 0]]))
    q_orient = hash_to_bytes(fresh[:, 1:].reshape(-1))
    codes = hash_to_bytes(cat)
    print(f"catalog {n:,} realistic pHashes; {nq:,} queries (25% near-dups) and {len(q_orient):,} "
          f"flipped/rotated ones; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    tasks = (("phash r=8", q, 8), ("phash r=10", q, 10),
             ("orient r=5", q_orient, 5), ("orient r=8", q_orient, 8))
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes)
    truth = {}
    for name, qq, r in tasks:
        t = time.time()
        lims, _, _ = flat.range_search(qq, r + 1)
        truth[name] = int(lims[-1])
        print(f"  IndexBinaryFlat          {name:11s} {time.time() - t:7.2f}s  "
              f"{lims[-1] / len(qq):6.2f} matches/query")
    del flat
    configs = [("faiss MultiHash 3x21", lambda: faiss.IndexBinaryMultiHash(64, 3, 21), 3)]
    if n <= 1_000_000:  # clearly behind at 1M already: not worth minutes at 5M
        configs += [("faiss MultiHash 4x16", lambda: faiss.IndexBinaryMultiHash(64, 4, 16), 4),
                    ("faiss MultiHash 2x32", lambda: faiss.IndexBinaryMultiHash(64, 2, 32), 2)]
    for label, make, nhash in configs:
        gc.collect()
        before = rss_now_mb()
        t = time.time()
        index = make()
        index.add(codes)
        print(f"  {label}: build {time.time() - t:.1f}s, +{rss_now_mb() - before:.0f} MB")
        for name, qq, r in tasks:
            if nhash == 2 and r > 5:
                continue  # 2x32 needs C(32, <=r/2) probes: hopeless past r=5
            index.nflip = r // nhash
            t = time.time()
            lims, _, _ = index.range_search(qq, r + 1)
            exact = "exact" if lims[-1] == truth[name] else f"MISSED {truth[name] - lims[-1]}"
            print(f"    {name:11s} nflip={index.nflip} {time.time() - t:7.2f}s  {exact}")
        del index
    gc.collect()
    before = rss_now_mb()
    t = time.time()
    ids = np.arange(n, dtype=np.int64)
    index = HashIndex()
    for s in range(0, n, CHUNK):
        index.add(ids[s : s + CHUNK], cat[s : s + CHUNK])
    print(f"  numpy multi-index hashing 3x21 (neardup.HashIndex): build {time.time() - t:.1f}s "
          f"in {CHUNK:,} adds, +{rss_now_mb() - before:.0f} MB")
    for name, qq, r in tasks:
        t = time.time()
        rows, _, _ = index.search_radius(qq.view("<i8").ravel(), r)
        exact = "exact" if len(rows) == truth[name] else f"MISSED {truth[name] - len(rows)}"
        print(f"    {name:11s} nflip={r // 3} {time.time() - t:7.2f}s  {exact}")
    del index
    if n > 1_000_000:
        return
    gc.collect()
    before = rss_now_mb()
    t = time.time()
    nlist = 4096
    ivf = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(64), 64, nlist)
    ivf.train(codes[rng.choice(n, min(n, 64 * nlist), replace=False)])
    ivf.add(codes)
    print(f"  IndexBinaryIVF {nlist}: build {time.time() - t:.1f}s, +{rss_now_mb() - before:.0f} MB")
    for nprobe in (16, 64, 256):
        ivf.nprobe = nprobe
        t = time.time()
        lims, _, _ = ivf.range_search(q, 11)
        print(f"    phash r=10 nprobe={nprobe:3d} {time.time() - t:7.2f}s  "
              f"recall {lims[-1] / truth['phash r=10']:.3f} (not exact by design)")


def exact_topk(queries: np.ndarray, model: EmbeddingModel, pool: np.ndarray, n: int, seed: int,
               k: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 top-k cosines (and catalog ids) of queries over the regenerated catalog."""
    best_s = np.full((len(queries), k), -2.0, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, n, CHUNK):
        ids, _, vecs = catalog_chunk(model, pool, start, min(start + CHUNK, n), seed)
        sims = queries @ vecs.T
        top = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        s2 = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        i2 = np.concatenate([best_i, ids[top]], 1)
        order = np.argsort(-s2, 1)[:, :k]
        best_s, best_i = np.take_along_axis(s2, order, 1), np.take_along_axis(i2, order, 1)
    return best_s, best_i


def compare_vector(n: int, dim: int, nq: int, n_truth: int, seed: int) -> None:
    """Recall and precision of VectorIndex settings against exact float32 search."""
    rng = np.random.default_rng(seed)
    pool = np.zeros((min(POOL, n), 8), np.int64)  # hashes unused here
    model = EmbeddingModel(dim, max(n // 200, 10), seed)
    partners = rng.integers(0, n, nq // 4)
    dup_src = np.concatenate([catalog_chunk(model, pool, s, min(s + CHUNK, n), seed)[2][
        partners[(partners >= s) & (partners < s + CHUNK)] - s] for s in range(0, n, CHUNK)])
    queries = np.concatenate([model.near_dups(dup_src, rng.uniform(0.3, 2.5, len(dup_src)), rng),
                              model.photos(rng.integers(0, len(model.centres), nq - len(dup_src)), rng)])
    queries = queries[rng.permutation(nq)]
    t = time.time()
    gt_s, gt_i = exact_topk(queries[:n_truth], model, pool, n, seed)
    print(f"{n:,} x {dim} synthetic embeddings (scene model, see top); exact top-50 of "
          f"{n_truth} queries in {time.time() - t:.0f}s; timing on {nq:,} queries")
    exact = [dict(zip(gt_i[j].tolist(), gt_s[j].tolist(), strict=True)) for j in range(n_truth)]
    k = 10

    def score(rows: np.ndarray, ids: np.ndarray, cos: np.ndarray, th: float) -> str:
        sel = (rows < n_truth) & (cos >= th)
        found: dict[int, list[tuple[int, float]]] = {}
        for r, i, c in zip(rows[sel].tolist(), ids[sel].tolist(), cos[sel].tolist(), strict=True):
            found.setdefault(r, []).append((i, c))
        hit = need = nf = good = 0
        errs = []
        for j in range(n_truth):
            need += min(k, sum(s >= th for s in exact[j].values()))
            for i, c in found.get(j, [])[:k]:
                nf += 1
                e = exact[j].get(i, -1.0)
                good += e >= th
                hit += e >= th
                if e > -1:
                    errs.append(c - e)
        err = np.array(errs) if errs else np.zeros(1)
        return (f"t={th}: recall {hit / max(need, 1):.3f} precision {good / max(nf, 1):.3f} "
                f"cos error {err.mean():+.3f}±{err.std():.3f}")

    # (dims kept, bits a coordinate in the lists, candidates re-ranked per k): 128 bytes a vector
    # in RAM each; (256, 4, 4) was the default until the 8-bit lists
    for keep, bits, cands in ((256, 4, 4), (256, 4, 2), (128, 8, 4), (128, 8, 2)):
        vi = VectorIndex(dim, keep_dims=keep, bits=bits, candidates=cands)
        t = time.time()
        vi.train(model.photos(rng.integers(0, len(model.centres), min(n, 64 * _default_nlist(n))), rng),
                 expected_size=n)
        t_train = time.time() - t
        t = time.time()
        for s in range(0, n, CHUNK):
            ids, _, vecs = catalog_chunk(model, pool, s, min(s + CHUNK, n), seed)
            vi.add(ids, vecs)
        print(f"  keep_dims={keep} bits={bits} ({keep * bits // 8} B/vector in RAM) candidates={cands}k "
              f"nlist={vi.nlist}: train {t_train:.0f}s add {time.time() - t:.0f}s")
        for nprobe in (4, 8):
            vi.nprobe = nprobe
            t, c = time.time(), cpu_s()
            rows, ids, cos = vi.search(queries, k, 0.8)
            t_s, c_s = time.time() - t, cpu_s() - c
            print(f"    nprobe={nprobe} search {t_s:5.2f}s ({c_s:5.2f} cpu-s) | "
                  + " | ".join(score(rows, ids, cos, th) for th in (0.85, 0.9, 0.95)))
        # the same candidates scored by the compressed vectors alone, without the re-rank
        vi._ivf.nprobe = 4
        approx, cand = vi._ivf.search(vi._reduce(queries[:n_truth]), k)
        rows = np.repeat(np.arange(n_truth), k)
        ok = cand.reshape(-1) >= 0
        print("    nprobe=4 no re-rank (compressed cosines) | " + " | ".join(
            score(rows[ok], vi.ids[cand.reshape(-1)[ok]], approx.reshape(-1)[ok], th)
            for th in (0.85, 0.9, 0.95)))
        del vi


# --------------------------------------------------------------------------- calibration


def chance_match_rates(n: int, seed: int) -> None:
    """P(pHash distance <= r) between crops of different real photos: chance matches that a
    catalog of N images produces N * P per new image."""
    rng = np.random.default_rng(seed)
    src: list[np.ndarray] = []
    h = crop_hashes(load_photo_integrals(), n, rng, src)
    s = src[0]
    same = np.zeros(65, np.int64)
    orient = np.zeros(65, np.int64)
    pairs = 0
    for i in range(0, n, 1000):
        other = s[i : i + 1000, None] != s[None, :]
        same += np.bincount(hamming(h[i : i + 1000, :1], h[None, :, 0])[other], minlength=65)
        d7 = np.min([hamming(h[i : i + 1000, t : t + 1], h[None, :, 0]) for t in range(1, 8)], axis=0)
        orient += np.bincount(d7[other], minlength=65)
        pairs += other.sum()
    print(f"chance pHash matches between {n:,} crops of different real photos ({pairs:,} pairs):")
    for r in (4, 6, 8, 10, 12):
        p, po = same[: r + 1].sum() / pairs, orient[: r + 1].sum() / pairs
        print(f"  r={r:2d}: P={p:.1e} (per new image: {p * 1e6:6.2f} at 1M, {p * 5e6:6.2f} at 5M) | "
              f"any of 7 orientations: P={po:.1e} ({po * 1e6:6.2f} at 1M, {po * 5e6:6.2f} at 5M)")


def calibrate(nd_dir: Path) -> None:
    """Distances per variant on a make_neardup_set.py folder, through the production code paths:
    extract's 512-px thumbnail, hashing's pHash, dihedral_phashes and the EfficientNet embedder."""
    import pandas as pd

    from lookalike.models.registry import resolve_model
    from lookalike.models.runtime import get_embedder
    from lookalike.stages.extract import ExtractSettings, decode_thumbnail
    from lookalike.stages.hashing import dihedral_phashes, image_hashes

    truth = pd.read_csv(nd_dir / "truth.csv", keep_default_na=False)
    embedder = get_embedder(resolve_model("effnet-lite0"), backend="torch")
    settings = ExtractSettings(thumbs_dir="")
    phash, dihedral, vecs = [], [], []
    for start in range(0, len(truth), 64):
        thumbs = [decode_thumbnail(nd_dir / p, settings)[0] for p in truth.path[start : start + 64]]
        phash += [image_hashes(t)["phash"] for t in thumbs]
        dihedral += [dihedral_phashes(t) for t in thumbs]
        vecs.append(embedder.embed_images(thumbs))
    phash, dihedral, emb = np.array(phash, np.int64), np.array(dihedral, np.int64), np.concatenate(vecs)
    orig = {b: i for i, (b, v) in enumerate(zip(truth.base, truth.variant, strict=True)) if v == "orig"}
    rows = []
    for i, (b, v) in enumerate(zip(truth.base, truth.variant, strict=True)):
        if v in ("orig", "distractor"):
            continue
        o = orig[b]
        rows.append({"variant": v, "tier": truth.tier[i],
                     "phash": hamming(phash[o : o + 1], phash[i : i + 1])[0],
                     "orient": min(hamming(dihedral[i], phash[o : o + 1]).min(),
                                   hamming(dihedral[o], phash[i : i + 1]).min()),
                     "cosine": float(emb[o] @ emb[i])})
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"{len(df)} near-duplicate pairs (orig vs variant), {len(orig)} bases; pHash distance / best "
          "flipped-rotated distance / embedding cosine:")
    print(df.groupby(["tier", "variant"]).agg(
        phash_med=("phash", "median"), phash_max=("phash", "max"), orient_med=("orient", "median"),
        orient_max=("orient", "max"), cos_min=("cosine", "min"),
        cos_p10=("cosine", lambda x: x.quantile(0.1)),
        cos_med=("cosine", "median")).round(3).to_string())
    distinct = np.flatnonzero(truth.variant.isin(["orig", "distractor"]).to_numpy())
    iu = np.triu_indices(len(distinct), 1)
    ham = hamming(phash[distinct][:, None], phash[distinct][None, :])[iu]
    ham_o = np.min([hamming(dihedral[distinct][:, None, t], phash[distinct][None, :]) for t in range(7)],
                   axis=0)
    ham_o = np.minimum(ham_o, ham_o.T)[iu]
    cos = (emb[distinct] @ emb[distinct].T)[iu]
    print(f"{len(ham):,} pairs of distinct photos: pHash min {ham.min()} p0.1 {np.percentile(ham, 0.1):.0f} "
          f"p1 {np.percentile(ham, 1):.0f} median {np.median(ham):.0f}; orient min {ham_o.min()}; "
          f"cosine max {cos.max():.3f} p99.9 {np.percentile(cos, 99.9):.3f} p99 {np.percentile(cos, 99):.3f} "
          f"median {np.median(cos):.3f}")
    rec = {}
    for v, g in df.groupby("variant"):
        r = {f"phash<={t}": (g.phash <= t).mean() for t in (4, 6, 8, 10)}
        r.update({f"orient<={t}": (g.orient <= t).mean() for t in (4, 6, 8)})
        r.update({f"cos>={t}": (g.cosine >= t).mean() for t in (0.85, 0.88, 0.9, 0.92, 0.95)})
        rec[v] = r
    print("recall per variant and threshold:")
    print(pd.DataFrame(rec).T.round(2).to_string())
    print("distinct-photo pairs over each threshold:",
          {f"phash<={t}": int((ham <= t).sum()) for t in (6, 8, 10, 12)},
          {f"orient<={t}": int((ham_o <= t).sum()) for t in (4, 6, 8)},
          {f"cos>={t}": int((cos >= t).sum()) for t in (0.8, 0.85, 0.9)})


# --------------------------------------------------------------------------- main


def run_child(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a couple of minutes")
    ap.add_argument("--sizes", type=int, nargs="+", help="catalog sizes (default 1M 5M; quick 50k 250k)")
    ap.add_argument("--batch", type=int, help="new images per batch (default 10000; quick 2000)")
    ap.add_argument("--dim", type=int, default=1280, help="embedding dimension (1280 EfficientNet, 512 CLIP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--repeats", type=int, default=2, help="timed find_pairs runs after the first")
    ap.add_argument("--pg-ms", type=float, help="ms per stored vector fetched from PostgreSQL (from "
                    "--pg-fetch): the summary adds the fetches' cost at that rate")
    ap.add_argument("--pg-fetch", type=int, metavar="N", help="time the stored-vector fetch from PostgreSQL")
    ap.add_argument("--compare-hash", action="store_true", help="compare FAISS binary index types")
    ap.add_argument("--compare-vector", action="store_true", help="VectorIndex recall vs exact search")
    ap.add_argument("--calibrate", type=Path, metavar="ND_DIR", help="distances per variant")
    ap.add_argument("--child", choices=["build", "query"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = a.sizes or ([50_000, 250_000] if a.quick else [1_000_000, 5_000_000])
    batch = a.batch or (2_000 if a.quick else 10_000)
    from lookalike.dedup.pairs import NearDupConfig

    cfg = NearDupConfig.defaults()  # the defaults of conf/lookalike.toml
    if a.child == "build":
        print(json.dumps(build(sizes[0], a.dim, batch, a.work, a.seed)))
    elif a.child == "query":
        print(json.dumps(query(a.work, cfg, a.repeats)))
    elif a.pg_fetch:
        pg_fetch(a.pg_fetch, a.dim, a.seed)
    elif a.calibrate:
        calibrate(a.calibrate)
        chance_match_rates(8_000 if a.quick else 30_000, a.seed)
    elif a.compare_hash:
        compare_hash(sizes[0], batch, a.seed)
    elif a.compare_vector:
        compare_vector(sizes[0], a.dim, batch, 200 if a.quick else 1000, a.seed)
    else:
        print(f"dedup.find_pairs of {batch:,} new images (dim {a.dim}) against catalogs of {sizes} "
              f"(exact vector index up to {EXACT_UP_TO:,}); {cfg}; {os.cpu_count()} cores", flush=True)
        results = []
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="neardup_bench_") as work:
                common = ["--sizes", str(n), "--batch", str(batch), "--dim", str(a.dim),
                          "--seed", str(a.seed), "--repeats", str(a.repeats), "--work", work]
                built = run_child(["--child", "build", *common], a.timeout)
                print(f"  built {n:,}: {json.dumps(_rounded(built, 2))}", flush=True)
                res = run_child(["--child", "query", *common], a.timeout)
                print(f"  query {n:,}: {json.dumps(_rounded(res, 3))}", flush=True)
                results.append(res)
        print(f"{'catalog':>10} {'find_pairs s':>12} {'cpu s':>6} {'load avg':>8} {'peak RSS MB':>11} "
              f"{'open s':>6} {'commit s':>8} {'fetched':>7} {'phash':>6} {'orient':>6} {'embed':>6} "
              f"{'recall':>6}")
        for r in results:
            print(f"{r['n']:>10,} {r['find_pairs_s']:>12.2f} {r['find_pairs_cpu_s']:>6.2f} "
                  f"{r['load_avg_before']:>8.2f} {r['peak_rss_mb']:>11.0f} {r['load_s']:>6.2f} "
                  f"{r['commit_s']:>8.2f} {r['stored_vectors']:>7} {r['pairs_phash']:>6} "
                  f"{r['pairs_phash_orient']:>6} {r['pairs_embedding']:>6} {r['planted_any_recall']:>6.3f}")
            print(f"{'':>10} find_pairs again (s@load average): {r['again']}")
            if a.pg_ms:
                with_pg = r["find_pairs_s"] - r["stored_s"] + r["stored_vectors"] * a.pg_ms / 1e3
                print(f"{'':>10} the {r['stored_vectors']} stored vectors from PostgreSQL at {a.pg_ms} ms "
                      f"each instead of the file: {with_pg:.2f} s")
        if len(results) > 1:
            print(f"time ratio {results[-1]['n']:,} / {results[0]['n']:,}: "
                  f"{results[-1]['find_pairs_s'] / results[0]['find_pairs_s']:.2f}x wall, "
                  f"{results[-1]['find_pairs_cpu_s'] / results[0]['find_pairs_cpu_s']:.2f}x cpu")


def _rounded(d: dict, digits: int) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


if __name__ == "__main__":
    main()
