"""Read-only access to a catalog for analysts: pandas DataFrames, thumbnails, similar images.

    from lookalike import Catalog
    with Catalog(home="/data/lookalike") as cat:
        cat.clusters()                 # similarity categories of the active model
        cat.groups()                   # near-duplicate groups, one row per member, keeper marked
        cat.similar("/some/photo.jpg") # exact copies, near-duplicates, semantic neighbours

Every frame is bounded, so no call reads a million-image catalog into memory by accident: a
`limit` (ROWS by default) with an `after` key to page on where a table is long (images, paths),
`stream()` for any query in batches, and `export()` to write any selection to CSV or Parquet.
`limit=None` reads everything, at the caller's risk.

Everything about clusters is limited to the catalog's active model_ver (catalog_meta), read
inside each query: clusters a recluster retired never mix with the current ones. The session
is read-only, so a notebook cannot change the catalog by accident, and it never runs DDL,
which would wait behind a run's loading transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lookalike import db
from lookalike.cluster.names import display_sql, name_by_analyst
from lookalike.config import Config, load_config
from lookalike.db import vector_index
from lookalike.db.runs import catalog_store
from lookalike.db.sql import ACTIVE_VER, KEEP_ORDER, OPEN_PATH, PATH_COUNT, hamming_sql
from lookalike.db.vector_io import read_vectors
from lookalike.files import replacing
from lookalike.labels.hierarchy import FIND_MIN_MASS, classes_under
from lookalike.layout import Layout
from lookalike.read import search

# pandas dtypes of an empty result's columns, by PostgreSQL type name (others: object).
_EMPTY_DTYPES = {"bool": "bool", "int2": "int64", "int4": "int64", "int8": "int64", "float4": "float64",
                 "float8": "float64", "timestamptz": "datetime64[ns, UTC]", "timestamp": "datetime64[ns]"}

# Near-duplicate group members ranked by the keep rule (rank 1: the copy to keep), with their
# group's size: what groups() pages and wasted_bytes() sums.
_GROUP_MEMBERS = f"""
    SELECT g.group_id, g.image_id, i.width, i.height, i.format, i.bytes, i.file_sha256, i.thumb_path,
           row_number() OVER (PARTITION BY g.group_id ORDER BY {KEEP_ORDER}) AS rank,
           count(*) OVER (PARTITION BY g.group_id) AS group_size
    FROM image_dup_group g JOIN images i ON i.id = g.image_id"""

# The default bound of a frame: ~100-250 MB of pandas at most. Page past it with `after`,
# or read a whole table in batches with Catalog.stream().
ROWS = 100_000
# Rows a stream()/export() batch holds.
BATCH_ROWS = 50_000

# The columns of Catalog.export's files, typed (a Parquet file's schema must not depend on
# which batch came first, or on an empty selection).
_EXPORT_SCHEMA = pa.schema([("image_id", pa.int64()), ("path", pa.string()), ("paths", pa.list_(pa.string())),
                            ("file_sha256", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                            ("format", pa.string()), ("bytes", pa.int64()), ("cluster_id", pa.int64()),
                            ("category", pa.string())])


class Catalog:
    """A catalog opened for reading: an embedded home, or any PostgreSQL by DSN.

    home/config are as for the CLI's --home/--config (config may also be a loaded Config);
    dsn overrides catalog.dsn and LOOKALIKE_DSN. Thumbnails are read from <home>/thumbs, or from
    the catalog's store (lookalike.store) when it has one.
    """

    def __init__(self, home: str | Path | None = None, config: str | Path | Config | None = None,
                 dsn: str | None = None) -> None:
        cfg = config if isinstance(config, Config) else load_config(config)
        self.cfg = cfg.with_home(home)
        self.layout = Layout(self.cfg.home)  # with the catalog's store once it is open
        self._dsn = dsn or self.cfg.dsn
        self.conn = db.connect(self.cfg, dsn, create=False)
        try:
            db.upgrade_schema(self.conn)  # an older catalog is migrated once, before going read-only
            self.conn.execute("SET default_transaction_read_only = on")
            if self.conn.execute("SELECT to_regclass('catalog_meta')").fetchone()[0] is None:
                raise db.CatalogUnavailable(f"{self.where} holds no lookalike catalog yet: "
                                            "`lookalike run ROOT` creates it")
            self.layout = Layout(self.cfg.home, catalog_store(self.conn))
            self.vector_type = db.get_meta(self.conn, "vector_type") or "bytea"
            if self.vector_type == "vector":
                db.register_vector(self.conn)
                self.conn.execute(f"SET hnsw.ef_search = {vector_index.EF_SEARCH}")
        except BaseException:
            self.conn.close()
            raise

    @property
    def home(self) -> Path:
        return self.cfg.home

    @property
    def where(self) -> str:
        """The catalog's location for messages, without any password."""
        return db.redact_dsn(self._dsn) if self._dsn else f"the embedded catalog in {self.home}"

    @property
    def model(self) -> str | None:
        """The active embedding model's name (None before the first run embedded anything)."""
        return db.get_meta(self.conn, "active_model")

    @property
    def model_ver(self) -> str | None:
        """The active model_ver: the only one whose clusters and vectors this class shows."""
        return db.get_meta(self.conn, "active_model_ver")

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def __repr__(self) -> str:
        return f"Catalog({self.where}, model_ver={self.model_ver if not self.conn.closed else '?'})"

    # -- queries --------------------------------------------------------------------------
    def sql(self, query: str, params: Any = None) -> pd.DataFrame:
        """Any read-only query as a DataFrame (columns kept even when no row matches)."""
        cur = self.conn.execute(query, params)
        if cur.description is None:
            return pd.DataFrame()
        columns = [c.name for c in cur.description]
        rows = cur.fetchall()
        if rows:
            return pd.DataFrame(rows, columns=columns)
        # No row: the columns still get their types, so that masks and sums on them work.
        types = self.conn.adapters.types
        dtypes = [_EMPTY_DTYPES.get(getattr(types.get(c.type_code), "name", ""), "object")
                  for c in cur.description]
        return pd.DataFrame({i: pd.Series(dtype=d) for i, d in enumerate(dtypes)}).set_axis(columns, axis=1)

    def stream(self, query: str, params: Any = None, rows: int = BATCH_ROWS) -> Iterator[pd.DataFrame]:
        """A read-only query's result in frames of at most `rows` rows, from a server-side cursor:
        a whole table in bounded memory."""
        with self.conn.transaction(), self.conn.cursor(name="lookalike_stream") as cur:
            cur.execute(query, params)
            columns = [c.name for c in cur.description or []]
            while batch := cur.fetchmany(rows):
                yield pd.DataFrame(batch, columns=columns)

    def images(self, limit: int | None = ROWS, after: int | None = None) -> pd.DataFrame:
        """One row per distinct content (images.id as image_id, as in every frame): size, format,
        bytes, where it was first found, how many paths it has now and the first of them, and its
        copy in the store (null without one). By image_id, `limit` rows from the first id above
        `after` (the last image_id of the previous page)."""
        return self.sql(
            "SELECT i.id AS image_id, i.file_sha256, i.path_original, i.width, i.height, i.format, i.bytes, "
            "p.paths, p.path, i.store_path, i.thumb_path, i.created_at, i.run_id "
            "FROM images i CROSS JOIN LATERAL (SELECT count(*) AS paths, min(path) AS path "
            "FROM image_paths WHERE image_id = i.id) p "
            "WHERE i.id > %(after)s ORDER BY i.id LIMIT %(limit)s",
            {"after": -1 if after is None else after, "limit": limit})

    def timeline(self, unit: str = "month") -> pd.DataFrame:
        """Images by when they were taken (EXIF capture time, else the file's mtime), per `unit`
        (day, week, month or year): how many, and how many of those times come from EXIF."""
        if unit not in ("day", "week", "month", "year"):
            raise ValueError(f"unit must be day, week, month or year, not {unit!r}")
        return self.sql(
            "SELECT date_trunc(%(unit)s, taken_at) AS period, count(*) AS images, "
            "count(*) FILTER (WHERE taken_at_source = 'exif') AS from_exif, sum(bytes)::bigint AS bytes "
            "FROM images WHERE taken_at IS NOT NULL GROUP BY 1 ORDER BY 1", {"unit": unit})

    def paths(self, limit: int | None = ROWS, after: str | None = None) -> pd.DataFrame:
        """Catalogued paths in path order, `limit` of them from the first after `after` (the last
        path of the previous page); `copies` > 1 marks byte-identical files (same sha256)."""
        return self.sql(
            "SELECT p.path, p.image_id, i.file_sha256, p.bytes, p.mtime, p.first_seen_at, "
            "(SELECT count(*) FROM image_paths c WHERE c.image_id = p.image_id) AS copies "
            "FROM image_paths p JOIN images i ON i.id = p.image_id "
            "WHERE %(after)s::text IS NULL OR p.path > %(after)s ORDER BY p.path LIMIT %(limit)s",
            {"after": after, "limit": limit})

    def errors(self, limit: int | None = ROWS) -> pd.DataFrame:
        """Files that could not be catalogued, with their short code and one-line reason: the
        latest `limit`, oldest first."""
        return self.sql("SELECT * FROM (SELECT path, error, message, bytes, mtime, run_id, at "
                        "FROM ingest_errors ORDER BY at DESC, path LIMIT %s) e ORDER BY at, path", (limit,))

    def runs(self, limit: int | None = 1000) -> pd.DataFrame:
        """Runs and reclusters, with the main figures of each summary as columns: the latest
        `limit`, oldest first."""
        return self.sql(
            "SELECT * FROM (SELECT run_id, kind, status, started_at, finished_at, "
            "extract(epoch FROM finished_at - started_at)::float8 AS seconds, model_ver, roots, "
            "(summary->>'files')::bigint AS files, (summary->>'new_images')::bigint AS new_images, "
            "(summary->>'exact_copies')::bigint AS exact_copies, (summary->>'errors')::bigint AS errors, "
            "message, summary FROM runs ORDER BY run_id DESC LIMIT %s) r ORDER BY run_id", (limit,))

    def near_duplicates(self, limit: int | None = ROWS) -> pd.DataFrame:
        """Detected pairs (image_id < other_id), one row per method, with their group and paths:
        the first `limit` by group."""
        return self.sql(
            f"SELECT n.image_id, n.other_id, n.method, n.distance, n.group_id, "
            f"{OPEN_PATH.format('n.image_id')} AS path, {OPEN_PATH.format('n.other_id')} AS other_path "
            "FROM (SELECT n.*, g.group_id FROM near_duplicates n "
            "LEFT JOIN image_dup_group g USING (image_id) "
            "ORDER BY g.group_id, n.image_id, n.other_id, n.method LIMIT %s) n "
            "ORDER BY n.group_id, n.image_id, n.other_id, n.method", (limit,))

    def groups(self, limit: int | None = 1000, offset: int = 0, order: str = "size") -> pd.DataFrame:
        """Near-duplicate groups, one row per member; `keep` marks the copy to keep.

        `limit` groups from `offset` on (a page), the largest first, or with order="wasted" those
        whose copies other than the keeper take the most bytes (`wasted_bytes`, per group). The
        keeper has the largest resolution, then the most bytes. `phash_to_keep` is the pHash
        Hamming distance to the keeper; `method`/`distance` the closest detected pair between the
        two, when the group links them directly (a flipped copy is far in plain pHash).
        """
        if order not in ("size", "wasted"):
            raise ValueError(f"order must be 'size' or 'wasted', not {order!r}")
        rank_by = "group_size DESC" if order == "size" else "wasted_bytes DESC"
        return self.sql(
            f"""
WITH m AS ({_GROUP_MEMBERS}), page AS (
    SELECT group_id, max(group_size) AS group_size,
           (sum(bytes) - sum(bytes) FILTER (WHERE rank = 1))::bigint AS wasted_bytes
    FROM m GROUP BY group_id ORDER BY {rank_by}, group_id LIMIT %(limit)s OFFSET %(offset)s
), k AS (SELECT group_id, image_id FROM m JOIN page USING (group_id) WHERE rank = 1)
SELECT m.group_id, m.group_size, page.wasted_bytes, m.rank, m.rank = 1 AS keep, m.image_id, m.width,
       m.height, m.width::bigint * m.height AS pixels, m.bytes, m.format,
       {hamming_sql("hm.phash64", "hk.phash64")} AS phash_to_keep, d.method, d.distance,
       {OPEN_PATH.format('m.image_id')} AS path, {PATH_COUNT.format('m.image_id')} AS paths,
       m.file_sha256, m.thumb_path
FROM m JOIN page USING (group_id) JOIN k USING (group_id)
LEFT JOIN image_hashes hm ON hm.image_id = m.image_id
LEFT JOIN image_hashes hk ON hk.image_id = k.image_id
LEFT JOIN LATERAL (
    SELECT n.method, n.distance FROM near_duplicates n
    WHERE n.image_id = least(m.image_id, k.image_id) AND n.other_id = greatest(m.image_id, k.image_id)
    ORDER BY n.method = 'embedding', n.distance LIMIT 1) d ON true
ORDER BY page.{rank_by}, m.group_id, m.rank""", {"limit": limit, "offset": offset})

    def wasted_bytes(self) -> pd.DataFrame:
        """What duplicates cost, in one row: images stored at more than one path and the bytes of
        their extra paths; near-duplicate groups and the bytes of their copies other than the keeper."""
        return self.sql(
            f"""
SELECT e.images AS exact_images, e.extra_paths AS exact_extra_paths, e.bytes AS exact_wasted_bytes,
       n.groups AS near_groups, n.images - n.groups AS near_extra_images, n.bytes AS near_wasted_bytes
FROM (SELECT count(*) AS images, coalesce(sum(p.n - 1), 0)::bigint AS extra_paths,
             coalesce(sum((p.n - 1) * i.bytes), 0)::bigint AS bytes
      FROM (SELECT image_id, count(*) AS n FROM image_paths GROUP BY image_id HAVING count(*) > 1) p
      JOIN images i ON i.id = p.image_id) e,
     (SELECT count(DISTINCT group_id) AS groups, count(*) AS images,
             coalesce(sum(bytes) FILTER (WHERE rank > 1), 0)::bigint AS bytes
      FROM ({_GROUP_MEMBERS}) r) n""")

    def clusters(self, limit: int | None = 10_000) -> pd.DataFrame:
        """Clusters of the active model, largest first (the `limit` largest), with their names;
        `images` counts their image_cluster rows."""
        return self.sql(
            f"""
SELECT c.id AS cluster_id, c.name, c.name_source, c.model_ver, c.size, count(ic.image_id) AS images,
       avg(ic.sim_score)::float8 AS mean_sim, c.created_at, c.updated_at
FROM clusters c
LEFT JOIN image_cluster ic ON ic.cluster_id = c.id AND ic.model_ver = c.model_ver
WHERE c.model_ver = {ACTIVE_VER}
GROUP BY c.id ORDER BY images DESC, c.id LIMIT %s""", (limit,))

    def growth(self, runs: int = 1, limit: int | None = 20) -> pd.DataFrame:
        """The categories that grew most in the latest `runs` runs that brought new images (a
        rerun that found nothing does not count): `new_images` catalogued by those runs, and
        `share` of the category they make up (1.0: a category those runs started)."""
        return self.sql(
            f"""
WITH recent AS (SELECT run_id FROM runs WHERE kind = 'run' AND (summary->>'new_images')::bigint > 0
                ORDER BY run_id DESC LIMIT %(runs)s)
SELECT c.id AS cluster_id, c.name, c.size, count(*) AS new_images,
       (count(*)::float8 / greatest(c.size, count(*)))::float8 AS share
FROM images i JOIN recent USING (run_id)
JOIN image_cluster ic ON ic.image_id = i.id AND ic.model_ver = {ACTIVE_VER}
JOIN clusters c ON c.id = ic.cluster_id
GROUP BY c.id ORDER BY new_images DESC, c.id LIMIT %(limit)s""", {"runs": runs, "limit": limit})

    def arrivals(self, by: str = "run", limit: int | None = 1000) -> pd.DataFrame:
        """What arrived when: per run (by="run") or per day catalogued (by="day"), the new images,
        their bytes, and the three categories most of them joined ("dog 120, sailboat 41, ..."):
        the latest `limit` periods, oldest first."""
        if by not in ("run", "day"):
            raise ValueError(f"by must be 'run' or 'day', not {by!r}")
        period = "i.run_id" if by == "run" else "date_trunc('day', i.created_at)"
        return self.sql(
            f"""
WITH periods AS (
    SELECT {period} AS period, count(*) AS images, sum(i.bytes)::bigint AS bytes FROM images i
    GROUP BY 1 ORDER BY 1 DESC LIMIT %(limit)s
), joined AS (
    SELECT {period} AS period, ic.cluster_id, count(*) AS n FROM images i
    JOIN image_cluster ic ON ic.image_id = i.id AND ic.model_ver = {ACTIVE_VER}
    WHERE {period} >= (SELECT min(period) FROM periods) GROUP BY 1, 2
), top AS (
    SELECT period, string_agg({display_sql('c')} || ' ' || n, ', ' ORDER BY n DESC)
           AS categories
    FROM (SELECT *, row_number() OVER (PARTITION BY period ORDER BY n DESC, cluster_id) AS r FROM joined) j
    JOIN clusters c ON c.id = j.cluster_id WHERE r <= 3 GROUP BY period
)
SELECT p.period{' AS run_id' if by == 'run' else ' AS day'}, p.images, p.bytes, t.categories
FROM periods p LEFT JOIN top t USING (period) ORDER BY p.period""", {"limit": limit})

    def members(self, cluster_id: int | None = None, limit: int | None = 100) -> pd.DataFrame:
        """Images of one cluster (or of every active cluster), closest to the centroid first.

        limit keeps the `limit` closest per cluster (None: all of them). A cluster of a retired
        model is a KeyError.
        """
        ranked = self.sql(
            f"""
SELECT * FROM (
    SELECT ic.cluster_id, ic.image_id, ic.sim_score, ic.joined_at,
           row_number() OVER (PARTITION BY ic.cluster_id ORDER BY ic.sim_score DESC, ic.image_id) AS rank,
           i.width, i.height, i.format, i.bytes, {OPEN_PATH.format('ic.image_id')} AS path, i.thumb_path
    FROM image_cluster ic JOIN images i ON i.id = ic.image_id
    WHERE ic.model_ver = {ACTIVE_VER} AND (%(cid)s::bigint IS NULL OR ic.cluster_id = %(cid)s)
) r WHERE %(limit)s::int IS NULL OR rank <= %(limit)s
ORDER BY cluster_id, rank""", {"cid": cluster_id, "limit": limit})
        if cluster_id is not None and ranked.empty:
            active = self.conn.execute(f"SELECT 1 FROM clusters WHERE id = %s AND model_ver = "
                                       f"{ACTIVE_VER}", (cluster_id,)).fetchone()
            if active is None:
                raise KeyError(f"cluster {cluster_id} is not a cluster of the active model {self.model_ver}")
        return ranked

    def embeddings(self, limit: int | None = 20_000) -> pd.DataFrame:
        """(image_id, cluster_id, embedding) of the active model; embedding holds float32 arrays.

        At most `limit` rows: when the model has more, every k-th image by image_id (a sample
        spread evenly over the catalog's history). None reads them all: ~5 KB an image at
        1280-d, GBs at a million.
        """
        (count,) = self.conn.execute("SELECT count(*) FROM image_embeddings WHERE model_ver = %s",
                                     (self.model_ver,)).fetchone()
        step = 1 if limit is None or count <= limit else -(-count // limit)
        with self.conn.cursor() as cur:
            ids, vectors = read_vectors(cur, "SELECT image_id, emb FROM image_embeddings "
                                        "WHERE model_ver = %s AND image_id %% %s = 0 "
                                        "ORDER BY image_id LIMIT %s",
                                        (self.model_ver, step, limit), self.vector_type)
        clusters = dict(self.conn.execute(f"SELECT image_id, cluster_id FROM image_cluster "
                                          f"WHERE model_ver = {ACTIVE_VER} AND image_id = ANY(%s)",
                                          (ids.tolist(),)).fetchall())
        return pd.DataFrame({"image_id": ids, "cluster_id": [clusters.get(int(i)) for i in ids],
                             "embedding": list(vectors)})

    # -- labels and names -----------------------------------------------------------------
    def find(self, word: str, limit: int | None = 100) -> pd.DataFrame:
        """Images whose labels fall under `word` in the label hierarchy (`find dog` finds every
        breed), best first: image_id, label (its likeliest under the word), score (the probability
        of its top-5 labels under the word), cluster_id, category, path. An image matches when its
        top label is under the word or its top 5 put half their probability there
        (lookalike.labels.find_mask). A word that names nothing raises UnknownWordError, which
        suggests the closest names."""
        classes = sorted(classes_under(word))
        return self.sql(
            f"""
SELECT l.image_id, l.label, l.score, ic.cluster_id, c.name AS category,
       {OPEN_PATH.format('l.image_id')} AS path
FROM (SELECT image_id, (array_agg(label ORDER BY score DESC))[1] AS label, sum(score)::float8 AS score
      FROM image_labels WHERE model_ver = {ACTIVE_VER} AND class_id = ANY(%(classes)s) GROUP BY image_id
      -- its most likely label is under the word, or its top-5 put FIND_MIN_MASS there (find_mask)
      HAVING bool_or(rank = 1) OR sum(score) >= %(min_mass)s) l
LEFT JOIN image_cluster ic ON ic.image_id = l.image_id AND ic.model_ver = {ACTIVE_VER}
LEFT JOIN clusters c ON c.id = ic.cluster_id
ORDER BY l.score DESC, l.image_id LIMIT %(limit)s""", {"classes": classes, "limit": limit,
                                                        "min_mass": FIND_MIN_MASS})

    def export(self, image_ids: Iterable[int] | pd.DataFrame, out: str | Path) -> int:
        """Write a selection of images to `out` (.csv or .parquet, by its suffix) to act on
        elsewhere: image_id, path (where to open it), every path it has, sha256, size, bytes,
        category id and name. `image_ids` is any iterable of ids or a frame with an image_id
        column (from find, members, groups, similar, sql). Streamed in batches; the file appears
        whole or not at all. Returns the rows written."""
        if isinstance(image_ids, pd.DataFrame):
            image_ids = image_ids["image_id"]
        ids = sorted({int(i) for i in image_ids})
        out = Path(out)
        if out.suffix not in (".csv", ".parquet"):
            raise ValueError(f"export writes .csv or .parquet files, not {out.name!r}")
        query = f"""
SELECT i.id AS image_id, {OPEN_PATH.format('i.id')} AS path,
       (SELECT array_agg(path ORDER BY path) FROM image_paths WHERE image_id = i.id) AS paths,
       i.file_sha256, i.width, i.height, i.format, i.bytes, ic.cluster_id, c.name AS category
FROM unnest(%s::bigint[]) AS sel(id) JOIN images i USING (id)
LEFT JOIN image_cluster ic ON ic.image_id = i.id AND ic.model_ver = {ACTIVE_VER}
LEFT JOIN clusters c ON c.id = ic.cluster_id ORDER BY i.id"""
        written = 0
        with replacing(out) as tmp:
            if out.suffix == ".parquet":
                with pq.ParquetWriter(tmp, _EXPORT_SCHEMA) as writer:
                    for frame in self.stream(query, (ids,)):
                        writer.write_table(pa.Table.from_pandas(frame, schema=_EXPORT_SCHEMA,
                                                                preserve_index=False))
                        written += len(frame)
            else:
                pd.DataFrame(columns=_EXPORT_SCHEMA.names).to_csv(tmp, index=False)
                for frame in self.stream(query, (ids,)):
                    frame["paths"] = frame["paths"].map(lambda paths: "|".join(paths or []))
                    frame.to_csv(tmp, mode="a", header=False, index=False)
                    written += len(frame)
        return written

    def name_category(self, cluster_id: int, name: str) -> None:
        """Give a category of the active model an analyst's name, which no automatic name replaces
        and a recluster carries over (this one call writes, under the catalog's writer lock)."""
        with db.writer(self.cfg, dsn=self._dsn) as (conn, _), conn.transaction(), conn.cursor() as cur:
            name_by_analyst(cur, cluster_id, name)

    # -- thumbnails and search ----------------------------------------------------------
    def thumbnail_path(self, image_id: int) -> Path:
        """The thumbnail folder's <images.thumb_path> of an image (KeyError if there is no such image)."""
        row = self.conn.execute("SELECT thumb_path FROM images WHERE id = %s", (image_id,)).fetchone()
        if row is None:
            raise KeyError(f"no image {image_id} in the catalog")
        return self.layout.thumbs / row[0]

    def thumbnail(self, image_id: int) -> Image.Image:
        """The image's 512-px thumbnail, loaded as RGB (the file is closed again)."""
        with Image.open(self.thumbnail_path(image_id)) as im:
            return im.convert("RGB")

    def similar(self, path_or_image: search.QueryInput = None, k: int = 10,
                text: str | None = None) -> pd.DataFrame:
        """Exact copies, near-duplicates and semantic neighbours of a file, a PIL image or an
        image_id (or images matching `text`, CLIP models only); see lookalike.read.search.similar."""
        return search.similar(self, path_or_image, k=k, text=text)

