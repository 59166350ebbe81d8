"""Every analyst surface timed on one catalog, with its peak memory, against #21's targets.

    python bench/analysts.py --home /data/big [--only status,find] [--skip notebooks]

Build the catalog first (bench/big_catalog.py --home /data/big, 1,000,000 images by default).
Each surface runs in a fresh process: the command-line ones are timed whole (start-up
included, as a user waits for them), the Python ones from inside (a Catalog opened, the call
timed; `similar` by image id warm: its median over 5 calls after a first). Peak memory is the
process's maximum RSS (with its children's: the report's browser-free HTML, a notebook's kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLI = [sys.executable, "-m", "lookalike.cli"]
QUERY_PHOTO = REPO.parent / "shared" / "data" / "imagenet-dev" / "n01440764_tench.JPEG"

# name -> (kind, what, target seconds, target MB)
SURFACES: dict[str, tuple[str, str, float, float]] = {
    "status": ("cli", "status", 2, 1024),
    "similar FILE": ("cli", f"similar {QUERY_PHOTO}", 3, 1024),
    "find dog": ("cli", "find dog", 2, 1024),
    "sql (formats)": ("cli", "sql 'SELECT format, count(*) FROM images GROUP BY 1'", 5, 1024),
    "similar(image_id) warm": ("warm", "cat.similar(IMAGE_ID)", 0.2, 1024),
    "Catalog.images()": ("py", "cat.images()", 5, 1024),
    "Catalog.images(after=...)": ("py", "cat.images(after=LAST_ID - 50_000)", 5, 1024),
    "Catalog.paths()": ("py", "cat.paths()", 5, 1024),
    "Catalog.paths(after=...)": ("py", "cat.paths(after='/archive/week004')", 5, 1024),
    "Catalog.errors()": ("py", "cat.errors()", 5, 1024),
    "Catalog.runs()": ("py", "cat.runs()", 5, 1024),
    "Catalog.near_duplicates()": ("py", "cat.near_duplicates()", 5, 1024),
    "Catalog.groups()": ("py", "cat.groups()", 5, 1024),
    "Catalog.groups(order='wasted')": ("py", "cat.groups(order='wasted')", 5, 1024),
    "Catalog.wasted_bytes()": ("py", "cat.wasted_bytes()", 5, 1024),
    "Catalog.clusters()": ("py", "cat.clusters()", 5, 1024),
    "Catalog.members(cid, limit=24)": ("py", "cat.members(LARGEST, limit=24)", 5, 1024),
    "Catalog.members(limit=24)": ("py", "cat.members(limit=24)", 5, 1024),
    "Catalog.growth()": ("py", "cat.growth()", 5, 1024),
    "Catalog.arrivals()": ("py", "cat.arrivals()", 5, 1024),
    "Catalog.arrivals('day')": ("py", "cat.arrivals('day')", 5, 1024),
    "Catalog.timeline()": ("py", "cat.timeline()", 5, 1024),
    "Catalog.find('dog')": ("py", "cat.find('dog')", 5, 1024),
    "Catalog.embeddings()": ("py", "cat.embeddings()", 5, 1024),
    # whole tables, in bounded memory: no target time (they read everything), the memory one holds
    "stream every image": ("py", "sum(len(f) for f in cat.stream('SELECT * FROM images'))", 600, 1024),
    "export find('animal') .parquet": ("py", "cat.export(cat.find('animal', limit=None), 'animal.parquet')",
                                       600, 1024),
    "report": ("cli", "report --out {tmp}/report", 300, 1024),
    "report index in Chromium": ("browser", "{tmp}/report/index.html", 5, 4096),
    "notebooks": ("notebooks", "", 300, 4096),
}

CHILD = """
import json, resource, sys, time
from lookalike import Catalog
kind, what, home = sys.argv[1:4]
with Catalog(home=home) as cat:
    IMAGE_ID, LAST_ID = (int(x) for x in cat.sql("SELECT min(id) AS i, max(id) AS j FROM images").iloc[0])
    LARGEST = int(cat.clusters(limit=1)["cluster_id"].iloc[0])
    if kind == "warm":
        eval(what)
        times = []
        for _ in range(5):
            t = time.perf_counter(); eval(what); times.append(time.perf_counter() - t)
        took, rows = sorted(times)[2], None
    else:
        t = time.perf_counter(); out = eval(what); took = time.perf_counter() - t
        rows = len(out) if hasattr(out, "__len__") else None
print(json.dumps({"seconds": took, "rows": rows,
                  "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CLI_CHILD = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
took = time.perf_counter() - t
if proc.returncode:
    sys.exit(proc.stderr.strip() or proc.returncode)
print(json.dumps({"seconds": took, "mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stdout": (proc.stdout.strip().splitlines() or [""])[-1]}))
"""

NOTEBOOKS_CHILD = """
import json, os, resource, sys, time
import nbformat
from nbclient import NotebookClient
out, failed = {}, []
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    # Run to the end: a notebook's closing self-check may not hold on a synthetic catalog (its
    # thumbnails are shared, so a resized copy cannot lead back to its original); said below.
    NotebookClient(nb, timeout=1800, kernel_name="python3", allow_errors=True).execute()
    name = os.path.basename(path)
    out[name] = round(time.perf_counter() - t, 1)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    failed += [f"{name}: {e.ename}" for e in errors]
print(json.dumps({"seconds": max(out.values()), "each": {"seconds": out, "errors": failed},
                  "mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER_CHILD = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
subprocess.run([sys.argv[1], "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={sys.argv[2]}", "--dump-dom", sys.argv[3]], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(kind: str, what: str, home: Path, tmp: Path) -> dict:
    if kind == "browser":  # the report's index page: opened, rendered, its DOM dumped
        page = Path(what.format(tmp=tmp))
        browser = next(filter(None, map(shutil.which, BROWSERS)), None)
        if not page.exists() or not browser:
            return {"error": "no report to open" if browser else "no Chromium"}
        proc = subprocess.run([sys.executable, "-c", BROWSER_CHILD, browser, str(tmp / "profile"),
                               page.as_uri()], capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if kind == "cli":
        # Through a wrapper process whose only child is the command: its children's peak RSS is
        # the command's own (this process's would hold every surface measured before).
        command = [*CLI, *shlex.split(what.format(tmp=tmp)), "--home", str(home)]
        args = [sys.executable, "-c", CLI_CHILD, *command]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or [str(proc.returncode)])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])
    env_home = {}
    script = [sys.executable, "-c", CHILD, kind, what, str(home)]
    if kind == "notebooks":
        env_home = {"LOOKALIKE_HOME": str(home)}
        script = [sys.executable, "-c", NOTEBOOKS_CHILD,
                  *map(str, sorted((REPO / "notebooks").glob("*.ipynb")))]
    proc = subprocess.run(script, capture_output=True, text=True, env={**os.environ, **env_home}, cwd=tmp)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_thumbnail_cost(home: Path, tmp: Path, figures: int) -> str:
    """What the report's thumbnails would cost on a real archive. The synthetic catalog's images
    share a pool of real thumbnails, so its report makes few files; a real one makes one per
    figure: time making them from the pool's distinct files, and scale by the figures."""
    import time

    from lookalike import Catalog
    from lookalike.read.report import _Report

    with Catalog(home=home) as cat:
        pool = [r[0] for r in cat.conn.execute("SELECT DISTINCT thumb_path FROM images").fetchall()]
        made = _Report(cat, tmp / "thumbcost")
        started = time.perf_counter()
        for thumb in pool:
            made.thumb_src(thumb)
        made.make_thumbnails()  # as the report does: on every core
        each = (time.perf_counter() - started) / max(1, made.written)
    return (f"the report showed {figures:,} thumbnails; made from distinct files at {each * 1e3:.1f} ms "
            f"each ({made.written} timed), a real archive's report adds {figures * each:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--only", help="comma-separated surface names (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated surface names to leave out")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(SURFACES)
    names = [n for n in names if n not in a.skip.split(",")]
    print(f"{'surface':<30} {'seconds':>9} {'target':>7} {'peak MB':>8} {'target':>7}  rows / note")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            kind, what, target_s, target_mb = SURFACES[name]
            r = measure(kind, what, a.home, Path(tmp))
            if "error" in r:
                print(f"{name:<30} {'failed':>9}  {r['error']}", flush=True)
                continue
            ok = "ok" if r["seconds"] <= target_s and r["mb"] <= target_mb else "OVER"
            note = r.get("rows") if r.get("rows") is not None else r.get("each", "")
            note = r["stdout"] if name == "report" else note
            print(f"{name:<30} {r['seconds']:>9.3f} {target_s:>7g} {r['mb']:>8.0f} {target_mb:>7g}  "
                  f"{ok} {note}", flush=True)
            if name == "report" and (shown := re.search(r"(\d+) thumbnails", r.get("stdout", ""))):
                print("   ", report_thumbnail_cost(a.home, Path(tmp), int(shown.group(1))), flush=True)


if __name__ == "__main__":
    main()
