"""Embedding throughput: torch vs ONNX Runtime, side by side, on real thumbnails.

    .venv/bin/python bench/embed.py [--images 256] [--batch 32] [--threads N] [--models effnet,vit]

Makes 512-px thumbnails of imagenet-dev photos the way the extract stage does (RGB, LANCZOS,
JPEG q90), then for each model and backend runs a fresh child process that decodes and
preprocesses them and times the raw model forward (preprocessed batches in, L2-normalised
vectors out). Each child reports its own peak RSS, so the ONNX figure is what an executor
that never imports torch costs. ViT-B-32 uses the real CLIP weights when they resolve, else a
random-init checkpoint (same speed). ONNX files are exported (and verified) before timing.
Measured figures and the backend="auto" decision they support: lookalike/models.py, _AUTO_BACKEND.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from lookalike import models

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-dev"


def raw_forward_rate(embedder: models.Embedder, batches: list[np.ndarray], repeats: int = 3) -> float:
    """Images/s of the model forward alone on preprocessed batches.

    One untimed warm-up batch first (ORT and torch allocate and tune on the first run); then each
    batch counts with its fastest of ``repeats`` runs, because other processes on shared cores can
    only ever make a run slower.
    """
    embedder.embed_pixels(batches[0])
    best = [float("inf")] * len(batches)
    for _ in range(repeats):
        for i, batch in enumerate(batches):
            started = time.perf_counter()
            embedder.embed_pixels(batch)
            best[i] = min(best[i], time.perf_counter() - started)
    return sum(len(b) for b in batches) / sum(best)


def make_thumbnails(count: int, out: Path, size: int = 512, quality: int = 90) -> list[Path]:
    paths = []
    for src in sorted(DATA.glob("*.JPEG"))[:count]:
        with Image.open(src) as im:
            thumb = im.convert("RGB")
        thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
        dest = out / f"{src.stem}_{size}.jpg"
        thumb.save(dest, "JPEG", quality=quality, optimize=True)
        paths.append(dest)
    return paths


def worker(spec_file: Path, backend: str, thumbs: list[Path], batch: int, threads: int,
           cache_dir: Path) -> dict[str, float | bool | str]:
    """One (model, backend) measurement, run in its own process for a clean peak RSS."""
    spec = pickle.loads(spec_file.read_bytes())
    embedder = models.get_embedder(spec, backend=backend, cache_dir=cache_dir, threads=threads,
                                   batch_size=batch)
    model_rss_mb = _peak_rss_mb()
    started = time.perf_counter()
    images = []
    for p in thumbs:
        with Image.open(p) as im:
            im.load()
            images.append(im)
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    pixels = embedder.preprocess(images)
    preprocess_s = time.perf_counter() - started
    batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
    return {
        "images_per_s": raw_forward_rate(embedder, batches),
        "decode_ms": 1000 * decode_s / len(images),
        "preprocess_ms": 1000 * preprocess_s / len(images),
        "model_rss_mb": model_rss_mb,
        "peak_rss_mb": _peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a child across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vit_spec(tmp: Path) -> tuple[models.ModelSpec, str]:
    try:
        return models.resolve_model(models.CLIP_B32), "CLIP weights"
    except models.WeightsNotFoundError:
        pass
    from lookalike.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch

    ckpt = tmp / "vit-b-32-random.pt"
    torch.manual_seed(0)  # same bytes every run, so the same model_ver and the cached ONNX export is reused
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), ckpt)
    return models.resolve_model(f"open_clip:ViT-B-32:{ckpt}"), "random init: speed only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--models", default="effnet,vit", help="comma list of: effnet, vit")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lookalike-bench-models")
    ap.add_argument("--worker", nargs=3, metavar=("SPEC", "BACKEND", "THUMBS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec_file, backend, thumb_list = args.worker
        thumbs = [Path(p) for p in Path(thumb_list).read_text().splitlines()]
        print(json.dumps(worker(Path(spec_file), backend, thumbs, args.batch, args.threads, args.cache_dir)))
        return

    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp_name:
        tmp = Path(tmp_name)
        thumbs = make_thumbnails(args.images, tmp)
        (tmp / "thumbs.txt").write_text("\n".join(map(str, thumbs)))
        sample = [Image.open(p) for p in thumbs[:8]]
        print(f"{len(thumbs)} thumbnails (<=512 px, JPEG q90) of {DATA}; batch {args.batch}, "
              f"{args.threads} thread(s), {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
        rows = []
        for key in args.models.split(","):
            spec, note = (models.resolve_model(models.EFFNET), "ImageNet weights") if key == "effnet" \
                else vit_spec(tmp)
            models.get_embedder(spec, backend="onnx", cache_dir=args.cache_dir, verify_images=sample)
            spec_file = tmp / f"{key}.spec"
            spec_file.write_bytes(pickle.dumps(spec))
            result = {}
            for backend in ("torch", "onnx"):
                cmd = [sys.executable, __file__, "--batch", str(args.batch), "--threads", str(args.threads),
                       "--cache-dir", str(args.cache_dir), "--worker", str(spec_file), backend,
                       str(tmp / "thumbs.txt")]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                result[backend] = json.loads(out.strip().splitlines()[-1])
            rows.append((spec.name, note, result))

    print(f"\n{'model':<24}{'torch img/s':>12}{'onnx img/s':>11}{'onnx/torch':>11}{'decode ms':>10}"
          f"{'prep ms':>8}{'RSS model torch/onnx':>22}{'RSS peak torch/onnx':>21}  onnx imported torch")
    for name, note, r in rows:
        t, o = r["torch"], r["onnx"]
        ratio = o["images_per_s"] / t["images_per_s"]
        print(f"{name:<24}{t['images_per_s']:>12.1f}{o['images_per_s']:>11.1f}{ratio:>10.2f}x"
              f"{o['decode_ms']:>10.2f}{o['preprocess_ms']:>8.2f}"
              f"{t['model_rss_mb']:>13.0f} /{o['model_rss_mb']:>5.0f} MB{t['peak_rss_mb']:>12.0f} /"
              f"{o['peak_rss_mb']:>5.0f} MB  {o['torch_imported']}  ({note})")
    print("img/s: raw forward on preprocessed batches (each batch's best of 3 runs). decode / prep: ms per "
          "image for the thumbnail JPEG decode and the model's reference transform (numpy/PIL). RSS model: "
          f"the child's peak once the model is loaded; RSS peak: with all {args.images} images decoded and "
          "preprocessed in memory.")


if __name__ == "__main__":
    main()
