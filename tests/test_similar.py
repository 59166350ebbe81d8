"""`lookalike similar` and Catalog.similar on the analyst catalog (built in test_catalog)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
from PIL import Image
from test_catalog import ORIGINAL, RESIZED_NAME, analyst_home, bytea_copy

from lookalike import Catalog, db
from lookalike.cli import main
from lookalike.db.vector_io import vector_to_db
from lookalike.models.registry import resolve_model
from lookalike.models.runtime import get_embedder, l2_normalize

pytestmark = pytest.mark.slow

DOG = "n02086079_Pekinese.JPEG"  # one of the catalogued dogs, stored once
SMALL_CLIP = "ViT-S-32-alt"  # a small open_clip architecture: random weights exercise the text path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return analyst_home(tmp_path_factory)


@pytest.fixture
def cat(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Catalog]:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    with Catalog(home=home) as c:
        yield c


def image_of(cat: Catalog, name: str) -> int:
    (image_id,), = cat.sql("SELECT image_id FROM image_paths WHERE path LIKE %s", (f"%/{name}",)).values
    return int(image_id)


def archive_file(cat: Catalog, name: str) -> Path:
    (path,), = cat.sql("SELECT path FROM image_paths WHERE path LIKE %s", (f"%/{name}",)).values
    return Path(path)


def top(results: pd.DataFrame, kind: str) -> pd.Series:
    return results[results["kind"] == kind].iloc[0]


def test_a_catalogued_copy_finds_itself_and_its_original(cat: Catalog) -> None:
    copy = archive_file(cat, RESIZED_NAME)
    results = cat.similar(copy, k=5)
    exact = results[results["kind"] == "exact"]
    assert exact["image_id"].tolist() == [image_of(cat, RESIZED_NAME)]
    assert exact["paths"].iloc[0] == [str(copy)]
    original = image_of(cat, ORIGINAL)
    assert top(results, "near-duplicate")["image_id"] == original
    assert top(results, "semantic")["image_id"] == original
    # Each kind is ranked by distance and never lists the query's own image again.
    for kind, part in results.groupby("kind"):
        assert part["distance"].is_monotonic_increasing
        assert part["rank"].tolist() == list(range(1, len(part) + 1))
        if kind != "exact":
            assert exact["image_id"].iloc[0] not in set(part["image_id"])
    assert "catalogued as image" in results.attrs["query"]


def test_a_resized_copy_outside_the_catalog_finds_its_original(cat: Catalog, tmp_path: Path) -> None:
    dog = image_of(cat, DOG)
    copy = tmp_path / "smaller.jpg"
    with Image.open(archive_file(cat, DOG)) as im:
        im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR).save(copy, quality=75)
    results = cat.similar(copy, k=3)
    assert results[results["kind"] == "exact"].empty
    assert "not in the catalog" in results.attrs["query"]
    nearest = top(results, "near-duplicate")
    assert (nearest["image_id"], nearest["method"]) == (dog, "phash") and nearest["distance"] <= 4
    assert top(results, "semantic")["image_id"] == dog and top(results, "semantic")["distance"] < 0.1
    # The same picture handed over in memory, and the catalogued image by its id.
    with Image.open(copy) as im:
        in_memory = cat.similar(im.copy(), k=3)
    assert top(in_memory, "near-duplicate")["image_id"] == dog and in_memory[in_memory.kind == "exact"].empty
    by_id = cat.similar(dog, k=3)
    assert top(by_id, "exact")["image_id"] == dog and top(by_id, "semantic")["image_id"] != dog


def test_a_mirrored_copy_is_found_through_the_flipped_hash(cat: Catalog, tmp_path: Path) -> None:
    mirrored = tmp_path / "mirrored.png"
    with Image.open(archive_file(cat, DOG)) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    nearest = top(cat.similar(mirrored, k=3), "near-duplicate")
    assert (nearest["image_id"], nearest["method"], nearest["transform"]) == \
        (image_of(cat, DOG), "phash_orient", "flip_left_right")


def test_bytea_vectors_rank_like_pgvector(cat: Catalog, home: Path) -> None:
    query = archive_file(cat, RESIZED_NAME)
    with Catalog(home=home, dsn=bytea_copy(home)) as plain:
        assert plain.vector_type == "bytea"
        streamed = plain.similar(query, k=6)
    reference = cat.similar(query, k=6)
    a, b = (r[r["kind"] == "semantic"] for r in (streamed, reference))
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert np.allclose(a["distance"], b["distance"], atol=1e-5)


def test_cli_prints_a_table(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    with Catalog(home=home) as cat:
        original = archive_file(cat, DOG)
    copy = tmp_path / "copy.jpg"
    with Image.open(original) as im:
        im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(copy, quality=80)
    assert main(["similar", str(copy), "-k", "3", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"query: {copy} (") and "not in the catalog" in out
    sections = out.split("\n\n")
    titles = [s.splitlines()[0] for s in sections[1:]]
    assert [t.split(" (")[0] for t in titles] == ["exact copies", "near-duplicates", "semantic neighbours"]
    assert sections[1].splitlines()[1].strip() == "none"
    for section in sections[2:]:
        header, first = section.splitlines()[1:3]
        assert header.split()[:3] == ["rank", "image", "distance"]
        assert first.split()[0] == "1" and first.rstrip().endswith(str(original))


def test_text_query_on_an_image_only_model_is_one_clear_line(
        home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    assert main(["similar", "--text", "a dog on a beach", "--home", str(home)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("lookalike: effnet-lite0 is an image-only model") and "CLIP" in line
    assert main(["similar", "--home", str(home)]) == 2  # neither a file nor a text
    assert "give one query" in capsys.readouterr().err


def test_text_query_on_a_clip_model(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Random weights make the ranking meaningless; what is checked is text -> CLIP -> neighbours."""
    from lookalike.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(SMALL_CLIP).state_dict(), ckpt)
    model = f"open_clip:{SMALL_CLIP}:{ckpt}"
    spec = resolve_model(model)
    dsn = bytea_copy(home)  # its own database: the shared catalog keeps its model
    with psycopg.connect(dsn, autocommit=True) as conn:
        saved = {key: db.get_meta(conn, key) for key in ("active_model", "active_model_ver")}
        ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY id")]
        vectors = l2_normalize(np.random.default_rng(0).normal(size=(len(ids), spec.dim)))
        with conn.transaction():
            for image_id, vec in zip(ids, vectors, strict=True):
                conn.execute("INSERT INTO image_embeddings VALUES (%s, %s, %s)",
                             (image_id, spec.model_ver, vector_to_db(vec, "bytea")))
            db.set_meta(conn, "active_model", model)
            db.set_meta(conn, "active_model_ver", spec.model_ver)
    try:
        monkeypatch.setenv("LOOKALIKE_DSN", dsn)
        assert main(["similar", "--text", "a dog", "-k", "4", "--home", str(home)]) == 0
        out = capsys.readouterr().out
        text = get_embedder(spec, backend="torch").embed_text(["a dog"])[0]
        expected = [ids[i] for i in np.argsort(1 - vectors @ text, kind="stable")[:4]]
        assert out.startswith("query: text 'a dog'") and "exact copies" not in out
        rows = out.split("semantic neighbours")[1].splitlines()[2:]
        assert [int(r.split()[1]) for r in rows] == expected
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("DELETE FROM image_embeddings WHERE model_ver = %s", (spec.model_ver,))
            for key, value in saved.items():
                db.set_meta(conn, key, value)


def near_duplicate_ids(results: pd.DataFrame) -> set[int]:
    return set(results.loc[results["kind"] == "near-duplicate", "image_id"].astype(int))


def test_similar_lists_exactly_the_near_duplicates_the_catalog_holds(cat: Catalog) -> None:
    """One pair rule: for every catalogued image, `similar` names the pairs the catalog holds."""
    held: dict[int, set[int]] = {}
    for a, b in cat.sql("SELECT image_id, other_id FROM near_duplicates").itertuples(index=False):
        held.setdefault(int(a), set()).add(int(b))
        held.setdefault(int(b), set()).add(int(a))
    images = cat.sql("SELECT image_id FROM image_hashes ORDER BY image_id")["image_id"].astype(int)
    assert len(images) > 20 and sum(map(len, held.values())) > 0
    for image_id in images:
        assert near_duplicate_ids(cat.similar(image_id, k=1000)) == held.get(image_id, set()), image_id


def test_similar_on_a_new_file_finds_the_pairs_its_run_then_records(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A file outside the catalog is tested as a run's new image: what `similar` says of it before
    a run is what the run records for it (pHash, flipped and embedding pairs alike)."""
    from conftest import IMAGENET

    from lookalike.config import load_config
    from lookalike.driver.ingest import run

    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    archive, incoming = tmp_path / "archive", tmp_path / "incoming"
    archive.mkdir()
    incoming.mkdir()
    photos = sorted(IMAGENET.glob("*.JPEG"))[::25][:16]
    for p in photos:
        (archive / p.name).write_bytes(p.read_bytes())
    for i, p in enumerate(photos[:3]):
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.resize((im.width * 3 // 5, im.height * 3 // 5), Image.Resampling.LANCZOS).save(
                incoming / f"resized-{i}.jpg", quality=80)
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(incoming / f"mirrored-{i}.jpg", quality=90)
            w, h = im.size
            im.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(incoming / f"cropped-{i}.jpg", quality=90)
    cfg = load_config(None, tmp_path / "home")
    run(cfg, [str(archive)])
    with Catalog(config=cfg) as c:
        before = {f.name: near_duplicate_ids(c.similar(f, k=100)) for f in sorted(incoming.iterdir())}
    assert sum(map(len, before.values())) >= 6  # most variants find their photo
    for f in incoming.iterdir():
        f.rename(archive / f.name)
    run(cfg, [str(archive)])
    with Catalog(config=cfg) as c:
        new_ids = {name: image_of(c, name) for name in before}
        for name, found in before.items():
            me = new_ids[name]
            recorded = set(c.sql("SELECT CASE WHEN image_id = %(i)s THEN other_id ELSE image_id END AS o "
                                 "FROM near_duplicates WHERE %(i)s IN (image_id, other_id)",
                                 {"i": me})["o"].astype(int))
            # Pairs among the batch itself were not in the catalog when `similar` ran.
            assert found == recorded - set(new_ids.values()), name
