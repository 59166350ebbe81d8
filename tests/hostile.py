"""A hostile archive, built from real photos: every file an archive of millions eventually holds.

`build_hostile_corpus(root)` writes it and returns, per path the scan will report, what the
catalog must say about it: catalogued (format, displayed size, a photo it must look like) or
one `ingest_errors` row with a given code. Paths the scan must not report (a link to its own
ancestor) are not in the dict, so "the tables hold exactly these paths" is the whole check.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGENET = SHARED_DATA / "imagenet-dev"
UKBENCH = SHARED_DATA / "nd-ukbench"

SPARSE_BYTES = (5 << 30) // 2  # 2.5 GiB: over 2**31, so 32-bit sizes would overflow too
BIG_PNG_BYTES = 50_000_000
NOT_UTF8_NAME = b"caf\xe9 latin-1.jpg"  # a name written by an old Latin-1 system


@dataclass(frozen=True)
class Expect:
    """What the catalog must hold for one path."""

    error: str | None = None            # the ingest_errors code; None: catalogued
    format: str | None = None           # Pillow's format name of a catalogued file
    size: tuple[int, int] | None = None  # displayed (width, height), EXIF orientation applied
    like: Path | None = None            # a photo the catalogued image must look like (pHash)


def photos() -> list[Path]:
    return sorted(IMAGENET.glob("*.JPEG"))


def outside_of(root: Path) -> Path:
    """The folder beside the root that the corpus's links lead into; nothing there may be read."""
    return root.parent / f"{root.name}-outside"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 60-byte PNG whose header declares width x height RGB pixels (30 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def make_big_png(dest: Path, target_bytes: int = BIG_PNG_BYTES) -> Path:
    """A real photo, upscaled and overlaid with noise so deflate cannot shrink it: ~50 MB on disk."""
    side = int((target_bytes / 2.75) ** 0.5)  # the clipped noise deflates to ~2.8 bytes a pixel
    with Image.open(photos()[0]) as src:
        base = np.asarray(src.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-128, 128, base.shape, dtype=np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    tmp = dest.with_name(dest.name + ".tmp")
    Image.fromarray(pixels, "RGB").save(tmp, "PNG", compress_level=1)
    tmp.replace(dest)
    return dest


def make_sparse(dest: Path, size: int = SPARSE_BYTES) -> Path:
    """A file of `size` zero bytes that takes no disk: a hole, as a failed copy leaves behind."""
    with open(dest, "wb") as f:
        os.truncate(f.fileno(), size)
    return dest


def age_atime(path: Path) -> None:
    """Set the access time an hour before the change time: under relatime any read moves it."""
    st = path.stat()
    os.utime(path, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))


def _copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def build_hostile_corpus(root: Path, big_png: Path | None = None) -> dict[str, Expect]:
    """Write the corpus under `root` (and its outside folder); returns path -> expectation.

    `big_png`: a ~50 MB PNG made by make_big_png, hard-linked in (built once per session);
    without it one is made in place.
    """
    root.mkdir(parents=True)
    outside = outside_of(root)
    outside.mkdir()
    pics = iter(photos())
    expect: dict[str, Expect] = {}

    def good(name: str | Path, fmt: str, size: tuple[int, int], like: Path) -> None:
        expect[str(root / name)] = Expect(None, fmt, size, like)

    def bad(name: str | Path, code: str) -> None:
        expect[str(root / name)] = Expect(code)

    def photo_copy(name: str) -> None:
        src = next(pics)
        with Image.open(src) as im:
            size = im.size
        _copy(src, root / name)
        good(name, "JPEG", size, src)

    # -- content that is not a (whole) image ----------------------------------------------
    (root / "empty.jpg").touch()
    bad("empty.jpg", "empty")
    jpeg = next(pics).read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad("truncated.jpg", "decode")
    (root / "random.jpg").write_bytes(random.Random(7).randbytes(64 << 10))
    bad("random.jpg", "not_an_image")
    (root / "bomb.png").write_bytes(bomb_png())
    bad("bomb.png", "too_large")
    make_sparse(root / "sparse 2.5GB.jpg")
    bad("sparse 2.5GB.jpg", "not_an_image")

    # -- odd but valid encodings ------------------------------------------------------------
    src = next(pics)
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    grey16.save(root / "grey16.png")
    good("grey16.png", "PNG", rgb.size, src)
    grey16.save(root / "grey16.tif")
    good("grey16.tif", "TIFF", rgb.size, src)
    rgb.convert("CMYK").save(root / "cmyk.jpg", "JPEG", quality=92)
    good("cmyk.jpg", "JPEG", rgb.size, src)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(root / "palette alpha.png", transparency=0)
    good("palette alpha.png", "PNG", rgb.size, src)
    rgb.save(root / "progressive.jpg", "JPEG", quality=90, progressive=True)
    good("progressive.jpg", "JPEG", rgb.size, src)
    rgb.save(root / "png named.jpg", "PNG")  # the extension lies; the content decides
    good("png named.jpg", "PNG", rgb.size, src)

    src = next(pics)
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    rgb.save(root / "animated.gif", save_all=True, duration=100,
             append_images=[rgb.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])
    good("animated.gif", "GIF", rgb.size, src)  # the first frame, not the flipped second

    src = next(pics)
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left; "rotate 90 CW to view" puts it upright
    rgb.transpose(Image.Transpose.ROTATE_90).save(root / "exif rotated.jpg", quality=92, exif=exif)
    good("exif rotated.jpg", "JPEG", rgb.size, src)

    big = root / "big 50MB.png"
    if big_png is None:
        make_big_png(big)
    else:
        try:
            os.link(big_png, big)  # the same inode: no second 50 MB on disk
        except OSError:
            shutil.copyfile(big_png, big)
    with Image.open(big) as im:
        good(big.name, "PNG", im.size, photos()[0])

    # -- names: the catalog keeps them exactly; SQL text in a name stays text ----------------
    for name in ("with space.jpg", "quote's \"double\".jpg", "new\nline.jpg", "写真 фото αβγ.jpg",
                 "x'); DROP TABLE images; --.jpg", "folder.jpg/inside.jpg", "deep/er/still/photo.jpg"):
        photo_copy(name)
    # Not UTF-8: PostgreSQL text cannot hold it, so it is reported under a readable stand-in.
    not_utf8 = os.fsdecode(bytes(root) + b"/" + NOT_UTF8_NAME)
    _copy(next(pics), Path(not_utf8))
    expect[not_utf8.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")] = Expect(
        "bad_name")

    # -- links and special files -----------------------------------------------------------
    os.symlink("deep/er/still/photo.jpg", root / "link inside.jpg")  # followed: an extra path
    expect[str(root / "link inside.jpg")] = expect[str(root / "deep/er/still/photo.jpg")]
    os.symlink("..", root / "deep" / "up")  # a loop through an ancestor: never entered, not reported
    os.symlink("loop b.jpg", root / "loop a.jpg")
    os.symlink("loop a.jpg", root / "loop b.jpg")
    bad("loop a.jpg", "broken_link")
    bad("loop b.jpg", "broken_link")
    os.symlink("missing.jpg", root / "dangling.jpg")
    bad("dangling.jpg", "broken_link")
    secret = _copy(next(pics), outside / "secret.jpg")
    os.symlink(secret, root / "outside.jpg")
    bad("outside.jpg", "outside_root")
    _copy(next(pics), outside / "album" / "private.jpg")
    os.symlink(outside / "album", root / "outside album")
    bad("outside album", "outside_root")
    os.mkfifo(root / "pipe.jpg")  # opening it to read would block forever
    bad("pipe.jpg", "not_a_file")
    for p in (secret, outside / "album", outside / "album" / "private.jpg"):
        age_atime(p)
    return expect


def share_models(home: Path, cache: Path) -> None:
    """Point <home>/models at a per-session folder: the embedding model is exported once, not per home."""
    cache.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(cache, target_is_directory=True)
