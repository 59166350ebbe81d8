"""Bulk-load a manifest's stage outputs into the catalog, inside the caller's transaction.

Rows go in through binary COPY into a temporary staging table, then set-based upserts move
them into the catalog tables. The driver (lookalike.driver.ingest) claims the manifest, loads
it, runs dedup and clustering and marks it loaded in one transaction, so a crash leaves
either all of it or none of it, and a retry never duplicates anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
import pyarrow as pa

from lookalike.counts import Counts
from lookalike.db.vector_io import vector_to_db
from lookalike.labels.hierarchy import load as load_hierarchy
from lookalike.stages import schemas
from lookalike.stages.hashing import HASH_VERSION
from lookalike.stages.schemas import postgres_columns

# When and with what a picture was taken: images columns of the same names.
_CAPTURE = ["taken_at", "taken_at_source", "taken_offset_min", "camera_make", "camera_model", "lens",
            "orientation", "gps_lat", "gps_lon", "decode_path"]
# The features that go into the catalog (the dihedral pHashes serve the dedup stage only).
_STAGE_COLUMNS = postgres_columns(schemas.FEATURES, [
    "path", "bytes", "mtime", "sha256", "width", "height", "format", "phash", "dhash", "ahash", "thumb",
    *_CAPTURE, "stored", "error", "message"])

_UPSERTS = [
    """
-- One new image per new sha256: the lexically first path's row describes it (path_original).
INSERT INTO images (file_sha256, path_original, width, height, format, bytes, thumb_path, run_id,
                    taken_at, taken_at_source, taken_offset_min, camera_make, camera_model,
                    lens, orientation, gps_lat, gps_lon, decode_path, store_path)
SELECT DISTINCT ON (sha256) sha256, path, width, height, format, bytes, thumb, %(run_id)s,
       taken_at, taken_at_source, taken_offset_min, camera_make, camera_model, lens, orientation, gps_lat,
       gps_lon, decode_path, stored
FROM stage WHERE error IS NULL ORDER BY sha256, path
ON CONFLICT (file_sha256) DO NOTHING
RETURNING file_sha256, id
""",
    """
INSERT INTO image_hashes (image_id, phash64, dhash64, ahash64, hash_version)
SELECT DISTINCT ON (i.id) i.id, s.phash, s.dhash, s.ahash, %(hash_version)s
FROM stage s JOIN images i ON i.file_sha256 = s.sha256 WHERE s.error IS NULL ORDER BY i.id, s.path
ON CONFLICT (image_id) DO NOTHING
""",
    """
-- A path whose bytes changed (or that became unreadable) keeps its history.
INSERT INTO image_path_history (path, image_id, bytes, mtime)
SELECT p.path, p.image_id, p.bytes, p.mtime
FROM stage s JOIN image_paths p USING (path)
LEFT JOIN images i ON i.file_sha256 = s.sha256
WHERE s.error IS NOT NULL OR i.id IS DISTINCT FROM p.image_id
""",
    """
DELETE FROM image_paths p USING stage s WHERE p.path = s.path AND s.error IS NOT NULL
""",
    """
INSERT INTO image_paths (path, image_id, bytes, mtime)
SELECT s.path, i.id, s.bytes, s.mtime FROM stage s JOIN images i ON i.file_sha256 = s.sha256
WHERE s.error IS NULL
ON CONFLICT (path) DO UPDATE SET image_id = EXCLUDED.image_id, bytes = EXCLUDED.bytes,
    mtime = EXCLUDED.mtime
""",
    """
-- A file that reads fine now is no longer an error.
DELETE FROM ingest_errors e USING stage s WHERE e.path = s.path AND s.error IS NULL
""",
    """
INSERT INTO ingest_errors (path, bytes, mtime, error, message, run_id)
SELECT path, bytes, mtime, error, message, %(run_id)s FROM stage WHERE error IS NOT NULL
ON CONFLICT (path) DO UPDATE SET bytes = EXCLUDED.bytes, mtime = EXCLUDED.mtime,
    error = EXCLUDED.error, message = EXCLUDED.message, run_id = EXCLUDED.run_id, at = now()
""",
]


@dataclass
class LoadCounts(Counts):
    files: int = 0
    new_images: int = 0
    exact_copies: int = 0  # files whose bytes were already catalogued, or repeated in the batch
    errors: int = 0


def _copy_stage(cur: psycopg.Cursor, features: pa.Table) -> None:
    cur.execute("CREATE TEMP TABLE stage (" + ", ".join(f"{n} {t}" for n, t in _STAGE_COLUMNS)
                + ") ON COMMIT DROP")
    names = [n for n, _ in _STAGE_COLUMNS]
    for name in names:  # a stage written before a column existed (a resumed manifest): nulls
        if name not in features.column_names:
            missing = pa.nulls(features.num_rows, schemas.FEATURES.field(name).type)
            features = features.append_column(name, missing)
    # Spark writes timestamps without a zone; they are UTC (the session's time zone).
    for name in ("mtime", "taken_at"):
        utc = features[name].cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
        features = features.set_column(features.schema.get_field_index(name), name, utc)
    with cur.copy(f"COPY stage ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([t for _, t in _STAGE_COLUMNS])
        for row in features.select(names).to_pylist():
            copy.write_row([row[n] for n in names])
    cur.execute("ANALYZE stage")


def claim_manifest(cur: psycopg.Cursor, manifest_id: str) -> bool:
    """Lock the manifest's row for the caller's transaction; False if it is loaded already (or
    unknown). A second loader of the same manifest waits here, then sees 'loaded'."""
    status = cur.execute("SELECT status FROM manifests WHERE manifest_id = %s FOR UPDATE",
                         (manifest_id,)).fetchone()
    return status is not None and status[0] != "loaded"


def load_features(cur: psycopg.Cursor, features: pa.Table, run_id: int) -> tuple[LoadCounts, dict[str, int]]:
    """The manifest's files into images, image_hashes, image_paths and ingest_errors, in the
    caller's transaction; returns the counts and sha256 -> image_id of the images it added."""
    _copy_stage(cur, features)
    params = {"run_id": run_id, "hash_version": HASH_VERSION}
    inserted = dict(cur.execute(_UPSERTS[0], params).fetchall())
    for statement in _UPSERTS[1:]:
        cur.execute(statement, params)
    good, errors = cur.execute(
        "SELECT count(*) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NOT NULL) "
        "FROM stage").fetchone()
    new = len(inserted)
    return LoadCounts(files=good + errors, new_images=new, exact_copies=good - new, errors=errors), inserted


def mark_loaded(cur: psycopg.Cursor, manifest_id: str) -> None:
    """The commit point of a manifest: in the same transaction as everything it loaded."""
    cur.execute("UPDATE manifests SET status = 'loaded', loaded_at = now() WHERE manifest_id = %s",
                (manifest_id,))


def _vector_rows(column: pa.Array) -> list[np.ndarray | None]:
    """A list<float> column as one float32 row view per value, None where the value is null."""
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = column.offsets.to_numpy()  # into values, also for a sliced column
    return [None if not valid else values[start:end]
            for valid, start, end in zip(column.is_valid().to_numpy(zero_copy_only=False), offsets[:-1],
                                         offsets[1:], strict=True)]


def copy_embeddings(cur: psycopg.Cursor, embeddings: pa.Table, vector_type: str, run_id: int) -> None:
    """Vectors of the manifest's new images into image_embeddings; failures into ingest_errors."""

    cur.execute(f"CREATE TEMP TABLE stage_emb (sha256 text, model_ver text, emb {vector_type}, "
                "error text, message text) ON COMMIT DROP")
    with cur.copy("COPY stage_emb FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", vector_type, "text", "text"])
        # Batch by batch, the vectors as numpy rows: to_pylist() made a Python float of every
        # element (25M for a manifest of 20k images, ~1 GB and seconds).
        for batch in embeddings.to_batches(max_chunksize=1024):
            for vec, sha, ver, error, message in zip(
                    _vector_rows(batch.column("vector")),
                    *(batch.column(c).to_pylist() for c in ("sha256", "model_ver", "error", "message")),
                    strict=True):
                copy.write_row([sha, ver, None if vec is None else vector_to_db(vec, vector_type), error,
                                message])
    cur.execute("INSERT INTO image_embeddings (image_id, model_ver, emb) "
                "SELECT i.id, s.model_ver, s.emb FROM stage_emb s JOIN images i ON i.file_sha256 = s.sha256 "
                "WHERE s.error IS NULL ON CONFLICT DO NOTHING")
    if "labels" in embeddings.column_names:
        _copy_labels(cur, embeddings)
    # An image whose thumbnail and original are both gone cannot be embedded: say so.
    cur.execute("INSERT INTO ingest_errors (path, bytes, mtime, error, message, run_id) "
                "SELECT p.path, p.bytes, p.mtime, s.error, s.message, %s FROM stage_emb s "
                "JOIN images i ON i.file_sha256 = s.sha256 JOIN image_paths p ON p.image_id = i.id "
                "WHERE s.error IS NOT NULL "
                "ON CONFLICT (path) DO UPDATE SET error = EXCLUDED.error, message = EXCLUDED.message, "
                "run_id = EXCLUDED.run_id, at = now()", (run_id,))


def _copy_labels(cur: psycopg.Cursor, embeddings: pa.Table) -> None:
    """Each embedded image's top-5 labels (the embed stage's labels, label_scores) into image_labels."""
    names = load_hierarchy().names
    cur.execute("CREATE TEMP TABLE stage_labels (sha256 text, model_ver text, rank int2, class_id int2, "
                "score float4) ON COMMIT DROP")
    with cur.copy("COPY stage_labels FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "int2", "int2", "float4"])
        columns = ("sha256", "model_ver", "labels", "label_scores")
        rows = zip(*(embeddings.column(c).to_pylist() for c in columns), strict=True)
        for sha, ver, classes, scores in rows:
            for rank, (class_id, score) in enumerate(zip(classes or [], scores or [], strict=True), 1):
                copy.write_row((sha, ver, rank, class_id, score))
    cur.execute("INSERT INTO image_labels (image_id, model_ver, rank, label, score, class_id) "
                "SELECT i.id, s.model_ver, s.rank, (%s::text[])[s.class_id + 1], s.score, s.class_id "
                "FROM stage_labels s JOIN images i ON i.file_sha256 = s.sha256 ON CONFLICT DO NOTHING",
                (list(names),))
