"""Embedding throughput in one run: the embed stage vs the raw model forward, ONNX Runtime vs torch,
and the stage with its top-5 labels vs without (issue #19: within 5%).

    .venv/bin/python bench/embed.py [--images 2000] [--large 20000] [--model effnet|vit] [--torch-images 128]
                                    [--work DIR]

All figures come from the same thumbnails, made once at the start:
1. Thumbnails: the imagenet-dev photos and mirrored, flipped and rotated copies of them (distinct
   real images), turned into 512-px thumbnails by the extract stage's own code (extract_file).
2. The embed stage as a pipeline run does it (driver.stages.SparkStages.embed on Spark local[2]: workers
   read and decode the thumbnails, embed them, the Parquet output is written and read back).
   Once cold: fresh Python workers that import the libraries and load the model. Then twice
   warm: the same workers with their loaded model, as for every manifest after a run's first
   (the steady state). Then once at a production manifest's size (--large rows, by default
   scan.manifest_files: the same thumbnails used several times over under distinct sha256 keys),
   where the stage's fixed costs (~0.3 s: planning, the last task's tail, the commit) weigh
   less. The ONNX export, once per model version, happens before and is timed apart.
   CPU seconds of the JVM and the Python workers, and each worker's peak RSS (VmHWM).
3. The raw model forward on the same images: decoded and preprocessed by the stage's own code
   into the batches the stage feeds the model (--batch), then only the forward is timed, with the
   same backend and the same 2 cores: as two processes of 1 thread (how the stage runs it) and
   as one process of 2 threads. Best of 2 passes, as the stage's two warm runs. The --large rows
   are these same batches several times over; their reference is one pass of the raw forward over
   as many images, right after: one long run against one long run (the best of two short passes
   against one long run would favour the raw forward on a shared machine, whose speed drifts).
4. torch vs ONNX Runtime: the raw forward of each with 2 threads, and the RSS of a process once
   its model is loaded (an ONNX executor never imports torch).
5. Labels: every stage run above is made twice, with the labels (the classifier head's output, or a
   CLIP model's zero-shot scores; softmax and top-5 in numpy; two more columns through Spark and
   Parquet) and without (EmbedSettings.labels=False: the head's output not fetched, null labels),
   side by side in A-B-B-A order so that a drifting machine favours neither. The raw forward is
   timed with and without labels too (Embedder.embed_labelled vs embed_pixels).
The machine may be shared: every figure is printed with the 1-minute load average beside it,
and the stage/raw ratio is also given from CPU time per image, which other processes on the
cores do not inflate: the ratio of rates on idle cores if the stage kept them busy throughout.
About 6 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from lookalike.config import DEFAULTS_FILE, load_config
from lookalike.layout import Layout
from lookalike.models import preprocess, registry, runtime
from lookalike.stages import embed
from lookalike.stages.extract import ExtractSettings, extract_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-dev"
DEFAULTS = tomllib.loads(DEFAULTS_FILE.read_text())
DEFAULT_BATCH = DEFAULTS["embed"]["batch_size"]
MANIFEST_FILES = DEFAULTS["scan"]["manifest_files"]  # a full manifest: what a large archive's run embeds
CORES = 2  # Spark local[2]; the raw forward gets the same 2 cores
VARIANTS = {"": None, "mirror": ImageOps.mirror, "flip": ImageOps.flip,
            "rot180": lambda im: im.rotate(180)}


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


# --------------------------------------------------------------------------- thumbnails


def make_thumbnails(count: int, work: Path, home: Path) -> pa.Table:
    """`count` distinct real photos made into thumbnails by extract_file: rows (sha256, thumb, path)."""
    originals = work / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    photos = sorted(DATA.glob("*.JPEG"))
    if count > len(photos) * len(VARIANTS):
        raise SystemExit(f"--images: at most {len(photos) * len(VARIANTS)} ({len(photos)} photos, "
                         f"{len(VARIANTS)} versions of each)")
    sources = []
    for name, transform in VARIANTS.items():
        for photo in photos:
            if len(sources) == count:
                break
            dest = originals / (f"{photo.stem}_{name}.jpg" if name else photo.name)
            if not dest.exists():
                if transform is None:
                    shutil.copy(photo, dest)
                else:
                    with Image.open(photo) as im:
                        transform(im.convert("RGB")).save(dest, "JPEG", quality=95)
            sources.append(dest)
    settings = ExtractSettings(str(home / "thumbs"))
    rows = [extract_file(str(p), settings) for p in sources]
    bad = [r["path"] for r in rows if r["error"] is not None]
    if bad:
        raise SystemExit(f"extract failed on {bad[:3]}")
    table = pa.table({k: [r[k] for r in rows] for k in ("sha256", "thumb", "path")})
    if len(set(table["sha256"].to_pylist())) != count:
        raise SystemExit("the thumbnails are not distinct images")
    return table


# --------------------------------------------------------------------------- processes


def _proc(pid: int) -> dict[str, Any] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    hwm = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
               0.0)
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return {"ppid": int(stat[1]), "cmd": cmd, "cpu": cpu, "hwm_mb": hwm}


def spark_processes() -> dict[str, dict[int, dict[str, Any]]]:
    """This process's Spark JVM and the Python workers it forked (via pyspark.daemon)."""
    procs = {int(p.name): info for p in Path("/proc").iterdir()
             if p.name.isdigit() and (info := _proc(int(p.name))) is not None}
    mine = {os.getpid()}
    for _ in range(4):  # bench -> JVM -> daemon -> workers
        mine |= {pid for pid, info in procs.items() if info["ppid"] in mine}
    out: dict[str, dict[int, dict[str, Any]]] = {"jvm": {}, "workers": {}}
    for pid in mine - {os.getpid()}:
        info = procs[pid]
        if "java" in info["cmd"].split(" ", 1)[0]:
            out["jvm"][pid] = info
        elif "pyspark.daemon" in info["cmd"] and "pyspark.daemon" in procs[info["ppid"]]["cmd"]:
            out["workers"][pid] = info  # a forked worker, not the daemon itself
    return out


def cpu_delta(before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]) -> float:
    return sum(info["cpu"] - before.get(pid, {"cpu": 0.0})["cpu"] for pid, info in after.items())


# --------------------------------------------------------------------------- the stage


def run_stage(runner: Any, rows: pa.Table, spec: registry.ModelSpec, name: str,
              labels: bool = True) -> dict[str, Any]:
    runner.labels = labels
    before, self_before = spark_processes(), resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    out = runner.embed(name, rows, spec)
    seconds = time.perf_counter() - started
    after, self_after = spark_processes(), resource.getrusage(resource.RUSAGE_SELF)
    errors = out.filter(pc.invert(pc.is_null(out["error"]))).num_rows
    if out.num_rows != rows.num_rows or errors:
        raise SystemExit(f"stage {name}: {out.num_rows} rows and {errors} errors, "
                         f"expected {rows.num_rows} vectors")
    unlabelled = out["labels"].null_count
    if unlabelled != (0 if labels else rows.num_rows):
        raise SystemExit(f"stage {name} (labels {labels}): {unlabelled} of {rows.num_rows} rows unlabelled")
    driver = (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
    return {"seconds": seconds, "rate": rows.num_rows / seconds, "load": load(),
            "cpu_jvm": cpu_delta(before["jvm"], after["jvm"]),
            "cpu_workers": cpu_delta(before["workers"], after["workers"]), "cpu_driver": driver,
            "workers": after["workers"]}


def reused(rows: pa.Table, count: int) -> pa.Table:
    """`count` rows cycling through `rows`' thumbnails, each repeat under a distinct sha256 key."""
    index = np.arange(count) % rows.num_rows
    shas = [sha if i < rows.num_rows else hashlib.sha256(f"{sha}:{i // rows.num_rows}".encode()).hexdigest()
            for i, sha in enumerate(rows["sha256"].take(pa.array(index)).to_pylist())]
    return rows.take(pa.array(index)).set_column(0, "sha256", pa.array(shas, pa.string()))


# --------------------------------------------------------------------------- raw forward (child processes)


def child(spec_file: Path, rows_file: Path, backend: str, threads: int, shard: int, shards: int,
          limit: int, batch: int, cache_dir: Path, passes: int, repeat: int, labels: bool) -> None:
    """Decode and preprocess with the stage's code, then time the forward alone, pass by pass.

    A pass runs the batches `repeat` times over. Before each pass it prints 'ready' and waits for a
    line on stdin, so that the parent can start concurrent children together. Prints one JSON line
    at the end.
    """
    spec = pickle.loads(spec_file.read_bytes())
    rows = pickle.loads(rows_file.read_bytes())[:limit]
    started = time.perf_counter()
    embedder = runtime.get_embedder(spec, backend=backend, cache_dir=cache_dir, threads=threads,
                                   batch_size=batch)
    load_s, model_rss = time.perf_counter() - started, _hwm_mb()
    extract = ExtractSettings(str(cache_dir.parent / "thumbs"))
    mine = [start for i, start in enumerate(range(0, len(rows), batch)) if i % shards == shard]
    write = preprocess.pixel_writer(spec.preprocess)
    pixels = np.empty((sum(len(rows[s : s + batch]) for s in mine), 3, *spec.preprocess.size), np.float32)
    batches: list[np.ndarray] = []
    for _ in range(2):  # the first round warms caches (resize matrices per crop size, fresh memory)
        batches, decode_s, prep_s, n = [], 0.0, 0.0, 0
        for start in mine:
            first = n
            for sha, thumb, path in rows[start : start + batch]:
                t0 = time.thread_time()  # CPU time: other processes on the cores do not count
                image = embed.read_thumbnail(sha, thumb, path, extract)
                t1 = time.thread_time()
                write(image, pixels[n])
                decode_s, prep_s, n = decode_s + t1 - t0, prep_s + time.thread_time() - t1, n + 1
            batches.append(pixels[first:n])
    forward = embedder.embed_labelled if labels else embedder.embed_pixels
    forward(batches[0])  # untimed: ORT and torch allocate and tune on the first run
    spans = []
    for _ in range(passes):
        print("ready", flush=True)
        sys.stdin.readline()
        t0, c0 = time.time(), time.process_time()
        for _ in range(repeat):
            for b in batches:
                forward(b)
        spans.append((t0, time.time(), time.process_time() - c0))
    print(json.dumps({"images": n * repeat, "spans": spans, "load_s": load_s,
                      "decode_ms": 1000 * decode_s / n,
                      "preprocess_ms": 1000 * prep_s / n, "model_rss_mb": model_rss, "peak_rss_mb": _hwm_mb(),
                      "torch_imported": "torch" in sys.modules, "load": load()}), flush=True)


def _hwm_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a child across exec.
    info = _proc(os.getpid())
    return info["hwm_mb"] if info else float("nan")


def raw_forward(args: argparse.Namespace, backend: str, threads: int, processes: int, limit: int,
                passes: int = 2, repeat: int = 1, labels: bool = False) -> dict[str, Any]:
    """`processes` concurrent children of `threads` threads share the batches, each pass `repeat`
    times over; the best pass counts. labels: embed_labelled (vectors and top-5) in place of embed_pixels."""
    cmd = [sys.executable, __file__, "--batch", str(args.batch), "--cache-dir", str(args.cache_dir),
           "--child", str(args.spec_file), str(args.rows_file), backend, str(threads), "", str(processes),
           str(limit), str(passes), str(repeat), str(int(labels))]
    kids = []
    for shard in range(processes):
        cmd[cmd.index("--child") + 5] = str(shard)
        kids.append(subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for _ in range(passes):
        for kid in kids:  # all ready, then all go: the passes of concurrent children overlap
            if kid.stdout.readline().strip() != "ready":
                raise SystemExit(f"raw forward child failed: {' '.join(cmd)}")
        for kid in kids:
            kid.stdin.write("go\n")
            kid.stdin.flush()
    results = []
    for kid in kids:
        out, _ = kid.communicate()
        if kid.returncode:
            raise SystemExit(f"raw forward child failed ({kid.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    images = sum(r["images"] for r in results)
    walls = [max(r["spans"][p][1] for r in results) - min(r["spans"][p][0] for r in results)
             for p in range(passes)]
    best = int(np.argmin(walls))
    return {"rate": images / walls[best], "cpu_ms": 1000 * sum(r["spans"][best][2] for r in results) / images,
            "images": images, "load": max(r["load"] for r in results), **{k: results[0][k] for k in (
                "load_s", "decode_ms", "preprocess_ms", "model_rss_mb", "peak_rss_mb", "torch_imported")}}


# --------------------------------------------------------------------------- main


def vit_spec(tmp: Path) -> tuple[registry.ModelSpec, str]:
    try:
        return registry.resolve_model(registry.CLIP_B32), "CLIP weights"
    except registry.WeightsNotFoundError:
        pass
    from lookalike.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch

    ckpt = tmp / "vit-b-32-random.pt"
    torch.manual_seed(0)  # same bytes every run, so the same model_ver and the cached ONNX export is reused
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), ckpt)
    return registry.resolve_model(f"open_clip:ViT-B-32:{ckpt}"), "random init: speed only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="distinct thumbnails (at most 4 x 500)")
    ap.add_argument("--model", choices=("effnet", "vit"), default="effnet")
    ap.add_argument("--large", type=int, default=MANIFEST_FILES,
                    help="rows of the manifest-sized stage run (the thumbnails reused; 0: skip it)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                    help=f"embed.batch_size (default: conf/lookalike.toml's, {DEFAULT_BATCH})")
    ap.add_argument("--torch-images", type=int, default=128, help="images for the (slow) torch forward")
    ap.add_argument("--work", type=Path, help="keep originals and thumbnails here (default: a temp dir)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lookalike-bench-models",
                    help="ONNX exports, kept between runs")
    ap.add_argument("--child", nargs=10, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec_file, rows_file, backend, threads, shard, shards, limit, passes, repeat, labels = args.child
        child(Path(spec_file), Path(rows_file), backend, int(threads), int(shard), int(shards), int(limit),
              args.batch, args.cache_dir, int(passes), int(repeat), labels == "1")
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="lookalike-bench-embed-"))
    try:
        bench(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path) -> None:
    from lookalike.driver.stages import SparkStages

    class Stages(SparkStages):
        labels = True  # run_stage's switch: False runs the stage without labels (head skipped)

        def _embed_settings(self, spec: registry.ModelSpec) -> embed.EmbedSettings:
            settings = super()._embed_settings(spec)
            return dataclasses.replace(settings, labels=settings.labels and self.labels)

    home = work / "home"
    shutil.rmtree(Layout(home).all_stages, ignore_errors=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(args.cache_dir, target_is_directory=True)
    args.cache_dir = home / "models"  # children find the thumbnails beside it

    started = time.perf_counter()
    rows = make_thumbnails(args.images, work, home)
    print(f"{rows.num_rows} thumbnails of {DATA} photos and their mirrored/flipped/rotated copies, made by "
          f"extract_file in {time.perf_counter() - started:.0f} s; {os.cpu_count()} cores, {load()}",
          flush=True)

    spec, note = (registry.resolve_model(registry.EFFNET), "ImageNet weights") if args.model == "effnet" \
        else vit_spec(work)
    config = work / "bench.toml"
    config.write_text(f'[embed]\nbackend = "onnx"\nbatch_size = {args.batch}\n')
    os.environ["LOOKALIKE_SPARK_MASTER"] = f"local[{CORES}]"
    runner = Stages(load_config(config, home), Layout(home))  # the embed stage needs no catalog
    started = time.perf_counter()
    exported = not runtime.onnx_path(spec, args.cache_dir).exists()
    if not runner._embed_settings(spec).labels:  # the driver's one-time ONNX export (verified on these
        raise SystemExit(f"{spec.model_ver} gives no labels")  # thumbnails) and zero-shot text vectors
    export_s = time.perf_counter() - started
    args.spec_file, args.rows_file = work / "spec.pickle", work / "rows.pickle"
    args.spec_file.write_bytes(pickle.dumps(spec))
    args.rows_file.write_bytes(pickle.dumps(list(zip(*(rows[c].to_pylist() for c in rows.column_names),
                                                     strict=True))))
    started = time.perf_counter()
    runner.spark  # noqa: B018 - the session starts here, not inside the first timed stage
    spark_s = time.perf_counter() - started

    export = f"{export_s:.1f} s" if exported else "cached"
    print(f"model {spec.model_ver} ({note}), backend onnx, batch {args.batch}; Spark local[{CORES}] "
          f"started in {spark_s:.1f} s; one-time ONNX export: {export}", flush=True)
    n = rows.num_rows
    cold = run_stage(runner, rows, spec, "cold")
    # With and without labels in A-B-B-A order: a machine whose speed drifts favours neither.
    warm = [run_stage(runner, rows, spec, "warm-1")]
    plain = [run_stage(runner, rows, spec, "plain-1", labels=False)]
    raw21 = raw_forward(args, "onnx", 1, CORES, n)
    raw21_labels = raw_forward(args, "onnx", 1, CORES, n, labels=True)
    raw12 = raw_forward(args, "onnx", CORES, 1, n)
    plain.append(run_stage(runner, rows, spec, "plain-2", labels=False))
    warm.append(run_stage(runner, rows, spec, "warm-2"))
    steady = max(warm, key=lambda s: s["rate"])
    steady_plain = max(plain, key=lambda s: s["rate"])
    large = run_stage(runner, reused(rows, args.large), spec, "large") if args.large else None
    large_plain = run_stage(runner, reused(rows, args.large), spec, "large-plain", labels=False) \
        if args.large else None
    # The manifest-sized run is one long run: its reference is the raw forward as one pass of as
    # many images (the same batches over and over), run next to it, not the best of the short passes.
    repeat = max(1, round(args.large / n))
    raw21_large = raw_forward(args, "onnx", 1, CORES, n, passes=1, repeat=repeat) if large else None
    raw12_large = raw_forward(args, "onnx", CORES, 1, n, passes=1, repeat=repeat) if large else None
    torch_raw = raw_forward(args, "torch", CORES, 1, min(args.torch_images, n), passes=1)

    raw_best = max(raw21["rate"], raw12["rate"])
    print(f"\n{'':<52}{'img/s':>8}{'s':>7}{'vs raw':>8}   machine")
    for label, r, secs in (
        ("embed stage, cold (worker start + model load)", cold, cold["seconds"]),
        ("embed stage, steady state (best of 2 warm runs)", steady, steady["seconds"]),
        ("embed stage, steady state, no labels", steady_plain, steady_plain["seconds"]),
        *([(f"embed stage, {args.large} rows (each thumbnail {args.large / n:g}x)", large,
            large["seconds"]),
           (f"embed stage, {args.large} rows, no labels", large_plain, large_plain["seconds"])]
          if large else []),
        (f"raw forward, {CORES} processes x 1 thread", raw21, None),
        (f"raw forward, {CORES} processes x 1 thread, with labels", raw21_labels, None),
        (f"raw forward, 1 process x {CORES} threads", raw12, None),
    ):
        print(f"{label:<54}{r['rate']:>8.1f}{secs or n / r['rate']:>7.1f}"
              f"{r['rate'] / raw_best:>7.2f}x   {r['load']}")
    if large:
        raw_large_best = max(raw21_large["rate"], raw12_large["rate"])
        print(f"against one pass of the raw forward over {raw21_large['images']} images, run after it:")
        for label, r, images in ((f"embed stage, {args.large} rows", large, args.large),
                                 (f"raw forward, {CORES} processes x 1 thread, one pass", raw21_large,
                                  raw21_large["images"]),
                                 (f"raw forward, 1 process x {CORES} threads, one pass", raw12_large,
                                  raw12_large["images"])):
            print(f"{label:<54}{r['rate']:>8.1f}{images / r['rate']:>7.1f}"
                  f"{r['rate'] / raw_large_best:>7.2f}x   {r['load']}")
    print("warm runs: " + ", ".join(f"{w['rate']:.1f} img/s ({w['load']})" for w in warm) + "; CPU s cold / "
          f"steady: JVM {cold['cpu_jvm']:.1f} / {steady['cpu_jvm']:.1f}, Python workers "
          f"{cold['cpu_workers']:.1f} / {steady['cpu_workers']:.1f} (cold: worker start and imports, model "
          "load, the JVM's JIT and code generation)")

    # CPU time is what a shared machine cannot take away: on idle cores, where the stage and the
    # raw forward both keep every core busy, the ratio of their rates is the ratio of CPU per image.
    decode, prep = raw21["decode_ms"], raw21["preprocess_ms"]
    ratios = []
    for label, run, rows_n, r21, r12 in (
            ("steady stage", steady, n, raw21, raw12),
            *([(f"{args.large}-row stage", large, args.large, raw21_large, raw12_large)] if large else [])):
        cpu = {k: 1000 * run[k] / rows_n for k in ("cpu_workers", "cpu_jvm", "cpu_driver")}
        stage_cpu = sum(cpu.values())
        rest = cpu["cpu_workers"] - r21["cpu_ms"] - decode - prep
        print(f"CPU ms per image, {label} {stage_cpu:.2f} = Python workers {cpu['cpu_workers']:.2f} "
              f"(model forward ~{r21['cpu_ms']:.2f}, thumbnail decode ~{decode:.2f}, preprocessing "
              f"~{prep:.2f}, rest ~{rest:.2f}) + Spark JVM {cpu['cpu_jvm']:.2f} + driver "
              f"{cpu['cpu_driver']:.2f}; its raw forward {r21['cpu_ms']:.2f} ({CORES}x1) / "
              f"{r12['cpu_ms']:.2f} (1x{CORES})")
        ratios += [(f"images/s, {label} ({rows_n} rows) / faster raw forward",
                    run["rate"] / max(r21["rate"], r12["rate"])),
                   (f"CPU per image, raw forward / {label} (the idle-machine ratio)",
                    min(r21["cpu_ms"], r12["cpu_ms"]) / stage_cpu)]
    for label, value in ratios:
        print(f"{label}: {value:.2f}x, target 0.8x {'MET' if value >= 0.8 else 'NOT met'}")

    print("\nlabels (top-5 beside every vector) vs none, the same run, A-B-B-A order; target: within 5%:")
    label_rows = [("steady stage", steady, steady_plain, n),
                  *([(f"{args.large}-row stage", large, large_plain, args.large)] if large else [])]
    for label, with_, without, rows_n in label_rows:
        cpu = {k: sum(run[c] for c in ("cpu_workers", "cpu_jvm", "cpu_driver")) * 1000 / rows_n
               for k, run in (("with", with_), ("without", without))}
        speed = with_["rate"] / without["rate"]
        cpu_ratio = cpu["with"] / cpu["without"]
        print(f"  {label}: {with_['rate']:.1f} vs {without['rate']:.1f} img/s = {speed:.3f}x "
              f"(target >= 0.95x: "
              f"{'MET' if speed >= 0.95 else 'NOT met'}); CPU ms per image {cpu['with']:.2f} vs "
              f"{cpu['without']:.2f} = {cpu_ratio:.3f}x (the idle-machine ratio; target <= 1.05x: "
              f"{'MET' if cpu_ratio <= 1.05 else 'NOT met'})")
    print("  warm runs with labels: " + ", ".join(f"{w['rate']:.1f}" for w in warm) + " img/s; without: "
          + ", ".join(f"{w['rate']:.1f}" for w in plain) + " img/s")
    print(f"  raw forward {CORES}x1: {raw21_labels['rate']:.1f} img/s with labels (embed_labelled) vs "
          f"{raw21['rate']:.1f} without = {raw21_labels['rate'] / raw21['rate']:.3f}x; CPU ms per image "
          f"{raw21_labels['cpu_ms']:.2f} vs {raw21['cpu_ms']:.2f} = "
          f"{raw21_labels['cpu_ms'] / raw21['cpu_ms']:.3f}x")

    workers = cold["workers"] | steady["workers"]
    reuse = ("the same processes in every run: one model load per worker"
             if set(cold["workers"]) == set(steady["workers"]) else "NOT the same processes in every run")
    peaks = ", ".join(f"{w['hwm_mb']:.0f}" for w in steady["workers"].values())
    print(f"Python workers: {len(workers)} ({reuse}); peak RSS (VmHWM) per worker: {peaks} MB; model "
          f"load in a fresh process {raw21['load_s']:.2f} s (torch imported: {raw21['torch_imported']})")

    print(f"\ntorch vs ONNX Runtime, raw forward, 1 process x {CORES} threads (torch on the first "
          f"{torch_raw['images']} images, one pass):")
    print(f"  torch {torch_raw['rate']:.1f} img/s ({torch_raw['load']}), onnx {raw12['rate']:.1f} img/s "
          f"({raw12['load']}): onnx {raw12['rate'] / torch_raw['rate']:.1f}x; CPU ms per image torch "
          f"{torch_raw['cpu_ms']:.1f}, onnx {raw12['cpu_ms']:.1f} "
          f"({torch_raw['cpu_ms'] / raw12['cpu_ms']:.1f}x)")
    print(f"  RSS once the model is loaded: torch {torch_raw['model_rss_mb']:.0f} MB, onnx "
          f"{raw12['model_rss_mb']:.0f} MB (the ONNX process imported torch: {raw12['torch_imported']})")

if __name__ == "__main__":
    main()
