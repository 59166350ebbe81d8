"""Bring an older catalog to this code's schema, in place, in one transaction, losing nothing.

Schema 1 (lookalike's first names) -> 2 (the original design's names, DESIGN.md "Catalog
contract"): images.image_id/sha256/first_seen_at become id/file_sha256/created_at and gain
path_original; image_hashes.phash/dhash/ahash become phash64/dhash64/ahash64;
image_embeddings.embedding becomes emb; clusters.cluster_id becomes id; image_cluster gains
joined_at; images gain the capture columns (taken_at, camera, lens, ...: null for images
catalogued before them); clusters gain name, name_source and top_labels; cluster_transitions
loses its primary key (a refit that keeps a category's id records the same pair again); the
image_labels table is new; cluster_pool goes (every image gets its category when its run
ends). Foreign keys follow the renamed columns by themselves.

Schema 2 -> 3: images gain store_path (the content-addressed store, lookalike.store); the index
of image_paths by image_id becomes one by (image_id, path), which finds an image's first path.
"""

from __future__ import annotations

import psycopg

SCHEMA_VERSION = 3


class CatalogTooNew(RuntimeError):
    """The catalog was written by a newer lookalike than this one."""


_V1_TO_V2 = """
ALTER TABLE images RENAME COLUMN image_id TO id;
ALTER TABLE images RENAME COLUMN sha256 TO file_sha256;
ALTER TABLE images RENAME COLUMN first_seen_at TO created_at;
ALTER TABLE images ADD COLUMN path_original TEXT;
-- The first path the bytes were found at: the earliest still catalogued, else the earliest
-- replaced one (every image has one or the other).
UPDATE images i SET path_original = coalesce(
    (SELECT p.path FROM image_paths p WHERE p.image_id = i.id ORDER BY p.first_seen_at, p.path LIMIT 1),
    (SELECT h.path FROM image_path_history h WHERE h.image_id = i.id ORDER BY h.replaced_at, h.path LIMIT 1),
    '');
ALTER TABLE images ALTER COLUMN path_original SET NOT NULL;
CREATE INDEX IF NOT EXISTS images_created_at ON images (created_at);
ALTER TABLE image_hashes RENAME COLUMN phash TO phash64;
ALTER TABLE image_hashes RENAME COLUMN dhash TO dhash64;
ALTER TABLE image_hashes RENAME COLUMN ahash TO ahash64;
ALTER TABLE image_embeddings RENAME COLUMN embedding TO emb;
ALTER TABLE clusters RENAME COLUMN cluster_id TO id;
ALTER TABLE clusters ALTER COLUMN size SET DEFAULT 0;
ALTER TABLE image_cluster ADD COLUMN joined_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE images ADD COLUMN taken_at TIMESTAMPTZ, ADD COLUMN taken_at_source TEXT,
    ADD COLUMN taken_offset_min SMALLINT, ADD COLUMN camera_make TEXT, ADD COLUMN camera_model TEXT,
    ADD COLUMN lens TEXT, ADD COLUMN orientation SMALLINT, ADD COLUMN gps_lat DOUBLE PRECISION,
    ADD COLUMN gps_lon DOUBLE PRECISION, ADD COLUMN decode_path TEXT;
CREATE INDEX IF NOT EXISTS images_taken_at ON images (taken_at);
ALTER TABLE clusters ADD COLUMN name TEXT, ADD COLUMN name_source TEXT, ADD COLUMN top_labels JSONB;
-- No image waits for a category any more; a pooled image keeps its provisional one until a refit.
DROP TABLE cluster_pool;
ALTER TABLE cluster_transitions DROP CONSTRAINT IF EXISTS cluster_transitions_pkey;
"""

_V2_TO_V3 = """
ALTER TABLE images ADD COLUMN IF NOT EXISTS store_path TEXT;
CREATE INDEX IF NOT EXISTS image_paths_image_path ON image_paths (image_id, path);
DROP INDEX IF EXISTS image_paths_image;
"""

_STEPS = {1: _V1_TO_V2, 2: _V2_TO_V3}


def catalog_version(conn: psycopg.Connection) -> int | None:
    """The schema version a catalog records; None for a database without a catalog."""
    if conn.execute("SELECT to_regclass('catalog_meta')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'").fetchone()
    if row is None:  # version 1 recorded none at first; no images table yet: being created
        return 1 if conn.execute("SELECT to_regclass('images')").fetchone()[0] else None
    return int(row[0])


def migrate(conn: psycopg.Connection) -> int | None:
    """Apply every step from the catalog's version to SCHEMA_VERSION, inside the caller's
    transaction (which holds the schema lock); returns the version it found."""
    found = catalog_version(conn)
    if found is None:
        return None
    if found > SCHEMA_VERSION:
        raise CatalogTooNew(f"this catalog has schema version {found}, newer than this lookalike's "
                            f"{SCHEMA_VERSION}: upgrade lookalike to use it")
    for version in range(found, SCHEMA_VERSION):
        conn.execute(_STEPS[version])
        conn.execute("UPDATE catalog_meta SET value = %s WHERE key = 'schema_version'", (str(version + 1),))
    return found
