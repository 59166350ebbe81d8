-- lookalike catalog, schema version 3: the original design's tables and columns (DESIGN.md,
-- "Catalog contract"), plus lookalike's own. Applied idempotently by lookalike.db.schema;
-- a version 1 catalog is migrated first (lookalike/db/migrations.py).
-- {vector} is replaced by `vector` (pgvector) or `bytea` (float32 little-endian) at creation.

CREATE TABLE IF NOT EXISTS catalog_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id      BIGSERIAL PRIMARY KEY,
    kind        TEXT NOT NULL,                 -- run | recluster
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    status      TEXT NOT NULL DEFAULT 'running', -- running | ok | failed
    model_ver   TEXT,
    roots       TEXT[],
    summary     JSONB,
    message     TEXT
);

CREATE TABLE IF NOT EXISTS manifests (
    manifest_id TEXT PRIMARY KEY,
    run_id      BIGINT REFERENCES runs,
    files       INTEGER NOT NULL,
    bytes       BIGINT NOT NULL,
    status      TEXT NOT NULL,                 -- scanned | loaded
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    loaded_at   TIMESTAMPTZ
);

-- One row per distinct content (file_sha256 is the identity).
CREATE TABLE IF NOT EXISTS images (
    id            BIGSERIAL PRIMARY KEY,
    file_sha256   TEXT NOT NULL UNIQUE,
    path_original TEXT NOT NULL,               -- the first path the bytes were found at (image_paths: all)
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    bytes         BIGINT NOT NULL,
    format        TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    thumb_path    TEXT NOT NULL,               -- relative to the thumbnail folder
    run_id        BIGINT REFERENCES runs,
    -- When and with what the picture was taken (EXIF; null where the file says nothing).
    taken_at         TIMESTAMPTZ,              -- EXIF DateTimeOriginal, else the file's mtime
    taken_at_source  TEXT,                     -- exif | mtime
    taken_offset_min SMALLINT,                 -- EXIF OffsetTimeOriginal in minutes (null: none given)
    camera_make      TEXT,
    camera_model     TEXT,
    lens             TEXT,
    orientation      SMALLINT,                 -- EXIF orientation 1-8 (already applied to width/height)
    gps_lat          DOUBLE PRECISION,         -- only with [extract] keep_gps = true
    gps_lon          DOUBLE PRECISION,
    decode_path      TEXT,                     -- decode | preview (a RAW's embedded JPEG) | demosaic
    -- The original's copy in the content-addressed store, <root>/ab/cd/<sha256>.<ext> (null when
    -- the catalog has no store: the files are where image_paths says).
    store_path       TEXT
);
CREATE INDEX IF NOT EXISTS images_created_at ON images (created_at);
CREATE INDEX IF NOT EXISTS images_taken_at ON images (taken_at);

-- 64-bit perceptual hashes stored as signed BIGINT (two's complement).
CREATE TABLE IF NOT EXISTS image_hashes (
    image_id     BIGINT PRIMARY KEY REFERENCES images ON DELETE CASCADE,
    phash64      BIGINT NOT NULL,
    dhash64      BIGINT NOT NULL,
    ahash64      BIGINT NOT NULL,
    hash_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS image_hashes_phash ON image_hashes (phash64);

CREATE TABLE IF NOT EXISTS image_paths (
    path          TEXT PRIMARY KEY,
    image_id      BIGINT NOT NULL REFERENCES images,
    bytes         BIGINT NOT NULL,
    mtime         TIMESTAMPTZ NOT NULL,
    first_seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- (image_id, path): an image's paths, and its first one (db.sql.OPEN_PATH) in one probe: with
-- (image_id) alone the planner chose to walk the primary key in path order for min(path).
CREATE INDEX IF NOT EXISTS image_paths_image_path ON image_paths (image_id, path);

-- Earlier contents of a path whose bytes changed (the path now points at a new image).
CREATE TABLE IF NOT EXISTS image_path_history (
    path        TEXT NOT NULL,
    image_id    BIGINT NOT NULL REFERENCES images,
    bytes       BIGINT NOT NULL,
    mtime       TIMESTAMPTZ NOT NULL,
    replaced_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS ingest_errors (
    path    TEXT PRIMARY KEY,
    bytes   BIGINT,
    mtime   TIMESTAMPTZ,
    error   TEXT NOT NULL,                     -- short code: unreadable, decode, too_large, ...
    message TEXT NOT NULL,                     -- one line for a person
    run_id  BIGINT REFERENCES runs,
    at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every model's vectors (a recluster writes the new model's beside the old ones); the active
-- model's are served by a pgvector index per model_ver (lookalike/db/vector_index.py).
CREATE TABLE IF NOT EXISTS image_embeddings (
    image_id  BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    model_ver TEXT NOT NULL,
    emb       {vector} NOT NULL,
    PRIMARY KEY (image_id, model_ver)
);

CREATE TABLE IF NOT EXISTS clusters (
    id         BIGSERIAL PRIMARY KEY,
    model_ver  TEXT NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    centroid   {vector} NOT NULL,             -- in the space categories are clustered on (lookalike.cluster.space)
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    name        TEXT,                          -- what the category shows: its members' labels, or an analyst's
    name_source TEXT,                          -- auto | analyst (an analyst's name is never replaced)
    top_labels  JSONB                          -- its members' most frequent labels: [[label, share], ...]
);
CREATE INDEX IF NOT EXISTS clusters_model ON clusters (model_ver);

-- Each image's 5 most likely ImageNet classes under a model (the classifier head of its forward
-- pass; zero-shot over the same names for CLIP models).
CREATE TABLE IF NOT EXISTS image_labels (
    image_id  BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    model_ver TEXT NOT NULL,
    rank      SMALLINT NOT NULL,               -- 1: the most likely
    label     TEXT NOT NULL,                   -- the class's name
    score     REAL NOT NULL,                   -- its probability
    class_id  SMALLINT NOT NULL,               -- the class's index among the 1000 (lookalike.labels)
    PRIMARY KEY (image_id, model_ver, rank)
);
CREATE INDEX IF NOT EXISTS image_labels_class ON image_labels (model_ver, class_id);

CREATE TABLE IF NOT EXISTS image_cluster (
    image_id   BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    cluster_id BIGINT NOT NULL REFERENCES clusters ON DELETE CASCADE,
    joined_at  TIMESTAMPTZ NOT NULL DEFAULT now(),  -- when it joined this cluster (a refit sets it anew)
    sim_score  REAL NOT NULL,                  -- cosine to the cluster centroid
    model_ver  TEXT NOT NULL,
    PRIMARY KEY (image_id, model_ver)
);
CREATE INDEX IF NOT EXISTS image_cluster_cluster ON image_cluster (cluster_id);

CREATE TABLE IF NOT EXISTS near_duplicates (
    image_id BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    other_id BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    method   TEXT NOT NULL,                    -- phash | phash_orient | embedding
    distance REAL NOT NULL,                    -- Hamming bits, or 1 - cosine
    PRIMARY KEY (image_id, other_id, method),
    CHECK (image_id < other_id)
);
CREATE INDEX IF NOT EXISTS near_duplicates_other ON near_duplicates (other_id);

CREATE TABLE IF NOT EXISTS image_dup_group (
    image_id BIGINT PRIMARY KEY REFERENCES images ON DELETE CASCADE,
    group_id BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS image_dup_group_group ON image_dup_group (group_id);

-- After each full re-clustering: how many images of each old cluster went to each new one.
CREATE TABLE IF NOT EXISTS cluster_transitions (
    old_model_ver  TEXT NOT NULL,
    old_cluster_id BIGINT NOT NULL,
    new_model_ver  TEXT NOT NULL,
    new_cluster_id BIGINT NOT NULL,
    overlap        INTEGER NOT NULL,
    at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A refit within a model keeps the ids of categories that persist: the same pair may recur.
CREATE INDEX IF NOT EXISTS cluster_transitions_new ON cluster_transitions (new_model_ver, new_cluster_id);
