"""One SparkSession builder for the jobs and the CLI."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from lookalike.config import DEFAULTS_FILE, Config

# Quiet Spark logging (warnings only), beside the default configuration.
LOG4J2_FILE = DEFAULTS_FILE.parent / "log4j2.properties"


def _default_local_ip(master: str) -> None:
    # In local mode Spark binds to whatever the host name resolves to, which in containers
    # is often unreachable; loopback always works. A cluster driver keeps the user's choice.
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def _log_options() -> str:
    if LOG4J2_FILE.is_file():
        return f"-Dlog4j2.configurationFile={LOG4J2_FILE.as_uri()}"
    return "-Dlog4j2.level=warn"


def get_spark(cfg: Config, app_name: str = "lookalike") -> SparkSession:
    """The active session if one exists (spark-submit made it), else a new one from the config."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Executors must run the same interpreter (and so the same venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    sc = cfg["spark"]
    master = os.environ.get("LOOKALIKE_SPARK_MASTER", sc["master"])
    _default_local_ip(master)
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master)
        .config("spark.driver.memory", sc["driver_memory"])
        .config("spark.executor.memory", sc["executor_memory"])
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # One image per Arrow record is plenty; small batches keep worker memory flat.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        # Reused Python workers keep a loaded model across tasks (one load per worker).
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", _log_options())
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(sc["log_level"])
    return spark
