"""End to end: camera RAW (DNG), HEIC and AVIF through a real run, from real photos (#24).

The archive: a DNG with a full-size preview and the JPEG the camera wrote beside it (RAW+JPEG
shooting), a DNG without a preview (demosaic path) and no EXIF, a HEIC stored turned (EXIF
orientation 6), an AVIF, the JPEGs these three were made from, and a corrupt .nef.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from make_test_raw import NO_EXIF, Meta, exif_bytes, photo, write_dng, write_heif

from lookalike import Catalog, db
from lookalike.config import Config
from lookalike.driver.ingest import run
from lookalike.driver.stages import SparkStages
from lookalike.stages import schemas

pytestmark = pytest.mark.slow

NO_EXIF_MTIME = 1_600_000_000  # 2020-09-13 12:26:40 UTC


def query(cfg: Config, sql: str, *params: object) -> list[tuple]:
    with db.connect(cfg) as conn:
        return conn.execute(sql, params).fetchall()


def _jpeg(path: Path, im: Any, meta: Meta | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=92, **({"exif": exif_bytes(meta)} if meta else {}))
    return path


@pytest.fixture
def archive(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "archive"
    (root / "camera").mkdir(parents=True)
    (root / "phone").mkdir()
    shot, plain, turned, other = (photo("hires-05.jpg", 1600), photo("hires-12.jpg", 1200),
                                  photo("hires-20.jpg", 900), photo("hires-27.jpg", 900))
    files = {
        # RAW+JPEG: the same shot as a DNG (preview path) and as the camera's JPEG, both with EXIF
        "raw_preview": write_dng(root / "camera" / "DSC_0001.dng", shot),
        "raw_jpeg": _jpeg(root / "camera" / "DSC_0001.JPG", shot, Meta()),
        "raw_demosaic": write_dng(root / "camera" / "scan_0002.DNG", plain, NO_EXIF, preview=None),
        "heic": write_heif(root / "phone" / "IMG_0003.HEIC", turned, Meta(orientation=6)),
        "avif": write_heif(root / "phone" / "IMG_0004.avif", other, NO_EXIF),
        "demosaic_source": _jpeg(root / "exports" / "scan_0002.jpg", plain),
        "heic_source": _jpeg(root / "exports" / "IMG_0003.jpg", turned),
        "avif_source": _jpeg(root / "exports" / "IMG_0004.jpg", other),
        "corrupt": root / "camera" / "DSC_0005.nef",
    }
    files["corrupt"].write_bytes(b"II*\x00" + bytes(range(256)) * 400)
    os.utime(files["raw_demosaic"], (NO_EXIF_MTIME, NO_EXIF_MTIME))
    return files


def _cosine(cfg: Config, a: int, b: int) -> float:
    rows = dict(query(cfg, "SELECT image_id, emb::real[] FROM image_embeddings "
                           "WHERE image_id IN (%s, %s)", a, b))
    va, vb = (np.asarray(rows[i], dtype=np.float64) for i in (a, b))
    return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))


def test_raw_heic_avif_are_catalogued_with_their_near_duplicate_jpegs(
        cfg: Config, archive: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    stage_tables: list[pa.Table] = []
    real_extract = SparkStages.extract

    def keep_features(self: SparkStages, manifest_id: str) -> pa.Table:
        table = real_extract(self, manifest_id)
        stage_tables.append(table)
        return table

    monkeypatch.setattr(SparkStages, "extract", keep_features)
    summary = run(cfg, [str(archive["raw_preview"].parents[1])])
    assert (summary.counts.files, summary.counts.errors) == (len(archive), 1)

    # Every file but the corrupt one is an image, in its format.
    ids = {Path(path): (image_id, fmt) for path, image_id, fmt in query(
        cfg, "SELECT p.path, i.id, i.format FROM image_paths p JOIN images i ON i.id = p.image_id")}
    assert set(ids) == {p for name, p in archive.items() if name != "corrupt"}
    formats = {name: ids[p][1] for name, p in archive.items() if name != "corrupt"}
    assert formats == {"raw_preview": "raw:dng", "raw_jpeg": "JPEG", "raw_demosaic": "raw:dng",
                       "heic": "HEIF", "avif": "AVIF",  # as pillow-heif and Pillow name them
                       "demosaic_source": "JPEG", "heic_source": "JPEG", "avif_source": "JPEG"}

    # The corrupt RAW: one ingest_errors row, one line.
    (path, error, message), = query(cfg, "SELECT path, error, message FROM ingest_errors")
    assert (Path(path), error) == (archive["corrupt"], "raw_decode")
    assert message.startswith("cannot decode raw:nef: ") and "\n" not in message and len(message) <= 300

    # Each RAW/HEIF file and the JPEG of the same pixels: a near-duplicate pair, embeddings alike.
    pairs = {frozenset(p) for p in query(cfg, "SELECT image_id, other_id FROM near_duplicates")}
    for name, jpeg in (("raw_preview", "raw_jpeg"), ("raw_demosaic", "demosaic_source"),
                       ("heic", "heic_source"), ("avif", "avif_source")):
        a, b = ids[archive[name]][0], ids[archive[jpeg]][0]
        assert frozenset((a, b)) in pairs, name
        assert _cosine(cfg, a, b) >= 0.9, name
    # ...and nothing else: the four shots are different photos.
    assert len(pairs) == 4
    # The copy to keep of a RAW and its JPEG is the RAW.
    with Catalog(config=cfg) as cat:
        groups = cat.groups()
    for raw in ("raw_preview", "raw_demosaic"):
        (group_id,) = groups.loc[groups["path"] == str(archive[raw]), "group_id"]
        group = groups[groups["group_id"] == group_id]
        assert group.loc[group["keep"], "path"].tolist() == [str(archive[raw])]

    # The features stage (Spark's Parquet) carries the capture columns. Spark writes timestamps
    # as naive (UTC) nanoseconds: cast back as db/load.py does for mtime.
    features = pa.concat_tables(stage_tables)
    assert features.column_names == schemas.FEATURES.names
    features = pa.Table.from_arrays([c.cast(pa.timestamp("us")).cast(f.type) if pa.types.is_timestamp(f.type)
                                     else c.cast(f.type) for c, f in zip(features.columns, schemas.FEATURES,
                                                                         strict=True)],
                                    schema=schemas.FEATURES)
    rows = {Path(r["path"]): r for r in features.to_pylist()}
    preview, demosaic, heic = (rows[archive[n]] for n in ("raw_preview", "raw_demosaic", "heic"))
    assert preview["decode_path"] == "preview" and demosaic["decode_path"] == "demosaic"
    assert {rows[archive[n]]["decode_path"] for n in ("raw_jpeg", "heic", "avif")} == {"decode"}
    # EXIF DateTimeOriginal 2023:07:14 18:30:05.25 at +02:00
    assert preview["taken_at"] == datetime(2023, 7, 14, 16, 30, 5, 250000, tzinfo=UTC)
    assert (preview["taken_at_source"], preview["taken_offset_min"]) == ("exif", 120)
    assert (preview["camera_make"], preview["camera_model"], preview["lens"], preview["orientation"]) == (
        "NIKON CORPORATION", "NIKON Z 6_2", "NIKKOR Z 24-70mm f/4 S", 1)
    assert rows[archive["raw_jpeg"]]["taken_at"] == preview["taken_at"]
    # No EXIF: the file's mtime, no offset, no camera
    assert demosaic["taken_at"] == datetime.fromtimestamp(NO_EXIF_MTIME, tz=UTC)
    assert (demosaic["taken_at_source"], demosaic["taken_offset_min"], demosaic["camera_make"]) == (
        "mtime", None, None)
    assert heic["orientation"] == 6 and heic["taken_at"].utcoffset() == timedelta(0)
    # GPS only when [extract] keep_gps (off by default), though every EXIF here has a position
    assert all(r["gps_lat"] is None and r["gps_lon"] is None for r in rows.values())
    assert rows[archive["corrupt"]]["taken_at"] is None

    # ...and the catalog holds them, in the images columns of the same names.
    catalogued = {Path(r[0]): r[1:] for r in query(
        cfg, "SELECT path_original, taken_at, taken_at_source, taken_offset_min, camera_model, orientation, "
             "gps_lat, decode_path FROM images")}
    assert catalogued[archive["raw_preview"]] == (preview["taken_at"], "exif", 120, "NIKON Z 6_2", 1, None,
                                                  "preview")
    assert catalogued[archive["raw_demosaic"]][1:3] == ("mtime", None)
    assert catalogued[archive["raw_demosaic"]][-1] == "demosaic"
