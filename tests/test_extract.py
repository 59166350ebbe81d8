"""Per-file extraction on real photos and on the odd files an archive always holds."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import UKBENCH
from PIL import Image

from lookalike.driver.stages import extract_tasks
from lookalike.stages.extract import ExtractSettings, extract_file, thumb_relpath

PHOTO = UKBENCH / "base_images" / "ukbench01380.jpg"


@pytest.fixture
def settings(tmp_path: Path) -> ExtractSettings:
    return ExtractSettings(str(tmp_path / "thumbs"))


def photo(size: tuple[int, int] | None = None) -> Image.Image:
    im = Image.open(PHOTO).convert("RGB")
    return im.resize(size) if size else im


def test_real_jpeg_gives_identity_size_hashes_and_thumbnail(settings: ExtractSettings) -> None:
    row = extract_file(str(PHOTO), settings)
    assert row["error"] is None
    assert row["sha256"] == hashlib.sha256(PHOTO.read_bytes()).hexdigest()
    assert (row["format"], row["width"], row["height"]) == ("JPEG", 640, 480)
    thumb = Path(settings.thumbs_dir) / row["thumb"]
    assert row["thumb"] == thumb_relpath(row["sha256"], 512)
    with Image.open(thumb) as t:
        assert max(t.size) == 512 and t.mode == "RGB"
    assert len(row["phash_dihedral"]) == 7


def test_large_jpeg_is_decoded_at_reduced_scale_but_thumbnail_is_full_size(
        settings: ExtractSettings, tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    photo((4000, 3000)).save(big, quality=92)
    row = extract_file(str(big), settings)
    assert (row["width"], row["height"]) == (4000, 3000)
    with Image.open(Path(settings.thumbs_dir) / row["thumb"]) as t:
        assert t.size == (512, 384)


def test_thumbnail_is_not_rewritten_when_present(settings: ExtractSettings) -> None:
    row = extract_file(str(PHOTO), settings)
    thumb = Path(settings.thumbs_dir) / row["thumb"]
    before = thumb.stat().st_mtime_ns
    extract_file(str(PHOTO), settings)
    assert thumb.stat().st_mtime_ns == before
    assert not [p for p in thumb.parent.iterdir() if p.name.endswith(".tmp")]


def test_exif_orientation_is_applied(settings: ExtractSettings, tmp_path: Path) -> None:
    upright = photo()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view" undoes the CCW rotation above
    p = tmp_path / "rotated.jpg"
    stored.save(p, quality=95, exif=exif)
    row = extract_file(str(p), settings)
    assert (row["width"], row["height"]) == (640, 480)
    straight = tmp_path / "straight.jpg"
    upright.save(straight, quality=95)
    ref = extract_file(str(straight), settings)
    assert bin((row["phash"] ^ ref["phash"]) & (2**64 - 1)).count("1") <= 4


@pytest.mark.parametrize("kind", ["cmyk", "png16", "tiff16", "palette_alpha", "gif_anim", "progressive",
                                  "grey", "la"])
def test_odd_modes_are_converted_properly(kind: str, settings: ExtractSettings, tmp_path: Path) -> None:
    im = photo()
    p = tmp_path / f"{kind}.img"
    if kind == "cmyk":
        im.convert("CMYK").save(p, "JPEG", quality=95)
    elif kind in ("png16", "tiff16"):
        grey16 = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(grey16).save(p, "PNG" if kind == "png16" else "TIFF")
    elif kind == "palette_alpha":
        pal = im.convert("P", palette=Image.Palette.ADAPTIVE)
        pal.info["transparency"] = 0
        pal.save(p, "PNG", transparency=0)
    elif kind == "gif_anim":
        frames = [im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        frames[0].save(p, "GIF", save_all=True, append_images=frames[1:], duration=100)
    elif kind == "progressive":
        im.save(p, "JPEG", quality=90, progressive=True)
    elif kind == "grey":
        im.convert("L").save(p, "PNG")
    elif kind == "la":
        im.convert("LA").save(p, "PNG")
    row = extract_file(str(p), settings)
    assert row["error"] is None, row["message"]
    with Image.open(Path(settings.thumbs_dir) / row["thumb"]) as t:
        arr = np.asarray(t.convert("L"), dtype=np.float64)
    # Properly scaled: a real photo, not a blown-out or black frame.
    assert 40 < arr.mean() < 215 and arr.std() > 20
    reference = extract_file(str(PHOTO), settings)
    if kind in ("cmyk", "png16", "tiff16", "progressive", "grey", "la", "gif_anim"):
        assert bin((row["phash"] ^ reference["phash"]) & (2**64 - 1)).count("1") <= 10


@pytest.mark.parametrize(("make", "code"), [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(PHOTO.read_bytes()[:5000]), "decode"),
    (lambda p: p.write_bytes(os.urandom(20000)), "not_an_image"),
    (lambda p: os.mkfifo(p), "not_a_file"),
])
def test_bad_files_become_one_line_errors(make, code: str, settings: ExtractSettings,
                                          tmp_path: Path) -> None:
    p = tmp_path / "bad.jpg"
    make(p)
    row = extract_file(str(p), settings)
    assert row["error"] == code
    assert row["message"] and "\n" not in row["message"]
    assert row["thumb"] is None


def test_decompression_bomb_is_refused(settings: ExtractSettings, tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(p, optimize=True)
    small_limit = ExtractSettings(settings.thumbs_dir, max_image_pixels=50_000_000)
    row = extract_file(str(p), small_limit)
    assert row["error"] == "too_large"
    assert "bomb" in row["message"]


def test_vanished_file(settings: ExtractSettings, tmp_path: Path) -> None:
    row = extract_file(str(tmp_path / "gone.jpg"), settings)
    assert row["error"] == "vanished"


def test_file_over_the_read_limit_is_streamed_with_the_same_result(tmp_path: Path) -> None:
    whole = extract_file(str(PHOTO), ExtractSettings(str(tmp_path / "a")))
    streamed = extract_file(str(PHOTO), ExtractSettings(str(tmp_path / "b"), max_read_bytes=1000))
    for key in ("sha256", "phash", "dhash", "ahash", "width", "height"):
        assert whole[key] == streamed[key]


def test_unwritable_thumbnail_folder_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "thumbs"
    blocker.write_text("a file where the folder should be")
    row = extract_file(str(PHOTO), ExtractSettings(str(blocker)))
    assert row["error"] == "thumbnail"


def test_bytes_are_read_once(settings: ExtractSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(io, "open", io.open)
    extract_file(str(PHOTO), settings)
    assert opened.count(str(PHOTO)) == 1


def test_extract_tasks_follow_bytes_not_file_counts() -> None:
    mb = 1 << 20
    assert extract_tasks(40, 40 * 30 * mb, 64 * mb, cores=2) == 19  # archive files: 2-3 a task
    assert extract_tasks(500, 500 * mb // 10, 64 * mb, cores=2) == 4  # small JPEGs: 2 tasks a core
    assert extract_tasks(3, 3 * mb, 64 * mb, cores=8) == 3  # never an empty task
    assert extract_tasks(0, 0, 64 * mb, cores=2) == 1
