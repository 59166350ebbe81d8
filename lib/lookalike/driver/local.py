"""Small manifests on a local master, without Spark: the same stage functions, in this process
and a pool of forked workers.

Spark's start is the fixed cost of a run: on 2 cores the JVM and session take ~6-11 s and the
first job ~5-13 s more (Python workers starting and importing), against ~0.3-1 core-second of
work per archive file (bench/overhead.py). A manifest of a few files never earns that back, and
a scheduled run on a new batch is often one. Forked workers start in milliseconds with the
driver's modules already imported. Larger manifests, and any master that is not local, go
through Spark: its tasks balance and spread them, and the live progress is Spark's.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import re
import shutil
import signal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lookalike.stages import schemas
from lookalike.stages.embed import EmbedSettings, embed_batches
from lookalike.stages.extract import ExtractSettings, extract_batches


def local_cores(master: str) -> int | None:
    """The cores of a local master ("local", "local[4]", "local[*]", "local[4,2]"); None for any other."""
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if m is None:
        return None
    if m.group(1) is None:
        return 1
    return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))


def _worker_signals() -> None:
    """A forked worker leaves Ctrl-C to the driver, and ends quietly on SIGTERM (it inherited the
    driver's handler, which turns SIGTERM into a KeyboardInterrupt and its traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _workers() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server preloaded with the extract stage (started once a run)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lookalike.driver.local"])
    return context


def start_workers_early() -> None:
    """Start the workers' forkserver now, in the background: its start and preloaded imports
    (~0.5 s of a core) then overlap the driver's PostgreSQL start (initdb, for a new catalog)
    and scan instead of delaying the first extract. A run whose manifests all go to Spark pays
    that half second on a core it would not have used meanwhile."""
    _workers()
    multiprocessing.forkserver.ensure_running()


def _extract_part(part: pd.DataFrame, settings: ExtractSettings) -> pd.DataFrame:
    return pd.concat(list(extract_batches(iter([part]), settings)), ignore_index=True)


def extract(manifest: Path, settings: ExtractSettings, out: Path, workers: int) -> None:
    """The features of a manifest's files into `out` (a stage folder, complete with _SUCCESS)."""
    rows = pq.read_table(manifest).to_pandas()
    workers = max(1, min(workers, len(rows)))
    # Largest files first, dealt round-robin: the parts hold about equal bytes.
    order = rows["bytes"].sort_values(ascending=False, kind="stable").index
    parts = [rows.loc[order[i::workers]] for i in range(workers)]
    _clear(out)  # like Spark's job: the folder exists while it runs
    if workers == 1:
        frames = [_extract_part(parts[0], settings)]
    else:
        # Workers forked from a fresh forkserver, not from the driver: a fork of the driver after it
        # ran OpenMP code (LibRaw's demosaic, torch) deadlocks in the child's first parallel region.
        # On an error, a Ctrl-C or a SIGTERM (the driver's KeyboardInterrupt) the context manager
        # ends them with SIGTERM.
        with _workers().Pool(workers, initializer=_worker_signals) as pool:
            frames = pool.starmap(_extract_part, [(p, settings) for p in parts])
            pool.close()
            pool.join()
    table = pa.Table.from_pandas(pd.concat(frames, ignore_index=True), schema=schemas.FEATURES,
                                 preserve_index=False)
    _write(table.sort_by("path"), out)


def embed(rows: pa.Table, settings: EmbedSettings, extract: ExtractSettings, out: Path) -> None:
    """Embeddings of `rows` (sha256, thumb, path) into `out`, in this process: the model runs on
    every core (settings.threads) and is loaded once per process."""
    _clear(out)
    batches = (b.to_pandas() for b in rows.select(["sha256", "thumb", "path"]).to_batches(64))
    frames = list(embed_batches(batches, settings, extract))
    table = pa.Table.from_pandas(pd.concat(frames, ignore_index=True) if frames else
                                 pd.DataFrame(columns=schemas.EMBEDDINGS.names),
                                 schema=schemas.EMBEDDINGS, preserve_index=False)
    _write(table, out)


def _clear(out: Path) -> None:
    """An empty stage folder: nothing of a killed attempt (Spark's or this one's) is read as output."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)


def _write(table: pa.Table, out: Path) -> None:
    """One part file, then _SUCCESS: the same complete stage folder as Spark's."""
    pq.write_table(table, out / "part-00000.parquet")
    (out / "_SUCCESS").touch()
