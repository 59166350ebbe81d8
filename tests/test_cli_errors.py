"""A new user's mistakes: each is one line naming what to do, a documented exit code, no
traceback, and nothing created or changed. Most are refused before any server or Spark starts,
so these run in about a second each; the catalogs here are real embedded PostgreSQL ones.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from catalog_snapshot import CliRun, run_env, stop_embedded_server
from hostile import photos

from lookalike import cli, db
from lookalike.config import load_config
from lookalike.layout import Layout

REPO = Path(__file__).resolve().parents[1]


def lookalike(*args: str, **env: str) -> tuple[int, str, list[str]]:
    """The real command line in a fresh process: (exit code, stdout, stderr lines)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    proc = subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True,
                          env={**clean, **env}, cwd=REPO, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr.splitlines()


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    return root


# -- refused before anything starts --------------------------------------------------------

def test_home_that_is_a_file(tmp_path: Path) -> None:
    readme = REPO / "README.md"
    code, out, err = lookalike("status", "--home", str(readme))
    assert (code, out, err) == (2, "", [f"lookalike: the catalog home {readme} is not a folder: "
                                        "give --home a folder"])


def test_home_that_cannot_be_created(images: Path) -> None:
    code, out, err = lookalike("run", str(images), "--home", "/proc/x")
    assert (code, out, err) == (2, "", ["lookalike: cannot create the catalog home /proc/x: No such file "
                                        "or directory: give --home a folder that can be written"])


def test_dsn_that_is_not_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, out, err = lookalike("status", "--home", str(home), LOOKALIKE_DSN="not a dsn at all")
    assert (code, out, err) == (2, "", [
        "lookalike: LOOKALIKE_DSN is not a PostgreSQL connection string: give "
        "postgresql://USER@HOST/DBNAME or 'host=HOST dbname=DBNAME user=USER'"])
    assert not home.exists()


def test_missing_root_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, out, err = lookalike("run", str(tmp_path / "nowhere"), "--home", str(home))
    assert (code, out, err) == (2, "", [f"lookalike: image root is not a directory: {tmp_path / 'nowhere'}"])
    assert not home.exists()


@pytest.mark.parametrize("command", [["status"], ["sql", "SELECT 1"], ["find", "dog"],
                                     ["similar", str(REPO / "README.md")], ["report", "--out", "OUT"],
                                     ["label", "1", "boats"], ["recluster"]])
def test_commands_other_than_run_never_create_a_catalog(command: list[str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    command = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    for exists in (False, True):  # no home at all; an empty folder
        if exists:
            home.mkdir()
        code, out, err = lookalike(*command, "--home", str(home))
        assert (code, out, err) == (2, "", [f"lookalike: no catalog in {home}: check --home, or create one "
                                            f"with `lookalike run ROOT --home {home}`"])
        assert home.exists() == exists and not list(tmp_path.glob("home/*"))
        assert not (tmp_path / "out").exists()


# -- refused by the catalog's state --------------------------------------------------------

def test_status_on_an_empty_database_changes_nothing(tmp_path: Path) -> None:
    """A server holding no lookalike tables (a new DSN's database): status says so, creates none."""
    cfg = load_config(None, tmp_path / "home")
    with db.connect(cfg, create=True) as conn:  # the embedded server, standing in for a DSN's
        uri = conn.info.dsn
    try:
        code, out, err = lookalike("status", "--home", str(tmp_path / "other"), LOOKALIKE_DSN=uri)
        assert code == 2 and out == "" and len(err) == 1
        assert err[0].startswith("lookalike: no catalog at ") and "`lookalike run ROOT" in err[0]
        with psycopg.connect(uri) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
    finally:
        db._servers.clear()  # our reference: the server stops when this process ends


def test_refused_run_on_a_busy_catalog_leaves_no_row(tmp_path: Path, images: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    cfg = load_config(None, home)
    with db.writer(cfg, create=True) as (conn, _):  # another run, writing
        assert cli.main(["run", str(images), "--home", str(home)]) == 2
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == ("lookalike: another lookalike run is writing to this "
                                                  "catalog; try again when it ends (or pass --wait)")
    assert "Traceback" not in err


# -- faults: one line, the traceback in the log file ---------------------------------------

def test_unexpected_fault_is_one_line_naming_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    (home / "pg").mkdir(parents=True)  # past the checks: the command itself runs

    def bug(cfg: object, args: object) -> int:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "status", bug)  # a bug cannot be had for real
    monkeypatch.delenv("LOOKALIKE_DEBUG", raising=False)
    log = Layout(home).log_file
    assert cli.main(["status", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"lookalike: unexpected error: ZeroDivisionError: division by zero (a bug; "
                                f"the traceback is in {log}: please attach it to a report, or rerun with "
                                "--debug)"]
    assert "Traceback" in log.read_text() and "in bug" in log.read_text()

    monkeypatch.setenv("LOOKALIKE_DEBUG", "1")  # or --debug: the traceback on the terminal too
    assert cli.main(["status", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("lookalike: unexpected error")


def test_debug_shows_an_expected_failures_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    assert cli.main(["run", str(tmp_path / "nowhere"), "--debug", "--home", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("lookalike: image root is not a directory")


# -- Ctrl-C and SIGTERM in the middle of a real run -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_is_one_line_stops_spark_and_is_recorded(sig: signal.Signals,
                                                                 tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for src in photos()[:40]:
        shutil.copyfile(src, images / src.name)
    home = tmp_path / "home"
    env = {**run_env(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    run = CliRun([sys.executable, "-m", "lookalike.cli", "run", str(images), "--home", str(home)], env)
    try:
        # The run's progress, seen from another terminal while its extract runs on Spark.
        deadline = time.monotonic() + 300
        while not (home / "progress.json").exists():
            assert run.proc.poll() is None and time.monotonic() < deadline, run.tail()
            time.sleep(0.2)
        code, out, _ = lookalike("status", "--home", str(home))
        assert code == 0 and "running" in out
        assert re.search(r"extract r000001-0000: \d+/40 files, .* files/s, .* left \(\d+ s ago\)", out), out
        jvms = [p for p in psutil.Process(run.proc.pid).children(recursive=True) if p.name() == "java"]
        assert jvms
        if sig == signal.SIGINT:
            os.killpg(run.proc.pid, sig)  # Ctrl-C reaches the terminal's whole foreground group
        else:
            run.proc.send_signal(sig)  # a scheduler's stop
        assert run.wait(120) == 128 + sig
        _, alive = psutil.wait_procs(jvms, timeout=5)
        assert not alive, "the run's JVM outlived it"
    finally:
        run.kill()
    line = f"lookalike: interrupted by {sig.name}; the next run resumes from manifest r000001-0000"
    assert run.stderr[-1] == line, run.tail()
    stages = ("new catalog:", "scan:", "extract ", "model:", "embed ")
    noise = [s for s in run.stderr if not s.startswith(stages)]
    assert noise == [line], run.tail()
    code, out, _ = lookalike("status", "--home", str(home))
    stop_embedded_server(home)
    assert code == 0 and re.search(r"\n +1 run +interrupted .*\n +interrupted by " + sig.name, out), out
    assert not (home / "progress.json").exists()
