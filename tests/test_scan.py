"""Enumeration: the driver's plan plus the subtree walks find each wanted file exactly once."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import UKBENCH

from lookalike.stages.scan import ScanSettings, plan, walk

EXTS = [".jpg", ".png", ".gif"]


def enumerate_all(root: Path, split_dirs: int) -> dict[str, tuple]:
    settings = ScanSettings.create([str(root)], EXTS)
    subtrees, rows = plan(settings, split_dirs)
    for sub in subtrees:
        rows.extend(walk(sub, settings))
    paths = [r[0] for r in rows]
    assert len(paths) == len(set(paths)), "a file was listed twice"
    return {r[0]: r for r in rows}


def make_tree(root: Path, dirs: int = 12, files: int = 3) -> set[str]:
    wanted = set()
    for d in range(dirs):
        sub = root / f"y{d % 3}" / f"m{d}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"img{f}.jpg").write_bytes(b"x" * (f + 1))
            wanted.add(str(sub / f"img{f}.jpg"))
        (sub / "notes.txt").write_text("not an image")
    return wanted


def test_plan_and_walk_find_everything_whatever_the_split(tmp_path: Path) -> None:
    wanted = make_tree(tmp_path)
    for split in (1, 3, 8, 1000):
        found = enumerate_all(tmp_path, split)
        assert set(found) == wanted
        assert all(r[3] is None for r in found.values())


def test_symlink_loop_ends_and_links_inside_are_followed(tmp_path: Path) -> None:
    wanted = make_tree(tmp_path, dirs=3, files=1)
    os.symlink(tmp_path, tmp_path / "y0" / "loop")           # to an ancestor: never followed
    os.symlink(tmp_path / "y1", tmp_path / "y2" / "alias")   # to a sibling inside the root
    found = enumerate_all(tmp_path, 2)
    aliased = {p for p in found if "/alias/" in p}
    assert aliased and all(Path(p).resolve().is_relative_to(tmp_path / "y1") for p in aliased)
    assert not [p for p in found if "/loop/" in p]
    assert wanted <= set(found)


def test_links_outside_the_root_are_reported_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"outside")
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside, root / "linkdir")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    found = enumerate_all(root, 4)
    assert found[str(root / "link.jpg")][3] == "outside_root"
    assert found[str(root / "linkdir")][3] == "outside_root"
    assert found[str(root / "dangling.jpg")][3] == "broken_link"
    assert not [p for p in found if "secret" in p]


def test_fifo_with_an_image_name_is_an_error_row(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    found = enumerate_all(tmp_path, 4)
    assert found[str(tmp_path / "pipe.jpg")][3] == "not_a_file"


def test_real_tree(tmp_path: Path) -> None:
    settings_exts = [".jpg", ".png", ".gif", ".bmp", ".webp", ".ppm", ".pgm", ".pbm", ".tiff"]
    # Roots are resolved (a symlinked root lists the real paths), so compare with the real tree.
    settings = ScanSettings.create([str(UKBENCH)], settings_exts)
    subtrees, rows = plan(settings, 2)
    for sub in subtrees:
        rows.extend(walk(sub, settings))
    real = UKBENCH.resolve()
    expected = {str(p) for p in real.rglob("*") if p.is_file() and p.suffix.lower() in settings_exts}
    assert {r[0] for r in rows} == expected
