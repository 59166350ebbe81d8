"""Similarity categories end to end: incremental assignment across runs and a model-change recluster."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import IMAGENET, UKBENCH

from lookalike import db
from lookalike.cli import main
from lookalike.config import Config
from lookalike.db.load import copy_embeddings
from lookalike.driver.ingest import run
from lookalike.driver.recluster import recluster
from lookalike.labels.hierarchy import find_mask
from lookalike.layout import Layout
from lookalike.read.catalog import Catalog

pytestmark = pytest.mark.slow

SMALL_CLIP = "ViT-S-32-alt"  # a small open_clip architecture; random weights suffice to switch models


def query(cfg: Config, sql: str, *params: object) -> list[tuple]:
    with db.connect(cfg) as conn:
        return conn.execute(sql, params).fetchall()


def active(cfg: Config) -> str:
    with db.connect(cfg) as conn:
        return db.get_meta(conn, "active_model_ver")


def one_row_per_embedded_image(cfg: Config) -> None:
    ver = active(cfg)
    (embedded,), = query(cfg, "SELECT count(*) FROM image_embeddings WHERE model_ver = %s", ver)
    (members,), = query(cfg, "SELECT count(*) FROM image_cluster WHERE model_ver = %s", ver)
    (images,), = query(cfg, "SELECT count(*) FROM images")
    assert embedded == images == members


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    shutil.copytree(UKBENCH, root / "ukbench")
    (root / "imagenet").mkdir()
    for p in sorted(IMAGENET.glob("*.JPEG"))[:40]:
        shutil.copy(p, root / "imagenet" / p.name)
    return root


@pytest.fixture
def small_clip_ckpt(tmp_path: Path) -> Path:
    from lookalike.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch

    torch.manual_seed(0)
    path = tmp_path / f"{SMALL_CLIP}-random.pt"
    torch.save(open_clip.create_model(SMALL_CLIP).state_dict(), path)
    return path


def _category(name: str) -> str:
    with open(IMAGENET / "categories.csv", newline="") as f:
        return {r["file"]: r["category"] for r in csv.DictReader(f)}[name]


def test_assignments_survive_reruns_and_new_images_join(cfg: Config, archive: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    first = run(cfg, [str(archive)])
    assert first.clusters.created > 0
    one_row_per_embedded_image(cfg)
    # Five labels for every embedded image, from the embedding's own forward pass; every category named.
    (embedded,), = query(cfg, "SELECT count(*) FROM image_embeddings")
    labelled = query(cfg, "SELECT count(*), count(DISTINCT image_id) FROM image_labels")
    assert labelled == [(5 * embedded, embedded)]
    assert query(cfg, "SELECT count(*) FROM clusters WHERE name IS NULL") == [(0,)]
    (analysts,), = query(cfg, "SELECT id FROM clusters ORDER BY size DESC, id LIMIT 1")
    assert main(["label", str(analysts), "my favourites", "--home", str(cfg.home)]) == 0
    before = dict(query(cfg, "SELECT image_id, cluster_id FROM image_cluster"))
    assert run(cfg, [str(archive)]).counts.files == 0
    later = archive / "later"
    later.mkdir()
    for p in sorted(IMAGENET.glob("*.JPEG"))[40:70]:
        shutil.copy(p, later / p.name)
    second = run(cfg, [str(archive)])
    assert second.counts.new_images == 30
    assert second.clusters.joined + second.clusters.created > 0
    one_row_per_embedded_image(cfg)
    after = dict(query(cfg, "SELECT image_id, cluster_id FROM image_cluster"))
    assert all(after[i] == c for i, c in before.items()), "a settled image changed cluster"
    # The analyst's name survived the run, which named the categories it touched automatically.
    assert query(cfg, "SELECT name, name_source FROM clusters WHERE id = %s", analysts) == [
        ("my favourites", "analyst")]
    assert sum(second.joined.values()) == 30 and "joined" in second.describe()
    # find on a real run: the imagenet birds among the catalogued photos, one path a line.
    catalogued = [*sorted(IMAGENET.glob("*.JPEG"))[:70]]
    birds = {p.name for p in catalogued if _category(p.name) == "bird"}
    capsys.readouterr()
    assert main(["find", "birds", "--home", str(cfg.home)]) == 0
    found = {Path(line).name for line in capsys.readouterr().out.splitlines()}
    assert len(birds) == 26 and len(found & birds) >= 0.8 * len(birds)
    assert len(found - birds) <= 0.2 * len(found)
    # A word that means several things says so on stderr (all are searched); a name as shown asks for one.
    assert main(["find", "plant", "--home", str(cfg.home)]) == 0
    err = capsys.readouterr().err
    assert "'plant' means 2 things here" in err and "plant (organism)" in err
    assert main(["find", "plant (organism)", "--home", str(cfg.home)]) == 0
    assert capsys.readouterr().err == ""
    # One rule: the catalog's SQL finds exactly what find_mask finds on the stored top-5 labels.
    with Catalog(home=cfg.home) as cat:
        labels = cat.sql("SELECT image_id, class_id, score FROM image_labels ORDER BY image_id, rank")
        ids = labels["image_id"].to_numpy()[::5]
        top_idx = labels["class_id"].to_numpy().reshape(-1, 5)
        top_p = labels["score"].to_numpy().reshape(-1, 5)
        for word in ("bird", "dog", "vehicle"):
            expected = set(ids[find_mask(word, top_idx, top_p)].tolist())
            assert set(cat.find(word, limit=None)["image_id"].tolist()) == expected, word
    # Every image has its category when its run ends: sizes count every member.
    for cluster_id, size in query(cfg, "SELECT id, size FROM clusters"):
        (members,), = query(cfg, "SELECT count(*) FROM image_cluster WHERE cluster_id = %s", cluster_id)
        assert members == size
    # status lists the largest categories, one a line: size, then the name as the catalog has it.
    capsys.readouterr()
    assert main(["status", "--home", str(cfg.home)]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.strip().startswith("largest categories:"))
    shown = [line[23:].split(None, 1) for line in out[start : start + 8]]
    largest = query(cfg, "SELECT size, name FROM clusters ORDER BY size DESC, id LIMIT 8")
    assert [(int(size), name) for size, name in shown] == largest


def test_model_change_reclusters_from_thumbnails_only(cfg: Config, archive: Path, small_clip_ckpt: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run(cfg, [str(archive)])
    old_ver = active(cfg)
    (old_clusters,), = query(cfg, "SELECT count(*) FROM clusters WHERE model_ver = %s", old_ver)
    (named,), = query(cfg, "SELECT id FROM clusters ORDER BY size DESC, id LIMIT 1")
    assert main(["label", str(named), "holiday shots", "--home", str(cfg.home)]) == 0
    shutil.rmtree(archive)  # a recluster must not need a single original
    model = f"open_clip:{SMALL_CLIP}:{small_clip_ckpt}"

    # Embedded in batches of 20, each committed. A recluster that fails while loading the second
    # batch: recorded as failed, the old model stays active, the first batch's vectors stay.
    cfg["scan"]["manifest_files"] = 20
    loads = []

    def no_space_the_second_time(*args: object) -> None:
        loads.append(args)
        if len(loads) == 2:
            raise OSError("No space left on device")
        copy_embeddings(*args)

    monkeypatch.setattr("lookalike.driver.recluster.copy_embeddings", no_space_the_second_time)
    with pytest.raises(OSError, match="No space"):
        recluster(cfg, model)
    assert active(cfg) == old_ver
    assert query(cfg, "SELECT kind, status, message FROM runs ORDER BY run_id")[-1] == (
        "recluster", "failed", "No space left on device")
    monkeypatch.undo()
    (images,), = query(cfg, "SELECT count(*) FROM images")
    (kept_vectors,), = query(cfg, "SELECT count(*) FROM image_embeddings WHERE model_ver <> %s", old_ver)
    assert kept_vectors == 20 < images

    # The next one embeds only the images without a vector and completes.
    summary = recluster(cfg, model)
    new_ver = active(cfg)
    assert new_ver != old_ver and new_ver == summary.model_ver
    assert summary.embedded == images - 20 and summary.images == images
    one_row_per_embedded_image(cfg)
    assert not list(Layout(cfg.home).all_stages.glob("recluster-*")), "the failed attempt's stage is left"
    # The retired model's clusters stay (for the transition record) but are not the active ones.
    (kept,), = query(cfg, "SELECT count(*) FROM clusters WHERE model_ver = %s", old_ver)
    assert kept == old_clusters
    (moved,), = query(cfg, "SELECT sum(overlap) FROM cluster_transitions WHERE old_model_ver = %s "
                           "AND new_model_ver = %s", old_ver, new_ver)
    assert moved == summary.images
    (errors,), = query(cfg, "SELECT count(*) FROM ingest_errors WHERE error = 'embed'")
    assert errors == 0
    # The new model labels every image again (zero-shot for CLIP) and names its categories; the
    # analyst's name went to the new category that took half its members, or is listed to place.
    assert query(cfg, "SELECT count(DISTINCT image_id) FROM image_labels WHERE model_ver = %s", new_ver) == [
        (images,)]
    carried = query(cfg, "SELECT count(*) FROM clusters WHERE model_ver = %s AND name = 'holiday shots' "
                         "AND name_source = 'analyst'", new_ver)[0][0]
    assert (carried == 1) != (summary.unplaced_names == ["holiday shots"])
    unnamed = query(cfg, "SELECT count(*) FROM clusters WHERE model_ver = %s AND name IS NULL", new_ver)
    assert unnamed == [(0,)]


def test_a_doubled_catalog_is_clustered_again(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "grow"
    root.mkdir()
    photos = sorted(IMAGENET.glob("*.JPEG"))
    for p in photos[:30]:
        shutil.copy(p, root / p.name)
    run(cfg, [str(root)])
    ver = active(cfg)
    for p in photos[30:45]:  # 45 < 2 x 30: placed incrementally
        shutil.copy(p, root / p.name)
    assert run(cfg, [str(root)]).clusters.refits == 0
    before = dict(query(cfg, "SELECT image_id, cluster_id FROM image_cluster"))
    for p in photos[45:70]:  # 70 >= 2 x 30: everything is clustered again
        shutil.copy(p, root / p.name)
    grown = run(cfg, [str(root)])
    assert grown.clusters.refits == 1
    one_row_per_embedded_image(cfg)
    (sizes,), = query(cfg, "SELECT sum(size) FROM clusters WHERE model_ver = %s", ver)
    assert sizes == 70
    # The first images' old clusters are mapped onto the new ones for analysts.
    moved = query(cfg, "SELECT old_cluster_id, sum(overlap) FROM cluster_transitions "
                       "WHERE old_model_ver = %s AND new_model_ver = %s GROUP BY 1", ver, ver)
    assert sum(n for _, n in moved) == 45
    assert {c for c, _ in moved} == set(before.values())
