"""Hostile inputs: every file is catalogued correctly or gets exactly one clear error row.

The corpus (tests/hostile.py) holds empty, truncated, random and sparse 2.5 GB files, a
decompression bomb, odd encodings, a 50 MB PNG, names nobody should use, symbolic-link loops
and links out of the root, and a FIFO. The fast tests run scan and extract in-process; the
slow ones run the real CLI and read the catalog.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    SPARSE_BYTES,
    Expect,
    age_atime,
    bomb_png,
    build_hostile_corpus,
    make_big_png,
    outside_of,
    photos,
    share_models,
)

from lookalike import cli, db
from lookalike.config import Config, load_config
from lookalike.driver.ingest import Ingest
from lookalike.stages.extract import READ_CHUNK, ExtractSettings, extract_batches, extract_file
from lookalike.stages.scan import ScanSettings, plan, rows_to_table, walk

MASK = 2**64 - 1
SUMMARY = re.compile(r"run (\d+): (\d+) files in \d+ manifests?, (\d+) new images, (\d+) exact copies, "
                     r"(\d+) errors")
HASHES = ("phash", "dhash", "ahash")


@dataclass
class Corpus:
    root: Path
    expect: dict[str, Expect]
    outside_atimes: dict[Path, int]

    @property
    def good(self) -> set[str]:
        return {p for p, e in self.expect.items() if e.error is None}

    @property
    def bad(self) -> set[str]:
        return set(self.expect) - self.good


@dataclass
class FirstRun:
    corpus: Corpus
    cfg: Config
    argv: list[str]  # `lookalike` arguments that ran it
    proc: subprocess.CompletedProcess[str]


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & MASK).count("1")


def rchar() -> int:
    """Bytes this process has read through read() so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def query(cfg: Config, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with db.connect(cfg) as conn:
        return conn.execute(sql, params).fetchall()


def summary(out: str) -> tuple[int, ...]:
    """(run_id, files, new images, exact copies, errors) from a run's last line."""
    m = SUMMARY.search(out)
    assert m, out
    return tuple(map(int, m.groups()))


def atime_is_tracked(folder: Path) -> bool:
    """Whether this file system moves atime on a read (relatime does once atime < mtime)."""
    canary = folder / "canary"
    canary.write_bytes(b"x")
    age_atime(canary)
    before = canary.stat().st_atime_ns
    canary.read_bytes()
    return canary.stat().st_atime_ns != before


@pytest.fixture(autouse=True)
def _embedded_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_DSN", raising=False)


@pytest.fixture(scope="session")
def big_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_big_png(tmp_path_factory.mktemp("big") / "big.png")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, big_png: Path) -> Corpus:
    root = tmp_path_factory.mktemp("hostile") / "archive"
    expect = build_hostile_corpus(root, big_png)
    outside = outside_of(root)
    atimes = {p: p.stat().st_atime_ns for p in (outside / "secret.jpg", outside / "album",
                                                 outside / "album" / "private.jpg")}
    return Corpus(root, expect, atimes)


@pytest.fixture(scope="module")
def direct(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """extract_file on each good file alone, and on each reference photo: the ground truth."""
    settings = ExtractSettings(str(tmp_path_factory.mktemp("direct-thumbs")))
    paths = corpus.good | {str(e.like) for e in corpus.expect.values() if e.like}
    return {p: extract_file(p, settings) for p in sorted(paths)}


def check_good(path: str, want: Expect, got: dict[str, Any], direct: dict[str, dict[str, Any]]) -> None:
    assert got["error"] is None, (path, got["message"])
    assert (got["format"], got["width"], got["height"]) == (want.format, *want.size), path
    # Exactly what extracting the file alone gives: batching must not alter a single bit.
    assert [int(got[h]) for h in HASHES] == [direct[path][h] for h in HASHES], path
    # And it looks like the photo it was made from (right colours, orientation, first frame).
    assert hamming(int(got["phash"]), direct[str(want.like)]["phash"]) <= 10, path


def check_bad(path: str, want: Expect, code: str, message: str) -> None:
    assert code == want.error, (path, code, message)
    assert message and "\n" not in message and len(message) <= 300, (path, message)


def assert_outside_untouched(corpus: Corpus) -> None:
    if atime_is_tracked(corpus.root.parent):
        for p, atime in corpus.outside_atimes.items():
            assert p.stat().st_atime_ns == atime, f"{p} was read"


# -- in-process: scan + extract ------------------------------------------------------------

def test_scan_and_extract_classify_every_hostile_file(corpus: Corpus, direct: dict[str, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    settings = ScanSettings.create([str(corpus.root)], load_config()["scan"]["extensions"])
    subtrees, rows = plan(settings, 2)
    for sub in subtrees:
        rows.extend(walk(sub, settings))
    manifest = rows_to_table(rows).to_pandas()
    # One batch mixing good and bad rows, as a Spark task gets them.
    (features,) = extract_batches(iter([manifest]), ExtractSettings(str(tmp_path / "thumbs")))
    assert sorted(features["path"]) == sorted(corpus.expect)
    for row in features.to_dict("records"):
        want = corpus.expect[row["path"]]
        if want.error:
            check_bad(row["path"], want, row["error"], row["message"])
        else:
            check_good(row["path"], want, row, direct)
    assert_outside_untouched(corpus)


@pytest.mark.parametrize(("header", "code"), [(b"", "not_an_image"), (bomb_png(), "too_large")])
def test_huge_file_is_refused_from_its_header_without_being_read(header: bytes, code: str,
                                                                 tmp_path: Path) -> None:
    p = tmp_path / "huge.jpg"
    p.write_bytes(header)
    os.truncate(p, SPARSE_BYTES)  # the rest is a hole: 2.5 GB of zeros that take no disk
    before, started = rchar(), time.monotonic()
    tracemalloc.start()
    try:
        row = extract_file(str(p), ExtractSettings(str(tmp_path / "thumbs")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert row["error"] == code, row["message"]
    assert rchar() - before < 16 << 20
    assert peak < 16 << 20
    assert time.monotonic() - started < 10


def test_file_over_the_read_limit_is_streamed_not_held(big_png: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    size = big_png.stat().st_size
    assert size > 6 * READ_CHUNK

    def traced(settings: ExtractSettings) -> tuple[dict[str, Any], int]:
        tracemalloc.start()
        try:
            return extract_file(str(big_png), settings), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    held, held_peak = traced(ExtractSettings(str(tmp_path / "a")))
    streamed, streamed_peak = traced(ExtractSettings(str(tmp_path / "b"), max_read_bytes=4 << 20))
    # A file that grows after fstat (still being written) must not be held either.
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result(
        (*real_fstat(fd)[:6], 1000, *real_fstat(fd)[7:])))
    grown, grown_peak = traced(ExtractSettings(str(tmp_path / "c"), max_read_bytes=4 << 20))
    keys = ("sha256", "format", "width", "height", *HASHES)
    assert [held[k] for k in keys] == [streamed[k] for k in keys] == [grown[k] for k in keys]
    assert held_peak > size  # the measure sees file bytes held in memory ...
    assert streamed_peak < 3 * READ_CHUNK  # ... and streaming holds two chunks at most
    assert grown_peak < 3 * READ_CHUNK


# -- end to end: the real CLI, the embedded catalog --------------------------------------------

@pytest.fixture(scope="module")
def first_run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    home = tmp_path_factory.mktemp("hostile-home")
    share_models(home, tmp_path_factory.getbasetemp() / "models")
    conf = home / "test.toml"
    # split_dirs = 2: the driver lists the root, Spark tasks walk the subfolders (both code paths).
    conf.write_text('[scan]\nsplit_dirs = 2\n\n'
                    '[spark]\nmaster = "local[2]"\n')
    argv = ["run", str(corpus.root), "--home", str(home), "--config", str(conf)]
    env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_DSN"}
    proc = subprocess.run([str(Path(sys.executable).parent / "lookalike"), *argv], capture_output=True,
                          text=True, env=env, timeout=600)
    return FirstRun(corpus, load_config(conf, home), argv, proc)


@pytest.mark.slow
def test_cli_run_catalogues_or_records_every_file(first_run: FirstRun,
                                                  direct: dict[str, dict[str, Any]]) -> None:
    corpus, cfg, proc = first_run.corpus, first_run.cfg, first_run.proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    _, files, new, copies, errors = summary(proc.stdout)
    assert (files, errors, new + copies) == (len(corpus.expect), len(corpus.bad), len(corpus.good))

    rows = query(cfg, "SELECT path, error, message FROM ingest_errors")
    recorded = {path: (code, message) for path, code, message in rows}
    assert set(recorded) == corpus.bad
    for path, (code, message) in recorded.items():
        check_bad(path, corpus.expect[path], code, message)

    catalogued = query(cfg, "SELECT p.path, i.file_sha256, i.format, i.width, i.height, h.phash64, "
                            "h.dhash64, h.ahash64, i.thumb_path FROM image_paths p "
                            "JOIN images i ON i.id = p.image_id JOIN image_hashes h ON h.image_id = i.id")
    assert {r[0] for r in catalogued} == corpus.good
    assert new == len({r[1] for r in catalogued})
    for path, sha, fmt, width, height, phash, dhash, ahash, thumb in catalogued:
        row = {"error": None, "format": fmt, "width": width, "height": height, "phash": phash, "dhash": dhash,
               "ahash": ahash}
        check_good(path, corpus.expect[path], row, direct)
        assert sha == direct[path]["sha256"]
        assert (cfg.home / "thumbs" / thumb).is_file()
    # SQL in a file name is only ever data.
    injected = str(corpus.root / "x'); DROP TABLE images; --.jpg")
    assert query(cfg, "SELECT count(*) FROM image_paths WHERE path = %s", injected) == [(1,)]

    # Nothing behind the links out of the root was read or catalogued.
    assert_outside_untouched(corpus)  # before this test reads them below
    outside = outside_of(corpus.root)
    secrets = [hashlib.sha256(p.read_bytes()).hexdigest() for p in outside.rglob("*.jpg")]
    assert query(cfg, "SELECT count(*) FROM images WHERE file_sha256 = ANY(%s)", secrets) == [(0,)]
    assert query(cfg, "SELECT count(*) FROM (SELECT path FROM image_paths UNION ALL SELECT path FROM "
                      "ingest_errors) t WHERE starts_with(path, %s)", str(outside)) == [(0,)]


@pytest.mark.slow
def test_bad_files_are_not_retried_unless_asked(first_run: FirstRun,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    corpus, cfg = first_run.corpus, first_run.cfg
    assert first_run.proc.returncode == 0
    images_before = query(cfg, "SELECT count(*) FROM images")

    def under_root() -> dict[str, tuple[str, int]]:
        rows = query(cfg, "SELECT path, error, run_id FROM ingest_errors WHERE starts_with(path, %s)",
                     f"{corpus.root}/")
        return {path: (code, run_id) for path, code, run_id in rows}

    before = under_root()
    assert cli.main(first_run.argv) == 0
    assert summary(capsys.readouterr().out)[1:] == (0, 0, 0, 0)

    assert cli.main([*first_run.argv, "--retry-errors"]) == 0
    run_id, files, new, copies, errors = summary(capsys.readouterr().out)
    assert (files, new, copies, errors) == (len(corpus.bad), 0, 0, len(corpus.bad))
    after = under_root()
    assert {p: code for p, (code, _) in after.items()} == {p: code for p, (code, _) in before.items()}
    assert {r for _, r in after.values()} == {run_id}  # each one retried, still one row each
    assert query(cfg, "SELECT count(*) FROM images") == images_before


@pytest.mark.slow
def test_file_deleted_between_scan_and_extract(first_run: FirstRun, tmp_path: Path) -> None:
    cfg = first_run.cfg
    root = tmp_path / "arrivals"
    root.mkdir()
    keep, victim = root / "keep.jpg", root / "victim.jpg"
    shutil.copyfile(photos()[-1], keep)
    shutil.copyfile(photos()[-2], victim)
    # The stages run() drives, one by one, with the deletion in between.
    with db.connect(cfg) as conn:
        vector_type = db.ensure_schema(conn)
        run_id = conn.execute("INSERT INTO runs (kind, roots) VALUES ('run', %s) RETURNING run_id",
                              ([str(root)],)).fetchone()[0]
        runner = Ingest(cfg, conn, vector_type)
        (manifest,) = runner.scan([str(root)], run_id, retry_errors=False)
        victim.unlink()
        counts = runner.process(manifest, run_id)
        conn.execute("UPDATE runs SET status = 'ok', finished_at = now() WHERE run_id = %s", (run_id,))
    assert (counts.files, counts.new_images, counts.errors) == (2, 1, 1)
    assert query(cfg, "SELECT error, message FROM ingest_errors WHERE path = %s", str(victim)) == [
        ("vanished", "file disappeared after the scan")]
    assert query(cfg, "SELECT count(*) FROM image_paths WHERE path = %s", str(keep)) == [(1,)]


@pytest.mark.slow
def test_embedded_catalog_listens_on_a_unix_socket_only(first_run: FirstRun) -> None:
    with db.connect(first_run.cfg) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.info.host.startswith("/")  # this very connection came through a socket file
