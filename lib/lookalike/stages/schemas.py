"""The columns each stage writes, said once: Arrow schemas, and the Spark and PostgreSQL types
derived from them where a stage's rows cross into Spark or into the catalog."""

from __future__ import annotations

import pyarrow as pa

# scan -> a manifest: the new files, or why one is bad without opening it.
MANIFEST = pa.schema([
    ("path", pa.string()),
    ("bytes", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("error", pa.string()),
    ("message", pa.string()),
])

# extract -> features: one row per file of the manifest.
FEATURES = pa.schema([
    ("path", pa.string()),
    ("bytes", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("phash", pa.int64()),
    ("dhash", pa.int64()),
    ("ahash", pa.int64()),
    ("phash_dihedral", pa.list_(pa.int64())),  # the pHash of the 7 flips/rotations
    ("thumb", pa.string()),                    # relative to the thumbnail folder
    # capture metadata (stages.formats.capture_info)
    ("taken_at", pa.timestamp("us", tz="UTC")),  # EXIF DateTimeOriginal, else the file's mtime
    ("taken_at_source", pa.string()),            # 'exif' | 'mtime'
    ("taken_offset_min", pa.int32()),            # the EXIF OffsetTimeOriginal in minutes; null without
    ("camera_make", pa.string()),
    ("camera_model", pa.string()),
    ("lens", pa.string()),
    ("orientation", pa.int32()),                 # EXIF 1-8 as the file stores it (already applied)
    ("gps_lat", pa.float64()),                   # degrees, null unless [extract] keep_gps
    ("gps_lon", pa.float64()),
    ("decode_path", pa.string()),                # 'preview' | 'demosaic' (camera RAW) | 'decode'
    ("stored", pa.string()),                     # the absolute path of the stored copy (lookalike.store)
    ("store_action", pa.string()),               # 'link' | 'copy' | 'exists'; null in place
    ("error", pa.string()),
    ("message", pa.string()),
])

# embed -> embeddings: the vector as the bytes of a float32 array (no per-element conversion), and
# the image's top-5 labels from the same forward (models.runtime.Embedder.embed_labelled).
EMBEDDINGS = pa.schema([
    ("sha256", pa.string()),
    ("model_ver", pa.string()),
    ("vector", pa.binary()),
    ("error", pa.string()),
    ("message", pa.string()),
    # class indices into lookalike.labels' 1000 ImageNet classes, most probable first; null for an
    # error row, or when the model gives no labels (a CLIP model whose text tower cannot load)
    ("labels", pa.list_(pa.int16())),
    ("label_scores", pa.list_(pa.float32())),  # their probabilities, same order
])

_SPARK = {pa.string(): "string", pa.int64(): "long", pa.int32(): "int", pa.float64(): "double",
          pa.binary(): "binary", pa.timestamp("us", tz="UTC"): "timestamp",
          pa.list_(pa.int64()): "array<long>", pa.list_(pa.int16()): "array<smallint>",
          pa.list_(pa.float32()): "array<float>"}
_POSTGRES = {pa.string(): "text", pa.int64(): "int8", pa.int32(): "int4", pa.float64(): "float8",
             pa.binary(): "bytea", pa.timestamp("us", tz="UTC"): "timestamptz",
             pa.list_(pa.int16()): "int2[]", pa.list_(pa.float32()): "float4[]"}


def spark_ddl(schema: pa.Schema) -> str:
    """The schema as a Spark DDL string, for mapInPandas and createDataFrame."""
    return ", ".join(f"{f.name} {_SPARK[f.type]}" for f in schema)


def postgres_columns(schema: pa.Schema, names: list[str]) -> list[tuple[str, str]]:
    """(name, PostgreSQL type) of some of the schema's columns, for a binary COPY."""
    return [(n, _POSTGRES[schema.field(n).type]) for n in names]
