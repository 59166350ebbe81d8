"""The content-addressed store: originals filed under <root>/ab/cd/<sha256>.<ext> from the read
that hashed them, thumbnails beside them, `move` removing sources only after the catalog commits,
`lookalike verify`, and runs SIGKILLed while they write into the store."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import psycopg
import pytest
from catalog_snapshot import (
    RUN_CONFIG,
    Archive,
    Reference,
    catalog_uri,
    home_config,
    lookalike_run,
    seed_models,
    snapshot,
    stop_embedded_server,
)
from conftest import HIRES, IMAGENET, UKBENCH
from test_resume import TIMEOUT, kill_inside_a_load, until

from lookalike import cli, db, store
from lookalike.config import Config, load_config
from lookalike.driver.ingest import run
from lookalike.read.catalog import Catalog
from lookalike.stages.extract import ExtractSettings, extract_file

pytest_plugins = ["catalog_snapshot"]

PHOTO = UKBENCH / "base_images" / "ukbench00120.jpg"
DECODABLE = 20  # distinct decodable images of nd-ukbench (24 files: 2 exact copies, 2 bad files)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def originals(root: Path) -> list[Path]:
    """The store's originals (not thumbs/, not .partial/)."""
    return sorted(p for p in root.glob("??/??/*") if p.is_file())


def settings(tmp_path: Path, root: Path, mode: str, **kw: object) -> ExtractSettings:
    return ExtractSettings(str(tmp_path / "thumbs"), store=store.StoreSettings(str(root), mode),
                           **kw)  # type: ignore[arg-type]


# -- filing one file (the extract stage, no Spark) --------------------------------------------

def test_stored_names_follow_the_design() -> None:
    sha = "ab" + "cd" + "0" * 60
    assert store.relpath(sha, "JPEG") == f"ab/cd/{sha}.jpg"
    assert store.relpath(sha, "raw:dng") == f"ab/cd/{sha}.dng"
    assert store.relpath(sha, "HEIF") == f"ab/cd/{sha}.heic"
    assert store.relpath(sha, "PNG") == f"ab/cd/{sha}.png"
    assert store.relpath(sha, "TIFF") == f"ab/cd/{sha}.tif"


@pytest.mark.parametrize("mode", ["copy", "hardlink", "move"])
def test_each_mode_files_the_bytes_under_their_sha256(mode: str, tmp_path: Path) -> None:
    source = tmp_path / "drop" / "photo.jpg"
    source.parent.mkdir()
    shutil.copy(PHOTO, source)
    root = tmp_path / "store"
    store.prepare(str(root))
    row = extract_file(str(source), settings(tmp_path, root, mode))
    stored = root / store.relpath(row["sha256"], "JPEG")
    assert row["error"] is None and row["stored"] == str(stored)
    assert stored.read_bytes() == PHOTO.read_bytes()
    linked = os.stat(stored).st_ino == os.stat(source).st_ino
    assert row["store_action"] == ("copy" if mode == "copy" else "link")
    assert linked == (mode != "copy")
    assert source.exists(), "the extract never removes a source (move does, after the commit)"
    assert not list((root / store.PARTIAL).iterdir()), "a temporary file was left"


def test_the_same_bytes_again_add_no_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store.prepare(str(root))
    s = settings(tmp_path, root, "copy")
    first = extract_file(str(PHOTO), s)
    stored = Path(first["stored"])
    before = os.stat(stored)
    twin = tmp_path / "twin.jpg"
    shutil.copy(PHOTO, twin)
    again = extract_file(str(twin), s)
    assert (again["stored"], again["store_action"]) == (first["stored"], "exists")
    after = os.stat(stored)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "rewritten"
    assert originals(root) == [stored]


def test_hardlink_across_filesystems_falls_back_to_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    root = shm / f"lookalike-test-store-{os.getpid()}"
    try:
        store.prepare(str(root))
        row = extract_file(str(PHOTO), settings(tmp_path, root, "hardlink"))
        assert row["error"] is None and row["store_action"] == "copy"
        assert Path(row["stored"]).read_bytes() == PHOTO.read_bytes()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_file_too_large_to_hold_is_copied_from_the_one_read(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    photo = min(HIRES.glob("*.jp*g"), key=lambda p: p.stat().st_size)
    root = tmp_path / "store"
    store.prepare(str(root))
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(io, "open", io.open)
    row = extract_file(str(photo), settings(tmp_path, root, "copy", max_read_bytes=1 << 20))
    assert row["error"] is None and row["store_action"] == "copy"
    assert opened.count(str(photo)) == 1, "the original was read twice"
    assert sha256(Path(row["stored"])) == row["sha256"] == sha256(photo)


def test_a_bad_file_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store.prepare(str(root))
    bad_files = (UKBENCH / "mixed_images" / "ukbench09268_corrupt.jpg",
                 UKBENCH / "formats_images" / "marbles.pbm")
    for bad in bad_files:
        for limit in (256 << 20, 1000):  # held in memory, and streamed through the temporary copy
            row = extract_file(str(bad), settings(tmp_path, root, "copy", max_read_bytes=limit))
            assert row["error"] is not None and row["stored"] is None
    assert originals(root) == [] and not list((root / store.PARTIAL).iterdir())


def test_prepare_removes_a_killed_runs_temporary_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / store.PARTIAL).mkdir(parents=True)
    (root / store.PARTIAL / "tmpabc.tmp").write_bytes(b"half a file")
    assert store.prepare(str(root)) == 1
    assert not list((root / store.PARTIAL).iterdir())


# -- runs (local Spark, the embedded PostgreSQL) -------------------------------------------------

def store_config(tmp_path: Path, home: Path, root: Path, mode: str) -> Config:
    file = tmp_path / f"store-{mode}.toml"
    file.write_text(f'[store]\nroot = "{root}"\nmode = "{mode}"\n')
    return load_config(file, home)


def query(cfg: Config, sql: str, *params: object) -> list[tuple]:
    with db.connect(cfg) as conn:
        return conn.execute(sql, params).fetchall()


def files_and_times(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_copy_mode_run_rerun_exact_copy_and_verify(tmp_path: Path, ukbench_copy: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    home, root = tmp_path / "home", tmp_path / "store"
    cfg = store_config(tmp_path, home, root, "copy")
    first = run(cfg, [str(ukbench_copy)])
    assert (first.store.copied, first.store.existing, first.store.linked) == (DECODABLE, 2, 0)
    rows = query(cfg, "SELECT file_sha256, format, store_path, thumb_path FROM images")
    assert len(rows) == DECODABLE
    for sha, fmt, stored, thumb in rows:
        assert stored == str(root / store.relpath(sha, fmt)) and sha256(Path(stored)) == sha
        assert (root / "thumbs" / thumb).is_file()
    assert not (home / "thumbs").exists(), "thumbnails belong in the store"
    assert len(originals(root)) == DECODABLE

    # A rerun writes nothing; a new path with known bytes adds a path, not a file.
    before = files_and_times(root)
    assert run(cfg, [str(ukbench_copy)]).counts.files == 0
    assert files_and_times(root) == before
    twin = ukbench_copy / "later" / "same-bytes.jpg"
    twin.parent.mkdir()
    shutil.copy(PHOTO, twin)
    third = run(cfg, [str(ukbench_copy)])
    assert (third.counts.exact_copies, third.store.existing, third.store.copied) == (1, 1, 0)
    assert files_and_times(root) == before
    assert query(cfg, "SELECT count(*) FROM image_paths WHERE path = %s", str(twin)) == [(1,)]

    # A store of another root is refused before anything starts.
    other = store_config(tmp_path, home, tmp_path / "elsewhere", "copy")
    with pytest.raises(ValueError, match="keeps the store it was created with"):
        run(other, [str(ukbench_copy)])

    # verify: consistent, then a deleted, an added and a corrupted stored file.
    args = ["verify", "--home", str(home), "--config", str(tmp_path / "store-copy.toml")]
    assert cli.main(args) == 0
    capsys.readouterr()
    deleted, corrupted = originals(root)[:2]
    deleted.unlink()
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    added = root / "ff" / "ff" / ("f" * 64 + ".jpg")
    added.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(IMAGENET / "n01440764_tench.JPEG", added)
    assert cli.main(args) == 3
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split(":")[0] for line in out) == ["missing", "unknown"], out
    assert cli.main([*args, "--full"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split(": ")[:2] for line in out) == [
        ["corrupt", str(corrupted)], ["missing", str(deleted)], ["unknown", str(added)]], out


@pytest.mark.slow
def test_move_mode_removes_only_committed_sources(tmp_path: Path, ukbench_copy: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    home, root = tmp_path / "home", tmp_path / "store"
    cfg = store_config(tmp_path, home, root, "move")
    kept = {p: p.stat().st_mtime_ns for p in ukbench_copy.rglob("*") if p.is_file()}
    summary = run(cfg, [str(ukbench_copy)])
    assert summary.store.removed == DECODABLE + 2  # and the two exact copies' sources
    left = sorted(str(p.relative_to(ukbench_copy)) for p in ukbench_copy.rglob("*") if p.is_file())
    assert left == ["formats_images/marbles.pbm", "mixed_images/ukbench09268_corrupt.jpg"]
    # Same filesystem: linked in, so the stored copies are the very files (inode count now 1).
    assert summary.store.linked == DECODABLE and all(p.stat().st_nlink == 1 for p in originals(root))

    # Readers open the stored copy now that the source is gone.
    with Catalog(home=home) as cat:
        image_id = int(cat.sql("SELECT min(id) AS i FROM images")["i"][0])
        hits = cat.similar(image_id, k=3)
        assert not hits.empty and all(str(p).startswith(str(root)) for p in hits["path"].dropna())
        assert cat.images()["store_path"].notna().all()

    # A source a killed run left behind after its commit (here: put back, unchanged) goes next time.
    back = ukbench_copy / "base_images" / PHOTO.name
    stored_photo = root / store.relpath(sha256(PHOTO), "JPEG")
    shutil.copy2(stored_photo, back)
    os.utime(back, ns=(kept[back], kept[back]))
    again = run(cfg, [str(ukbench_copy)])
    assert again.counts.files == 0 and again.store.removed == 1 and not back.exists()
    assert stored_photo.is_file()


# -- SIGKILLed copy-mode runs ---------------------------------------------------------------------

@pytest.fixture
def store_archive(archive: Archive, tmp_path: Path) -> tuple[Archive, Path]:
    root = tmp_path / "store"
    config = tmp_path / "store.toml"
    config.write_text(RUN_CONFIG + f'[store]\nroot = "{root}"\nmode = "copy"\n')
    return Archive(archive.root, config, archive.sha256), root


@pytest.mark.slow
def test_killed_copy_mode_runs_leave_store_and_catalog_consistent(
        store_archive: tuple[Archive, Path], reference: Reference, tmp_path: Path) -> None:
    archive, root = store_archive
    home = tmp_path / "home"
    seed_models(reference.home, home)
    try:
        # 1. Killed while extract tasks file originals into the store.
        killed = lookalike_run(archive, home, tmp_path)
        try:
            until(lambda: originals(root), "originals filed into the store", killed)
        finally:
            killed.kill()
        # 2. Killed inside the third manifest's load: its originals are filed, its rows are not.
        kill_inside_a_load(archive, home, tmp_path)
        with catalog_uri(home_config(home)) as uri, psycopg.connect(uri) as conn:
            catalogued = {r[0] for r in conn.execute("SELECT store_path FROM images")}
        assert catalogued <= {str(p) for p in originals(root)}, "a catalog row points at no file"
        # 3. Then a run to the end, and verify.
        final = lookalike_run(archive, home, tmp_path)
        assert final.wait(TIMEOUT) == 0, final.tail()
        archive.check(snapshot(home_config(home)))
        assert not list((root / store.PARTIAL).iterdir()), "temporary files left"
        assert cli.main(["verify", "--full", "--home", str(home), "--config", str(archive.config)]) == 0
    finally:
        stop_embedded_server(home)
