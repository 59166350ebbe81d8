"""SQL fragments the catalog's readers and writers share, each written once."""

from __future__ import annotations

# The active model_ver as a scalar subquery: every cluster query filters on it.
ACTIVE_VER = "(SELECT value FROM catalog_meta WHERE key = 'active_model_ver')"
# Where to open an image: its copy in the store when the catalog has one (always there, even after
# `move` removed the source), else the lexically first path it was found at (via the path index).
OPEN_PATH = ("coalesce((SELECT s.store_path FROM images s WHERE s.id = {0}), "
             "(SELECT min(p.path) FROM image_paths p WHERE p.image_id = {0}))")
PATH_COUNT = "(SELECT count(*) FROM image_paths p WHERE p.image_id = {0})"
# Which of near-duplicate images to keep (or list first): a camera RAW (the master of a RAW+JPEG
# pair), then the largest resolution, then the most bytes.
KEEP_ORDER = "starts_with(i.format, 'raw:') DESC, i.width::bigint * i.height DESC, i.bytes DESC, i.id"


def hamming_sql(a: str, b: str) -> str:
    """SQL for the Hamming distance of two BIGINT hashes: bit_count takes bit strings, not integers."""
    return f"bit_count(({a} # {b})::bit(64))"
