"""Per-file feature extraction: each original is read exactly once.

The same bytes feed sha256 and one reduced-scale decode (JPEG draft mode), which yields the
size, the perceptual hashes and the 512-px thumbnail. A file that cannot be catalogued
becomes a row with an error code and a one-line message, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps

from lookalike.errors import IngestError, one_line
from lookalike.files import replacing
from lookalike.stages import schemas
from lookalike.stages.hashing import dihedral_phashes, image_hashes

# Registers the HEIF opener when pillow-heif is installed; HEIC files are errors otherwise.
try:  # pragma: no cover - optional plugin
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:
    pass

READ_CHUNK = 8 << 20

FEATURE_COLUMNS = schemas.FEATURES.names


# Nullable integer dtypes: beside an error row's None, plain pandas turns these columns into
# float64, whose 53-bit mantissa silently rounds the low bits of the 64-bit hashes.
_NULLABLE_INTS = {"width": "Int32", "height": "Int32", "phash": "Int64", "dhash": "Int64", "ahash": "Int64"}


@dataclass(frozen=True)
class ExtractSettings:
    thumbs_dir: str
    thumb_size: int = 512
    thumb_quality: int = 90
    max_image_pixels: int = 250_000_000
    max_read_bytes: int = 256 << 20

    @classmethod
    def from_config(cls, cfg: Any, thumbs_dir: Path) -> ExtractSettings:
        e = cfg["extract"]
        return cls(str(thumbs_dir), e["thumb_size"], e["thumb_quality"], e["max_image_pixels"],
                   e["max_read_bytes"])


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


def _read_once(path: str, settings: ExtractSettings) -> tuple[str, bytes | None]:
    """sha256 of the file, and its bytes when it is small enough to hold in memory.

    Refuses anything that is not a regular file (FIFOs would block, devices never end). A file
    too large to hold is identified from its header first: gigabytes that no decoder claims
    (a zero-filled failed copy, a disk image named .jpg) are refused without being read.
    Pillow's errors propagate for the caller to classify.
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
        if not keep:
            with _bomb_guard(settings.max_image_pixels):
                Image.open(f)  # the header only; the file stays open (it is ours, not Pillow's)
            f.seek(0)
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        held = 0
        try:
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
                if keep:
                    chunks.append(chunk)
                    held += len(chunk)
                    if held > settings.max_read_bytes:  # still being written: stop holding it
                        keep, chunks = False, []
        except OSError as e:
            raise ExtractError(IngestError.UNREADABLE, f"read failed: {e.strerror or e}") from None
    if keep:
        return digest.hexdigest(), b"".join(chunks)
    return digest.hexdigest(), None


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


def decode_thumbnail(source: Any, settings: ExtractSettings) -> tuple[Image.Image, str, int, int]:
    """Decode at the smallest scale that still yields a sharp thumbnail.

    Returns (RGB thumbnail, format, width, height) with EXIF orientation applied; width and
    height are the original's displayed dimensions.
    """
    with _bomb_guard(settings.max_image_pixels), Image.open(source) as im:
        fmt = im.format or "unknown"
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if fmt == "JPEG":
            # draft() picks the largest DCT scale (1/2..1/8) keeping both sides >= the request.
            t = settings.thumb_size
            scale = max(t / max(im.size), 1 / 8)
            im.draft("RGB", (max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))))
        im.seek(0)  # animated formats: the first frame
        im.load()
        im = ImageOps.exif_transpose(im) if orientation != 1 else im
        rgb = _to_rgb(im)
    rgb.thumbnail((settings.thumb_size, settings.thumb_size), Image.Resampling.LANCZOS)
    return rgb, fmt, width, height


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


def extract_file(path: str, settings: ExtractSettings) -> dict[str, Any]:
    """Features of one file, or an error row; never raises for a bad file."""
    row: dict[str, Any] = dict.fromkeys(FEATURE_COLUMNS)
    row["path"] = path
    try:
        try:
            sha, data = _read_once(path, settings)
            row["sha256"] = sha
            thumb, fmt, width, height = decode_thumbnail(io.BytesIO(data) if data is not None else path,
                                                         settings)
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
        row.update(format=fmt, width=width, height=height, thumb=rel)
    except ExtractError as e:
        row.update(error=e.code, message=str(e))
    return row


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
                row = extract_file(path, settings)
            row["bytes"], row["mtime"] = int(size), mtime
            rows.append(row)
        yield pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=_NULLABLE_INTS.get(c))
                            for c in FEATURE_COLUMNS})
