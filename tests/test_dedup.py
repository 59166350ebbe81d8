"""Near-duplicate pairs and groups: the dedup stage and its indexes kept beside the catalog."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
from conftest import IMAGENET
from PIL import Image, ImageOps

from lookalike import db
from lookalike.config import Config
from lookalike.db.vector_io import vector_to_db
from lookalike.dedup import indexes as dedup_indexes
from lookalike.dedup.indexes import DedupIndexes
from lookalike.dedup.pairs import NearDupConfig, NewImages, find_pairs
from lookalike.dedup.store import merge_groups
from lookalike.driver.ingest import run
from lookalike.index.exact import ExactVectorIndex
from lookalike.index.hamming import HashIndex
from lookalike.index.ivf import VectorIndex
from lookalike.stages.hashing import dihedral_phashes, image_hashes

PHOTOS = sorted(IMAGENET.glob("*.JPEG"))


def pairs(*rows: tuple[int, int]) -> pd.DataFrame:
    return pd.DataFrame([(a, b, "phash", 0.0) for a, b in rows],
                        columns=["image_id", "other_id", "method", "distance"])


def groups(*rows: tuple[int, int]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["image_id", "group_id"])


def as_dict(df: pd.DataFrame) -> dict[int, int]:
    return dict(zip(df["image_id"], df["group_id"], strict=True))


def test_new_group_takes_its_smallest_member() -> None:
    assert as_dict(merge_groups(pairs((5, 9), (9, 12)), groups())) == {5: 5, 9: 5, 12: 5}


def test_an_image_joining_a_group_changes_only_itself() -> None:
    out = merge_groups(pairs((3, 20)), groups((3, 3), (7, 3)))
    assert as_dict(out) == {20: 3}


def test_a_bridge_merges_two_whole_groups_under_the_smallest_id() -> None:
    existing = groups((4, 4), (8, 4), (10, 10), (11, 10))
    out = merge_groups(pairs((8, 30), (11, 30)), existing)
    assert as_dict(out) == {10: 4, 11: 4, 30: 4}


def test_merge_groups_returns_only_what_changed_by_image_id() -> None:
    existing = groups((1, 1), (2, 1), (5, 5), (6, 5), (9, 9), (10, 9))
    found = pd.DataFrame({"image_id": [2, 6, 9, 30], "other_id": [7, 7, 10, 31],
                          "method": ["phash", "embedding", "phash", "phash"],
                          "distance": [1.0, 0.05, 0.0, 2.0]})
    # 7 bridges {1, 2} and {5, 6}: all become group 1; 9-10 is unchanged; 30-31 is a new group
    out = merge_groups(found, existing)
    assert out.to_dict("list") == {"image_id": [5, 6, 7, 30, 31], "group_id": [1, 1, 1, 30, 30]}
    assert merge_groups(found.iloc[:0], existing).empty
    first = merge_groups(found, existing.iloc[:0])
    assert first.to_dict("list") == {"image_id": [2, 6, 7, 9, 10, 30, 31],
                                     "group_id": [2, 2, 2, 9, 9, 30, 30]}


# --------------------------------------------------------------------------- find_pairs


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def new_images(ids: list[int], hashes: list[int], vecs: np.ndarray | None,
               dihedral: np.ndarray | None = None) -> NewImages:
    n = len(ids)
    h = np.asarray(hashes, np.int64)
    if dihedral is None:  # 32 bits from the pHash: no flipped/rotated matches
        dihedral = np.tile(h[:, None] ^ 0x0F0F0F0F0F0F0F0F, (1, 7))
    return NewImages(ids=np.asarray(ids, np.int64), phash=h, dihedral=dihedral,
                     vectors=np.zeros((n, 8), np.float32) if vecs is None else vecs.astype(np.float32),
                     has_vector=np.full(n, vecs is not None))


def from_dict(vectors: dict[int, np.ndarray], calls: list[np.ndarray] | None = None
              ) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """A stand-in for the catalog's stored vectors; records what it was asked for."""
    def fetch(ids: np.ndarray) -> dict[int, np.ndarray]:
        if calls is not None:
            calls.append(np.asarray(ids))
        return {int(i): vectors[int(i)] for i in ids if int(i) in vectors}
    return fetch


def found(df: pd.DataFrame) -> set[tuple[int, int, str]]:
    return {(int(a), int(b), m) for a, b, m in df[["image_id", "other_id", "method"]].itertuples(index=False)}


def flip(h: int, *bits: int) -> int:
    return int(np.int64(h) ^ np.int64(sum(1 << b for b in bits)))


def test_find_pairs_against_the_catalog_and_within_the_batch() -> None:
    rng = np.random.default_rng(0)
    catalog_hashes = rng.integers(-2**63, 2**63 - 1, size=200, dtype=np.int64)
    catalog_vecs = unit(rng.normal(size=(200, 64)))
    hashes = HashIndex(np.arange(1, 201), catalog_hashes)
    vectors = VectorIndex(64)
    vectors.add(np.arange(1, 201), catalog_vecs)
    near_hash = flip(catalog_hashes[9], 0, 1, 3)  # 3 bits from image 10
    far = unit(rng.normal(size=(2, 64)))
    vecs = np.stack([catalog_vecs[9], far[1], far[1]])  # 501 is a copy of 10; 502, 503 are alike
    new = new_images([501, 502, 503], [near_hash, 12345, -999], vecs)
    stored = dict(zip(range(1, 201), catalog_vecs, strict=True))
    got = find_pairs(new, hashes, vectors, NearDupConfig.defaults(), from_dict(stored))
    assert list(got.columns) == ["image_id", "other_id", "method", "distance"]
    assert {(10, 501, "phash"), (10, 501, "embedding"), (502, 503, "embedding")} <= found(got)
    assert (got["image_id"] < got["other_id"]).all()
    assert len(found(got)) == len(got)


def test_a_far_hash_match_needs_alike_embeddings() -> None:
    """A pHash match beyond verify_radius with an unrelated embedding is a chance collision:
    dropped when both embeddings are at hand, kept when one is missing or the hashes are close."""
    rng = np.random.default_rng(1)
    cat_vecs = unit(rng.normal(size=(3, 64)))
    cat_hashes = rng.integers(-2**63, 2**63 - 1, size=3, dtype=np.int64)
    hashes = HashIndex(np.array([1, 2, 3]), cat_hashes)
    vectors = ExactVectorIndex(64)
    vectors.add(np.array([1, 2, 3]), cat_vecs)
    unrelated = unit(rng.normal(size=(3, 64)))
    cfg = NearDupConfig.defaults()
    new = new_images([11, 12, 13, 14, 15],
                     [flip(cat_hashes[0], 1, 5, 9, 20, 30),      # 5 bits from 1, unrelated
                      flip(cat_hashes[1], 4, 7),                 # 2 bits from 2, unrelated
                      flip(cat_hashes[2], 2, 3, 6, 8),           # 4 bits from 3, a copy
                      flip(cat_hashes[0], 1, 5, 9, 40, 50, 60),  # 5 bits from 11 and alike, 6 from 1
                      flip(cat_hashes[2], 10, 11, 12)],          # 3 from 3, 7 from 13, unrelated
                     np.stack([unrelated[0], unrelated[1], cat_vecs[2],
                               unit(unrelated[0] + 0.1 * unrelated[1]), unrelated[2]]))
    got = found(find_pairs(new, hashes, vectors, cfg, from_dict({})))
    assert {(2, 12, "phash"), (3, 13, "phash"), (11, 14, "phash")} <= got
    dropped = {(1, 11), (1, 14), (3, 15), (13, 15)}
    assert not {p for p in got if p[:2] in dropped}
    # without embeddings nothing contradicts the hashes
    blind = new_images(list(new.ids), list(new.phash), None)
    blind_pairs = find_pairs(blind, hashes, vectors, cfg, from_dict({}))
    assert {(*p, "phash") for p in dropped} <= found(blind_pairs)


def test_hash_matches_are_capped_per_new_image_closest_first() -> None:
    """Thousands of blank images are all alike: each new one keeps its closest few."""
    blank = np.int64(0x7FFF000000000000)
    cat_hashes = [flip(blank, *range(i % 5)) for i in range(300)]  # 0-4 bits from blank
    hashes = HashIndex(np.arange(1, 301), np.array(cat_hashes, np.int64))
    cfg = NearDupConfig.defaults(max_hash_matches=50)
    new = new_images([1001, 1002], [int(blank), int(blank)], None)
    got = find_pairs(new, hashes, ExactVectorIndex(8), cfg, from_dict({}))
    plain = got[got["method"] == "phash"]
    # 50 each: of the 60 catalog images at 0 bits (and each other), the smallest ids
    assert len(plain) == 100 and plain["distance"].max() == 0
    for image in (1001, 1002):
        assert set(plain["image_id"][plain["other_id"] == image]) == set(range(1, 300, 5)[:50])


@pytest.mark.parametrize("kind", ["exact", "compressed"])
def test_embedding_threshold_is_decided_on_the_stored_vectors(kind: str) -> None:
    """Cosines near min_cosine from 8-bit codes are checked on the stored float32 vectors (and
    only those): the pairs are those of an exact search."""
    rng = np.random.default_rng(2)
    dim, n = 64, 400
    base = unit(rng.normal(size=(n, dim)))
    queries = unit(rng.normal(size=(n, dim)))
    # the catalog: each query's partner at cosine 0.70 .. 0.90 (the rest are far)
    target = np.linspace(0.70, 0.90, n)
    orth = unit(base - (base * queries).sum(1, keepdims=True) * queries)
    catalog = target[:, None] * queries + np.sqrt(1 - target[:, None] ** 2) * orth
    ids = np.arange(1, n + 1)
    vectors: ExactVectorIndex | VectorIndex = ExactVectorIndex(dim) if kind == "exact" else VectorIndex(dim)
    vectors.add(ids, catalog)
    calls: list[np.ndarray] = []
    new = new_images(list(range(1001, 1001 + n)), list(rng.integers(-2**63, 2**63 - 1, n)), queries)
    stored = dict(zip(ids.tolist(), catalog, strict=True))
    got = find_pairs(new, HashIndex(), vectors, NearDupConfig.defaults(k=3), from_dict(stored, calls))
    emb = got[got["method"] == "embedding"]
    exact = (queries * catalog).sum(1)
    assert set(emb["image_id"]) == set(ids[exact >= 0.80])
    np.testing.assert_allclose(1 - emb["distance"], exact[emb["image_id"] - 1],
                               atol=vectors.cosine_error + 1e-6)
    if kind == "exact":
        assert not calls  # its cosines are exact already
    else:
        fetched = set(np.concatenate(calls).tolist())
        off = np.abs(exact - 0.80)
        assert set(ids[off < 0.005].tolist()) <= fetched  # surely within the band
        assert all(off[i - 1] < vectors.cosine_error + 0.01 for i in fetched)  # and only near it


# --------------------------------------------------------------------------- real photos


def thumb(path: Path, size: int = 256) -> Image.Image:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    return rgb


def reencode(im: Image.Image, scale: float = 1.0, quality: int = 75) -> Image.Image:
    """A near-duplicate: resized, then JPEG-compressed."""
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def stand_in_embedding(im: Image.Image) -> np.ndarray:
    """The test's embedding: a 16x16 colour thumbnail, centred and L2-normalised. Like a model's,
    it barely moves under resizing and recompression and differs between photos."""
    v = np.asarray(im.resize((16, 16), Image.Resampling.BOX), np.float32).ravel()
    v -= v.mean()
    return v / np.linalg.norm(v)


def features(ids: list[int], images: list[Image.Image]) -> NewImages:
    return NewImages(ids=np.asarray(ids, np.int64),
                     phash=np.array([image_hashes(im)["phash"] for im in images], np.int64),
                     dihedral=np.array([dihedral_phashes(im) for im in images], np.int64),
                     vectors=np.stack([stand_in_embedding(im) for im in images]),
                     has_vector=np.ones(len(images), bool))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    if len(PHOTOS) < 60:
        pytest.skip(f"real photos missing under {IMAGENET}")
    return [thumb(p) for p in PHOTOS[:60]]


@pytest.mark.parametrize("kind", ["exact", "compressed"])
def test_find_pairs_on_real_photos(photos: list[Image.Image], kind: str) -> None:
    catalog = features(list(range(1, 51)), photos[:50])
    hashes = HashIndex(catalog.ids, catalog.phash)
    vectors: ExactVectorIndex | VectorIndex = ExactVectorIndex(768) if kind == "exact" else VectorIndex(768)
    vectors.add(catalog.ids, catalog.vectors)
    new = features(list(range(101, 107)), [
        photos[0].copy(),                                                  # 101: copy of 1 (other bytes)
        reencode(photos[1], 0.5, 60),                                      # 102: near-duplicate of 2
        reencode(photos[2].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),    # 103: mirror of 3
        photos[55],                                                        # 104: unrelated, new
        photos[56], reencode(photos[56], 0.7)])                            # 105, 106: new near-duplicates
    stored = dict(zip(catalog.ids.tolist(), catalog.vectors, strict=True))
    got = find_pairs(new, hashes, vectors, NearDupConfig.defaults(), from_dict(stored))
    assert {(1, 101, "phash"), (1, 101, "embedding"), (2, 102, "phash"), (2, 102, "embedding"),
            (3, 103, "phash_orient"), (105, 106, "phash"), (105, 106, "embedding")} <= found(got)
    assert not (got[["image_id", "other_id"]] == 104).any().any()  # the unrelated photo
    assert not ((got["image_id"] == 3) & (got["other_id"] == 103) & (got["method"] == "phash")).any()
    copy = got[(got["image_id"] == 1) & (got["other_id"] == 101)].set_index("method")["distance"]
    assert copy["phash"] == 0 and copy["embedding"] < 1e-2


def test_dihedral_hashes_find_flipped_and_rotated_copies(photos: list[Image.Image]) -> None:
    img = photos[0]
    dihedral = np.array(dihedral_phashes(img), np.int64)
    own = np.int64(image_hashes(img)["phash"])

    def bits(a: np.ndarray, b: np.int64) -> np.ndarray:
        return np.bitwise_count(a.view(np.uint64) ^ np.uint64(b.view(np.uint64)))

    from lookalike.stages.hashing import DIHEDRAL
    for t in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90):
        copy = np.int64(image_hashes(reencode(img.transpose(t), 0.8))["phash"])
        d = bits(dihedral, copy)
        assert d[DIHEDRAL.index(t)] <= 4 and d.min() == d[DIHEDRAL.index(t)]
    assert bits(dihedral, own).min() > 8  # a photo is not its own mirror image
    assert bits(np.array(dihedral_phashes(photos[1]), np.int64), own).min() > 8


# --------------------------------------------------------------------------- indexes beside the catalog


def add_to_catalog(conn: psycopg.Connection, ids: range, rng: np.random.Generator, dim: int,
                   vector_type: str) -> NewImages:
    """Images with hashes and embeddings straight into the catalog, as a load would put them."""
    new = NewImages(ids=np.asarray(ids, np.int64), phash=rng.integers(-2**63, 2**63 - 1, len(ids)),
                    dihedral=rng.integers(-2**63, 2**63 - 1, (len(ids), 7)),
                    vectors=unit(rng.normal(size=(len(ids), dim))), has_vector=np.ones(len(ids), bool))
    with conn.transaction(), conn.cursor() as cur:
        for i, h, v in zip(new.ids.tolist(), new.phash.tolist(), new.vectors, strict=True):
            cur.execute("INSERT INTO images (id, file_sha256, path_original, width, height, format, bytes, "
                        "thumb_path) VALUES (%s, %s, 'x', 1, 1, 'JPEG', 1, 'x')", (i, f"{i:064x}"))
            cur.execute("INSERT INTO image_hashes VALUES (%s, %s, 0, 0, 'v')", (i, h))
            cur.execute("INSERT INTO image_embeddings VALUES (%s, 'm', %s)",
                        (i, vector_to_db(v, vector_type)))
    return new


def test_indexes_persist_catch_up_and_grow(cfg: Config, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dim, rng = 16, np.random.default_rng(5)
    folder = tmp_path / "index"
    monkeypatch.setattr(dedup_indexes, "EXACT_UP_TO", 300)
    with db.connect(cfg) as conn:
        vt = db.ensure_schema(conn)
        first = add_to_catalog(conn, range(1, 201), rng, dim, vt)
        idx = DedupIndexes.open(conn, folder, "m", dim, vt)  # built from the catalog
        assert isinstance(idx.vectors, ExactVectorIndex) and len(idx.vectors) == len(idx.hashes) == 200

        def no_rebuild(*_: object) -> None:
            raise AssertionError("rebuilt from the catalog")

        monkeypatch.setattr(dedup_indexes, "spilled_vectors", no_rebuild)
        second = add_to_catalog(conn, range(201, 251), rng, dim, vt)
        idx.commit(second)
        assert len(DedupIndexes.open(conn, folder, "m", dim, vt).vectors) == 250  # loaded as saved
        # A run killed between its commit and the save: the next open adds what the index lacks.
        shutil.copytree(folder, tmp_path / "before")
        idx.commit(add_to_catalog(conn, range(251, 281), rng, dim, vt))
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "before", folder)
        idx = DedupIndexes.open(conn, folder, "m", dim, vt)
        assert isinstance(idx.vectors, ExactVectorIndex) and len(idx.vectors) == len(idx.hashes) == 280
        # Past EXACT_UP_TO the vector index becomes the compressed one, trained on what it held.
        idx.commit(add_to_catalog(conn, range(281, 401), rng, dim, vt))
        idx = DedupIndexes.open(conn, folder, "m", dim, vt)
        assert isinstance(idx.vectors, VectorIndex) and len(idx.vectors) == 400
        assert not (DedupIndexes.vector_folder(folder, "m") / "exact").exists()
        q = first.vectors[:20]
        _, matched, _ = idx.vectors.search(q, 1, 0.99)
        np.testing.assert_array_equal(matched, first.ids[:20])
        # An index holding an image the catalog does not (a catalog restored from a backup) is rebuilt.
        monkeypatch.undo()
        monkeypatch.setattr(dedup_indexes, "EXACT_UP_TO", 300)
        idx.vectors.add(np.array([9999]), q[:1])
        idx.hashes.add(np.array([9999]), np.array([7]))
        idx.save()
        idx = DedupIndexes.open(conn, folder, "m", dim, vt)
        assert 9999 not in idx.vectors.ids and 9999 not in idx.hashes.ids and len(idx.vectors) == 400
        assert not (folder / "scratch").exists()
        # Another model's vectors (after a recluster): the old model's index goes.
        assert len(DedupIndexes.open(conn, folder, "m2", dim, vt).vectors) == 0
        assert not DedupIndexes.vector_folder(folder, "m").exists()


def query(cfg: Config, sql: str, *params: object) -> list[tuple]:
    with db.connect(cfg) as conn:
        return conn.execute(sql, params).fetchall()


def group_of(cfg: Config, name: str) -> int | None:
    rows = query(cfg, "SELECT g.group_id FROM image_paths p LEFT JOIN image_dup_group g USING (image_id) "
                      "WHERE p.path LIKE %s", f"%/{name}")
    assert len(rows) == 1, name
    return rows[0][0]


@pytest.mark.slow
def test_copies_and_near_duplicates_across_runs(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    photos = PHOTOS[:12]
    for p in photos:
        shutil.copy(p, root / p.name)
    base = photos[3]
    shutil.copy(base, root / "exact copy.JPEG")
    with Image.open(base) as im:
        im.convert("RGB").resize((im.width // 2, im.height // 2)).save(root / "smaller.jpg", quality=80)
    first = run(cfg, [str(root)])
    assert first.counts.exact_copies == 1
    g = group_of(cfg, base.name)
    assert g is not None and group_of(cfg, "smaller.jpg") == g
    assert group_of(cfg, "exact copy.JPEG") == g  # the same image, so the same group
    unrelated = [p.name for p in photos if p != base]
    assert all(group_of(cfg, n) is None for n in unrelated)
    # Later runs: a mirrored copy joins the group; a grey copy of another photo starts a new one.
    later = root / "later"
    later.mkdir()
    with Image.open(base) as im:
        ImageOps.mirror(im.convert("RGB")).save(later / "mirrored.jpg", quality=90)
    with Image.open(photos[7]) as im:
        ImageOps.grayscale(im).save(later / "grey.png")
    run(cfg, [str(root)])
    assert group_of(cfg, "mirrored.jpg") == g
    other = group_of(cfg, photos[7].name)
    assert other is not None and other == group_of(cfg, "grey.png") and other != g
    (smallest,), = query(cfg, "SELECT min(image_id) FROM image_dup_group WHERE group_id = %s", g)
    assert smallest == g
