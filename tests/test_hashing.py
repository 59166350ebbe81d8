"""The hash definition is pinned: a change here means HASH_VERSION must change too."""

from pathlib import Path

import pytest
from conftest import UKBENCH
from PIL import Image

from lookalike.stages.extract import ExtractSettings, extract_file
from lookalike.stages.hashing import HASH_VERSION, dihedral_phashes, hash_to_int64, image_hashes, int64_to_hex


def test_hash_values_pinned_on_a_fixed_image(tmp_path: Path) -> None:
    row = extract_file(str(UKBENCH / "base_images" / "ukbench00120.jpg"), ExtractSettings(str(tmp_path)))
    assert row["error"] is None
    assert row["sha256"] == "acc92f6a67a34b025d06d3c25c78128ff7c16ec8802c99b39fbd72263a9105ea"
    assert int64_to_hex(row["phash"]) == "9fee256238984d71"
    assert int64_to_hex(row["dhash"]) == "2b69707551f1b87a"
    assert int64_to_hex(row["ahash"]) == "81b83c3c3c3c1e0a"
    assert HASH_VERSION.startswith("imagehash-4.3.2/thumb512")


def test_hashes_are_signed_64_bit() -> None:
    import imagehash
    import numpy as np

    all_ones = imagehash.ImageHash(np.ones((8, 8), dtype=bool))
    assert hash_to_int64(all_ones) == -1
    first_only = np.zeros((8, 8), dtype=bool)
    first_only[0, 0] = True
    assert hash_to_int64(imagehash.ImageHash(first_only)) == -(1 << 63)
    assert int64_to_hex(-(1 << 63)) == "8000000000000000"


@pytest.mark.parametrize("index", range(7))
def test_dihedral_hash_matches_the_transformed_image(index: int) -> None:
    from lookalike.stages.hashing import DIHEDRAL

    im = Image.open(UKBENCH / "base_images" / "ukbench01380.jpg").convert("RGB")
    im.thumbnail((512, 512))
    expected = image_hashes(im.transpose(DIHEDRAL[index]))["phash"]
    got = dihedral_phashes(im)[index]
    # Transposing the 32x32 pHash input instead of the image differs only by resampling.
    assert bin((got ^ expected) & 0xFFFFFFFFFFFFFFFF).count("1") <= 4
