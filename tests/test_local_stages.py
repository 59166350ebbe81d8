"""A small manifest on a local master runs extract and embed without Spark (lookalike.driver.local):
no JVM starts, and the catalog is the one Spark's stages make (#23)."""

from __future__ import annotations

from pathlib import Path

import pytest
from catalog_snapshot import difference, snapshot

import lookalike.driver.spark
from lookalike.config import load_config
from lookalike.driver.ingest import run
from lookalike.driver.local import local_cores

pytestmark = pytest.mark.slow


def test_local_master_cores() -> None:
    assert local_cores("local") == 1
    assert local_cores("local[3]") == 3
    assert local_cores("local[2,4]") == 2
    assert local_cores("local[*]") >= 1
    assert local_cores("spark://host:7077") is None
    assert local_cores("yarn") is None


def test_small_manifest_without_spark_makes_the_same_catalog(ukbench_copy: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)
    monkeypatch.setenv("LOOKALIKE_SPARK_MASTER", "local[2]")
    sessions = []
    get_spark = lookalike.driver.spark.get_spark
    monkeypatch.setattr(lookalike.driver.spark, "get_spark",
                        lambda *a, **k: sessions.append(1) or get_spark(*a, **k))
    always_spark = tmp_path / "spark.toml"
    always_spark.write_text("[spark]\nlocal_files = 0\n")
    local_cfg = load_config(None, tmp_path / "local")
    spark_cfg = load_config(always_spark, tmp_path / "spark")

    local = run(local_cfg, [str(ukbench_copy)])
    assert sessions == []  # 24 files: under local_files, so no Spark session, no JVM
    assert (local.counts.files, local.counts.errors) == (24, 2)
    on_spark = run(spark_cfg, [str(ukbench_copy)])
    assert sessions == [1]
    assert on_spark.counts == local.counts
    a, b = snapshot(local_cfg), snapshot(spark_cfg)
    assert a == b, difference(a, b)
