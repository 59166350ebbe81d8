"""What the archive's formats need beyond Pillow's own: camera RAW, HEIC/HEIF and AVIF, capture metadata.

`decode_image` turns a file's bytes (already read once for the sha256) into a picture ready to
thumbnail, with its orientation applied, and names the format: `raw:nef`, `raw:dng`, ... for camera
RAW, and Pillow's own name for everything else (`JPEG`, `PNG`, `MPO`, `HEIF` for HEIC/HEIF as
pillow-heif reports it, `AVIF`), as the catalog has always stored it.
`capture_info` reads when and with what a picture was taken.

Camera RAW goes through LibRaw (rawpy). The embedded preview JPEG is used when its long side is
at least `min_side`: decoding it (in JPEG draft mode) costs a fraction of a demosaic, and it is
the camera's own rendering. Otherwise a half-size demosaic with the camera's white balance.

Where a RAW's EXIF comes from: rawpy exposes no camera make or model, no UTC offset, and reading
its lens or timestamp forces a full unpack of the sensor data (`ensure_unpack`); its timestamp is
a naive local time. So the EXIF is read from the RAW's own TIFF structure (NEF, CR2, ARW, DNG,
PEF, SRW; ORF's and RW2's non-standard TIFF magic is patched), from the CMT1/CMT2/CMT4 boxes of a
CR3, and otherwise (RAF) from the embedded preview JPEG's APP1. The orientation is LibRaw's
`sizes.flip` when the EXIF has none.

LibRaw is built with OpenMP, but the half-size demosaic (no interpolation) measured the same
with OMP_NUM_THREADS=1 as without (12.5 MP: 0.12 s of CPU either way, bench/ingest.py on 2
cores), so executors leave the thread count alone.

HEIC/HEIF through pillow-heif; AVIF through Pillow's own plugin (Pillow >= 11.3), or pillow-heif's
AVIF opener where an older pillow-heif still has one. pillow-heif applies the container's
rotation (irot/imir) itself and sets the EXIF orientation to 1, keeping the file's value in
`info["original_orientation"]`; Pillow's AVIF plugin leaves it in the EXIF for exif_transpose.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, features

from lookalike.errors import IngestError, one_line

# Camera RAW formats LibRaw decodes, by extension. A DNG is a TIFF that Pillow would open too
# (its first IFD, often a small preview): the extension, not the content, routes it to LibRaw.
RAW_EXTENSIONS = frozenset({
    ".nef", ".nrw", ".cr2", ".cr3", ".crw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
    ".pef", ".dng", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".mrw", ".rwl",
})
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif"})

_ORIENTATION = ExifTags.Base.Orientation
_EXIF_IFD = ExifTags.IFD.Exif
_GPS_IFD = ExifTags.IFD.GPSInfo
_OFFSET_TIME_ORIGINAL = 0x9011  # EXIF 2.31; not in every Pillow's ExifTags.Base
# LibRaw's flip (dcraw's bit field: 4 transpose, 2 flip vertically, 1 flip horizontally) as EXIF
# orientation; the inverse of dcraw's "50132467"[orientation & 7].
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}
# EXIF orientation -> the transpose that displays it (as ImageOps.exif_transpose does).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# ORF and RW2 are TIFF with their own magic; Pillow's EXIF reader wants the standard one.
_TIFF_MAGIC = {b"II*\x00": b"II*\x00", b"MM\x00*": b"MM\x00*", b"IIRO": b"II*\x00",
               b"IIRS": b"II*\x00", b"MMOR": b"MM\x00*", b"IIU\x00": b"II*\x00"}
_CANON_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_HEIF_BRANDS = _HEIC_BRANDS | {b"mif1", b"msf1", b"mif2", b"avif", b"avis"}
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                  struct.error, ZeroDivisionError)


class FormatError(Exception):
    """A file its format's decoder cannot read: `code` is short and stable, the message one line."""

    def __init__(self, code: IngestError, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Decoded:
    """A picture ready to thumbnail and what is known about how it was obtained."""

    image: Image.Image  # orientation applied; reduced scale (draft, preview or half-size demosaic)
    format: str  # 'raw:nef', 'raw:dng', ... for RAW; else Pillow's name: 'JPEG', 'PNG', 'HEIF', 'AVIF', ...
    width: int  # the original's displayed size (after orientation), not the decoded one
    height: int
    path: str  # 'preview' | 'demosaic' (RAW) | 'decode' (anything else)
    exif: Image.Exif  # for capture_info; its orientation is the file's own, before it was applied


@dataclass(frozen=True)
class CaptureInfo:
    """When and with what a picture was taken."""

    taken_at: datetime | None  # timezone-aware; None when neither EXIF nor an mtime gives one
    taken_at_source: str | None  # 'exif' | 'mtime'
    taken_at_offset: bool  # the EXIF time came with its UTC offset (else it was read in local_tz)
    camera_make: str | None
    camera_model: str | None
    lens: str | None
    orientation: int | None  # EXIF 1-8, as the file stores it
    gps_lat: float | None  # None unless keep_gps
    gps_lon: float | None


_registered = False
_heif_opener = False  # pillow-heif registered: HEIC/HEIF decodable


def register_openers() -> None:
    """Teach Pillow HEIC/HEIF (pillow-heif) and, where Pillow lacks it, AVIF; once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        import pillow_heif
    except ImportError:  # HEIC files then fail with a 'heif_decode' error that says so
        return
    global _heif_opener
    pillow_heif.register_heif_opener()
    _heif_opener = True
    # pillow-heif 0.22 dropped AVIF, which Pillow 11.3 reads itself: only an old pair needs this.
    if not features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()


register_openers()


def _norm_ext(ext: str) -> str:
    ext = ext.lower()
    return ext if ext.startswith(".") else f".{ext}"


def decode_image(data: bytes | str, ext: str, min_side: int = 512, max_pixels: int | None = None) -> Decoded:
    """Decode a file's bytes (or, for a file too large to hold, its path) for a `min_side` thumbnail.

    `ext` is the path's extension ('.NEF' or 'nef'); RAW extensions go to LibRaw, the rest to
    Pillow. Raises FormatError ('raw_decode', 'heif_decode', 'too_large') with a one-line
    message; other formats' Pillow errors propagate unchanged for the caller to classify.
    """
    ext = _norm_ext(ext)
    if ext in RAW_EXTENSIONS:
        decoded = _decode_raw(data, ext, min_side, max_pixels)
        if decoded is not None:
            return decoded
    return _decode_pillow(data, min_side)


def is_raw(ext: str) -> bool:
    return _norm_ext(ext) in RAW_EXTENSIONS


def probe_raw(path: str, ext: str, max_pixels: int | None = None) -> None:
    """LibRaw's verdict on a RAW file from its header and metadata, before it is read whole.

    For a file too large to hold: gigabytes no decoder claims are refused without being read.
    Raises FormatError ('raw_decode', 'too_large'); a JPEG named like a RAW passes.
    """
    fmt = f"raw:{_norm_ext(ext)[1:]}"
    raw = _open_raw(path, fmt)
    if raw is None:
        return
    with raw:
        sizes = raw.sizes
    if max_pixels is not None and sizes.width * sizes.height > max_pixels:
        raise FormatError(IngestError.TOO_LARGE,
                          f"{fmt} of {sizes.width}x{sizes.height} pixels is over the {max_pixels} limit")


# ---------------------------------------------------------------------------------------------
# Camera RAW


class _Whole:
    """A file object whose read() is the bytes themselves: rawpy's open_buffer takes them uncopied."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, size: int = -1) -> bytes:
        return self._data


def _open_raw(source: bytes | str, fmt: str) -> Any:
    """LibRaw opened on a RAW file (its path, or its bytes), the header and metadata parsed but
    nothing unpacked; None for a JPEG named like a RAW (a camera's JPEG renamed: Pillow's to
    decode, not an error). Raises FormatError('raw_decode') when rawpy or LibRaw cannot."""
    try:
        import rawpy
    except ImportError:
        raise FormatError(IngestError.RAW_DECODE, f"cannot decode {fmt}: rawpy is not installed") from None
    try:
        return rawpy.imread(_Whole(source) if isinstance(source, bytes) else source)
    except rawpy.LibRawError as e:
        head = source[:3] if isinstance(source, bytes) else _head(source)[:3]
        if head == b"\xff\xd8\xff":
            return None
        raise FormatError(IngestError.RAW_DECODE,
                          f"cannot decode {fmt}: LibRaw cannot open it ({one_line(e)})") from None


def _draft(im: Image.Image, min_side: int) -> None:
    """JPEG draft mode: the largest DCT scale (1/2..1/8) that keeps the long side >= min_side."""
    scale = max(min_side / max(im.size), 1 / 8)
    im.draft("RGB", (max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))))


def _decode_raw(data: bytes | str, ext: str, min_side: int, max_pixels: int | None) -> Decoded | None:
    """LibRaw's preview or half-size demosaic; None for a renamed JPEG (Pillow's then)."""
    fmt = f"raw:{ext[1:]}"
    raw = _open_raw(data, fmt)
    if raw is None:
        return None
    import rawpy  # imported by _open_raw: its errors are caught below

    with raw:
        sizes = raw.sizes  # known from the header: no unpack
        width, height = (sizes.height, sizes.width) if sizes.flip & 4 else (sizes.width, sizes.height)
        if max_pixels is not None and width * height > max_pixels:
            raise FormatError(IngestError.TOO_LARGE,
                              f"{fmt} of {width}x{height} pixels is over the {max_pixels} limit")
        orientation = _FLIP_TO_ORIENTATION.get(sizes.flip, 1)
        image, preview_exif, why_not = _raw_preview(raw, min_side)
        if image is not None:
            path = "preview"
            # Cameras store previews as the sensor sees them, like the raw data: turn it like
            # the demosaic, which LibRaw turns itself.
            if orientation in _TRANSPOSE:
                image = image.transpose(_TRANSPOSE[orientation])
        else:
            path = "demosaic"
            try:
                rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
            except (rawpy.LibRawError, ValueError, RuntimeError) as e:
                raise FormatError(IngestError.RAW_DECODE, f"cannot decode {fmt}: {why_not}, and the demosaic "
                                                          f"failed ({one_line(e)})") from None
            image = Image.fromarray(rgb)
    own = raw_exif(data) if isinstance(data, bytes) else _raw_exif_file(data)
    exif = own or preview_exif or Image.Exif()
    if _ORIENTATION not in exif:
        exif[_ORIENTATION] = orientation
    return Decoded(image, fmt, width, height, path, exif)


def _raw_preview(raw: Any, min_side: int) -> tuple[Image.Image | None, Image.Exif | None, str]:
    """(the embedded preview if its long side is >= min_side, its EXIF, why not)."""
    import rawpy

    try:
        thumb = raw.extract_thumb()  # unpacks the preview only, not the sensor data
    except rawpy.LibRawNoThumbnailError:
        return None, None, "no embedded preview"
    except rawpy.LibRawUnsupportedThumbnailError:
        return None, None, "embedded preview in an unsupported format"
    except (rawpy.LibRawError, ValueError, NotImplementedError) as e:
        return None, None, f"embedded preview unreadable ({one_line(e)})"
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        im = Image.fromarray(thumb.data)
        if max(im.size) < min_side:
            return None, None, f"embedded preview of {im.width}x{im.height} is under {min_side} px"
        return im, None, ""
    try:
        im = Image.open(io.BytesIO(thumb.data))
        exif = _exif_of(im)
        if max(im.size) < min_side:
            return None, exif, f"embedded preview of {im.width}x{im.height} is under {min_side} px"
        _draft(im, min_side)
        im.load()
    except _PILLOW_ERRORS as e:
        return None, None, f"embedded preview unreadable ({one_line(e)})"
    return im, exif if len(exif) else None, ""


def _exif_of(im: Image.Image) -> Image.Exif:
    """The image's EXIF with its nested IFDs read now, while the file is open (a TIFF's come from
    the file). Metadata is a bonus: a damaged EXIF gives what could be read, never an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "possibly corrupt EXIF"
        try:
            exif = im.getexif()
        except _PILLOW_ERRORS:
            return Image.Exif()
        for ifd in (_EXIF_IFD, _GPS_IFD):
            with contextlib.suppress(*_PILLOW_ERRORS):
                exif.get_ifd(ifd)
    return exif


def _exif_from_tiff(tiff: bytes) -> Image.Exif | None:
    exif = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "possibly corrupt EXIF": a RAW's maker tags are odd
        try:
            exif.load(tiff)
            exif.get_ifd(_EXIF_IFD)
            exif.get_ifd(_GPS_IFD)
        except _PILLOW_ERRORS:
            return None
    return exif if len(exif) else None


def _raw_exif_file(path: str) -> Image.Exif | None:
    """EXIF from a TIFF-based RAW too large to hold, read through the open file (IFDs only)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\x00", b"MM\x00*"):
                return None  # ORF, RW2, CR3, RAF that large: the preview's EXIF, if any
            f.seek(0)
            exif = Image.Exif()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exif.load_from_fp(f)
                for ifd in (_EXIF_IFD, _GPS_IFD):
                    with contextlib.suppress(*_PILLOW_ERRORS):
                        exif.get_ifd(ifd)
    except (OSError, *_PILLOW_ERRORS):
        return None
    return exif if len(exif) else None


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """ISO-BMFF boxes in data[start:end]: (type, content start, end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _cr3_exif(data: bytes) -> Image.Exif | None:
    """A CR3's EXIF: TIFF blocks CMT1 (IFD0), CMT2 (EXIF IFD), CMT4 (GPS) in moov/uuid(Canon)."""
    blocks: dict[bytes, bytes] = {}
    for kind, s, e in _boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for kind2, s2, e2 in _boxes(data, s, e):
            if kind2 == b"uuid" and data[s2:s2 + 16] == _CANON_UUID:
                blocks.update((k, data[s3:e3]) for k, s3, e3 in _boxes(data, s2 + 16, e2))
        break
    exif = _exif_from_tiff(blocks[b"CMT1"]) if b"CMT1" in blocks else None
    if exif is None:
        return None
    for name, tag in ((b"CMT2", _EXIF_IFD), (b"CMT4", _GPS_IFD)):
        sub = _exif_from_tiff(blocks[name]) if name in blocks else None
        if sub is not None:
            exif.get_ifd(tag).update(sub)
    return exif


def raw_exif(data: bytes) -> Image.Exif | None:
    """EXIF from a RAW file's own structure (TIFF-based formats and CR3); None where it has none."""
    magic = data[:4]
    if magic in _TIFF_MAGIC:
        standard = _TIFF_MAGIC[magic]
        return _exif_from_tiff(data if magic == standard else standard + data[4:])
    if data[4:12] == b"ftypcrx ":
        return _cr3_exif(data)
    return None


# ---------------------------------------------------------------------------------------------
# Everything Pillow opens (with pillow-heif for HEIC)


def _head(source: bytes | str) -> bytes:
    if isinstance(source, bytes):
        return source[:16]
    with open(source, "rb") as f:
        return f.read(16)


def _heif_brand(head: bytes) -> bytes | None:
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return head[8:12]
    return None


def _decode_pillow(source: bytes | str, min_side: int) -> Decoded:
    head = _head(source)
    brand = _heif_brand(head)
    kind = "AVIF" if brand in (b"avif", b"avis") else "HEIC" if brand in _HEIC_BRANDS else "HEIF"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            fmt = im.format or "unknown"  # Pillow's name: 'JPEG', 'MPO', 'HEIF' (pillow-heif), 'AVIF'
            exif = _exif_of(im)
            pending = exif.get(_ORIENTATION, 1)  # what exif_transpose will still apply
            # pillow-heif applied it already (and wrote 1); a HEIF container without a rotation is 1
            own = im.info.get("original_orientation") or exif.get(_ORIENTATION) or (1 if brand else None)
            if own is not None and own != exif.get(_ORIENTATION):
                exif[_ORIENTATION] = own
            width, height = (im.height, im.width) if pending in (5, 6, 7, 8) else im.size
            if isinstance(im, JpegImagePlugin.JpegImageFile):
                _draft(im, min_side)
            im.seek(0)  # animated formats: the first frame
            im.load()
            image = ImageOps.exif_transpose(im) if pending in (2, 3, 4, 5, 6, 7, 8) else im
    except (MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as e:
        if brand is None:
            raise
        # pillow-heif raises RuntimeError too: the caller's usual classes would not catch it.
        if isinstance(e, Image.UnidentifiedImageError):
            has_decoder = ".avif" in Image.registered_extensions() if kind == "AVIF" else _heif_opener
            why = "damaged or truncated (no decoder accepted it)" if has_decoder else "no decoder installed"
            raise FormatError(IngestError.HEIF_DECODE, f"cannot decode {kind}: {why}") from None
        raise FormatError(IngestError.HEIF_DECODE, f"cannot decode {kind}: {one_line(e)}") from None
    return Decoded(image, fmt, width, height, "decode", exif)


# ---------------------------------------------------------------------------------------------
# Capture metadata

_DATETIME = re.compile(r"(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = " ".join(value.replace("\x00", " ").split())
    return text[:200] or None


def _parse_offset(value: Any) -> tzinfo | None:
    text = _text(value)
    if text is None:
        return None
    if text == "Z":
        return UTC
    m = _OFFSET.fullmatch(text)
    if m is None:
        return None
    minutes = int(m[2]) * 60 + int(m[3])
    if minutes > 14 * 60:
        return None
    return timezone(timedelta(minutes=-minutes if m[1] == "-" else minutes))


def _exif_time(value: Any, subsec: Any, offset: Any, local_tz: tzinfo) -> tuple[datetime | None, bool]:
    text = _text(value)
    m = _DATETIME.match(text) if text else None
    if m is None:
        return None, False
    try:  # a camera without a clock writes "0000:00:00 00:00:00"
        dt = datetime(*(int(g) for g in m.groups()))  # type: ignore[misc]
    except ValueError:
        return None, False
    digits = "".join(c for c in (_text(subsec) or "") if c.isdigit())
    if digits:
        dt = dt.replace(microsecond=int((digits + "000000")[:6]))
    tz = _parse_offset(offset)
    if tz is not None:
        return dt.replace(tzinfo=tz), True
    return dt.replace(tzinfo=local_tz), False


def _as_datetime(mtime: datetime | float | int | None) -> datetime | None:
    if mtime is None:
        return None
    if isinstance(mtime, datetime):
        to_py = getattr(mtime, "to_pydatetime", None)  # pandas.Timestamp
        dt: datetime = to_py() if to_py is not None else mtime
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(mtime), tz=UTC)


def _degrees(dms: Any, ref: Any, limit: float) -> float | None:
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if not (0 <= value <= limit):  # also rejects NaN (a 0/0 rational)
        return None
    return -value if (_text(ref) or "").upper() in ("S", "W") else value


def _ifd(exif: Image.Exif, tag: int) -> Any:
    """A nested IFD, or {} where the file has none or a damaged one."""
    if not len(exif):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return exif.get_ifd(tag)
        except _PILLOW_ERRORS:
            return {}


def capture_info(image_or_exif: Image.Image | Image.Exif | None, mtime: datetime | float | None,
                 keep_gps: bool = False, local_tz: tzinfo = UTC) -> CaptureInfo:
    """Capture time, camera, lens, orientation and (only when keep_gps) GPS position.

    The time is EXIF DateTimeOriginal (+ SubSecTimeOriginal) with OffsetTimeOriginal where the
    file has it; without an offset the wall-clock time is read in `local_tz` and
    taken_at_offset is False. Without DateTimeOriginal it is the file's mtime (a datetime, or
    seconds since the epoch; naive means UTC). GPS is not even read unless keep_gps.
    """
    orientation: Any = None
    if isinstance(image_or_exif, Image.Image):
        exif = image_or_exif.getexif()
        orientation = image_or_exif.info.get("original_orientation")  # pillow-heif's
    else:
        exif = image_or_exif if image_or_exif is not None else Image.Exif()
    ifd0: Any = exif
    sub: Any = _ifd(exif, _EXIF_IFD)

    def tag(t: int) -> Any:  # a DNG may keep EXIF tags in IFD0 (pidng does)
        return sub.get(t, ifd0.get(t))

    taken, has_offset = _exif_time(tag(ExifTags.Base.DateTimeOriginal), tag(ExifTags.Base.SubsecTimeOriginal),
                                   tag(_OFFSET_TIME_ORIGINAL), local_tz)
    source: str | None = "exif"
    if taken is None:
        taken, source = _as_datetime(mtime), "mtime"
        if taken is None:
            source = None
    if orientation is None:
        orientation = ifd0.get(_ORIENTATION)
    lat = lon = None
    if keep_gps and len(exif):
        gps = _ifd(exif, _GPS_IFD)
        lat = _degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), 90)
        lon = _degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), 180)
        if lat is None or lon is None:
            lat = lon = None
    return CaptureInfo(
        taken_at=taken,
        taken_at_source=source,
        taken_at_offset=has_offset,
        camera_make=_text(ifd0.get(ExifTags.Base.Make)),
        camera_model=_text(ifd0.get(ExifTags.Base.Model)),
        lens=_text(tag(ExifTags.Base.LensModel)),
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None,
        gps_lat=lat,
        gps_lon=lon,
    )
