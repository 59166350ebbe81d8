"""Perceptual hashes: the exact definition, pinned by a test and recorded as HASH_VERSION.

All three are imagehash's 64-bit hashes (hash_size 8) of the 512-px RGB thumbnail, so the
value does not depend on the scale the original was decoded at. They are stored as signed
64-bit integers (two's complement), which is what PostgreSQL's BIGINT holds.
"""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

# Change this whenever the definition changes (library, input image, sizes): hashes of
# different versions must never be compared.
HASH_VERSION = f"imagehash-{imagehash.__version__}/thumb512-lanczos/p8d8a8"

# The 7 non-identity symmetries of the square, in the order phash_dihedral stores them.
DIHEDRAL = (
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def hash_to_int64(h: imagehash.ImageHash) -> int:
    """64 hash bits, first bit most significant, as a signed 64-bit integer."""
    bits = np.asarray(h.hash, dtype=np.uint8).flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= 1 << 63 else value


def int64_to_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFFFFFFFFFF:016x}"


def image_hashes(thumb: Image.Image) -> dict[str, int]:
    """pHash, dHash and aHash of an RGB thumbnail."""
    return {
        "phash": hash_to_int64(imagehash.phash(thumb)),
        "dhash": hash_to_int64(imagehash.dhash(thumb)),
        "ahash": hash_to_int64(imagehash.average_hash(thumb)),
    }


def dihedral_phashes(thumb: Image.Image) -> list[int]:
    """pHash of the thumbnail under each of DIHEDRAL: finds flipped and rotated copies.

    The image is first reduced to pHash's own 32x32 grayscale input: transposing that is
    the same as transposing the image first, at a fraction of the cost.
    """
    small = thumb.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return [hash_to_int64(imagehash.phash(small.transpose(t))) for t in DIHEDRAL]
