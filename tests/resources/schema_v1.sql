-- lookalike catalog, schema version 1 (kept to build v1 catalogs for the migration test).
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

-- One row per distinct content (sha256 is the identity).
CREATE TABLE IF NOT EXISTS images (
    image_id      BIGSERIAL PRIMARY KEY,
    sha256        TEXT NOT NULL UNIQUE,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    format        TEXT NOT NULL,
    bytes         BIGINT NOT NULL,
    thumb_path    TEXT NOT NULL,               -- relative to the thumbnail folder
    first_seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id        BIGINT REFERENCES runs
);

-- 64-bit perceptual hashes stored as signed BIGINT (two's complement).
CREATE TABLE IF NOT EXISTS image_hashes (
    image_id     BIGINT PRIMARY KEY REFERENCES images ON DELETE CASCADE,
    phash        BIGINT NOT NULL,
    dhash        BIGINT NOT NULL,
    ahash        BIGINT NOT NULL,
    hash_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS image_hashes_phash ON image_hashes (phash);

CREATE TABLE IF NOT EXISTS image_paths (
    path          TEXT PRIMARY KEY,
    image_id      BIGINT NOT NULL REFERENCES images,
    bytes         BIGINT NOT NULL,
    mtime         TIMESTAMPTZ NOT NULL,
    first_seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS image_paths_image ON image_paths (image_id);

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

CREATE TABLE IF NOT EXISTS image_embeddings (
    image_id  BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    model_ver TEXT NOT NULL,
    embedding {vector} NOT NULL,
    PRIMARY KEY (image_id, model_ver)
);

CREATE TABLE IF NOT EXISTS clusters (
    cluster_id BIGSERIAL PRIMARY KEY,
    model_ver  TEXT NOT NULL,
    centroid   {vector} NOT NULL,
    size       INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS clusters_model ON clusters (model_ver);

CREATE TABLE IF NOT EXISTS image_cluster (
    image_id   BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    model_ver  TEXT NOT NULL,
    cluster_id BIGINT NOT NULL REFERENCES clusters ON DELETE CASCADE,
    sim_score  REAL NOT NULL,                  -- cosine to the cluster centroid
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

-- Images not yet close enough to any cluster; each also has a provisional image_cluster row.
CREATE TABLE IF NOT EXISTS cluster_pool (
    image_id  BIGINT NOT NULL REFERENCES images ON DELETE CASCADE,
    model_ver TEXT NOT NULL,
    PRIMARY KEY (image_id, model_ver)
);

-- After a recluster: how many images of each old cluster went to each new one.
CREATE TABLE IF NOT EXISTS cluster_transitions (
    old_model_ver  TEXT NOT NULL,
    old_cluster_id BIGINT NOT NULL,
    new_model_ver  TEXT NOT NULL,
    new_cluster_id BIGINT NOT NULL,
    overlap        INTEGER NOT NULL,
    at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (old_cluster_id, new_cluster_id)
);
