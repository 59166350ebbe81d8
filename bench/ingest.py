"""Extract-stage speed and memory on archive-like files (10-50 MB), side by side in one run.

    python bench/ingest.py [CORPUS_DIR] [--rounds 2] [--spark] [--formats-mb 25] [--formats-only]
                           [--store-only]

CORPUS_DIR defaults to bench/out/corpus40, built with
../shared/tools/make_large_corpus.py ../shared/data/photos-hires DIR --count 40.

Per image, on one core, each way in turn on the same files (rounds alternate the order):
  extract  lookalike's extract_file: one read, sha256, reduced-scale decode, hashes, thumbnail
  naive    read for sha256, open and read again, full decode, resize, the same hashes/thumbnail
  floor    read + sha256 + reduced-scale decode alone (no hashes, no thumbnail)
Also: bytes read through read() per corpus byte for extract (from /proc/self/io rchar), peak
RSS of a fresh worker process extracting the largest files, and with --spark the Spark
stage's throughput over the whole corpus in local mode.

Then camera RAW and HEIC (#24): one real photo scaled so that its 16-bit Bayer mosaic is
--formats-mb MB (a camera's RAW), written as a DNG with a full-size preview JPEG, a DNG without
a preview, a HEIC and a JPEG (q95) of the same pixels (tests/make_test_raw.py; kept under
bench/out/formats-<MB>mb). extract_file on each, best of --rounds: seconds per file (wall and
process CPU, all threads) through the preview, the half-size demosaic and the decoders, side by
side with the JPEG. --formats-only skips the corpus.

And the content-addressed store (#20): extract_file on each corpus file catalogued in place,
filed into a store by hardlink and by copy (a fresh store on the corpus's filesystem each time, so
every file is really written), and the floor of a copy: writing the same bytes once to a new file
with fsync. Seconds per file, interleaved, alternating the order. --store-only runs only this.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from lookalike.stages.extract import ExtractSettings, _to_rgb, decode_thumbnail, extract_file
from lookalike.stages.hashing import dihedral_phashes, image_hashes
from lookalike.store import StoreSettings

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
sys.path.insert(0, str(HERE.parent / "tests"))  # make_test_raw: DNG and HEIC from real photos
EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def corpus_files(root: Path) -> list[Path]:
    if not root.exists():
        print(f"building the corpus in {root} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_large_corpus.py"),
                        str(SHARED / "data" / "photos-hires"), str(root), "--count", "40"], check=True)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTS)


def naive(path: Path, settings: ExtractSettings) -> None:
    """What a first script does: hash the file, then open it again and decode it whole."""
    with open(path, "rb") as f:
        hashlib.sha256(f.read()).hexdigest()
    with Image.open(path) as im:
        im = _to_rgb(ImageOps.exif_transpose(im))
    scale = settings.thumb_size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.LANCZOS)
    image_hashes(im)
    dihedral_phashes(im)
    im.save(io.BytesIO(), "JPEG", quality=settings.thumb_quality)


def floor(path: Path, settings: ExtractSettings) -> None:
    """The least any correct extract must do: read once, sha256, reduced-scale decode."""
    data = path.read_bytes()
    hashlib.sha256(data).hexdigest()
    decode_thumbnail(data, settings, path.suffix)


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def time_ways(files: list[Path], rounds: int) -> dict[str, float]:
    ways = {"extract": None, "naive": naive, "floor": floor}
    seconds: dict = dict.fromkeys(ways, 0.0)
    by_format: dict[tuple[str, str], list[float]] = {}
    read = 0
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for path in files:
            for way in order:
                with tempfile.TemporaryDirectory() as thumbs:
                    settings = ExtractSettings(thumbs)
                    before = rchar()
                    started = time.perf_counter()
                    if way == "extract":
                        row = extract_file(str(path), settings)
                        assert row["error"] is None, row
                    else:
                        ways[way](path, settings)
                    took = time.perf_counter() - started
                    seconds[way] += took
                    by_format.setdefault((path.suffix.lower(), way), []).append(took)
                    if way == "extract":
                        read += rchar() - before
    seconds["extract_rchar"] = read
    seconds["by_format"] = by_format
    return seconds


def worker_peak_rss(files: list[Path]) -> float:
    """Peak RSS (MB) of a fresh process extracting the given files, as a Spark worker would."""
    # VmHWM is the process's own peak; ru_maxrss would include the parent's, inherited at fork.
    code = (
        "import sys, tempfile\n"
        "from lookalike.stages.extract import ExtractSettings, extract_file\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    for p in sys.argv[1:]:\n"
        "        assert extract_file(p, ExtractSettings(d))['error'] is None\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip())


def spark_stage(root: Path) -> tuple[int, float]:
    """Files and seconds of a real run (local[2]: scan, extract, load), the JVM already started."""
    from lookalike.config import load_config
    from lookalike.driver.ingest import run
    from lookalike.driver.spark import get_spark

    os.environ["LOOKALIKE_SPARK_MASTER"] = "local[2]"
    with tempfile.TemporaryDirectory() as home:
        cfg = load_config(None, home)
        get_spark(cfg).range(1).count()
        started = time.perf_counter()
        summary = run(cfg, [str(root)])
        return summary.counts.files, time.perf_counter() - started


def format_files(megabytes: float) -> dict[str, Path]:
    """The same photo as a DNG with and without its preview, a HEIC and a JPEG; built once."""
    from make_test_raw import photo_for_mb, write_dng, write_heif

    out = HERE / "out" / f"formats-{megabytes:g}mb"
    files = {"jpeg q95": out / "photo.jpg", "dng + preview": out / "preview.dng",
             "dng, no preview": out / "mosaic.dng", "heic q80": out / "photo.heic"}
    if not all(p.exists() for p in files.values()):
        print(f"building the RAW/HEIC files in {out} ...", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        src = photo_for_mb(megabytes)
        src.save(files["jpeg q95"], "JPEG", quality=95)
        write_dng(files["dng + preview"], src)
        write_dng(files["dng, no preview"], src, preview=None)
        write_heif(files["heic q80"], src)
    return files


def time_formats(files: dict[str, Path], rounds: int) -> dict[str, tuple[str, float, float]]:
    """(decode path, best wall s, best CPU s) of extract_file per file, the page cache warm."""
    best: dict[str, tuple[str, float, float]] = {}
    for name, path in files.items():
        path.read_bytes()
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as thumbs:
                wall, cpu = time.perf_counter(), time.process_time()
                row = extract_file(str(path), ExtractSettings(thumbs))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert row["error"] is None, row
            _, w, c = best.get(name, ("", float("inf"), float("inf")))
            best[name] = (row["decode_path"], min(w, wall), min(c, cpu))
    return best


def formats_report(megabytes: float, rounds: int) -> None:
    files = format_files(megabytes)
    with Image.open(files["jpeg q95"]) as im:
        size = f"{im.width}x{im.height}"
    t = time_formats(files, rounds)
    print(f"RAW and HEIC: one photo, {size} ({megabytes:g} MB as a 16-bit mosaic), extract_file, "
          f"best of {rounds}")
    print(f"  {'file':<16} {'MB':>6} {'path':>9} {'s/file':>7} {'cpu s':>6} {'vs jpeg':>8}")
    ref = t["jpeg q95"][1]
    for name, path in files.items():
        how, wall, cpu = t[name]
        print(f"  {name:<16} {path.stat().st_size / 1e6:>6.1f} {how:>9} {wall:>7.3f} {cpu:>6.3f} "
              f"{wall / ref:>7.2f}x")


def write_once(path: Path, folder: Path) -> float:
    """The floor of a copy into the store: seconds to write the bytes (already in memory) once,
    fsynced."""
    data = path.read_bytes()
    started = time.perf_counter()
    with open(folder / "copy", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return time.perf_counter() - started


def time_store(files: list[Path], rounds: int) -> dict[str, float]:
    ways = ["in place", "hardlink", "copy", "write once"]
    seconds = dict.fromkeys(ways, 0.0)
    near = files[0].parent  # the store on the corpus's filesystem, as hardlink needs
    for r in range(rounds):
        order = ways if r % 2 == 0 else list(reversed(ways))
        for path in files:
            for way in order:
                with tempfile.TemporaryDirectory(dir=near) as tmp:
                    if way == "write once":
                        seconds[way] += write_once(path, Path(tmp))
                        continue
                    store = StoreSettings(str(Path(tmp) / "store"), way) if way != "in place" else None
                    if store is not None:
                        (Path(store.root) / ".partial").mkdir(parents=True)
                    settings = ExtractSettings(str(Path(tmp) / "thumbs"), store=store)
                    started = time.perf_counter()
                    row = extract_file(str(path), settings)
                    seconds[way] += time.perf_counter() - started
                    assert row["error"] is None, row
                    assert row["store_action"] == {"in place": None, "hardlink": "link",
                                                   "copy": "copy"}[way], row
    return seconds


def store_report(files: list[Path], rounds: int) -> None:
    n = len(files) * rounds
    s = time_store(files, rounds)
    print(f"store (#20): {len(files)} files x {rounds} rounds, s/file")
    for way, took in s.items():
        print(f"  {way:<10} {took / n:>7.3f}")
    print(f"hardlink vs in place: {(s['hardlink'] / s['in place'] - 1) * 100:+.1f}%  (target <= +3%)")
    extra = s["copy"] - s["in place"]
    print(f"copy's extra time over in place: {extra / n:.3f} s/file, {extra / s['write once']:.2f}x the "
          "time of writing the bytes once  (target <= 1.0x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", type=Path, default=HERE / "out" / "corpus40")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spark", action="store_true", help="also time the Spark stage end to end")
    ap.add_argument("--formats-mb", type=float, default=25.0,
                    help="RAW/HEIC section: the photo's size as a 16-bit mosaic, MB (0: skip)")
    ap.add_argument("--formats-only", action="store_true", help="only the RAW/HEIC section")
    ap.add_argument("--store-only", action="store_true", help="only the store section")
    a = ap.parse_args()
    if a.store_only:
        store_report(corpus_files(a.corpus), a.rounds)
        return
    if not a.formats_only:
        corpus_report(a)
        store_report(corpus_files(a.corpus), a.rounds)
    if a.formats_mb > 0:
        formats_report(a.formats_mb, a.rounds)


def corpus_report(a: argparse.Namespace) -> None:
    files = corpus_files(a.corpus)
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    print(f"corpus: {len(files)} files, {total / 1e6:.0f} MB "
          f"({min(sizes) / 1e6:.0f}-{max(sizes) / 1e6:.0f} MB each)")
    for p in files:  # warm the page cache so every way reads from memory alike
        p.read_bytes()
    s = time_ways(files, a.rounds)
    n, mb = len(files) * a.rounds, total * a.rounds / 1e6
    print(f"{'way':<8} {'images/s/core':>14} {'MB/s/core':>10} {'s/image':>8}")
    for way in ("extract", "naive", "floor"):
        print(f"{way:<8} {n / s[way]:>14.2f} {mb / s[way]:>10.1f} {s[way] / n:>8.3f}")
    print(f"extract vs naive: {s['naive'] / s['extract']:.2f}x faster   (target >= 1.6x)")
    for ext in sorted({e for e, _ in s["by_format"]}):
        runs = {w: s["by_format"][(ext, w)] for w in ("extract", "naive", "floor")}
        t = {w: sum(v) / len(v) for w, v in runs.items()}
        print(f"  {ext:<6} s/image: extract {t['extract']:.3f}  naive {t['naive']:.3f}  "
              f"floor {t['floor']:.3f}  naive/extract {t['naive'] / t['extract']:.2f}x "
              f"({len(runs['extract'])} files)")
    print(f"extract vs floor: {s['extract'] / s['floor']:.2f}x the floor's time per image  (target <= 1.25x)")
    print(f"bytes read per corpus byte (extract): {s['extract_rchar'] / (total * a.rounds):.3f}  "
          "(target <= 1.05)")
    largest = sorted(files, key=lambda p: p.stat().st_size)[-4:]
    rss = worker_peak_rss(largest)
    print(f"peak worker RSS on the 4 largest files (up to {max(sizes) / 1e6:.0f} MB): {rss:.0f} MB"
          "  (target <= 1500)")
    if a.spark:
        count, took = spark_stage(a.corpus)
        print(f"spark run (local[2], scan+extract+load): {count} files in {took:.1f} s = "
              f"{count / took / 2:.2f} images/s/core, {total / 1e6 / took / 2:.1f} MB/s/core")


if __name__ == "__main__":
    main()
