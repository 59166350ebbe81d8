"""Find images like a given one: exact copies, near-duplicates and semantic neighbours.

The query may be a file that is not in the catalog: it goes through the same extraction as
an archive file (sha256, 512-px thumbnail, pHash and its 7 flipped/rotated variants) and is
embedded from that thumbnail with the catalog's pinned model, so a catalogued file finds
exactly its stored values. Three searches follow:

- exact: the same sha256;
- near-duplicate: the pair rule of a run (lookalike.dedup.pairs.find_pairs), so `similar`
  and the catalog agree: a catalogued image's near-duplicates are the pairs the catalog holds
  for it; a file outside the catalog is tested as if it were a run's new image, against the
  indexes the runs keep (pHash within neardup.phash_radius, a flipped/rotated pHash within
  orient_radius, embeddings of cosine >= min_cosine, with the same verification and caps);
- semantic: cosine distance to the active model's vectors, in PostgreSQL with pgvector
  (`<=>`), else streamed out of the bytea column and ranked in numpy.
"""

from __future__ import annotations

import heapq
import numbers
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import psycopg
from PIL import Image

from lookalike.cluster.names import display
from lookalike.config import Config
from lookalike.db import runs, vector_index
from lookalike.db.sql import ACTIVE_VER, OPEN_PATH
from lookalike.db.vector_io import stored_vectors, vector_from_db, vector_to_db
from lookalike.dedup.indexes import DedupIndexes
from lookalike.dedup.pairs import NearDupConfig, NewImages, find_pairs
from lookalike.index import VectorSearch
from lookalike.index.exact import ExactVectorIndex
from lookalike.layout import Layout
from lookalike.models.registry import ModelSpec, WeightsNotFoundError
from lookalike.models.runtime import Embedder, catalog_embedder
from lookalike.read.text import human_bytes
from lookalike.stages.extract import ExtractSettings, extract_file
from lookalike.stages.hashing import DIHEDRAL, HASH_VERSION, dihedral_phashes
from lookalike.vectors import l2_normalize


class CatalogReader(Protocol):
    """What a search reads of an open catalog (lookalike.read.catalog.Catalog is one)."""

    conn: psycopg.Connection
    cfg: Config
    layout: Layout
    vector_type: str

    @property
    def model_ver(self) -> str | None: ...

    def thumbnail(self, image_id: int) -> Image.Image: ...

# A file path, an in-memory picture, or the image_id of a catalogued image.
QueryInput = str | Path | Image.Image | numbers.Integral | None
# Vectors ranked per batch when the catalog stores them as bytea.
SCAN_BATCH = 8192
TRANSFORMS = [t.name.lower() for t in DIHEDRAL]
RESULT_COLUMNS = ["kind", "rank", "image_id", "distance", "method", "transform", "width", "height",
                  "format", "bytes", "path", "paths", "thumb_path", "category"]



class QueryError(ValueError):
    """A search that cannot be done as asked; the message is one line for the user."""


@dataclass
class Query:
    """What a search compares: identity, perceptual hashes, and the thumbnail to embed."""

    label: str
    sha256: str | None
    phash: int
    orient: list[int]  # pHash of the query under each of hashing.DIHEDRAL
    thumb: Image.Image
    width: int
    height: int
    format: str
    bytes: int | None
    image_id: int | None = None  # the catalogued image with these bytes, if any
    notes: list[str] = field(default_factory=list)


def similar(cat: CatalogReader, query: QueryInput = None, k: int = 10,
            text: str | None = None) -> pd.DataFrame:
    """Top-k matches as one DataFrame (columns RESULT_COLUMNS), `kind` in exact / near-duplicate /
    semantic, each kind ranked by distance. With `text`, semantic matches of the text (CLIP only).

    df.attrs holds the query's description ("query"), whether it was a text ("text"), the
    model_ver ("model_ver") and notes on what could not be searched ("notes"), e.g. no vectors.
    """
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    if (query is None) == (text is None):
        raise QueryError("give one query: an image (a file, a PIL image or an image_id) or a text")
    if text is not None:
        if not text.strip():
            raise QueryError("the text query is empty")
        spec = catalog_model(cat)
        # The text tower always runs in torch: a CLIP model loaded there once serves the text,
        # with no ONNX export of an image tower that a text query does not use.
        backend = "torch" if spec.supports_text else None
        try:
            vector = embedder_for(cat, spec, None, backend).embed_text([text])[0]
        except ValueError as e:  # an image-only model says why, in one sentence
            raise QueryError(str(e)) from None
        hits = _semantic(cat, vector, k, exclude=None)
        return _results(cat, hits, {"query": f"text {text!r}", "text": True, "model_ver": spec.model_ver,
                                    "notes": []})
    with tempfile.TemporaryDirectory(prefix="lookalike-query-") as tmp:
        q = _prepare(cat, query, Path(tmp))
    vector, model_ver = None, None
    try:
        spec = catalog_model(cat)
        model_ver = spec.model_ver
        vector = _query_vector(cat, spec, q)
    except QueryError as e:
        q.notes.append(f"no semantic search: {e}")
    hits = _exact(q) + _near_duplicates(cat, q, vector, k)
    if vector is not None:
        hits += _semantic(cat, vector, k, exclude=q.image_id)
    return _results(cat, hits, {"query": describe(q), "text": False, "model_ver": model_ver,
                                "notes": q.notes})


# --------------------------------------------------------------------------- the query


def _prepare(cat: CatalogReader, query: QueryInput, tmp: Path) -> Query:
    if isinstance(query, bool):  # an int to Python, but surely a mistake here
        raise QueryError(f"not an image query: {query!r}")
    if isinstance(query, numbers.Integral):  # numpy integers too, as DataFrame cells give them
        return _from_catalog(cat, int(query))
    if isinstance(query, Image.Image):
        # Through a lossless file, so an in-memory picture takes exactly the file path's steps.
        file = tmp / "query.png"
        query.save(file, "PNG")
        q = _from_file(cat, file, tmp, "an in-memory image")
        q.sha256 = q.bytes = None  # the PNG's bytes are ours, not the picture's identity
        q.image_id = None
        return q
    path = Path(query).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return _from_file(cat, path.resolve(), tmp, str(path.resolve()))


def _from_file(cat: CatalogReader, path: Path, tmp: Path, label: str) -> Query:
    settings = ExtractSettings.from_config(cat.cfg, tmp / "thumbs", store=False)  # a query is not filed
    row = extract_file(str(path), settings)
    if row["error"] is not None:
        raise QueryError(f"{label}: {row['message']}")
    with Image.open(Path(settings.thumbs_dir) / row["thumb"]) as im:
        thumb = im.convert("RGB")
    found = cat.conn.execute("SELECT id FROM images WHERE file_sha256 = %s", (row["sha256"],)).fetchone()
    return Query(label, row["sha256"], row["phash"], row["phash_dihedral"], thumb, row["width"],
                 row["height"], row["format"], path.stat().st_size, found[0] if found else None)


def _from_catalog(cat: CatalogReader, image_id: int) -> Query:
    row = cat.conn.execute(
        f"SELECT i.file_sha256, h.phash64, h.hash_version, i.width, i.height, i.format, i.bytes, "
        f"{OPEN_PATH.format('i.id')} FROM images i "
        "LEFT JOIN image_hashes h ON h.image_id = i.id WHERE i.id = %s", (image_id,)).fetchone()
    if row is None:
        raise QueryError(f"no image {image_id} in the catalog")
    sha, phash, version, width, height, fmt, size, path = row
    if phash is None or version != HASH_VERSION:
        raise QueryError(f"image {image_id} has no pHash of the current definition ({HASH_VERSION})")
    thumb = cat.thumbnail(image_id)
    # The variants are not stored: made from the stored thumbnail (JPEG of the hashed one).
    return Query(path or f"image {image_id}", sha, phash, dihedral_phashes(thumb), thumb, width, height,
                 fmt, size, image_id)


def describe(q: Query) -> str:
    where = f"catalogued as image {q.image_id}" if q.image_id is not None else "not in the catalog"
    size = f", {human_bytes(q.bytes)}" if q.bytes is not None else ""
    sha = f", sha256 {q.sha256[:12]}…" if q.sha256 else ""
    return f"{q.label} ({q.width}x{q.height} {q.format}{size}{sha}; {where})"


# --------------------------------------------------------------------------- the model


def catalog_model(cat: CatalogReader) -> ModelSpec:
    """The catalog's pinned model, resolved on this machine; never pins one (read-only)."""
    try:
        return runs.catalog_model(cat.conn, cat.cfg)
    except runs.ModelMismatch as e:
        raise QueryError(str(e)) from None
    except (WeightsNotFoundError, ValueError) as e:
        raise QueryError(f"cannot load the catalog's model: {e}") from None


def embedder_for(cat: CatalogReader, spec: ModelSpec, sample: Image.Image | None,
                 backend: str | None = None) -> Embedder:
    """The embedder the runs use for this catalog (unless `backend` says otherwise); a new ONNX
    export is checked against torch on the query's own picture."""
    e = cat.cfg["embed"]
    return catalog_embedder(spec, backend or e["backend"], cat.layout.models, e["batch_size"],
                            lambda: [sample] if sample is not None else [])


def _query_vector(cat: CatalogReader, spec: ModelSpec, q: Query) -> np.ndarray:
    if q.image_id is not None:
        row = cat.conn.execute("SELECT emb FROM image_embeddings WHERE image_id = %s "
                               "AND model_ver = %s", (q.image_id, spec.model_ver)).fetchone()
        if row is not None:
            return vector_from_db(row[0])  # a catalogued image: its stored vector, no model to load
    return embedder_for(cat, spec, q.thumb).embed_images([q.thumb])[0]


# --------------------------------------------------------------------------- the searches

# A hit before it is described: (kind, image_id, distance, method, transform).
Hit = tuple[str, int, float, str, str | None]


def _exact(q: Query) -> list[Hit]:
    return [("exact", q.image_id, 0.0, "sha256", None)] if q.image_id is not None else []


def _near_duplicates(cat: CatalogReader, q: Query, vector: np.ndarray | None, k: int) -> list[Hit]:
    """The k closest near-duplicates by the run's pair rule: pHash pairs first, by distance."""
    if q.image_id is not None:  # catalogued: what the catalog holds for it
        rows = cat.conn.execute(
            "SELECT CASE WHEN image_id = %(id)s THEN other_id ELSE image_id END, method, distance "
            "FROM near_duplicates WHERE image_id = %(id)s OR other_id = %(id)s",
            {"id": q.image_id}).fetchall()
        pairs = pd.DataFrame(rows, columns=["other_id", "method", "distance"])
    else:
        pairs = _pairs_as_new_image(cat, q, vector)
    if pairs.empty:
        return []
    # One line an image, its closest pair: ranked by distance like the other kinds (an embedding
    # pair's 1 - cosine is below 1 - min_cosine, so it ranks with pHash pairs of 0 bits).
    pairs["embedding"] = pairs["method"] == "embedding"
    pairs = pairs.sort_values(["distance", "embedding", "other_id"]).drop_duplicates("other_id").head(k)
    hashes = dict(cat.conn.execute("SELECT image_id, phash64 FROM image_hashes WHERE image_id = ANY(%s)",
                                   (pairs["other_id"].tolist(),)).fetchall())
    hits: list[Hit] = []
    for other, method, distance in pairs[["other_id", "method", "distance"]].itertuples(index=False):
        transform = _transform(q.orient, hashes.get(other)) if method == "phash_orient" else None
        hits.append(("near-duplicate", int(other), float(distance), method, transform))
    return hits


def _pairs_as_new_image(cat: CatalogReader, q: Query, vector: np.ndarray | None) -> pd.DataFrame:
    """find_pairs for the query as if a run had just loaded it (as image -1, so no pair skips it).
    Without a vector (no usable model) the pHash rule alone decides, as for a run's image whose
    thumbnail could not be embedded."""
    hashes = DedupIndexes.read_hashes(cat.conn, cat.layout.index)
    vectors: VectorSearch = ExactVectorIndex(1)
    if vector is not None and cat.model_ver is not None:
        vectors, note = DedupIndexes.read_vectors(cat.conn, cat.layout.index, cat.model_ver, len(vector))
        if note:
            q.notes.append(note)
    has_vector = vector is not None
    new = NewImages(ids=np.asarray([-1], np.int64), phash=np.asarray([q.phash], np.int64),
                    dihedral=np.asarray([q.orient], np.int64),
                    vectors=l2_normalize(vector[None, :]) if has_vector else np.zeros((1, 1), np.float32),
                    has_vector=np.asarray([has_vector]))
    with cat.conn.cursor() as cur:
        stored = stored_vectors(cur, cat.model_ver or "", cat.vector_type)
        pairs = find_pairs(new, hashes, vectors, NearDupConfig.from_config(cat.cfg["neardup"]), stored)
    return pairs[["other_id", "method", "distance"]]


def _transform(orient: list[int], other_phash: int | None) -> str | None:
    """Which flip or rotation of the query the other image's pHash is closest to."""
    if other_phash is None:
        return None
    bits = [bin((v ^ other_phash) & (2**64 - 1)).count("1") for v in orient]
    return TRANSFORMS[int(np.argmin(bits))]


def _semantic(cat: CatalogReader, vector: np.ndarray, k: int, exclude: int | None) -> list[Hit]:
    vector = np.asarray(vector, np.float32)
    if cat.vector_type == "vector":  # the active model's pgvector index (db.vector_index)
        rows = cat.conn.execute(vector_index.knn_sql(cat.model_ver or "", len(vector)), {
            "vector": vector_to_db(vector, "vector"), "exclude": exclude, "k": k}).fetchall()
        rows.sort(key=lambda r: (r[1], r[0]))  # ties in image_id order, as the bytea scan ranks them
    else:  # no pgvector: the runs' exact or IVF index on disk, a scan only where it lags behind
        rows = _search_saved_index(cat, vector, k, exclude)
        if rows is None:
            rows = _scan_bytea(cat, vector, k, exclude)
    return [("semantic", image_id, float(distance), "embedding", None) for image_id, distance in rows]


def _search_saved_index(cat: CatalogReader, vector: np.ndarray, k: int,
                        exclude: int | None) -> list[tuple[int, float]] | None:
    """Top-k cosine distances from the vector index the runs keep under <home>/index; None when
    it does not hold every vector of the catalog's model (a run loading now, another machine)."""
    if cat.model_ver is None:
        return None
    try:
        vectors, behind = DedupIndexes.read_vectors(cat.conn, cat.layout.index, cat.model_ver, len(vector))
    except (OSError, ValueError):
        return None
    if behind or not len(vectors):
        return None
    _, found, cos = vectors.search(l2_normalize(vector[None, :]), k + 1, -1.0)
    hits = sorted((1.0 - float(c), int(i)) for i, c in zip(found.tolist(), cos.tolist(), strict=True)
                  if i != exclude)
    return [(i, d) for d, i in hits[:k]]


def _scan_bytea(cat: CatalogReader, vector: np.ndarray, k: int,
                exclude: int | None) -> list[tuple[int, float]]:
    """Top-k cosine distances over float32 bytea vectors, streamed in batches (bounded memory)."""
    query = l2_normalize(vector[None, :])[0]
    best: list[tuple[float, int]] = []  # a max-heap of the k best, as (-distance, -image_id)

    def rank(ids: list[int], blobs: list[bytes]) -> None:
        mat = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1)
        for image_id, dist in zip(ids, (1.0 - l2_normalize(mat) @ query).tolist(), strict=True):
            item = (-dist, -image_id)
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)

    for ids, blobs in _embedding_batches(cat, exclude):
        rank(ids, blobs)
    return sorted(((-i, -d) for d, i in best), key=lambda r: (r[1], r[0]))


def _embedding_batches(cat: CatalogReader, exclude: int | None) -> Iterator[tuple[list[int], list[bytes]]]:
    sql = psycopg.ClientCursor(cat.conn).mogrify(
        "SELECT image_id, emb FROM image_embeddings WHERE model_ver = %s "
        "AND image_id IS DISTINCT FROM %s", (cat.model_ver, exclude))
    ids: list[int] = []
    blobs: list[bytes] = []
    with cat.conn.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "bytea"])
        for image_id, blob in copy.rows():
            ids.append(image_id)
            blobs.append(bytes(blob))
            if len(ids) == SCAN_BATCH:
                yield ids, blobs
                ids, blobs = [], []
    if ids:
        yield ids, blobs


# --------------------------------------------------------------------------- results


def _results(cat: CatalogReader, hits: list[Hit], attrs: dict[str, object]) -> pd.DataFrame:
    ids = sorted({h[1] for h in hits})
    info = {row[0]: row[1:] for row in cat.conn.execute(
        "SELECT i.id, i.width, i.height, i.format, i.bytes, "
        "array(SELECT p.path FROM image_paths p WHERE p.image_id = i.id ORDER BY p.path), i.thumb_path, "
        "c.id, c.name, i.store_path FROM images i "
        f"LEFT JOIN image_cluster ic ON ic.image_id = i.id AND ic.model_ver = {ACTIVE_VER} "
        "LEFT JOIN clusters c ON c.id = ic.cluster_id WHERE i.id = ANY(%s)", (ids,)).fetchall()}
    rows = []
    for kind in ("exact", "near-duplicate", "semantic"):
        of_kind = [h for h in hits if h[0] == kind]
        for rank, (_, image_id, distance, method, transform) in enumerate(of_kind, 1):
            width, height, fmt, size, paths, thumb, cluster_id, name, stored = info[image_id]
            # `path` opens the image (its stored copy when there is a store); `paths`: where found.
            rows.append((kind, rank, image_id, distance, method, transform, width, height, fmt, size,
                         stored or (paths[0] if paths else None), paths, thumb,
                         display(name, cluster_id) if cluster_id is not None else None))
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df.attrs.update(attrs)
    return df
