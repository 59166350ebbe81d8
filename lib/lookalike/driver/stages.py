"""The executor-side stages (lookalike.stages) run on Spark, for one catalog home; a small
manifest on a local master runs them without Spark (lookalike.driver.local).

Spark distributes paths and task numbers, never image bytes: tasks open the files themselves.
Each stage writes Parquet under <home>/stages/<name>/ and is complete once Spark's _SUCCESS
marker is there, so a stage that finished before a run was killed is not run again.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from lookalike import store
from lookalike.config import Config
from lookalike.driver import local
from lookalike.layout import Layout, file_safe
from lookalike.models.registry import ModelSpec
from lookalike.models.runtime import ensure_export, ensure_labels
from lookalike.progress import stage
from lookalike.stages import schemas
from lookalike.stages.embed import (
    EmbedSettings,
    embed_task_inputs,
    embed_tasks,
    embeddings_table,
    write_task_inputs,
)
from lookalike.stages.extract import ExtractSettings, extract_batches, prepare_thumbs_dir
from lookalike.stages.scan import ScanSettings, walk

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def extract_tasks(files: int, total_bytes: int, task_bytes: int, cores: int) -> int:
    """Spark tasks for extracting `files` originals: about task_bytes each, at least two a core
    (so big and small files balance over the cores), never more than one a file."""
    return max(1, min(files, max(math.ceil(total_bytes / task_bytes), 2 * cores)))


def local_master_cores(cfg: Config) -> int | None:
    """The cores of the run's Spark master when it is local (where small manifests run without
    Spark), else None."""
    return local.local_cores(cfg.spark_master)


class SparkStages:
    """Scan, extract and embed on Spark; the session starts on first use, which a run whose
    manifests are all small on a local master never makes."""

    def __init__(self, cfg: Config, layout: Layout) -> None:
        self.cfg = cfg
        self.layout = layout
        self._spark: SparkSession | None = None

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            from lookalike.driver.spark import get_spark

            self._spark = get_spark(self.cfg)
        return self._spark

    def stop(self) -> None:
        """Stop Spark and its JVM now, if this run started it (an interrupted run ends here)."""
        if self._spark is not None:
            from lookalike.driver.spark import stop_spark

            stop_spark(self._spark)
            self._spark = None

    @property
    def cores(self) -> int:
        return self.spark.sparkContext.defaultParallelism

    def local_cores(self, files: int) -> int | None:
        """The cores to run a manifest of `files` files on without Spark; None: on Spark."""
        if files > self.cfg["spark"]["local_files"]:
            return None
        return local_master_cores(self.cfg)

    def walk(self, settings: ScanSettings, subtrees: list[str]) -> pa.Table:
        """Every file under the subtrees, one task a subtree: a million files spread over executors."""
        walked = self.spark.sparkContext.parallelize(subtrees, len(subtrees)).flatMap(
            partial(walk, settings=settings))
        df = self.spark.createDataFrame(walked, schema=schemas.spark_ddl(schemas.MANIFEST))
        return df.toArrow().cast(schemas.MANIFEST)

    def extract(self, manifest_id: str) -> pa.Table:
        """The features of a manifest's files (and their thumbnails), made once."""
        out = self.layout.stage(manifest_id, "features")
        if not Layout.is_complete(out):
            sizes = pq.read_table(self.layout.manifest(manifest_id), columns=["bytes"])["bytes"]
            settings = ExtractSettings.from_config(self.cfg, self.layout.thumbs)
            prepare_thumbs_dir(self.layout.thumbs)  # fail the run once, not every file
            if settings.store is not None and settings.store.enabled:
                store.prepare(settings.store.root)  # and clear a killed run's temporary files
            total_bytes = pc.sum(sizes).as_py() or 0
            cores = self.local_cores(len(sizes))
            if cores is not None:
                with stage(f"extract {manifest_id}", len(sizes), total_bytes=total_bytes):
                    local.extract(self.layout.manifest(manifest_id), settings, out, cores)
                return pq.read_table(out)
            tasks = extract_tasks(len(sizes), total_bytes, self.cfg["extract"]["task_bytes"], self.cores)
            with stage(f"extract {manifest_id}", len(sizes), self.spark, total_bytes=total_bytes):
                df = self.spark.read.parquet(str(self.layout.manifest(manifest_id))).repartition(tasks)
                df.mapInPandas(partial(extract_batches, settings=settings),
                               schema=schemas.spark_ddl(schemas.FEATURES)) \
                    .write.mode("overwrite").parquet(str(out))
        return pq.read_table(out)

    def embed(self, name: str, rows: pa.Table, spec: ModelSpec) -> pa.Table:
        """Embeddings of `rows` (sha256, thumb, path), kept under stages/<name>/embeddings-<model>."""
        out = self.layout.stage(name, "embeddings-" + file_safe(spec.model_ver))
        if not Layout.is_complete(out):
            settings = self._embed_settings(spec)
            # store=False: a lost thumbnail is made again from the original, which is filed already.
            extract = ExtractSettings.from_config(self.cfg, self.layout.thumbs, store=False)
            cores = self.local_cores(rows.num_rows)
            if cores is not None:
                with stage(f"embed {name}", rows.num_rows):
                    local.embed(rows, replace(settings, threads=cores), extract, out)
                return embeddings_table(pq.read_table(out))
            tasks = embed_tasks(rows.num_rows, self.cores, settings.batch_size)
            with stage(f"embed {name}", rows.num_rows, self.spark):
                inputs = self.layout.stage(name, "embed-input")
                write_task_inputs(rows.select(["sha256", "thumb", "path"]), inputs, tasks)
                # One task number a partition; spark.range needs no Python worker of its own.
                self.spark.range(tasks, numPartitions=tasks).mapInPandas(
                    partial(embed_task_inputs, folder=str(inputs), settings=settings, extract=extract),
                    schema=schemas.spark_ddl(schemas.EMBEDDINGS)).write.mode("overwrite") \
                    .option("parquet.enable.dictionary", "false").parquet(str(out))  # all values distinct
        return embeddings_table(pq.read_table(out))

    def _embed_settings(self, spec: ModelSpec) -> EmbedSettings:
        e = self.cfg["embed"]
        # The ONNX export happens once, here on the driver and verified on real thumbnails,
        # before any executor needs the file.
        ensure_export(spec, e["backend"], self.layout.models, e["batch_size"],
                         lambda: [_rgb(p) for p in sorted(self.layout.thumbs.rglob("*.jpg"))[:8]])
        # So are a CLIP model's zero-shot label vectors; a model that gives no labels says so here, once.
        labels = ensure_labels(spec, self.layout.models)
        return EmbedSettings(spec, e["backend"], str(self.layout.models), e["batch_size"], labels=labels)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
