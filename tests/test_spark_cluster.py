"""A real Spark standalone cluster (one master, one worker, on loopback) runs spark-submit.sh.

The run goes through the script a scheduler would call: the package travels as a zip
(--py-files), the scan's walk, extract and embed run in the worker's executor, and the
catalog must equal the local-mode run's. It files the originals into a content-addressed store
(copy mode) from the executor, as a cluster with a shared store does.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyspark
import pytest
from catalog_snapshot import (
    Archive,
    CliRun,
    Reference,
    difference,
    home_config,
    kill_tree,
    run_env,
    seed_models,
    snapshot,
    stop_embedded_server,
)
from conftest import REPO

from lookalike import cli

pytest_plugins = ["catalog_snapshot"]
pytestmark = pytest.mark.slow

SPARK_HOME = Path(pyspark.__file__).parent
SPARK_INFO_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d INFO ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    url: str
    work_dir: Path


def start_daemon(cls: str, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), cls, *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"{log.name} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {log.name}:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("spark-cluster")
    port = free_port()
    url = f"spark://127.0.0.1:{port}"
    env = run_env(base, SPARK_HOME=str(SPARK_HOME), SPARK_DAEMON_MEMORY="512m",
                  SPARK_LOG_DIR=str(base / "logs"),
                  # No REST submission server: it would take the fixed port 6066.
                  SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")
    procs = []
    try:
        master = start_daemon("org.apache.spark.deploy.master.Master",
                              ["--host", "127.0.0.1", "--port", str(port), "--webui-port", "0"],
                              base / "master.log", env)
        procs.append(master)
        wait_for_log(master, base / "master.log", "I have been elected leader")
        worker = start_daemon("org.apache.spark.deploy.worker.Worker",
                              [url, "--host", "127.0.0.1", "--cores", "2", "--memory", "2g",
                               "--webui-port", "0", "--work-dir", str(base / "work")],
                              base / "worker.log", env)
        procs.append(worker)
        wait_for_log(worker, base / "worker.log", "Successfully registered with master")
        yield Cluster(url, base / "work")
    finally:
        # The worker's executors (and their pyspark daemons) go with it.
        for proc in reversed(procs):
            kill_tree(proc.pid)
            proc.wait(30)


def test_spark_submit_on_a_standalone_cluster_equals_the_local_run(
        cluster: Cluster, reference: Reference, archive: Archive, tmp_path: Path) -> None:
    expected = reference.snapshot()
    home, store_root = tmp_path / "home", tmp_path / "store"
    home.mkdir()
    seed_models(reference.home, home)
    config = tmp_path / "store.toml"
    config.write_text(archive.config.read_text() + f'[store]\nroot = "{store_root}"\nmode = "copy"\n')
    run = CliRun([str(REPO / "spark-submit.sh"), "--master", cluster.url, "run", str(archive.root),
                  "--home", str(home), "--config", str(config)], run_env(tmp_path))
    try:
        assert run.wait(600) == 0, run.tail()
        got = snapshot(home_config(home))
        # The executor filed every image's original, each under its own sha256.
        assert len(list(store_root.glob("??/??/*"))) == len(got["images"])
        assert cli.main(["verify", "--full", "--home", str(home), "--config", str(config)]) == 0
    finally:
        run.kill()
        stop_embedded_server(home)
    assert got["meta"]["store_root"] == str(store_root)
    got, expected = ({**snap, "meta": {k: v for k, v in snap["meta"].items() if k != "store_root"}}
                     for snap in (got, expected))
    assert got == expected, difference(got, expected)

    # The work ran in the cluster's executor, with the package the script shipped.
    logs = [p.read_text() for p in cluster.work_dir.glob("app-*/*/stderr")]
    assert len(logs) == 1, f"expected one executor of one application, found {len(logs)}"
    assert "lookalike.zip" in logs[0]
    assert len(re.findall(r"Finished task", logs[0])) >= 3
    # The scheduler's log holds the run's lines, not Spark's start-up chatter.
    assert not [line for line in run.stderr if SPARK_INFO_LINE.match(line)]
