"""End to end on real photos: scan -> extract -> load into the embedded PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import IMAGENET, UKBENCH

from lookalike import db
from lookalike.config import Config
from lookalike.driver.ingest import run

pytestmark = pytest.mark.slow

DECODABLE = 22  # nd-ukbench's 24 files less the corrupt JPEG and the truncated PBM


def query(cfg: Config, sql: str, *params: object) -> list[tuple]:
    with db.connect(cfg) as conn:
        return conn.execute(sql, params).fetchall()


def test_first_run_second_run_and_one_added_file(cfg: Config, ukbench_copy: Path) -> None:
    first = run(cfg, [str(ukbench_copy)])
    assert first.counts.files == 24
    assert first.counts.errors == 2
    # Two photos are stored twice under different names: one image, two paths each.
    assert first.counts.new_images == DECODABLE - 2
    assert first.counts.exact_copies == 2
    (n_images,), = query(cfg, "SELECT count(*) FROM images")
    (n_paths,), = query(cfg, "SELECT count(*) FROM image_paths")
    assert (n_images, n_paths) == (DECODABLE - 2, DECODABLE)
    shared = query(cfg, "SELECT i.file_sha256, array_agg(p.path ORDER BY p.path) FROM images i "
                        "JOIN image_paths p ON p.image_id = i.id GROUP BY i.file_sha256 HAVING count(*) > 1")
    names = sorted(sorted(Path(p).name for p in paths) for _, paths in shared)
    assert names == [["ukbench00120.jpg"] * 2, ["ukbench09268.jpg"] * 2]
    errors = dict(query(cfg, "SELECT path, error FROM ingest_errors"))
    corrupt = str(ukbench_copy / "mixed_images" / "ukbench09268_corrupt.jpg")
    truncated = str(ukbench_copy / "formats_images" / "marbles.pbm")
    assert set(errors) == {corrupt, truncated}
    for (message,) in query(cfg, "SELECT message FROM ingest_errors"):
        assert message and "\n" not in message
    (hashed,), = query(cfg, "SELECT count(*) FROM image_hashes")
    assert hashed == n_images
    for (thumb,) in query(cfg, "SELECT thumb_path FROM images"):
        assert (cfg.home / "thumbs" / thumb).is_file()

    second = run(cfg, [str(ukbench_copy)])
    assert second.counts.files == 0 and second.manifests == 0
    (manifests,), = query(cfg, "SELECT count(*) FROM manifests")
    assert manifests == 1

    added = ukbench_copy / "new" / "tench.JPEG"
    added.parent.mkdir()
    shutil.copy(IMAGENET / "n01440764_tench.JPEG", added)
    third = run(cfg, [str(ukbench_copy)])
    assert (third.counts.files, third.counts.new_images) == (1, 1)
    assert query(cfg, "SELECT path FROM image_paths WHERE path LIKE %s", "%tench%") == [(str(added),)]

    # A changed file is a new image; the path's history keeps the old one.
    shutil.copy(IMAGENET / "n01484850_great_white_shark.JPEG", added)
    fourth = run(cfg, [str(ukbench_copy)])
    assert (fourth.counts.files, fourth.counts.new_images) == (1, 1)
    (history,), = query(cfg, "SELECT count(*) FROM image_path_history WHERE path = %s", str(added))
    assert history == 1


def test_unchanged_bad_files_are_not_retried_unless_asked(cfg: Config, ukbench_copy: Path) -> None:
    run(cfg, [str(ukbench_copy)])
    assert run(cfg, [str(ukbench_copy)]).counts.files == 0
    retried = run(cfg, [str(ukbench_copy)], retry_errors=True)
    assert (retried.counts.files, retried.counts.errors) == (2, 2)
    (n_errors,), = query(cfg, "SELECT count(*) FROM ingest_errors")
    assert n_errors == 2


def test_run_summary_is_stored(cfg: Config) -> None:
    summary = run(cfg, [str(UKBENCH)])
    (status, stored), = query(cfg, "SELECT status, summary FROM runs WHERE run_id = %s", summary.run_id)
    assert status == "ok"
    assert stored["new_images"] == summary.counts.new_images
