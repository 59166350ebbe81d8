"""Near-duplicate quality on ground truth: the real pipeline against a pHash-only baseline.

    python bench/neardup_quality.py [--bases 100] [--set imagenet|hires|both] [--keep DIR]

Builds ground truth with ../shared/tools/make_neardup_set.py (base photos, 14 variants of each,
distractors; two files are near-duplicates exactly when they share a base), runs `lookalike run`
on it with the default offline model into a fresh catalog, and prints pairwise precision and
recall over image pairs, recall per variant (base image vs variant), and whether any distractor
was grouped with anything. The baseline is what imagededup does: pHash pairs within Hamming 10.
Pairs are counted between distinct images (a byte-identical copy is the same image).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
SETS = {"imagenet": SHARED / "data" / "imagenet-dev", "hires": SHARED / "data" / "photos-hires"}


def build_truth(photos: Path, out: Path, bases: int) -> dict[str, tuple[str, str, str]]:
    if not (out / "truth.csv").exists():
        cmd = [sys.executable, str(SHARED / "tools" / "make_neardup_set.py"), str(photos), str(out)]
        if bases:
            cmd += ["--bases", str(bases)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out / "truth.csv") as f:
        return {str((out / r["path"]).resolve()): (r["base"], r["variant"], r["tier"])
                for r in csv.DictReader(f)}


def catalog(home: Path, root: Path) -> tuple[dict[str, int], set[tuple[int, int]], dict[int, int],
                                               set[tuple[int, int]]]:
    """(path -> image_id, detected pairs, image -> group, pHash-only baseline pairs)."""
    from lookalike import db
    from lookalike.config import load_config
    from lookalike.driver.ingest import run

    cfg = load_config(None, home)
    print(run(cfg, [str(root)]).describe())
    with db.connect(cfg) as conn:
        paths = dict(conn.execute("SELECT path, image_id FROM image_paths").fetchall())
        pairs = {(a, b) for a, b in conn.execute("SELECT image_id, other_id FROM near_duplicates")}
        groups = dict(conn.execute("SELECT image_id, group_id FROM image_dup_group").fetchall())
        baseline = {(a, b) for a, b in conn.execute(
            "SELECT a.image_id, b.image_id FROM image_hashes a "
            "JOIN image_hashes b ON a.image_id < b.image_id "
            "WHERE bit_count((a.phash64 # b.phash64)::bit(64)) <= 10")}
    return paths, pairs, groups, baseline


def score(name: str, truth: dict[str, tuple[str, str, str]], paths: dict[str, int],
          found: set[tuple[int, int]]) -> None:
    image_base: dict[int, str] = {}
    variant_of: dict[int, str] = {}
    for path, (base, variant, _tier) in truth.items():
        if path in paths:
            image_base.setdefault(paths[path], base)
            if variant != "exact":
                variant_of.setdefault(paths[path], variant)
    by_base: dict[str, list[int]] = defaultdict(list)
    for image, base in image_base.items():
        if base:
            by_base[base].append(image)
    true_pairs = {(min(a, b), max(a, b)) for ids in by_base.values() for a in ids for b in ids if a < b}
    hits = found & true_pairs
    precision = len(hits) / len(found) if found else 1.0
    recall = len(hits) / len(true_pairs) if true_pairs else 1.0
    print(f"{name:<22} pairs found {len(found):>6}  true {len(true_pairs):>6}  "
          f"precision {precision:.3f}  recall {recall:.3f}")
    # Per variant: is the base photo paired with its variant (directly)?
    orig = {base: image for image, base in image_base.items() if base and variant_of.get(image) == "orig"}
    per: dict[str, list[bool]] = defaultdict(list)
    tiers = {v: t for _, v, t in truth.values()}
    for image, variant in variant_of.items():
        base = image_base[image]
        if base and variant != "orig" and base in orig:
            a, b = sorted((orig[base], image))
            per[variant].append((a, b) in found)
    ordered = sorted(per.items(), key=lambda kv: (tiers[kv[0]], kv[0]))
    row = "  ".join(f"{v}:{sum(x) / len(x):.2f}" for v, x in ordered)
    print(f"{'':<22} recall per variant  {row}")
    for tier in ("easy", "hard"):
        got = [x for v, xs in per.items() if tiers[v] == tier for x in xs]
        if got:
            print(f"{'':<22} {tier}-tier recall {sum(got) / len(got):.3f} ({len(got)} variants)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", type=int, default=100)
    ap.add_argument("--set", choices=["imagenet", "hires", "both"], default="imagenet")
    ap.add_argument("--keep", type=Path, help="keep the generated sets and catalogs here")
    a = ap.parse_args()
    os.environ.setdefault("LOOKALIKE_SPARK_MASTER", "local[2]")
    work = a.keep or Path(tempfile.mkdtemp(prefix="neardup-quality-"))
    for name in (["imagenet", "hires"] if a.set == "both" else [a.set]):
        root = work / f"set-{name}"
        truth = build_truth(SETS[name], root, a.bases if name == "imagenet" else 0)
        print(f"== {name}: {len(truth)} files from {SETS[name]}")
        paths, found, groups, baseline = catalog(work / f"home-{name}", root)
        score("lookalike", truth, paths, found)
        score("pHash<=10 (imagededup)", truth, paths, baseline)
        distractors = {paths[p] for p, (base, _, _) in truth.items() if not base and p in paths}
        grouped = distractors & set(groups)
        print(f"distractors grouped with anything: {len(grouped)} of {len(distractors)}")


if __name__ == "__main__":
    main()
