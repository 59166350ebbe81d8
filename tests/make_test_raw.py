"""Camera-like test files made from real photos: DNG (Bayer mosaic, with or without a preview), HEIC, AVIF.

Nothing is downloaded. A DNG is written by a small TIFF writer here: pidng (4.0.9) writes one
IFD holding the mosaic, and can embed neither a preview image nor an EXIF or GPS IFD, which a
camera's DNG has. `write_dng_pidng` still writes pidng's kind (EXIF tags in IFD0, no preview) as
a second, independent writer. HEIC goes through pillow-heif, AVIF through Pillow.

`python tests/make_test_raw.py [OUT_DIR]` times a ~25 MB DNG through the preview path and the
demosaic path against a JPEG of the same pixels in draft mode.
"""

from __future__ import annotations

import io
import struct
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin

HIRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos-hires"

# TIFF field types
BYTE, ASCII, SHORT, LONG, RATIONAL, UNDEFINED, SRATIONAL = 1, 2, 3, 4, 5, 7, 10
_PACK = {BYTE: "B", SHORT: "H", LONG: "I"}

# XYZ (D65) -> linear sRGB: as a DNG ColorMatrix1 it says "this sensor sees linear sRGB", so
# LibRaw's colour conversion is close to the identity and the demosaic looks like the photo.
XYZ_TO_SRGB = ((3.2406, -1.5372, -0.4986), (-0.9689, 1.8758, 0.0415), (0.0557, -0.2040, 1.0570))

# A file with EXIF orientation o stores the displayed picture turned by the inverse of what
# exif_transpose does for o (flips and transposes are their own inverses).
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class Meta:
    """The EXIF a test file is written with; None leaves a field out."""

    make: str | None = "NIKON CORPORATION"
    model: str | None = "NIKON Z 6_2"
    lens: str | None = "NIKKOR Z 24-70mm f/4 S"
    lens_make: str | None = "Nikon"
    taken: str | None = "2023:07:14 18:30:05"
    subsec: str | None = "25"
    offset: str | None = "+02:00"
    gps: tuple[float, float] | None = (48.858370, -2.294481)  # degrees, negative: S / W
    orientation: int = 1


NO_EXIF = Meta(make=None, model=None, lens=None, lens_make=None, taken=None, subsec=None, offset=None,
               gps=None)


def photo(name: str = "hires-05.jpg", long_side: int = 1800) -> Image.Image:
    """A real photo as RGB, scaled so its long side is `long_side` (draft mode first: fast)."""
    with Image.open(HIRES / name) as im:
        im.draft("RGB", (long_side, long_side))
        im = ImageOps.exif_transpose(im).convert("RGB")
    scale = long_side / max(im.size)
    size = (max(2, round(im.width * scale)) // 2 * 2, max(2, round(im.height * scale)) // 2 * 2)
    return im.resize(size, Image.Resampling.LANCZOS)


def photo_for_mb(megabytes: float, name: str = "hires-02.jpg") -> Image.Image:
    """A photo whose 16-bit mosaic is `megabytes` MB (2 bytes a pixel)."""
    with Image.open(HIRES / name) as im:
        aspect = im.width / im.height
    pixels = megabytes * 1e6 / 2
    return photo(name, round(max((pixels * aspect) ** 0.5, (pixels / aspect) ** 0.5)))


def stored(displayed: Image.Image, orientation: int) -> Image.Image:
    """The pixels a file with this EXIF orientation stores so that it displays as `displayed`."""
    return displayed.transpose(_STORE[orientation]) if orientation in _STORE else displayed


def bayer_rggb(rgb: Image.Image, white: int = 65535) -> np.ndarray:
    """16-bit RGGB mosaic of linear light (the sRGB curve undone): what a sensor would record."""
    v = np.arange(256) / 255.0
    lut = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4) * white
    lin = np.round(lut).astype(np.uint16)[np.asarray(rgb)]
    h, w = lin.shape[0] // 2 * 2, lin.shape[1] // 2 * 2
    mosaic = np.empty((h, w), np.uint16)
    mosaic[0::2, 0::2] = lin[0:h:2, 0:w:2, 0]
    mosaic[0::2, 1::2] = lin[0:h:2, 1:w:2, 1]
    mosaic[1::2, 0::2] = lin[1:h:2, 0:w:2, 1]
    mosaic[1::2, 1::2] = lin[1:h:2, 1:w:2, 2]
    return mosaic


# ---------------------------------------------------------------------------------------------
# A minimal little-endian TIFF writer: enough for a camera-like DNG.


class Ifd:
    """Tags of one IFD; a value that is a list of Ifd is a pointer tag (SubIFDs, EXIF, GPS)."""

    def __init__(self, strip: bytes | None = None) -> None:
        self.tags: dict[int, tuple[int, Any]] = {}
        self.strip = strip  # image data: one strip, its offset and length filled in

    def set(self, tag: int, typ: int, value: Any) -> Ifd:
        self.tags[tag] = (typ, value)
        return self


def _rational(x: float) -> tuple[int, int]:
    f = Fraction(x).limit_denominator(10000)
    return f.numerator, f.denominator


def _encode(typ: int, value: Any) -> tuple[bytes, int]:
    if typ == ASCII:
        raw = value.encode() + b"\x00"
        return raw, len(raw)
    if typ in (BYTE, UNDEFINED) and isinstance(value, bytes):
        return value, len(value)
    values = list(value) if isinstance(value, list | tuple) else [value]
    if typ in (RATIONAL, SRATIONAL):
        pairs = [_rational(v) for v in values]
        fmt = "<" + ("II" if typ == RATIONAL else "ii") * len(pairs)
        return struct.pack(fmt, *(n for p in pairs for n in p)), len(pairs)
    return struct.pack(f"<{len(values)}{_PACK[typ]}", *values), len(values)


def _pad(buf: bytearray) -> None:
    if len(buf) % 2:
        buf.append(0)


def _place(buf: bytearray, ifd: Ifd) -> int:
    """Writes the IFD's children, data and out-of-line values, then the IFD; returns its offset."""
    fields: dict[int, tuple[int, Any]] = {}
    for tag, (typ, value) in ifd.tags.items():
        if isinstance(value, list) and value and isinstance(value[0], Ifd):
            fields[tag] = (LONG, [_place(buf, child) for child in value])
        else:
            fields[tag] = (typ, value)
    if ifd.strip is not None:
        _pad(buf)
        fields[273] = (LONG, [len(buf)])  # StripOffsets
        fields[279] = (LONG, [len(ifd.strip)])  # StripByteCounts
        buf += ifd.strip
    entries = []
    for tag in sorted(fields):
        typ, value = fields[tag]
        raw, count = _encode(typ, value)
        if len(raw) > 4:
            _pad(buf)
            field = struct.pack("<I", len(buf))
            buf += raw
        else:
            field = raw.ljust(4, b"\x00")
        entries.append(struct.pack("<HHI", tag, typ, count) + field)
    _pad(buf)
    offset = len(buf)
    buf += struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return offset


def tiff_bytes(ifd0: Ifd) -> bytes:
    buf = bytearray(b"II*\x00\x00\x00\x00\x00")
    struct.pack_into("<I", buf, 4, _place(buf, ifd0))
    return bytes(buf)


def _dms(deg: float) -> list[float]:
    deg = abs(deg)
    d = int(deg)
    m = int((deg - d) * 60)
    return [d, m, round((deg - d - m / 60) * 3600, 4)]


def _exif_ifds(meta: Meta, ifd0: Ifd) -> None:
    """Make, model, orientation in IFD0; capture time and lens in an EXIF IFD; GPS in its own."""
    if meta.make is not None:
        ifd0.set(0x010F, ASCII, meta.make)
    if meta.model is not None:
        ifd0.set(0x0110, ASCII, meta.model)
    ifd0.set(0x0112, SHORT, meta.orientation)
    exif = Ifd().set(0x9000, UNDEFINED, b"0231")
    if meta.taken is not None:
        exif.set(0x9003, ASCII, meta.taken)
    if meta.subsec is not None:
        exif.set(0x9291, ASCII, meta.subsec)
    if meta.offset is not None:
        exif.set(0x9011, ASCII, meta.offset)
    if meta.lens_make is not None:
        exif.set(0xA433, ASCII, meta.lens_make)
    if meta.lens is not None:
        exif.set(0xA434, ASCII, meta.lens)
    ifd0.set(0x8769, LONG, [exif])
    if meta.gps is not None:
        lat, lon = meta.gps
        gps = (Ifd().set(0, BYTE, b"\x02\x03\x00\x00")
               .set(1, ASCII, "N" if lat >= 0 else "S").set(2, RATIONAL, _dms(lat))
               .set(3, ASCII, "E" if lon >= 0 else "W").set(4, RATIONAL, _dms(lon)))
        ifd0.set(0x8825, LONG, [gps])


def dng_bytes(displayed: Image.Image, meta: Meta = Meta(), preview: int | None = 0, quality: int = 90,
              broken: bool = False) -> bytes:
    """A DNG of `displayed` (RGB) as a camera writes one.

    preview: None for no preview; 0 for a full-size preview JPEG; n for one of long side n. With a
    preview, IFD0 is the preview (NewSubfileType 1) and the mosaic is its SubIFD, as cameras and
    Adobe's converter lay it out; without one, IFD0 is the mosaic. broken: the mosaic claims a
    deflate compression it does not have, and the preview's JPEG data is overwritten (its header
    kept): a file LibRaw opens but can neither demosaic nor take a preview from.
    """
    pixels = stored(displayed, meta.orientation)
    mosaic = bayer_rggb(pixels)
    h, w = mosaic.shape
    raw = (Ifd(mosaic.tobytes())
           .set(0x00FE, LONG, 0).set(0x0100, LONG, w).set(0x0101, LONG, h).set(0x0102, SHORT, 16)
           .set(0x0103, SHORT, 8 if broken else 1).set(0x0106, SHORT, 32803).set(0x0115, SHORT, 1)
           .set(0x0116, LONG, h).set(0x011C, SHORT, 1)
           .set(0x828D, SHORT, [2, 2]).set(0x828E, BYTE, b"\x00\x01\x01\x02")  # CFA: RGGB
           .set(0xC617, SHORT, 1).set(0xC61A, LONG, 0).set(0xC61D, LONG, 65535))  # layout, black, white
    dng = [(0xC612, BYTE, b"\x01\x04\x00\x00"), (0xC613, BYTE, b"\x01\x01\x00\x00"),
           (0xC614, ASCII, f"{meta.make or 'Test'} {meta.model or 'Camera'}"),
           (0xC621, SRATIONAL, [x for row in XYZ_TO_SRGB for x in row]),
           (0xC65A, SHORT, 21), (0xC628, RATIONAL, [1, 1, 1])]  # D65, neutral white balance
    if preview is None:
        ifd0 = raw
    else:
        small = pixels.copy()
        if preview:
            small.thumbnail((preview, preview), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.save(out, "JPEG", quality=quality)
        jpeg = out.getvalue()
        if broken:  # keep the headers (LibRaw and Pillow see a JPEG), destroy the scan data
            jpeg = jpeg[:1000] + bytes(len(jpeg) - 1000)
        ifd0 = (Ifd(jpeg)
                .set(0x00FE, LONG, 1).set(0x0100, LONG, small.width).set(0x0101, LONG, small.height)
                .set(0x0102, SHORT, [8, 8, 8]).set(0x0103, SHORT, 7).set(0x0106, SHORT, 6)
                .set(0x0115, SHORT, 3).set(0x0116, LONG, small.height).set(0x011C, SHORT, 1)
                .set(0x014A, LONG, [raw]))
    for tag, typ, value in dng:
        ifd0.set(tag, typ, value)
    ifd0.set(0x0131, ASCII, "lookalike tests")
    _exif_ifds(meta, ifd0)
    return tiff_bytes(ifd0)


def write_dng(path: Path, displayed: Image.Image, meta: Meta = Meta(), preview: int | None = 0) -> Path:
    path.write_bytes(dng_bytes(displayed, meta, preview))
    return path


def write_dng_pidng(path: Path, displayed: Image.Image, meta: Meta = Meta()) -> Path:
    """A DNG written by pidng: the mosaic in IFD0, no preview, DateTimeOriginal in IFD0."""
    from pidng.core import RAW2DNG
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, PhotometricInterpretation
    from pidng.dng import DNGTags, Tag

    mosaic = bayer_rggb(stored(displayed, meta.orientation))
    h, w = mosaic.shape
    t = DNGTags()
    for tag, value in [
        (Tag.ImageWidth, w), (Tag.ImageLength, h), (Tag.TileWidth, w), (Tag.TileLength, h),
        (Tag.Orientation, meta.orientation),
        (Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array),
        (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 16), (Tag.CFARepeatPatternDim, [2, 2]),
        (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0), (Tag.WhiteLevel, 65535),
        (Tag.ColorMatrix1, [[round(x * 10000), 10000] for row in XYZ_TO_SRGB for x in row]),
        (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
        (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]),
        (Tag.Make, meta.make or "Test"), (Tag.Model, meta.model or "Camera"),
        (Tag.UniqueCameraModel, f"{meta.make} {meta.model}"), (Tag.DNGVersion, DNGVersion.V1_4),
    ]:
        t.set(tag, value)
    if meta.taken is not None:
        t.set(Tag.DateTimeOriginal, meta.taken)
    converter = RAW2DNG()
    converter.options(t, path="", compress=False)
    path.write_bytes(bytes(converter.convert(mosaic)))
    return path


# ---------------------------------------------------------------------------------------------
# HEIC / AVIF


def exif_bytes(meta: Meta) -> bytes:
    """The EXIF block (as a JPEG's APP1 or a HEIF's Exif item holds it) for `meta`, by Pillow."""
    exif = Image.Exif()
    if meta.make is not None:
        exif[0x010F] = meta.make
    if meta.model is not None:
        exif[0x0110] = meta.model
    exif[0x0112] = meta.orientation
    sub = exif.get_ifd(0x8769)
    for tag, value in ((0x9003, meta.taken), (0x9291, meta.subsec), (0x9011, meta.offset),
                       (0xA433, meta.lens_make), (0xA434, meta.lens)):
        if value is not None:
            sub[tag] = value
    if meta.gps is not None:
        gps = exif.get_ifd(0x8825)
        lat, lon = meta.gps
        gps[1], gps[3] = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
        gps[2] = tuple(TiffImagePlugin.IFDRational(*_rational(x)) for x in _dms(lat))
        gps[4] = tuple(TiffImagePlugin.IFDRational(*_rational(x)) for x in _dms(lon))
    return exif.tobytes()


def write_heif(path: Path, displayed: Image.Image, meta: Meta = Meta(), quality: int = 80) -> Path:
    """HEIC (pillow-heif) or AVIF (Pillow), by the path's suffix, stored turned for meta.orientation."""
    from lookalike.stages.formats import register_openers

    register_openers()
    # The encoders' fastest settings: x265's default preset takes ~2 s for 0.5 MP, ultrafast 0.3 s.
    if path.suffix.lower() == ".avif":
        fmt, speed = "AVIF", {"speed": 9}
    else:
        fmt, speed = "HEIF", {"enc_params": {"preset": "ultrafast"}}
    stored(displayed, meta.orientation).save(path, fmt, quality=quality, exif=exif_bytes(meta), **speed)
    return path


# ---------------------------------------------------------------------------------------------
# Bench


def _time(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(out: Path, megabytes: float = 25.0, repeats: int = 3) -> dict[str, Any]:
    """Best-of-`repeats` seconds from bytes in memory to a 512-px thumbnail, per path."""
    import hashlib

    from lookalike.stages.formats import decode_image

    out.mkdir(parents=True, exist_ok=True)
    src = photo_for_mb(megabytes)
    with_preview = write_dng(out / "bench_preview.dng", src).read_bytes()
    without = write_dng(out / "bench_mosaic.dng", src, preview=None).read_bytes()
    jpeg = io.BytesIO()
    src.save(jpeg, "JPEG", quality=95)
    (out / "bench.jpg").write_bytes(jpeg.getvalue())

    def thumb(data: bytes, ext: str, path: str) -> None:
        d = decode_image(data, ext, 512)
        assert d.path == path, d.path
        d.image.convert("RGB").thumbnail((512, 512), Image.Resampling.LANCZOS)

    return {
        "pixels": f"{src.width}x{src.height}",
        "MB": {"dng_preview": len(with_preview) / 1e6, "dng_mosaic": len(without) / 1e6,
               "jpeg_q95": len(jpeg.getvalue()) / 1e6},
        "s": {
            "dng_preview": _time(lambda: thumb(with_preview, ".dng", "preview"), repeats),
            "dng_demosaic": _time(lambda: thumb(without, ".dng", "demosaic"), repeats),
            "jpeg_draft": _time(lambda: thumb(jpeg.getvalue(), ".jpg", "decode"), repeats),
            "sha256_25MB": _time(lambda: hashlib.sha256(with_preview).digest(), repeats),
        },
    }


if __name__ == "__main__":
    print(bench(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lookalike-raw-bench")))
