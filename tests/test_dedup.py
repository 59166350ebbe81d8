"""Near-duplicate pairs and groups: the catalog-side dedup stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import IMAGENET
from PIL import Image, ImageOps

from lookalike import db
from lookalike.config import Config
from lookalike.dedup import NearDupConfig, NewImages, find_pairs, merge_groups
from lookalike.neardup import HashIndex, VectorIndex
from lookalike.pipeline import run


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


def new_images(ids: list[int], hashes: list[int], vecs: np.ndarray) -> NewImages:
    n = len(ids)
    return NewImages(ids=np.asarray(ids, np.int64), phash=np.asarray(hashes, np.int64),
                     dihedral=np.tile(np.asarray(hashes, np.int64)[:, None] ^ 0x0F0F0F0F0F0F0F0F, (1, 7)),
                     vectors=vecs.astype(np.float32), has_vector=np.ones(n, bool))


def test_find_pairs_against_the_catalog_and_within_the_batch() -> None:
    rng = np.random.default_rng(0)
    catalog_hashes = rng.integers(-2**63, 2**63 - 1, size=200, dtype=np.int64)
    catalog_vecs = rng.normal(size=(200, 64)).astype(np.float32)
    catalog_vecs /= np.linalg.norm(catalog_vecs, axis=1, keepdims=True)
    hashes = HashIndex(np.arange(1, 201), catalog_hashes)
    vectors = VectorIndex(64)
    vectors.add(np.arange(1, 201), catalog_vecs)
    near_hash = int(catalog_hashes[9] ^ 0b1011)  # 3 bits from image 10
    far = rng.normal(size=(2, 64)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    vecs = np.stack([far[0], far[1], far[1]])  # 502 and 503 share an embedding
    new = new_images([501, 502, 503], [near_hash, 12345, -999], vecs)
    stored = dict(zip(range(1, 201), catalog_vecs, strict=True))
    found = find_pairs(new, hashes, vectors, NearDupConfig(), lambda ids: {i: stored[i] for i in ids})
    got = {(a, b, m) for a, b, m in found[["image_id", "other_id", "method"]].itertuples(index=False)}
    assert (10, 501, "phash") in got
    assert (502, 503, "embedding") in got
    assert all(a < b for a, b, _ in got)
    assert not [p for p in got if 501 in p[:2] and p[2] == "embedding"]


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
    photos = sorted(IMAGENET.glob("*.JPEG"))[:12]
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
