"""Where a run's fixed time goes, stage by stage, beside a naive script on the same files (#23).

    python bench/overhead.py [CORPUS_DIR] [--small FILE] [--out DIR] [--spark]

CORPUS_DIR defaults to bench/out/corpus24 (24 archive-like files of 10-70 MB, built with
../shared/tools/make_large_corpus.py ../shared/data/photos-hires DIR --count 24). Four runs of
`lookalike run CORPUS_DIR DROP` on one new home, the way a scheduled run meets its batches:

  24 new    the corpus into a fresh catalog (creates it: initdb, the schema)
  rerun     the same roots again, nothing new
  1 small   one new small photo (--small, default: an imagenet-dev photo) in DROP
  1 large   one new ~30 MB file in DROP (a corpus JPEG with bytes appended: new sha256, same decode)

Each run is a child process (`--child`) that times, from outside the code under test, what the
run calls: module imports, the PostgreSQL start, the JVM and Spark session, the scan, the model's
resolution, the ONNX export and driver-side load, each stage (split into the time to the first
task, the tasks' own work and the rest), the commit step's parts, and the shutdown after main()
returns. The workers (Spark's Python workers, or lookalike.driver.local's forked pool for a small
manifest) report their side (first task in each worker, the model load, per-file work) through
the same module, imported by them from bench/. `--spark` runs every manifest on Spark
([spark] local_files = 0), the way runs went before #23.
The naive script reads and fully decodes the run's new files, one after the other, in a fresh
process. ONNX exports come from the user's cache as a real run's would (a cold cache shows the
export in the 24-new row). Seconds of wall time; the machine's load is printed beside them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TRACE_ENV = "LOOKALIKE_OVERHEAD_TRACE"  # the JSON-lines file every process of a run appends to

NAIVE = """
import sys, time
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
for p in sys.argv[1:]:
    with open(p, "rb") as f, Image.open(f) as im:
        im.load()
"""


# -- the probe: in the run's driver (--child) and in its Spark Python workers ---------------------
def _record(**fields: Any) -> None:
    with open(os.environ[TRACE_ENV], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(kind="call", name=name, start=started, end=time.time())
    return wrapper


def _patch(owner: Any, attr: str, name: str) -> None:
    fn = getattr(owner, attr)
    if isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod):
        setattr(owner, attr, classmethod(_timed(name, fn.__func__)))
    else:
        setattr(owner, attr, _timed(name, fn))


def _worker_task(stage: str, body: Callable[..., Iterator[Any]], work: tuple[Any, str],
                 batches: Iterator[Any], **kwargs: Any) -> Iterator[Any]:
    """A mapInPandas body, timed: entry (after the worker started and unpickled the task), the
    per-file work (`work`: the module and function doing one file) and the end."""
    entered = time.time()
    owner, attr = work
    spent = [0.0, 0]
    fn = getattr(owner, attr)
    if not hasattr(fn, "_overhead"):
        def counted(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                counted.spent[0] += time.perf_counter() - t  # type: ignore[attr-defined]
                counted.spent[1] += 1  # type: ignore[attr-defined]
        counted._overhead = True  # type: ignore[attr-defined]
        setattr(owner, attr, counted)
    getattr(owner, attr).spent = spent
    yield from body(batches, **kwargs)
    _record(kind="task", stage=stage, enter=entered, end=time.time(), work=spent[0], files=spent[1],
            worker_started=_process_start())


def extract_task(batches: Iterator[Any], **kwargs: Any) -> Iterator[Any]:
    from lookalike.stages import extract

    yield from _worker_task("extract", extract.extract_batches, (extract, "extract_file"), batches, **kwargs)


def embed_task(batches: Iterator[Any], **kwargs: Any) -> Iterator[Any]:
    from lookalike.stages import embed

    if not hasattr(embed.get_embedder, "__wrapped__"):
        _patch(embed, "get_embedder", "worker model load")
    yield from _worker_task("embed", embed.embed_task_inputs, (embed, "read_thumbnail"), batches, **kwargs)


def local_extract_part(part: Any, settings: Any) -> Any:
    """lookalike.driver.local's extract of one part (in a forked pool worker, or in the driver)."""
    import pandas as pd

    from lookalike.stages import extract

    frames = _worker_task("extract", extract.extract_batches, (extract, "extract_file"), iter([part]),
                          settings=settings)
    return pd.concat(list(frames), ignore_index=True)


def local_embed_batches(batches: Iterator[Any], settings: Any, extract: Any) -> Iterator[Any]:
    """lookalike.driver.local's embed (in the driver)."""
    from lookalike.stages import embed

    if not hasattr(embed.get_embedder, "__wrapped__"):
        _patch(embed, "get_embedder", "worker model load")
    yield from _worker_task("embed", embed.embed_batches, (embed, "read_thumbnail"), batches,
                            settings=settings, extract=extract)


def _process_start() -> float:
    """This process's start, seconds since the epoch (Linux /proc)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def child(argv: list[str]) -> int:
    """`lookalike run` with the driver's steps timed; workers get extract_task/embed_task."""
    t0 = _process_start()
    imports = time.time()
    import overhead  # this file under its module name, so Spark pickles the task bodies by reference

    import lookalike.cli
    import lookalike.driver.ingest as ingest
    import lookalike.driver.spark as spark
    import lookalike.driver.stages as stages
    import lookalike.models.runtime as runtime
    from lookalike import db
    from lookalike.db import runs, vector_index
    from lookalike.dedup.indexes import DedupIndexes

    _record(kind="call", name="interpreter start", start=t0, end=imports)
    _record(kind="call", name="imports", start=imports, end=time.time())
    for owner, attr, name in [
            (db, "embedded_uri", "PostgreSQL start"), (db, "ensure_schema", "schema and writer lock"),
            (spark, "get_spark", "JVM and Spark session"), (ingest.Ingest, "scan", "scan"),
            (runs, "catalog_model", "model resolution"), (runtime, "_export_onnx", "ONNX export"),
            (stages, "ensure_export", "driver: export check and load"),
            (stages.SparkStages, "extract", "extract stage"), (stages.SparkStages, "embed", "embed stage"),
            (DedupIndexes, "open", "indexes open"), (ingest.load, "load_features", "load rows"),
            (ingest, "dedup", "dedup"), (ingest, "assign_new", "clustering"),
            (ingest, "name_new_members", "category names"), (DedupIndexes, "commit", "indexes commit"),
            (vector_index, "ensure_index", "vector index"), (spark, "stop_spark", "Spark stop")]:
        _patch(owner, attr, name)
    stages.extract_batches = overhead.extract_task
    stages.embed_task_inputs = overhead.embed_task
    try:  # lookalike.driver.local came with #23: the bench also times the code before it
        import lookalike.driver.local as local
    except ImportError:
        local = None
    if local is not None:
        local._extract_part = overhead.local_extract_part
        local.embed_batches = overhead.local_embed_batches
    started = time.time()
    try:
        rc = lookalike.cli.main(argv)
    finally:
        _record(kind="call", name="main", start=started, end=time.time())
    return rc


# -- the parent: the scenarios, the table -------------------------------------------------------
def run_child(name: str, roots: list[Path], home: Path, trace_dir: Path,
              spark: bool) -> tuple[float, list[dict[str, Any]]]:
    trace = trace_dir / f"{name.replace(' ', '-')}.jsonl"
    trace.unlink(missing_ok=True)
    env = dict(os.environ, **{TRACE_ENV: str(trace)})
    # lib first (the code under test), then bench/ so that the workers can import this module.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), str(BENCH), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(BENCH / "overhead.py"), "--child", "run", *map(str, roots),
           "--home", str(home)]
    if spark:
        config = trace_dir / "spark.toml"
        config.write_text("[spark]\nlocal_files = 0\n")
        cmd += ["--config", str(config)]
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    ended = time.time()
    if proc.returncode != 0:
        sys.exit(f"{name}: lookalike run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    events.append({"kind": "call", "name": "process", "start": started, "end": ended})
    return ended - started, events


def naive(files: list[Path]) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-c", NAIVE, *map(str, files)], check=True)
    return time.time() - started


def breakdown(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per row of the table, from one run's events. The rows add up to the run's wall
    time, except the files' own work, which is core-seconds (divided by the workers in the sum)."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e["kind"] == "call":
            spans[e["name"]].append((e["start"], e["end"]))

    def took(name: str) -> float:
        return sum(end - start for start, end in spans[name])

    def within(outer: tuple[float, float], names: tuple[str, ...]) -> float:
        return sum(end - start for n in names for start, end in spans[n] if outer[0] <= start <= outer[1])

    process = spans["process"][0]
    rows: dict[str, float] = {"process start (interpreter)": spans["interpreter start"][0][1] - process[0]}
    driver = ("imports", "PostgreSQL start", "schema and writer lock", "JVM and Spark session",
              "model resolution", "ONNX export")
    for name in driver:
        rows[name] = took(name)
    rows["scan"] = sum(end - start - within((start, end), ("JVM and Spark session",))
                       for start, end in spans["scan"])
    rows["driver: ONNX export check, model load"] = (took("driver: export check and load")
                                                     - took("ONNX export"))
    nested = ("JVM and Spark session", "model resolution", "driver: export check and load")
    summed = 0.0  # what the rows' sum is off the wall time by
    for stage in ("extract", "embed"):
        tasks = [e for e in events if e["kind"] == "task" and e["stage"] == stage]
        for span in spans[f"{stage} stage"]:
            wall = span[1] - span[0] - within(span, nested)
            mine = [t for t in tasks if span[0] <= t["enter"] <= span[1]]
            if not mine:
                key = f"{stage}: no task (done already)"
                rows[key] = rows.get(key, 0.0) + wall
                continue
            first, last = min(t["enter"] for t in mine), max(t["end"] for t in mine)
            workers = len({t["pid"] for t in mine})
            work = sum(t["work"] for t in mine)
            load = sum(end - start for start, end in spans["worker model load"] if first <= start <= last)
            parts = {
                f"{stage}: to the first task (Spark job or pool, worker start, imports)":
                    first - span[0] - within((span[0], first), nested),
                f"{stage}: model load (per worker)": load / workers,
                f"{stage}: files' own work (core-seconds)": work,
                f"{stage}: tasks' rest (set-up, batches, Arrow, idle cores)":
                    (last - first) - (work + load) / workers,
                f"{stage}: after the last task (write, job end, read back)": span[1] - last,
            }
            if stage == "extract":
                del parts["extract: model load (per worker)"]
            for k, v in parts.items():
                rows[k] = rows.get(k, 0.0) + v
            summed += work / workers - work  # in the wall time, the files' work counts once per worker
            rows[f"{stage}: files (count)"] = rows.get(f"{stage}: files (count)", 0.0) + sum(
                t["files"] for t in mine)
    for name in ("indexes open", "load rows", "dedup", "clustering", "category names", "indexes commit",
                 "vector index"):
        rows[f"commit: {name}"] = took(name)
    rows["Spark stop"] = took("Spark stop")
    rows["after main() returns (JVM, PostgreSQL stop)"] = process[1] - spans["main"][0][1]
    counted = sum(v for k, v in rows.items() if "(count)" not in k) + summed
    rows["other (the driver between these)"] = (process[1] - process[0]) - counted
    return rows


def make_large(src: Path, dest: Path) -> None:
    """A copy of `src` with 16 bytes after its end: a new sha256, the same decode."""
    with open(src, "rb") as f, open(dest, "wb") as g:
        shutil.copyfileobj(f, g)
        g.write(os.urandom(16))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", type=Path, default=BENCH / "out" / "corpus24")
    ap.add_argument("--small", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-dev"
                    / "n01440764_tench.JPEG")
    ap.add_argument("--out", type=Path, help="keep the homes and traces here (default: a temporary folder)")
    ap.add_argument("--spark", action="store_true", help="every manifest on Spark (local_files = 0)")
    args = ap.parse_args()
    exts = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
    corpus = sorted(p for p in args.corpus.rglob("*") if p.suffix.lower() in exts)
    if not corpus:
        sys.exit(f"no images under {args.corpus}: build it with make_large_corpus.py (see --help)")
    work = Path(tempfile.mkdtemp(prefix="overhead-")) if args.out is None else args.out
    if args.out is not None and work.exists():
        shutil.rmtree(work)
    drop, home = work / "drop", work / "home"
    drop.mkdir(parents=True)
    jpegs = [p for p in corpus if p.suffix.lower() in (".jpg", ".jpeg")]
    large_src = min(jpegs, key=lambda p: abs(p.stat().st_size - 30e6))
    roots = [args.corpus, drop]
    results: dict[str, tuple[float, float, dict[str, float]]] = {}
    for name, new in [("24 new", corpus), ("rerun", []), ("1 small", [drop / args.small.name]),
                      ("1 large", [drop / f"large-{large_src.name}"])]:
        if name == "1 small":
            shutil.copyfile(args.small, new[0])
        elif name == "1 large":
            make_large(large_src, new[0])
        load = os.getloadavg()[0]
        took, events = run_child(name, roots, home, work, args.spark)
        results[name] = (took, naive(new), breakdown(events))
        print(f"{name}: {len(new)} new files, {took:.1f} s (naive {results[name][1]:.1f} s, "
              f"load average {load:.1f})", file=sys.stderr)
    names = list(results)
    keys: list[str] = []
    for _, _, rows in results.values():
        keys += [k for k in rows if k not in keys]
    width = max(map(len, keys)) + 2
    print(f"{'seconds':<{width}}" + "".join(f"{n:>10}" for n in names))
    for k in keys:
        values = [results[n][2].get(k) for n in names]
        if all(v is None or abs(v) < 0.05 for v in values):
            continue
        print(f"{k:<{width}}" + "".join(f"{'':>10}" if v is None else f"{v:>10.1f}" for v in values))
    print(f"{'run, total':<{width}}" + "".join(f"{results[n][0]:>10.1f}" for n in names))
    print(f"{'naive read + decode, total':<{width}}" + "".join(f"{results[n][1]:>10.1f}" for n in names))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
