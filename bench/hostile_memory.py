"""Peak memory and bytes read of a fresh worker extracting hostile large files.

    python bench/hostile_memory.py [--out DIR]

Files (built in DIR, default bench/out/hostile; the sparse ones take no disk):
  big.png      a real photo upscaled with noise: ~50 MB that deflate cannot shrink
  zeros.jpg    2.5 GiB of zeros, as a failed copy leaves behind (not an image)
  jpeghead.jpg a real JPEG's first 64 KB, then a 2.5 GiB hole (claims to be a JPEG)

Each is extracted by extract_file in a fresh Python process, as a Spark worker would, with
the configured extract.max_read_bytes (files up to it are held in memory once, larger ones
streamed in chunks) and, for the PNG, again with a 4 MB limit to force streaming. Printed per
case: the outcome, seconds, MB read through read() (/proc/self/io rchar), the worker's peak
RSS (VmHWM) and how far the extract took it above the RSS after `import lookalike.stages.extract`.
The zero tail of jpeghead.jpg decodes as grey (libjpeg reads zeros as valid data), so it is
catalogued: the case is here for the memory of a 2.5 GiB streamed read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lookalike.config import load_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import hostile  # noqa: E402  (the tests' corpus generator)

# Peak RSS is VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork.
WORKER = """
import json, sys, tempfile, time
from lookalike.stages.extract import ExtractSettings, extract_file

def proc(name, key):
    with open(f"/proc/self/{name}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

path, limit = sys.argv[1], int(sys.argv[2])
out = {"outcome": "import only", "seconds": 0.0, "read_mb": 0.0}
base = proc("status", "VmRSS:") / 1024
if path:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the peak below is the extract's
    with tempfile.TemporaryDirectory() as thumbs:
        before, started = proc("io", "rchar:"), time.perf_counter()
        row = extract_file(path, ExtractSettings(thumbs, max_read_bytes=limit))
        out = {"seconds": time.perf_counter() - started, "read_mb": (proc("io", "rchar:") - before) / 1e6,
               "outcome": row["error"] or f"{row['format']} {row['width']}x{row['height']}"}
out["peak_mb"] = proc("status", "VmHWM:") / 1024
out["above_mb"] = out["peak_mb"] - base
print(json.dumps(out))
"""


def worker(path: Path | None, limit: int) -> dict[str, object]:
    """One fresh interpreter extracting `path` (or only importing, for the baseline)."""
    proc = subprocess.run([sys.executable, "-c", WORKER, str(path or ""), str(limit)], check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout)


def build(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"big.png": out / "big.png", "zeros.jpg": out / "zeros.jpg", "jpeghead.jpg": out / "jpeghead.jpg"}
    if not files["big.png"].exists():
        print(f"building {files['big.png']} ...", file=sys.stderr)
        hostile.make_big_png(files["big.png"])
    hostile.make_sparse(files["zeros.jpg"])
    files["jpeghead.jpg"].write_bytes(hostile.photos()[0].read_bytes()[:64 << 10])
    os.truncate(files["jpeghead.jpg"], hostile.SPARSE_BYTES)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "hostile")
    a = ap.parse_args()
    files = build(a.out)
    limit = load_config()["extract"]["max_read_bytes"]
    cases = [("(baseline)", None, limit),
             ("big.png", files["big.png"], limit),
             ("big.png", files["big.png"], 4 << 20),
             ("zeros.jpg", files["zeros.jpg"], limit),
             ("jpeghead.jpg", files["jpeghead.jpg"], limit)]
    print(f"{'file':<13} {'size MB':>8} {'max_read MB':>11} {'outcome':<16} {'s':>6} {'read MB':>8} "
          f"{'peak RSS MB':>11} {'above import':>12}")
    for name, path, cap in cases:
        r = worker(path, cap)
        size = path.stat().st_size / 1e6 if path else 0.0
        print(f"{name:<13} {size:>8.0f} {cap / 2**20:>11.0f} {r['outcome']:<16} {r['seconds']:>6.2f} "
              f"{r['read_mb']:>8.1f} {r['peak_mb']:>11.0f} {r['above_mb']:>12.0f}")


if __name__ == "__main__":
    main()
