"""Vectors in and out of the catalog in bulk: binary COPY, and spills to memory-mapped files.

A million 1280-d vectors are 5 GB: they are streamed from PostgreSQL into a .npy file that
the clustering and the index builds read in chunks, never as one in-memory copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import psycopg

from lookalike.layout import file_safe


def vector_to_db(vec: np.ndarray, vector_type: str) -> object:
    """A float32 vector in the catalog's storage: pgvector's type, or little-endian float32 bytes."""
    vec = np.asarray(vec, dtype=np.float32)
    if vector_type == "vector":
        from pgvector import Vector

        return Vector(vec)
    return vec.astype("<f4").tobytes()


def vector_from_db(value: object) -> np.ndarray:
    if isinstance(value, bytes | memoryview):
        return np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


VECTOR_CHUNK = 65536


def read_vectors(cur: psycopg.Cursor, sql: str, params: tuple,
                 vector_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a query returning (id, embedding), through binary COPY."""
    ids: list[int] = []
    vecs: list[np.ndarray] = []
    # COPY takes no bind parameters: the client cursor quotes them into the text safely.
    query = psycopg.ClientCursor(cur.connection).mogrify(sql, params) if params else sql
    with cur.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
        copy.set_types(["int8", vector_type])
        for image_id, vec in copy.rows():
            ids.append(image_id)
            vecs.append(vector_from_db(vec))
    if not vecs:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    return np.asarray(ids, np.int64), np.stack(vecs).astype(np.float32)


@contextmanager
def spilled_vectors(conn: psycopg.Connection, model_ver: str, vector_type: str,
                    scratch: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every image's vector of model_ver (ids, vectors), streamed into a memory-mapped file under
    `scratch` for the block, which reads it in chunks; the file (5 GB at 1M x 1280) goes after."""
    dims = "vector_dims(emb)" if vector_type == "vector" else "length(emb) / 4"
    n, dim = conn.execute(f"SELECT count(*), max({dims}) FROM image_embeddings WHERE model_ver = %s",
                          (model_ver,)).fetchone()
    if not n:
        yield np.empty(0, np.int64), np.empty((0, 0), np.float32)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    spill = scratch / ("vectors-" + file_safe(model_ver) + ".npy")
    vectors = np.lib.format.open_memmap(spill, mode="w+", dtype=np.float32, shape=(n, int(dim)))
    ids = np.empty(n, np.int64)
    query = psycopg.ClientCursor(conn).mogrify(
        "SELECT image_id, emb FROM image_embeddings WHERE model_ver = %s ORDER BY image_id",
        (model_ver,))
    with conn.cursor() as cur, cur.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
        copy.set_types(["int8", vector_type])
        for i, (image_id, vec) in enumerate(copy.rows()):
            ids[i] = image_id
            vectors[i] = vector_from_db(vec)
    vectors.flush()
    try:
        yield ids, vectors
    finally:
        del vectors
        spill.unlink(missing_ok=True)
        with suppress(OSError):  # the folder goes too, unless something else is in it
            scratch.rmdir()


def chunks(vectors: np.ndarray, size: int = VECTOR_CHUNK) -> Iterator[np.ndarray]:
    for i in range(0, len(vectors), size):
        yield np.asarray(vectors[i:i + size], dtype=np.float32)


# Stored float32 vectors of some image_ids (those it has), e.g. from the catalog.
StoredVectors = Callable[[np.ndarray], dict[int, np.ndarray]]


def vectors_by_id(cur: psycopg.Cursor, model_ver: str, vector_type: str,
                   ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return read_vectors(cur, "SELECT image_id, emb FROM image_embeddings "
                             "WHERE model_ver = %s AND image_id = ANY(%s)",
                        (model_ver, np.asarray(ids).tolist()), vector_type)


def stored_vectors(cur: psycopg.Cursor, model_ver: str, vector_type: str) -> StoredVectors:
    """The catalog's float32 vectors of model_ver, by image_id (within `cur`'s transaction)."""
    def fetch(ids: np.ndarray) -> dict[int, np.ndarray]:
        found, vecs = vectors_by_id(cur, model_ver, vector_type, ids)
        return dict(zip(found.tolist(), vecs, strict=True))
    return fetch
