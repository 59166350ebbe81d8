"""Camera RAW (DNG made from real photos), HEIC and AVIF decoding, capture metadata, and the extract
stage on these formats."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from make_test_raw import (
    ASCII,
    NO_EXIF,
    RATIONAL,
    SHORT,
    Ifd,
    Meta,
    dng_bytes,
    exif_bytes,
    photo,
    tiff_bytes,
    write_dng,
    write_dng_pidng,
    write_heif,
)
from PIL import Image

from lookalike.config import load_config
from lookalike.stages import schemas
from lookalike.stages.extract import ExtractSettings, extract_batches, extract_file
from lookalike.stages.formats import (
    HEIF_EXTENSIONS,
    RAW_EXTENSIONS,
    FormatError,
    capture_info,
    decode_image,
    is_raw,
    raw_exif,
)

TAKEN = datetime(2023, 7, 14, 18, 30, 5, 250000)
MTIME = 1_700_000_000.5


@pytest.fixture(scope="module")
def src() -> Image.Image:
    """A real photo at ~2 MP: its DNG is ~4.3 MB (16-bit mosaic) and decodes in well under a second."""
    return photo("hires-05.jpg", 1800)


@pytest.fixture(scope="module")
def small() -> Image.Image:
    return photo("hires-12.jpg", 900)


def _gray64(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64).ravel()


def assert_looks_like(decoded: Image.Image, source: Image.Image, max_bits: int = 10) -> None:
    """Same picture, same way up: 64x64 grayscale correlation and pHash distance."""
    assert (decoded.width > decoded.height) == (source.width > source.height)
    corr = np.corrcoef(_gray64(decoded), _gray64(source))[0, 1]
    bits = imagehash.phash(decoded.convert("RGB")) - imagehash.phash(source)
    assert corr > 0.9 and bits <= max_bits, (corr, bits)


# ---------------------------------------------------------------------------------------------
# Camera RAW


def test_dng_with_a_full_size_preview_is_decoded_from_the_preview(src: Image.Image) -> None:
    data = dng_bytes(src)
    d = decode_image(data, ".DNG", min_side=512)
    assert (d.path, d.format, d.width, d.height) == ("preview", "raw:dng", src.width, src.height)
    assert min(d.image.size) >= 512 * src.height // src.width  # draft mode kept the thumbnail's size
    assert max(d.image.size) < src.width  # ...and did not decode all of it
    assert_looks_like(d.image, src, max_bits=4)


def test_dng_without_a_preview_goes_through_the_demosaic(src: Image.Image) -> None:
    d = decode_image(dng_bytes(src, preview=None), "dng", min_side=512)
    assert (d.path, d.format, d.width, d.height) == ("demosaic", "raw:dng", src.width, src.height)
    assert d.image.size == (src.width // 2, src.height // 2)  # half-size: one pixel per Bayer quad
    assert_looks_like(d.image, src)


def test_a_preview_smaller_than_the_thumbnail_is_not_used(src: Image.Image) -> None:
    d = decode_image(dng_bytes(src, preview=256), ".dng", min_side=512)
    assert d.path == "demosaic"
    assert_looks_like(d.image, src)
    assert decode_image(dng_bytes(src, preview=256), ".dng", min_side=200).path == "preview"


@pytest.mark.parametrize("preview", [0, None], ids=["preview", "demosaic"])
@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_raw_orientation_is_applied_on_both_paths(small: Image.Image, preview: int | None,
                                                  orientation: int) -> None:
    d = decode_image(dng_bytes(small, Meta(orientation=orientation), preview=preview), ".dng")
    assert (d.width, d.height) == small.size
    assert_looks_like(d.image, small)
    assert capture_info(d.exif, MTIME).orientation == orientation


def test_raw_from_a_path_when_the_file_is_too_large_to_hold(tmp_path: Path, small: Image.Image) -> None:
    path = write_dng(tmp_path / "big.dng", small)
    d = decode_image(str(path), ".dng")
    assert d.path == "preview"
    assert_looks_like(d.image, small, max_bits=4)


def test_pidng_dng_decodes_too(tmp_path: Path, small: Image.Image) -> None:
    pytest.importorskip("pidng")
    path = write_dng_pidng(tmp_path / "pidng.dng", small, Meta(orientation=3))
    d = decode_image(path.read_bytes(), ".dng")
    assert d.path == "demosaic"
    assert_looks_like(d.image, small)
    info = capture_info(d.exif, MTIME)  # pidng puts DateTimeOriginal in IFD0, without an offset
    assert info.taken_at == TAKEN.replace(microsecond=0, tzinfo=UTC)
    assert (info.taken_at_source, info.taken_at_offset) == ("exif", False)
    assert (info.camera_make, info.orientation) == ("NIKON CORPORATION", 3)


def test_a_raw_whose_preview_and_demosaic_fail_is_one_line_error(small: Image.Image) -> None:
    for preview in (0, 128, None):
        with pytest.raises(FormatError) as e:
            decode_image(dng_bytes(small, preview=preview, broken=True), ".dng")
        assert e.value.code == "raw_decode"
        message = str(e.value)
        assert "\n" not in message and "Traceback" not in message and len(message) < 300
        assert message.startswith("cannot decode raw:dng: ") and "demosaic failed" in message
    with pytest.raises(FormatError, match=r"raw:dng: embedded preview unreadable .*demosaic failed"):
        decode_image(dng_bytes(small, broken=True), ".dng")


@pytest.mark.parametrize("data", [b"\x00" * 50_000, b"II*\x00" + b"\x13" * 50_000], ids=["zeros", "garbage"])
def test_bytes_libraw_does_not_know_are_a_raw_decode_error(data: bytes) -> None:
    with pytest.raises(FormatError) as e:
        decode_image(data, ".nef")
    assert e.value.code == "raw_decode"
    assert str(e.value) == ("cannot decode raw:nef: LibRaw cannot open it "
                            "(Unsupported file format or not RAW file)")


def test_a_truncated_raw_is_a_raw_decode_error(small: Image.Image) -> None:
    data = dng_bytes(small, preview=None)
    with pytest.raises(FormatError, match=r"^cannot decode raw:cr2: LibRaw cannot open it") as e:
        decode_image(data[: len(data) // 2], ".cr2")
    assert e.value.code == "raw_decode"


def test_a_jpeg_named_like_a_raw_is_decoded_as_a_jpeg(small: Image.Image) -> None:
    out = io.BytesIO()
    small.save(out, "JPEG", quality=90)
    d = decode_image(out.getvalue(), ".NEF")
    assert (d.format, d.path, d.width, d.height) == ("JPEG", "decode", *small.size)


def test_raw_over_the_pixel_limit_is_refused(small: Image.Image) -> None:
    with pytest.raises(FormatError) as e:
        decode_image(dng_bytes(small), ".dng", max_pixels=1000)
    assert e.value.code == "too_large"


def test_raw_extensions() -> None:
    assert all(is_raw(e) for e in (".nef", ".CR2", "cr3", ".arw", ".raf", ".orf", ".rw2", ".pef", ".dng"))
    assert not any(is_raw(e) for e in (".jpg", ".tif", ".heic"))


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def test_cr3_metadata_comes_from_its_cmt_boxes() -> None:
    """A CR3 keeps its EXIF as TIFF blocks in moov/uuid: CMT1 IFD0, CMT2 EXIF IFD, CMT4 GPS."""
    cmt1 = tiff_bytes(Ifd().set(0x010F, ASCII, "Canon").set(0x0110, ASCII, "Canon EOS R5")
                      .set(0x0112, SHORT, 8))
    cmt2 = tiff_bytes(Ifd().set(0x9003, ASCII, "2024:01:02 03:04:05").set(0x9011, ASCII, "-05:00")
                      .set(0xA434, ASCII, "RF24-105mm F4 L IS USM"))
    cmt4 = tiff_bytes(Ifd().set(1, ASCII, "S").set(2, RATIONAL, [33, 52, 4.2]).set(3, ASCII, "E")
                      .set(4, RATIONAL, [151, 12, 36]))
    canon = _box(b"uuid", bytes.fromhex("85c0b687820f11e08111f4ce462b6a48") + _box(b"CMT1", cmt1)
                 + _box(b"CMT2", cmt2) + _box(b"CMT3", b"\x00" * 16) + _box(b"CMT4", cmt4))
    data = _box(b"ftyp", b"crx \x00\x00\x00\x01crx isom") + _box(b"moov", canon) + _box(b"mdat", b"\x00" * 64)
    info = capture_info(raw_exif(data), MTIME, keep_gps=True)
    assert info.taken_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))
    assert (info.camera_make, info.camera_model, info.lens, info.orientation) == (
        "Canon", "Canon EOS R5", "RF24-105mm F4 L IS USM", 8)
    assert info.gps_lat == pytest.approx(-(33 + 52 / 60 + 4.2 / 3600))
    assert info.gps_lon == pytest.approx(151.21)


# ---------------------------------------------------------------------------------------------
# HEIC / AVIF


@pytest.mark.parametrize("suffix,fmt", [(".heic", "HEIF"), (".avif", "AVIF")])  # Pillow's names
@pytest.mark.parametrize("orientation", [1, 6])
def test_heif_round_trip_with_orientation(tmp_path: Path, small: Image.Image, suffix: str, fmt: str,
                                          orientation: int) -> None:
    path = write_heif(tmp_path / f"phone{suffix}", small, Meta(orientation=orientation))
    d = decode_image(path.read_bytes(), suffix)
    assert (d.format, d.path, d.width, d.height) == (fmt, "decode", *small.size)
    assert d.image.size == small.size
    assert_looks_like(d.image, small, max_bits=4)
    info = capture_info(d.exif, MTIME)
    assert (info.orientation, info.camera_model) == (orientation, "NIKON Z 6_2")
    assert info.lens == "NIKKOR Z 24-70mm f/4 S"
    assert info.taken_at == TAKEN.replace(tzinfo=timezone(timedelta(hours=2)))


def test_capture_info_of_an_opened_heic_image_reports_its_own_orientation(tmp_path: Path,
                                                                         small: Image.Image) -> None:
    # pillow-heif turns the picture itself and rewrites the EXIF orientation to 1
    with Image.open(write_heif(tmp_path / "p.heic", small, Meta(orientation=6))) as im:
        assert im.getexif().get(0x0112) == 1
        assert capture_info(im, MTIME).orientation == 6


@pytest.mark.parametrize("suffix,kind", [(".heic", "HEIC"), (".avif", "AVIF")])
def test_a_truncated_heif_is_a_heif_decode_error(tmp_path: Path, small: Image.Image, suffix: str,
                                                 kind: str) -> None:
    data = write_heif(tmp_path / f"t{suffix}", small).read_bytes()
    with pytest.raises(FormatError, match=f"^cannot decode {kind}: ") as e:
        decode_image(data[:3000], suffix)
    assert e.value.code == "heif_decode" and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Capture time, camera, GPS


def test_capture_time_with_offset_and_camera(src: Image.Image) -> None:
    d = decode_image(dng_bytes(src), ".dng")
    info = capture_info(d.exif, MTIME)
    assert info.taken_at == TAKEN.replace(tzinfo=timezone(timedelta(hours=2)))
    assert info.taken_at.utcoffset() == timedelta(hours=2)
    assert (info.taken_at_source, info.taken_at_offset) == ("exif", True)
    assert (info.camera_make, info.camera_model, info.lens) == ("NIKON CORPORATION", "NIKON Z 6_2",
                                                                "NIKKOR Z 24-70mm f/4 S")
    assert info.orientation == 1


def test_capture_time_without_offset_is_read_in_the_local_zone(small: Image.Image) -> None:
    exif = Image.Exif()
    exif.load(exif_bytes(Meta(offset=None, subsec=None)))
    info = capture_info(exif, MTIME)
    assert info.taken_at == datetime(2023, 7, 14, 18, 30, 5, tzinfo=UTC)
    assert (info.taken_at_source, info.taken_at_offset) == ("exif", False)
    paris = timezone(timedelta(hours=2), "CEST")
    assert capture_info(exif, MTIME, local_tz=paris).taken_at == datetime(2023, 7, 14, 16, 30, 5, tzinfo=UTC)


def test_negative_offset_and_a_clockless_camera() -> None:
    exif = Image.Exif()
    exif.load(exif_bytes(Meta(offset="-07:00", subsec=None)))
    assert capture_info(exif, MTIME).taken_at == datetime(2023, 7, 15, 1, 30, 5, tzinfo=UTC)
    exif.load(exif_bytes(Meta(taken="0000:00:00 00:00:00")))
    assert capture_info(exif, MTIME).taken_at_source == "mtime"


@pytest.mark.parametrize("kind", ["dng", "heic", "jpeg"])
def test_capture_time_without_exif_is_the_mtime(tmp_path: Path, small: Image.Image, kind: str) -> None:
    if kind == "dng":
        data, ext = dng_bytes(small, NO_EXIF), ".dng"
    elif kind == "heic":
        data, ext = write_heif(tmp_path / "n.heic", small, NO_EXIF).read_bytes(), ".heic"
    else:
        out = io.BytesIO()
        small.save(out, "JPEG")
        data, ext = out.getvalue(), ".jpg"
    exif = decode_image(data, ext).exif
    info = capture_info(exif, MTIME)
    assert (info.taken_at, info.taken_at_source, info.taken_at_offset) == (
        datetime.fromtimestamp(MTIME, tz=UTC), "mtime", False)
    assert (info.camera_make, info.camera_model, info.lens, info.gps_lat) == (None, None, None, None)
    # the manifest's mtime column: a timezone-aware datetime (a pandas Timestamp in a batch)
    when = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert capture_info(exif, when).taken_at == when
    assert capture_info(exif, when.replace(tzinfo=None)).taken_at == when
    pd = pytest.importorskip("pandas")
    assert capture_info(exif, pd.Timestamp(when)).taken_at == when
    assert capture_info(None, None).taken_at_source is None


def test_gps_is_kept_only_when_asked(small: Image.Image) -> None:
    exif = decode_image(dng_bytes(small), ".dng").exif
    info = capture_info(exif, MTIME)
    assert (info.gps_lat, info.gps_lon) == (None, None)
    kept = capture_info(exif, MTIME, keep_gps=True)
    assert kept.gps_lat == pytest.approx(48.858370, abs=1e-6)
    assert kept.gps_lon == pytest.approx(-2.294481, abs=1e-6)
    assert capture_info(decode_image(dng_bytes(small, Meta(gps=None)), ".dng").exif, MTIME,
                        keep_gps=True).gps_lat is None


# ---------------------------------------------------------------------------------------------
# The extract stage: extract_file and extract_batches on these formats


def _settings(tmp_path: Path, **kw: object) -> ExtractSettings:
    return ExtractSettings(str(tmp_path / "thumbs"), **kw)  # type: ignore[arg-type]


def test_extract_file_on_a_dng_gives_its_format_decode_path_and_capture(tmp_path: Path,
                                                                        small: Image.Image) -> None:
    path = write_dng(tmp_path / "DSC_1.NEF.dng", small)
    row = extract_file(str(path), _settings(tmp_path))
    assert row["error"] is None, row["message"]
    assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # of the RAW file's bytes
    assert (row["format"], row["decode_path"], row["width"], row["height"]) == ("raw:dng", "preview",
                                                                                *small.size)
    assert row["taken_at"] == datetime(2023, 7, 14, 16, 30, 5, 250000, tzinfo=UTC)
    assert (row["taken_at_source"], row["taken_offset_min"], row["orientation"]) == ("exif", 120, 1)
    assert (row["camera_make"], row["camera_model"], row["lens"]) == ("NIKON CORPORATION", "NIKON Z 6_2",
                                                                      "NIKKOR Z 24-70mm f/4 S")
    assert (row["gps_lat"], row["gps_lon"]) == (None, None)
    with Image.open(tmp_path / "thumbs" / row["thumb"]) as thumb:
        assert max(thumb.size) == 512
        assert_looks_like(thumb, small, max_bits=4)
    kept = extract_file(str(path), _settings(tmp_path, keep_gps=True))
    assert (kept["gps_lat"], kept["gps_lon"]) == (pytest.approx(48.858370, abs=1e-6),
                                                  pytest.approx(-2.294481, abs=1e-6))


def test_extract_file_reads_offsetless_exif_times_in_the_configured_zone(tmp_path: Path,
                                                                         small: Image.Image) -> None:
    path = write_heif(tmp_path / "p.heic", small, Meta(offset=None, subsec=None))
    paris = extract_file(str(path), _settings(tmp_path, exif_timezone="Europe/Paris"))
    assert paris["taken_at"] == datetime(2023, 7, 14, 16, 30, 5, tzinfo=UTC)  # CEST in July
    assert (paris["taken_at_source"], paris["taken_offset_min"], paris["format"]) == ("exif", None, "HEIF")
    utc = extract_file(str(path), _settings(tmp_path))  # the default zone: UTC
    assert utc["taken_at"] == datetime(2023, 7, 14, 18, 30, 5, tzinfo=UTC)


def test_extract_file_without_exif_is_dated_by_the_mtime(tmp_path: Path, small: Image.Image) -> None:
    path = tmp_path / "plain.jpg"
    small.save(path, "JPEG")
    os.utime(path, (MTIME, MTIME))
    row = extract_file(str(path), _settings(tmp_path))  # the file's own mtime
    assert (row["format"], row["decode_path"], row["taken_at_source"], row["orientation"]) == (
        "JPEG", "decode", "mtime", None)
    assert row["taken_at"] == datetime.fromtimestamp(MTIME, tz=UTC)
    when = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert extract_file(str(path), _settings(tmp_path), when)["taken_at"] == when  # the manifest's


def test_a_raw_too_large_to_hold_is_decoded_from_its_path(tmp_path: Path, small: Image.Image) -> None:
    path = write_dng(tmp_path / "big.dng", small)
    held = extract_file(str(path), _settings(tmp_path / "a"))
    streamed = extract_file(str(path), _settings(tmp_path / "b", max_read_bytes=1000))
    keys = ("error", "sha256", "format", "width", "height", "phash", "decode_path", "taken_at",
            "camera_model")
    assert {k: streamed[k] for k in keys} == {k: held[k] for k in keys}


def test_a_huge_file_named_like_a_raw_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.nef"
    path.write_bytes(b"")
    os.truncate(path, 3 << 30)  # a hole: 3 GB of zeros that take no disk
    started = time.monotonic()
    row = extract_file(str(path), _settings(tmp_path))
    assert row["error"] == "raw_decode" and row["sha256"] is None, row
    assert row["message"].startswith("cannot decode raw:nef: LibRaw cannot open it")
    assert time.monotonic() - started < 10  # not read


@pytest.mark.parametrize("name,code", [("broken.nef", "raw_decode"), ("cut.heic", "heif_decode")])
def test_extract_file_turns_format_errors_into_error_rows(tmp_path: Path, small: Image.Image, name: str,
                                                         code: str) -> None:
    path = tmp_path / name
    if code == "raw_decode":
        path.write_bytes(dng_bytes(small, preview=None, broken=True))
    else:
        path.write_bytes(write_heif(tmp_path / "whole.heic", small).read_bytes()[:3000])
    row = extract_file(str(path), _settings(tmp_path))
    assert row["error"] == code and row["thumb"] is None and row["taken_at"] is None
    assert row["message"] and "\n" not in row["message"]


def test_feature_batches_keep_their_arrow_types(tmp_path: Path, small: Image.Image) -> None:
    """What mapInPandas hands Spark: ints exact, NaN never a GPS value, the capture time in UTC."""
    dng = write_dng(tmp_path / "a.dng", small)
    heic = write_heif(tmp_path / "b.heic", small, NO_EXIF)
    when = pd.Timestamp("2022-01-02 03:04:05", tz="UTC")
    manifest = pd.DataFrame({"path": [str(dng), str(heic), str(tmp_path / "gone.dng")], "bytes": [1, 2, 3],
                             "mtime": [when] * 3, "error": [None] * 3, "message": [None] * 3})
    (frame,) = extract_batches(iter([manifest]), _settings(tmp_path, keep_gps=True))
    table = pa.Table.from_pandas(frame, schema=schemas.FEATURES, preserve_index=False)
    rows = table.to_pylist()
    assert [r["error"] for r in rows] == [None, None, "vanished"]
    assert rows[0]["taken_at"] == datetime(2023, 7, 14, 16, 30, 5, 250000, tzinfo=UTC)
    assert rows[0]["gps_lat"] == pytest.approx(48.858370, abs=1e-6) and rows[0]["taken_offset_min"] == 120
    assert rows[1]["taken_at"] == when.to_pydatetime() and rows[1]["taken_at_source"] == "mtime"
    assert (rows[1]["gps_lat"], rows[1]["taken_offset_min"], rows[2]["orientation"]) == (None, None, None)
    assert rows[0]["phash"] == extract_file(str(dng), _settings(tmp_path))["phash"]  # all 64 bits


def test_the_scan_takes_raw_and_heif_by_default() -> None:
    extensions = set(load_config()["scan"]["extensions"])
    assert extensions >= RAW_EXTENSIONS | HEIF_EXTENSIONS
    assert {".jpg", ".png", ".tif"} <= extensions and ".txt" not in extensions
