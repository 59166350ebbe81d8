"""Find images like a given one: exact copies, near-duplicates and semantic neighbours.

The query may be a file that is not in the catalog: it goes through the same extraction as
an archive file (sha256, 512-px thumbnail, pHash and its 7 flipped/rotated variants) and is
embedded from that thumbnail with the catalog's pinned model, so a catalogued file finds
exactly its stored values. Three searches follow:

- exact: the same sha256;
- near-duplicate: pHash Hamming distance <= neardup.phash_radius, or a flipped/rotated
  variant within neardup.orient_radius (the catalog stores one pHash per image, so the query
  carries the 7 variants);
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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import psycopg
from PIL import Image

from lookalike import db
from lookalike.extract import ExtractSettings, extract_file
from lookalike.hashing import DIHEDRAL, HASH_VERSION, dihedral_phashes
from lookalike.models import Embedder, ModelSpec, WeightsNotFoundError, get_embedder, onnx_path, resolve_model

if TYPE_CHECKING:
    from lookalike.catalog import Catalog

# A file path, an in-memory picture, or the image_id of a catalogued image.
QueryInput = str | Path | Image.Image | numbers.Integral | None
# Vectors ranked per batch when the catalog stores them as bytea.
SCAN_BATCH = 8192
TRANSFORMS = [t.name.lower() for t in DIHEDRAL]
# Which of near-duplicate images to keep (or list first): the largest resolution, then the most bytes.
KEEP_ORDER = "i.width::bigint * i.height DESC, i.bytes DESC, i.image_id"
RESULT_COLUMNS = ["kind", "rank", "image_id", "distance", "method", "transform", "width", "height",
                  "format", "bytes", "path", "paths", "thumb_path"]


def hamming_sql(a: str, b: str) -> str:
    """SQL for the Hamming distance of two BIGINT hashes: bit_count takes bit strings, not integers."""
    return f"bit_count(({a} # {b})::bit(64))"


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


def similar(cat: Catalog, query: QueryInput = None, k: int = 10, text: str | None = None) -> pd.DataFrame:
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
    hits = _exact(q) + _near_duplicates(cat, q, k)
    model_ver = None
    try:
        spec = catalog_model(cat)
        model_ver = spec.model_ver
        hits += _semantic(cat, _query_vector(cat, spec, q), k, exclude=q.image_id)
    except QueryError as e:
        q.notes.append(f"no semantic search: {e}")
    return _results(cat, hits, {"query": describe(q), "text": False, "model_ver": model_ver,
                                "notes": q.notes})


# --------------------------------------------------------------------------- the query


def _prepare(cat: Catalog, query: QueryInput, tmp: Path) -> Query:
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


def _from_file(cat: Catalog, path: Path, tmp: Path, label: str) -> Query:
    settings = ExtractSettings.from_config(cat.cfg, tmp / "thumbs")
    row = extract_file(str(path), settings)
    if row["error"] is not None:
        raise QueryError(f"{label}: {row['message']}")
    with Image.open(Path(settings.thumbs_dir) / row["thumb"]) as im:
        thumb = im.convert("RGB")
    found = cat.conn.execute("SELECT image_id FROM images WHERE sha256 = %s", (row["sha256"],)).fetchone()
    return Query(label, row["sha256"], row["phash"], row["phash_dihedral"], thumb, row["width"],
                 row["height"], row["format"], path.stat().st_size, found[0] if found else None)


def _from_catalog(cat: Catalog, image_id: int) -> Query:
    row = cat.conn.execute(
        "SELECT i.sha256, h.phash, h.hash_version, i.width, i.height, i.format, i.bytes, "
        "(SELECT min(p.path) FROM image_paths p WHERE p.image_id = i.image_id) FROM images i "
        "LEFT JOIN image_hashes h USING (image_id) WHERE i.image_id = %s", (image_id,)).fetchone()
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


def catalog_model(cat: Catalog) -> ModelSpec:
    """The catalog's pinned model, resolved on this machine; never pins one (read-only)."""
    name, ver = cat.model, cat.model_ver
    if name is None or ver is None:
        raise QueryError("the catalog has no embedding model yet: `lookalike run` embeds the images")
    try:
        spec = resolve_model(name, clip_checkpoint=cat.cfg["embed"]["clip_checkpoint"] or None)
    except (WeightsNotFoundError, ValueError) as e:
        raise QueryError(f"cannot load the catalog's model {name}: {e}") from None
    if spec.model_ver != ver:
        raise QueryError(f"the weights of {name} here give {spec.model_ver}, but the catalog's vectors are "
                         f"{ver}: comparing them would be meaningless")
    return spec


def embedder_for(cat: Catalog, spec: ModelSpec, sample: Image.Image | None,
                 backend: str | None = None) -> Embedder:
    """The embedder the pipeline uses for this catalog: the configured backend (unless `backend`
    says otherwise), ONNX exports cached under <home>/models."""
    e = cat.cfg["embed"]
    backend = backend or e["backend"]
    verify = None
    if backend != "torch" and sample is not None and not onnx_path(spec, cat.layout.models).exists():
        verify = [sample]  # the export is checked against torch on a real photo, as the pipeline does
    return get_embedder(spec, backend=backend, cache_dir=cat.layout.models, batch_size=e["batch_size"],
                        verify_images=verify)


def _query_vector(cat: Catalog, spec: ModelSpec, q: Query) -> np.ndarray:
    if q.image_id is not None:
        row = cat.conn.execute("SELECT embedding FROM image_embeddings WHERE image_id = %s "
                               "AND model_ver = %s", (q.image_id, spec.model_ver)).fetchone()
        if row is not None:
            return db.vector_from_db(row[0])  # a catalogued image: its stored vector, no model to load
    return embedder_for(cat, spec, q.thumb).embed_images([q.thumb])[0]


# --------------------------------------------------------------------------- the searches

# A hit before it is described: (kind, image_id, distance, method, transform).
Hit = tuple[str, int, float, str, str | None]


def _exact(q: Query) -> list[Hit]:
    return [("exact", q.image_id, 0.0, "sha256", None)] if q.image_id is not None else []


def _near_duplicates(cat: Catalog, q: Query, k: int) -> list[Hit]:
    radius, orient_radius = cat.cfg["neardup"]["phash_radius"], cat.cfg["neardup"]["orient_radius"]
    rows = cat.conn.execute(
        f"""
SELECT d.image_id, d.direct, d.oriented, d.transform FROM (
    SELECT h.image_id, {hamming_sql("h.phash", "%(phash)s::bigint")} AS direct, o.bits AS oriented,
           o.n AS transform
    FROM image_hashes h
    CROSS JOIN LATERAL (SELECT {hamming_sql("h.phash", "v")} AS bits, n FROM unnest(%(orient)s::bigint[])
                        WITH ORDINALITY AS t(v, n) ORDER BY 1, 2 LIMIT 1) o
    WHERE h.hash_version = %(version)s AND h.image_id IS DISTINCT FROM %(self)s
) d JOIN images i USING (image_id)
WHERE d.direct <= %(radius)s OR d.oriented <= %(orient_radius)s
-- Equally close copies: the one a group would keep first.
ORDER BY least(CASE WHEN d.direct <= %(radius)s THEN d.direct END,
               CASE WHEN d.oriented <= %(orient_radius)s THEN d.oriented END), {KEEP_ORDER}
LIMIT %(k)s""",
        {"phash": q.phash, "orient": q.orient, "version": HASH_VERSION, "self": q.image_id,
         "radius": radius, "orient_radius": orient_radius, "k": k}).fetchall()
    hits: list[Hit] = []
    for image_id, direct, oriented, n in rows:
        # A flipped copy matches its variant: only then is the orientation the explanation.
        if direct <= radius and (direct <= oriented or oriented > orient_radius):
            hits.append(("near-duplicate", image_id, float(direct), "phash", None))
        else:
            hits.append(("near-duplicate", image_id, float(oriented), "phash_orient", TRANSFORMS[n - 1]))
    return hits


def _semantic(cat: Catalog, vector: np.ndarray, k: int, exclude: int | None) -> list[Hit]:
    vector = np.asarray(vector, np.float32)
    if cat.vector_type == "vector":
        rows = cat.conn.execute(
            "SELECT image_id, (embedding <=> %s)::float8 AS distance FROM image_embeddings "
            "WHERE model_ver = %s AND image_id IS DISTINCT FROM %s ORDER BY 2, 1 LIMIT %s",
            (db.vector_to_db(vector, "vector"), cat.model_ver, exclude, k)).fetchall()
    else:
        rows = _scan_bytea(cat, vector, k, exclude)
    return [("semantic", image_id, float(distance), "embedding", None) for image_id, distance in rows]


def _scan_bytea(cat: Catalog, vector: np.ndarray, k: int, exclude: int | None) -> list[tuple[int, float]]:
    """Top-k cosine distances over float32 bytea vectors, streamed in batches (bounded memory)."""
    query = vector / max(float(np.linalg.norm(vector)), 1e-12)
    best: list[tuple[float, int]] = []  # a max-heap of the k best, as (-distance, -image_id)

    def rank(ids: list[int], blobs: list[bytes]) -> None:
        mat = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1)
        norms = np.maximum(np.linalg.norm(mat, axis=1), 1e-12)
        for image_id, dist in zip(ids, (1.0 - mat @ query / norms).tolist(), strict=True):
            item = (-dist, -image_id)
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)

    for ids, blobs in _embedding_batches(cat, exclude):
        rank(ids, blobs)
    return sorted(((-i, -d) for d, i in best), key=lambda r: (r[1], r[0]))


def _embedding_batches(cat: Catalog, exclude: int | None) -> Iterator[tuple[list[int], list[bytes]]]:
    sql = psycopg.ClientCursor(cat.conn).mogrify(
        "SELECT image_id, embedding FROM image_embeddings WHERE model_ver = %s "
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


def _results(cat: Catalog, hits: list[Hit], attrs: dict[str, object]) -> pd.DataFrame:
    ids = sorted({h[1] for h in hits})
    info = {row[0]: row[1:] for row in cat.conn.execute(
        "SELECT i.image_id, i.width, i.height, i.format, i.bytes, "
        "array(SELECT p.path FROM image_paths p WHERE p.image_id = i.image_id ORDER BY p.path), i.thumb_path "
        "FROM images i WHERE i.image_id = ANY(%s)", (ids,)).fetchall()}
    rows = []
    for kind in ("exact", "near-duplicate", "semantic"):
        of_kind = [h for h in hits if h[0] == kind]
        for rank, (_, image_id, distance, method, transform) in enumerate(of_kind, 1):
            width, height, fmt, size, paths, thumb = info[image_id]
            rows.append((kind, rank, image_id, distance, method, transform, width, height, fmt, size,
                         paths[0] if paths else None, paths, thumb))
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df.attrs.update(attrs)
    return df


def format_results(df: pd.DataFrame, cat: Catalog, k: int) -> str:
    """The CLI's report: the query, then one small table per kind of match."""
    nd = cat.cfg["neardup"]
    lines = [f"query: {df.attrs.get('query')}"]
    if df.attrs.get("model_ver"):
        lines.append(f"model: {df.attrs['model_ver']}")
    lines += [f"note: {n}" for n in df.attrs.get("notes", [])]
    sections = [("semantic", f"semantic neighbours (cosine distance, top {k})")]
    if not df.attrs.get("text"):
        sections = [
            ("exact", "exact copies (same sha256)"),
            ("near-duplicate", f"near-duplicates (pHash Hamming distance <= {nd['phash_radius']} bits; "
                               f"flipped/rotated <= {nd['orient_radius']}; top {k})"),
            *sections,
        ]
    for kind, title in sections:
        part = df[df["kind"] == kind]
        lines += ["", f"{title}:"]
        if part.empty:
            lines.append("  none")
            continue
        if kind == "exact":
            for r in part.itertuples():
                lines.append(f"  image {r.image_id}  {r.width}x{r.height} {r.format}  "
                             f"{len(r.paths)} path(s):")
                lines += [f"    {p}" for p in r.paths]
            continue
        lines += _table(part, kind)
    return "\n".join(lines)


def _table(part: pd.DataFrame, kind: str) -> list[str]:
    def dist(r: Any) -> str:  # r: a row of part.itertuples()
        return f"{r.distance:.0f} bits" if kind == "near-duplicate" else f"{r.distance:.4f}"

    def how(r: Any) -> str:
        return f"{r.method} ({r.transform})" if r.transform else r.method

    def path(r: Any) -> str:
        more = len(r.paths) - 1
        return f"{r.path or '(no path left)'}" + (f"  (+{more} more)" if more > 0 else "")

    columns: list[tuple[str, list[str], bool]] = [
        ("rank", [str(r.rank) for r in part.itertuples()], True),
        ("image", [str(r.image_id) for r in part.itertuples()], True),
        ("distance", [dist(r) for r in part.itertuples()], True),
    ]
    if kind == "near-duplicate":
        columns.append(("method", [how(r) for r in part.itertuples()], False))
    columns += [
        ("size", [f"{r.width}x{r.height}" for r in part.itertuples()], False),
        ("bytes", [human_bytes(r.bytes) for r in part.itertuples()], True),
        ("path", [path(r) for r in part.itertuples()], False),
    ]
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals, _ in columns]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if right else c.ljust(w)
               for c, w, (_, _, right) in zip(cells, widths, columns, strict=True)]
        return ("  " + "  ".join(out)).rstrip()

    rows = [line([h for h, _, _ in columns])]
    rows += [line([vals[i] for _, vals, _ in columns]) for i in range(len(part))]
    return rows


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1000:
        return f"{n} B"
    size, unit = float(n) / 1000, "kB"
    for bigger in ("MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{size:.1f} {unit}"
