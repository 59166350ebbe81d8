"""Read-only access to a catalog for analysts: pandas DataFrames, thumbnails, similar images.

    from lookalike import Catalog
    with Catalog(home="/data/lookalike") as cat:
        cat.clusters()                 # similarity categories of the active model
        cat.groups()                   # near-duplicate groups, one row per member, keeper marked
        cat.similar("/some/photo.jpg") # exact copies, near-duplicates, semantic neighbours

Everything about clusters is limited to the catalog's active model_ver (catalog_meta), read
inside each query: clusters a recluster retired never mix with the current ones. The session
is read-only, so a notebook cannot change the catalog by accident, and it never runs DDL,
which would wait behind a run's loading transaction.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
from PIL import Image

from lookalike import db
from lookalike.cluster.names import name_by_analyst
from lookalike.config import Config, load_config
from lookalike.db import vector_index
from lookalike.db.runs import catalog_store
from lookalike.db.sql import ACTIVE_VER, KEEP_ORDER, OPEN_PATH, PATH_COUNT, hamming_sql
from lookalike.db.vector_io import read_vectors
from lookalike.labels.hierarchy import FIND_MIN_MASS, classes_under
from lookalike.layout import Layout
from lookalike.read import search

# pandas dtypes of an empty result's columns, by PostgreSQL type name (others: object).
_EMPTY_DTYPES = {"bool": "bool", "int2": "int64", "int4": "int64", "int8": "int64", "float4": "float64",
                 "float8": "float64", "timestamptz": "datetime64[ns, UTC]", "timestamp": "datetime64[ns]"}


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

    def images(self) -> pd.DataFrame:
        """One row per distinct content (images.id as image_id, as in every frame): size, format,
        bytes, where it was first found, how many paths it has now and the first of them, and its
        copy in the store (null without one)."""
        return self.sql(
            "SELECT i.id AS image_id, i.file_sha256, i.path_original, i.width, i.height, i.format, i.bytes, "
            "coalesce(p.paths, 0) AS paths, p.path, i.store_path, i.thumb_path, i.created_at, i.run_id "
            "FROM images i LEFT JOIN (SELECT image_id, count(*) AS paths, min(path) AS path "
            "FROM image_paths GROUP BY image_id) p ON p.image_id = i.id ORDER BY i.id")

    def timeline(self, unit: str = "month") -> pd.DataFrame:
        """Images by when they were taken (EXIF capture time, else the file's mtime), per `unit`
        (day, week, month or year): how many, and how many of those times come from EXIF."""
        if unit not in ("day", "week", "month", "year"):
            raise ValueError(f"unit must be day, week, month or year, not {unit!r}")
        return self.sql(
            "SELECT date_trunc(%(unit)s, taken_at) AS period, count(*) AS images, "
            "count(*) FILTER (WHERE taken_at_source = 'exif') AS from_exif, sum(bytes)::bigint AS bytes "
            "FROM images WHERE taken_at IS NOT NULL GROUP BY 1 ORDER BY 1", {"unit": unit})

    def paths(self) -> pd.DataFrame:
        """Every catalogued path; `copies` > 1 marks byte-identical files (same sha256)."""
        return self.sql(
            "SELECT p.path, p.image_id, i.file_sha256, p.bytes, p.mtime, p.first_seen_at, "
            "count(*) OVER (PARTITION BY p.image_id) AS copies "
            "FROM image_paths p JOIN images i ON i.id = p.image_id ORDER BY p.path")

    def errors(self) -> pd.DataFrame:
        """Files that could not be catalogued, with their short code and one-line reason."""
        return self.sql("SELECT path, error, message, bytes, mtime, run_id, at FROM ingest_errors "
                        "ORDER BY at, path")

    def runs(self) -> pd.DataFrame:
        """Runs and reclusters, with the main figures of each summary as columns."""
        return self.sql(
            "SELECT run_id, kind, status, started_at, finished_at, "
            "extract(epoch FROM finished_at - started_at)::float8 AS seconds, model_ver, roots, "
            "(summary->>'files')::bigint AS files, (summary->>'new_images')::bigint AS new_images, "
            "(summary->>'exact_copies')::bigint AS exact_copies, (summary->>'errors')::bigint AS errors, "
            "message, summary FROM runs ORDER BY run_id")

    def near_duplicates(self) -> pd.DataFrame:
        """Detected pairs (image_id < other_id), one row per method, with their group and paths."""
        return self.sql(
            f"SELECT n.image_id, n.other_id, n.method, n.distance, g.group_id, "
            f"{OPEN_PATH.format('n.image_id')} AS path, {OPEN_PATH.format('n.other_id')} AS other_path "
            "FROM near_duplicates n LEFT JOIN image_dup_group g USING (image_id) "
            "ORDER BY g.group_id, n.image_id, n.other_id, n.method")

    def groups(self) -> pd.DataFrame:
        """Near-duplicate groups, one row per member; `keep` marks the copy to keep.

        The keeper has the largest resolution, then the most bytes. `phash_to_keep` is the pHash
        Hamming distance to the keeper; `method`/`distance` the closest detected pair between the
        two, when the group links them directly (a flipped copy is far in plain pHash).
        """
        return self.sql(
            f"""
WITH m AS (
    SELECT g.group_id, g.image_id, i.width, i.height, i.format, i.bytes, i.file_sha256, i.thumb_path,
           row_number() OVER (PARTITION BY g.group_id ORDER BY {KEEP_ORDER}) AS rank,
           count(*) OVER (PARTITION BY g.group_id) AS group_size
    FROM image_dup_group g JOIN images i ON i.id = g.image_id
), k AS (SELECT group_id, image_id FROM m WHERE rank = 1)
SELECT m.group_id, m.group_size, m.rank, m.rank = 1 AS keep, m.image_id, m.width, m.height,
       m.width::bigint * m.height AS pixels, m.bytes, m.format,
       {hamming_sql("hm.phash64", "hk.phash64")} AS phash_to_keep, d.method, d.distance,
       {OPEN_PATH.format('m.image_id')} AS path, {PATH_COUNT.format('m.image_id')} AS paths,
       m.file_sha256, m.thumb_path
FROM m JOIN k USING (group_id)
LEFT JOIN image_hashes hm ON hm.image_id = m.image_id
LEFT JOIN image_hashes hk ON hk.image_id = k.image_id
LEFT JOIN LATERAL (
    SELECT n.method, n.distance FROM near_duplicates n
    WHERE n.image_id = least(m.image_id, k.image_id) AND n.other_id = greatest(m.image_id, k.image_id)
    ORDER BY n.method = 'embedding', n.distance LIMIT 1) d ON true
ORDER BY m.group_size DESC, m.group_id, m.rank""")

    def clusters(self) -> pd.DataFrame:
        """Clusters of the active model, largest first, with their names; `images` counts their
        image_cluster rows."""
        return self.sql(
            f"""
SELECT c.id AS cluster_id, c.name, c.name_source, c.model_ver, c.size, count(ic.image_id) AS images,
       avg(ic.sim_score)::float8 AS mean_sim, c.created_at, c.updated_at
FROM clusters c
LEFT JOIN image_cluster ic ON ic.cluster_id = c.id AND ic.model_ver = c.model_ver
WHERE c.model_ver = {ACTIVE_VER}
GROUP BY c.id ORDER BY images DESC, c.id""")

    def members(self, cluster_id: int | None = None, limit: int | None = None) -> pd.DataFrame:
        """Images of one cluster (or of every active cluster), closest to the centroid first.

        limit keeps the `limit` closest per cluster. A cluster of a retired model is a KeyError.
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

