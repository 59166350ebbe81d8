"""Per-file feature extraction: each original is read exactly once.

The same bytes feed sha256 and one reduced-scale decode (JPEG draft mode; a camera RAW's
embedded preview or half-size demosaic, see stages.formats), which yields the size, the
perceptual hashes and the 512-px thumbnail, and the capture metadata (time, camera, lens,
orientation, GPS when configured). A file that cannot be catalogued becomes a row with an
error code and a one-line message, never an exception.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

from lookalike.errors import IngestError, one_line
from lookalike.files import replacing
from lookalike.stages import schemas
from lookalike.stages.formats import Decoded, FormatError, capture_info, decode_image, is_raw, probe_raw
from lookalike.stages.hashing import dihedral_phashes, image_hashes
from lookalike.store import ChangedError, Filing, StoreSettings, filing

READ_CHUNK = 8 << 20

FEATURE_COLUMNS = schemas.FEATURES.names


# Nullable integer dtypes: beside an error row's None, plain pandas turns these columns into
# float64, whose 53-bit mantissa silently rounds the low bits of the 64-bit hashes.
# The same for the float GPS columns (NaN is not null) and the capture time (tz-aware UTC).
_DTYPES = {"width": "Int32", "height": "Int32", "phash": "Int64", "dhash": "Int64", "ahash": "Int64",
           "taken_offset_min": "Int32", "orientation": "Int32", "gps_lat": "Float64", "gps_lon": "Float64",
           "taken_at": "datetime64[us, UTC]"}


@dataclass(frozen=True)
class ExtractSettings:
    thumbs_dir: str
    thumb_size: int = 512
    thumb_quality: int = 90
    max_image_pixels: int = 250_000_000
    max_read_bytes: int = 256 << 20
    keep_gps: bool = False
    exif_timezone: str = "UTC"  # the zone of EXIF times written without an offset
    store: StoreSettings | None = None  # where originals are filed; None: catalogued in place

    @classmethod
    def from_config(cls, cfg: Any, thumbs_dir: Path, store: bool = True) -> ExtractSettings:
        """The run's settings; `store=False` for a reader's extract (a query file is never filed)."""
        e = cfg["extract"]
        return cls(str(thumbs_dir), e["thumb_size"], e["thumb_quality"], e["max_image_pixels"],
                   e["max_read_bytes"], e["keep_gps"], e["exif_timezone"],
                   StoreSettings.from_config(cfg) if store else None)


class ExtractError(Exception):
    """A file that cannot be catalogued: `code` is short and stable, the message is for people."""

    def __init__(self, code: IngestError, message: str) -> None:
        super().__init__(message)
        self.code = code.value  # a plain str: rows cross into Spark and Arrow


def thumb_relpath(sha256: str, size: int) -> str:
    """<ab>/<cd>/<sha256>_<size>.jpg: two fan-out levels keep directories small at millions."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}_{size}.jpg"


@contextmanager
def _bomb_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard at `max_pixels` for the block."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # A bomb between 1x and 2x the limit only warns; treat it like the error above 2x.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _read_once(path: str, settings: ExtractSettings,
               filer: Filing | None = None) -> tuple[str, bytes | None, float]:
    """sha256 of the file, its bytes when it is small enough to hold in memory, and its mtime.
    With a store, the same read feeds the stored copy of a file too large to hold (`filer`).

    Refuses anything that is not a regular file (FIFOs would block, devices never end). A file
    too large to hold is identified from its header first: gigabytes that no decoder claims
    (a zero-filled failed copy, a disk image named .jpg) are refused without being read; a
    camera RAW's header is LibRaw's to judge, not Pillow's. Pillow's errors propagate for the
    caller to classify.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise ExtractError(IngestError.VANISHED, "file disappeared after the scan") from None
    except PermissionError:
        raise ExtractError(IngestError.UNREADABLE, "permission denied") from None
    except OSError as e:
        raise ExtractError(IngestError.UNREADABLE, f"cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ExtractError(IngestError.NOT_A_FILE, "not a regular file (FIFO, device or socket)")
        if st.st_size == 0:
            raise ExtractError(IngestError.EMPTY, "file is empty (0 bytes)")
        keep = st.st_size <= settings.max_read_bytes
        ext = os.path.splitext(path)[1]
        if not keep and is_raw(ext):
            probe_raw(path, ext, settings.max_image_pixels)  # LibRaw's header check, not Pillow's
        elif not keep:
            with _bomb_guard(settings.max_image_pixels):
                Image.open(f)  # the header only; the file stays open (it is ours, not Pillow's)
            f.seek(0)
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        held = 0
        tee = filer.tee(st, keep) if filer is not None else None
        try:
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
                if tee is not None:
                    _spool(tee, chunk)
                if keep:
                    chunks.append(chunk)
                    held += len(chunk)
                    if held > settings.max_read_bytes:  # still being written: stop holding it
                        keep, chunks = False, []
        except OSError as e:
            raise ExtractError(IngestError.UNREADABLE, f"read failed: {e.strerror or e}") from None
    if keep:
        return digest.hexdigest(), b"".join(chunks), st.st_mtime
    return digest.hexdigest(), None, st.st_mtime


def _spool(tee: Any, chunk: bytes) -> None:
    try:
        tee.write(chunk)
    except OSError as e:
        raise ExtractError(IngestError.STORE, f"cannot write the store: {e.strerror or e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB for any mode: alpha over white, 16-bit and float scaled, CMYK converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        else:
            arr = arr / top * 255.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB
    return im


def decode_thumbnail(source: bytes | str | Path, settings: ExtractSettings,
                     ext: str | None = None) -> tuple[Image.Image, Decoded]:
    """Decode at the smallest scale that still yields a sharp thumbnail.

    `source` is the file's bytes, or its path when it is too large to hold; `ext` routes camera
    RAW to LibRaw (the path's suffix when not given). Returns the RGB thumbnail, orientation
    applied, and the Decoded (format, the original's displayed size, decode path, EXIF).
    """
    if isinstance(source, Path):
        source = str(source)
    if ext is None:
        ext = os.path.splitext(source)[1] if isinstance(source, str) else ""
    with _bomb_guard(settings.max_image_pixels):
        decoded = decode_image(source, ext, settings.thumb_size, settings.max_image_pixels)
        rgb = _to_rgb(decoded.image)
    rgb.thumbnail((settings.thumb_size, settings.thumb_size), Image.Resampling.LANCZOS)
    return rgb, decoded


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _capture_columns(decoded: Decoded, mtime: Any, settings: ExtractSettings) -> dict[str, Any]:
    """The capture columns of a feature row; metadata never makes a file an error."""
    try:
        info = capture_info(decoded.exif, mtime, settings.keep_gps, _zone(settings.exif_timezone))
    except Exception:  # a metadata oddity nobody foresaw: keep the image, dated by its mtime
        info = capture_info(None, mtime)
    taken: datetime | None = info.taken_at
    offset = taken.utcoffset() if taken is not None and info.taken_at_offset else None
    return {
        "taken_at": taken.astimezone(UTC) if taken is not None else None,
        "taken_at_source": info.taken_at_source,
        "taken_offset_min": int(offset.total_seconds() // 60) if offset is not None else None,
        "camera_make": info.camera_make,
        "camera_model": info.camera_model,
        "lens": info.lens,
        "orientation": info.orientation,
        "gps_lat": info.gps_lat,
        "gps_lon": info.gps_lon,
        "decode_path": decoded.path,
    }


def _write_thumbnail(thumb: Image.Image, dest: Path, quality: int) -> None:
    """Atomic: a reader sees either no thumbnail or a whole one, even if the task is killed."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        thumb.save(tmp, "JPEG", quality=quality, optimize=True)


def prepare_thumbs_dir(thumbs_dir: Path) -> None:
    """Create the thumbnail root and prove a file can be written in it (on the driver).

    A run that cannot write thumbnails at all must stop with one message before it loads
    anything, not record every file as a 'thumbnail' error that later runs then skip.
    """
    probe = thumbs_dir / f".probe.{os.getpid()}.tmp"
    try:
        thumbs_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write thumbnails: {e.strerror or e}", str(thumbs_dir)) from None


def extract_file(path: str, settings: ExtractSettings, mtime: Any = None) -> dict[str, Any]:
    """Features of one file, or an error row; never raises for a bad file.

    `mtime` (the manifest's) is the capture time of a file without an EXIF one; the file's own
    when not given.
    """
    row: dict[str, Any] = dict.fromkeys(FEATURE_COLUMNS)
    row["path"] = path
    with filing(settings.store, path) as filer:
        _extract_into(row, path, settings, mtime, filer)
    return row


def _extract_into(row: dict[str, Any], path: str, settings: ExtractSettings, mtime: Any,
                  filer: Filing | None) -> None:
    try:
        try:
            sha, data, file_mtime = _read_once(path, settings, filer)
            row["sha256"] = sha
            thumb, decoded = decode_thumbnail(data if data is not None else path, settings,
                                              os.path.splitext(path)[1])
        except FormatError as e:  # raw_decode, heif_decode, too_large: already one line
            raise ExtractError(e.code, str(e)) from None
        except Image.DecompressionBombError as e:
            raise ExtractError(IngestError.TOO_LARGE, f"decompression-bomb guard: {one_line(e)}") from None
        except Image.DecompressionBombWarning as e:
            raise ExtractError(IngestError.TOO_LARGE, f"decompression-bomb guard: {one_line(e)}") from None
        except Image.UnidentifiedImageError:
            raise ExtractError(IngestError.NOT_AN_IMAGE, "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            raise ExtractError(IngestError.DECODE, f"cannot decode: {one_line(e)}") from None
        except MemoryError:
            raise ExtractError(IngestError.TOO_LARGE, "out of memory while decoding") from None
        row.update(image_hashes(thumb))
        row["phash_dihedral"] = dihedral_phashes(thumb)
        rel = thumb_relpath(sha, settings.thumb_size)
        try:
            _write_thumbnail(thumb, Path(settings.thumbs_dir) / rel, settings.thumb_quality)
        except OSError as e:
            raise ExtractError(IngestError.THUMBNAIL, f"cannot write thumbnail: {one_line(e)}") from None
        if filer is not None:
            try:
                row["stored"], row["store_action"] = filer.finish(sha, decoded.format, data)
            except ChangedError as e:
                raise ExtractError(IngestError.CHANGED, str(e)) from None
            except OSError as e:
                raise ExtractError(IngestError.STORE, f"cannot write the store: {one_line(e)}") from None
        row.update(format=decoded.format, width=decoded.width, height=decoded.height, thumb=rel)
        row.update(_capture_columns(decoded, mtime if mtime is not None else file_mtime, settings))
    except ExtractError as e:
        row.update(error=e.code, message=str(e), stored=None, store_action=None)


def extract_batches(batches: Iterator[pd.DataFrame], settings: ExtractSettings) -> Iterator[pd.DataFrame]:
    """mapInPandas body: manifest rows (path, bytes, mtime) in, feature rows out."""
    # Truncated files decode partially in Pillow when this is True: keep it False so a
    # truncated file is an error rather than a silently grey thumbnail.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    for batch in batches:
        rows = []
        for path, size, mtime, error, message in zip(batch["path"], batch["bytes"], batch["mtime"],
                                                     batch["error"], batch["message"], strict=True):
            if isinstance(error, str):
                # Found bad at scan time (a link out of the roots, a FIFO): never opened here.
                row = dict.fromkeys(FEATURE_COLUMNS)
                row.update(path=path, error=error, message=message)
            else:
                row = extract_file(path, settings, mtime)
            row["bytes"], row["mtime"] = int(size), mtime
            rows.append(row)
        yield features_frame(rows)


def features_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Feature rows as the DataFrame mapInPandas hands to Spark, every column in its exact dtype."""
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=_DTYPES.get(c)) for c in FEATURE_COLUMNS})
