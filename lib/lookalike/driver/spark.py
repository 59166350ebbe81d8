"""One SparkSession builder for the jobs and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

from pyspark import SparkConf, SparkContext
from pyspark.java_gateway import launch_gateway
from pyspark.sql import SparkSession

from lookalike import logs
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


def _settings(cfg: Config, app_name: str, master: str) -> dict[str, str]:
    sc = cfg["spark"]
    return {
        "spark.app.name": app_name,
        "spark.master": master,
        "spark.driver.memory": sc["driver_memory"],
        "spark.executor.memory": sc["executor_memory"],
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # One image per Arrow record is plenty; small batches keep worker memory flat.
        "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
        # Reused Python workers keep a loaded model across tasks (one load per worker).
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.session.timeZone": "UTC",
        # The client JIT only (C1): the JVM and session start in ~6 s instead of ~11 on 2 cores, and
        # the first job ~2 s sooner; the driver's own work (scheduling, and in local mode Arrow and
        # Parquet for rows of ~1 KB a file) never grows hot enough for C2 to pay off against ~0.4
        # CPU-seconds of Python per file. 24 archive files on Spark: 34.1 -> 28.8 s a run (medians).
        "spark.driver.extraJavaOptions": f"{_log_options()} -XX:TieredStopAtLevel=1",
    }


def _launch_jvm(settings: dict[str, str]) -> None:
    """Start the JVM with its stdout and stderr in the log file: its start-up notices (the
    incubator-module WARNING), log4j's lines and the Python workers' output (which Spark copies
    into the JVM's stderr) are not the terminal's business. Without a log file, pyspark starts it."""
    out = logs.jvm_output()
    if out is None:
        return
    with out, SparkContext._lock:
        if SparkContext._gateway is None:
            conf = SparkConf(loadDefaults=False).setAll(list(settings.items()))
            SparkContext._gateway = launch_gateway(conf, popen_kwargs={"stdout": out, "stderr": out})
            SparkContext._jvm = SparkContext._gateway.jvm


def get_spark(cfg: Config, app_name: str = "lookalike") -> SparkSession:
    """The active session if one exists (spark-submit made it), else a new one from the config."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Executors must run the same interpreter (and so the same venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = cfg.spark_master
    _default_local_ip(master)
    settings = _settings(cfg, app_name, master)
    _launch_jvm(settings)
    builder = SparkSession.builder
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg["spark"]["log_level"])
    return spark


def stop_spark(spark: SparkSession) -> None:
    """Stop the session and the JVM this process started, at once: an interrupted run must leave
    no JVM behind (it would otherwise live until this process exits and its stdin closes)."""
    spark.stop()
    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)
    if gateway is None or proc is None:  # spark-submit's JVM is not ours to end
        return
    with SparkContext._lock:
        SparkContext._gateway = None
        SparkContext._jvm = None
    gateway.shutdown()
    proc.stdin.close()  # pyspark's gateway server exits on end of input
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
