"""Label and category-name quality on imagenet-dev with the real EfficientNet-Lite0 (issue #19).

Runs the reference torch model once over ../shared/data/imagenet-dev (500 photos, one per class, from
the original JPEGs; the embed stage feeds 512-px thumbnails), cached under /tmp/lookalike-bench, and prints:

1. the class-index check: top-1 accuracy against sorted wnids (the shipped order; ~0.001 if it were wrong);
2. per-image top-1 accuracy of the label's coarse category (categories.csv);
3. category names: share of images under a right-level name, i.e. a name that is their own class or an
   ancestor no higher than their categories.csv coarse category (only the coarse categories that are
   WordNet nodes; 'mixed' counts as wrong). Groups: (a) the TRUE coarse categories, standing in for
   clusters, (b) plain k-means (k=30) over the embeddings, swept over min_share, votes from top-1
   labels and from full probabilities; (c) lookalike's own clustering (lookalike.cluster.space's
   embeddings joined with labels, then cluster.algorithm), at several label weights and seeds, at
   finer k (more, purer categories), and as runs that join categories, with and without refits;
4. `find WORD` precision / recall / F1 for each coarse category whose name is a WordNet node;
5. the classifier head's cost: torch CPU forward, batch 32, features only vs features + head (+ softmax).

Ancestry for judging (3) and (4) is WordNet's, all hypernym paths (read from /usr/share/wordnet,
package wordnet-base), so the shipped one-chain-per-class tree is judged against the full graph.

find's relevant set: images whose categories.csv category is the word or nested under it in WordNet
(dog images are relevant to 'mammal', clothing to 'covering'): categories.csv is a partition that
carves dogs out of mammals, while `find mammal` is meant to find dogs. The strict reading (only images
labelled exactly the word) is printed beside it.

Usage: PYTHONPATH=lib python bench/category_quality.py [--threads 2] [--seeds 3]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.cluster import KMeans

from lookalike.cluster import space
from lookalike.cluster.algorithm import (
    ClusterConfig,
    assign,
    assign_incremental,
    fit_clusters,
    should_refit,
)
from lookalike.labels import hierarchy as hi
from lookalike.labels.classifier import classifier_head, features_and_logits, logits_from_features
from lookalike.models.registry import resolve_model
from lookalike.models.runtime import get_embedder, load_torch_model
from lookalike.vectors import l2_normalize

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagenet-dev"
CACHE = Path("/tmp/lookalike-bench")
WORDNET = Path("/usr/share/wordnet")
SHARES = (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)


def model_outputs(paths: list[Path], threads: int) -> tuple[np.ndarray, np.ndarray]:
    spec = resolve_model("effnet-lite0")
    key = hashlib.sha1(("\n".join(map(str, paths)) + spec.model_ver).encode()).hexdigest()[:12]
    cache = CACHE / f"labels-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["features"], z["logits"]
    t = time.perf_counter()
    feats, logits = features_and_logits(spec, [Image.open(p).convert("RGB") for p in paths], threads=threads)
    print(f"ran {spec.model_ver} on {len(paths)} images in {time.perf_counter() - t:.0f} s (torch)")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=feats, logits=logits)
    return feats, logits


def wordnet_graph() -> tuple[dict[str, set[str]], dict[str, tuple[str, ...]], str]:
    """(node -> all ancestors incl. itself, lemma -> nodes, source) from WordNet when installed."""
    h = hi.load()
    data = WORDNET / "data.noun"
    if data.is_file():
        script = REPO / "scripts" / "build_label_hierarchy.py"
        spec = importlib.util.spec_from_file_location("build_label_hierarchy", script)
        assert spec and spec.loader
        build = importlib.util.module_from_spec(spec)
        sys.modules["build_label_hierarchy"] = build  # dataclasses look their module up there
        spec.loader.exec_module(build)
        nouns = build.read_nouns(data)
        memo: dict[str, set[str]] = {}

        def up(off: str) -> set[str]:
            if off not in memo:
                memo[off] = {off}.union(*(up(p) for p in nouns[off].hypernyms))
            return memo[off]

        ups = {f"n{o}": {f"n{a}" for a in up(o)} for o in nouns}
        lemmas: dict[str, list[str]] = defaultdict(list)
        for o, syn in nouns.items():
            for lemma in syn.lemmas:
                lemmas[hi.normalise(lemma)].append(f"n{o}")
        return ups, {k: tuple(v) for k, v in lemmas.items()}, "WordNet 3.0, all hypernym paths"
    ups = {}
    for chain in h.chains:
        for i, node in enumerate(chain):
            ups.setdefault(node, set(chain[i:]))
    return ups, h.lemma_index, "the shipped chains (wordnet-base not installed)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="k-means seeds")
    ap.add_argument("--k", type=int, default=30)
    args = ap.parse_args()
    h = hi.load()
    rows = list(csv.DictReader((DATA / "categories.csv").open()))
    paths = [DATA / r["file"] for r in rows]
    coarse = [r["category"] for r in rows]
    truth = np.array([h.wnids.index(r["file"].split("_")[0]) for r in rows])
    feats, logits = model_outputs(paths, args.threads)
    probs = hi.softmax(logits)
    top_idx, top_p = hi.top_k(probs, 5)
    pred = top_idx[:, 0]
    ups, lemma_nodes, graph_src = wordnet_graph()

    # coarse categories that are WordNet nodes: all senses of the word that are ancestors of a member
    cats = sorted(set(coarse))
    senses = {c: tuple(n for n in lemma_nodes.get(hi.normalise(c), ())
                       if any(n in ups[h.wnids[t]] for t, cc in zip(truth, coarse, strict=True) if cc == c))
              for c in cats}
    wn_cats = [c for c in cats if senses[c]]

    print(f"== imagenet-dev: {len(rows)} images, {len(cats)} coarse categories ({len(wn_cats)} are WordNet "
          f"nodes); judged on {graph_src}")
    print(f"class order: top-1 accuracy {np.mean(pred == truth):.3f} against sorted wnids "
          f"(top-5 {np.mean((top_idx == truth[:, None]).any(axis=1)):.3f})")

    # ---- 2. per-image coarse accuracy: a predicted class's coarse category is its categories.csv one when
    # it is a dev class, else the most specific coarse category above it (categories.csv's own priority).
    csv_of = {int(t): c for t, c in zip(truth, coarse, strict=True)}

    def coarse_of(cls: int) -> str:
        if cls in csv_of:
            return csv_of[cls]
        above = [(len(ups[n]), c) for c in wn_cats for n in senses[c] if n in ups[h.wnids[cls]]]
        return max(above)[1] if above else "other"

    ok = np.array([coarse_of(int(p)) == c for p, c in zip(pred, coarse, strict=True)])
    print(f"per-image top-1 coarse accuracy: {ok.mean():.3f} ({ok.sum()}/{len(ok)}); "
          f"fine top-1 {np.mean(pred == truth):.3f}")

    # ---- 3. category names
    def right_level(node: str | None, i: int) -> bool:
        c = coarse[i]
        if node is None or not senses[c]:
            return False
        anc = ups[h.wnids[truth[i]]]
        return node in anc and any(s in ups[node] and s in anc for s in senses[c])

    judged = np.array([bool(senses[c]) for c in coarse])
    truth_groups = [np.flatnonzero(np.array(coarse) == c) for c in cats]
    emb = l2_normalize(feats)
    fits = [KMeans(args.k, n_init=4, random_state=s).fit_predict(emb) for s in range(args.seeds)]
    km_groups = [[np.flatnonzero(lab == g) for g in range(args.k)] for lab in fits]

    stored = hi.top_labels(probs, 5)  # what the catalog keeps per image

    def votes(g: np.ndarray, mode: str) -> object:
        return {"top1": pred[g], "top5": [stored[i] for i in g], "prob": probs[g]}[mode]

    def score(groups: list[np.ndarray], share: float, mode: str) -> float:
        good = 0
        for g in groups:
            node, _ = hi.category_node(votes(g, mode), share)  # type: ignore[arg-type]
            good += sum(right_level(node, int(i)) for i in g if judged[i])
        return good / judged.sum()

    print(f"\n== category names: share of the {judged.sum()} images (coarse category a WordNet node) under "
          f"a right-level name; max_classes={hi.DEFAULT_MAX_CLASSES}")
    print("   groups: 'true' = categories.csv's true coarse categories as stand-in clusters; "
          f"'kmeans' = k-means k={args.k} on the embeddings, mean of {args.seeds} seeds")
    purity = np.mean([sum(np.unique(np.array(coarse)[g], return_counts=True)[1].max() for g in gs if len(g))
                      / len(rows) for gs in km_groups])
    print(f"   k-means clusters' purity in coarse categories: {purity:.3f} "
          "(about the most a name can get right)")
    print("   votes: top1 = each member's top-1 label; top5 = its stored top-5, renormalised; "
          "prob = all 1000")
    modes = ("top1", "top5", "prob")
    print(f"   {'min_share':>9s} | " + " ".join(f"{'true/' + m:>10s}" for m in modes) + " | "
          + " ".join(f"{'kmeans/' + m:>11s}" for m in modes))
    for share in SHARES:
        tr = [score(truth_groups, share, m) for m in modes]
        km = [np.mean([score(g, share, m) for g in km_groups]) for m in modes]
        mark = "  <- default" if share == hi.DEFAULT_MIN_SHARE else ""
        print(f"   {share:9.2f} | " + " ".join(f"{x:10.3f}" for x in tr) + " | "
              + " ".join(f"{x:11.3f}" for x in km) + mark)
    print("   names of the true coarse categories at the default (top-1 votes):")
    for c, g in zip(cats, truth_groups, strict=True):
        name, _ = hi.name_category(pred[g])
        good = sum(right_level(hi.category_node(pred[g])[0], int(i)) for i in g)
        print(f"     {c:22s} {len(g):3d} -> {name[:60]:60s} {good if senses[c] else '-':>3}")
    # The product's own clustering (cluster.algorithm with conf/lookalike.toml's values, on what
    # cluster.space joins: the embeddings and the stored top-5 labels), its categories named from
    # the members' stored top-5, as a run names them; beside it, the embeddings alone
    # (label_weight 0) and other label weights, each over several k-means seeds (the product's is 0).
    cfg = ClusterConfig.defaults()

    def product_clustering(label_weight: float, seed: int, k_per_sqrt_n: float = cfg.k_per_sqrt_n,
                           fine_per_cluster: int = cfg.fine_per_cluster) -> tuple[int, float, float]:
        vecs = space.joined(feats, top_idx, top_p, label_weight)
        fit = fit_clusters(lambda: [vecs], len(vecs), replace(
            cfg, label_weight=label_weight, seed=seed, k_per_sqrt_n=k_per_sqrt_n,
            fine_per_cluster=fine_per_cluster))
        lab = assign(fit.centroids, vecs)[0]
        groups = [np.flatnonzero(lab == g) for g in range(len(fit.centroids))]
        purity = sum(np.unique(np.array(coarse)[g], return_counts=True)[1].max()
                     for g in groups if len(g)) / len(rows)
        return len(groups), purity, score(groups, hi.DEFAULT_MIN_SHARE, "top5")

    print(f"   lookalike's clustering (top5 votes, default share), seeds 0-{args.seeds * 2 - 1}:")
    for weight in sorted({0.0, 0.5, cfg.label_weight, 0.9}):
        runs = np.array([product_clustering(weight, seed) for seed in range(args.seeds * 2)])
        mark = "  <- default" if weight == cfg.label_weight else ""
        print(f"     label_weight {weight:4.2f}: {runs[:, 0].mean():4.0f} categories, purity "
              f"{runs[:, 1].mean():.3f}; right-level names {runs[0, 2]:.3f} at seed 0, mean "
              f"{runs[:, 2].mean():.3f} (min {runs[:, 2].min():.3f}, max {runs[:, 2].max():.3f}){mark}")
    # The names' share grows with the number of categories (finer categories are purer, and a
    # finer right name still counts: 'hound' for a hound); k-means alone (1 piece per category)
    # against k-means pieces joined by Ward (the product's fine_per_cluster), at each granularity.
    print(f"   granularity (k = k_per_sqrt_n * sqrt(n); the product's {cfg.k_per_sqrt_n:g}) and k-means "
          f"pieces per category joined by Ward (the product's {cfg.fine_per_cluster}; 1 = k-means alone), "
          f"seeds 0-{args.seeds * 2 - 1}:")
    for k_per_sqrt_n in (2.0, 3.0, 4.0):
        for fine in sorted({1, cfg.fine_per_cluster}):
            runs = np.array([product_clustering(cfg.label_weight, seed, k_per_sqrt_n, fine)
                             for seed in range(args.seeds * 2)])
            mark = "  <- default" if (k_per_sqrt_n, fine) == (cfg.k_per_sqrt_n, cfg.fine_per_cluster) else ""
            print(f"     k_per_sqrt_n {k_per_sqrt_n:g}, pieces {fine}: {runs[:, 0].mean():4.0f} categories, "
                  f"purity {runs[:, 1].mean():.3f}; right-level names mean {runs[:, 2].mean():.3f} "
                  f"(min {runs[:, 2].min():.3f}, max {runs[:, 2].max():.3f}){mark}")
    # Runs: the first 100 images fitted, the other 400 arriving in 4 runs of 100 that join categories or
    # start their own (join_cosine); with the product's refit rule (a full fit once the catalog has grown
    # refit_growth times since the last: here at 200 and 400 images) and without any refit.
    def arrivals(join_cosine: float, seed: int, refit: bool) -> tuple[int, float]:
        vecs = space.joined(feats, top_idx, top_p, cfg.label_weight)
        order = np.random.default_rng(seed).permutation(len(vecs))
        c = replace(cfg, join_cosine=join_cosine, seed=seed)
        lab = np.full(len(vecs), -1)
        centroids, sizes, n_fit = np.empty((0, vecs.shape[1]), np.float32), np.empty(0, np.int64), 0
        for seen in range(100, len(vecs) + 1, 100):
            part = order[seen - 100 : seen]
            if n_fit == 0 or (refit and should_refit(n_fit, seen, c)):
                fit = fit_clusters(lambda seen=seen: [vecs[order[:seen]]], seen, c)
                centroids, sizes, n_fit = fit.centroids, fit.sizes, seen
                lab[order[:seen]] = assign(centroids, vecs[order[:seen]])[0]
            else:
                step = assign_incremental(centroids, sizes, vecs[part], c)
                centroids, sizes, lab[part] = step.centroids, step.sizes, step.cluster
        return len(centroids), score([np.flatnonzero(lab == g) for g in range(len(centroids))],
                                     hi.DEFAULT_MIN_SHARE, "top5")

    print(f"   runs (100 fitted, then 4 runs of 100 joining or starting categories), label_weight "
          f"{cfg.label_weight:g}, seeds 0-{args.seeds * 2 - 1}:")
    for refit in (True, False):
        for join in sorted({0.5, cfg.join_cosine, 0.7}):
            runs = np.array([arrivals(join, seed, refit) for seed in range(args.seeds * 2)])
            mark = "  <- default" if join == cfg.join_cosine and refit else ""
            how = f"refit at {cfg.refit_growth:g}x" if refit else "no refit   "
            print(f"     {how}, join_cosine {join:.2f}: {runs[:, 0].mean():4.0f} categories; right-level "
                  f"names {runs[:, 1].mean():.3f} (min {runs[:, 1].min():.3f}){mark}")
    names = defaultdict(int)
    for g in km_groups[0]:
        names[hi.name_category(pred[g])[0]] += 1
    print(f"   k-means seed 0 names: {dict(sorted(names.items()))}")

    # ---- 4. find
    print("\n== find WORD, per coarse category that is a WordNet node (relevant: the category and the "
          "categories nested under it in WordNet)")
    # A word with several meanings ('plant': flora and factories) finds them all, and `find` says so
    # on stderr; the category's own meaning is asked for by its name as shown ('plant (organism)').
    print("   as typed: the category's word; its meaning: the name of the category's own node when the word "
          "means several things")
    print(f"   {'word':22s} {'rel':>4s} {'strict':>6s} | {'top-1 P':>7s} {'R':>5s} {'F1':>5s} | "
          f"{'top-5 mass P':>12s} {'R':>5s} {'F1':>5s} | {'true-label F1':>13s} | strict P(top-1) | "
          "its meaning: query, F1 (top-1)")
    f1s = []
    for c in wn_cats:
        nested = {d for d in cats if d == c or any(s in ups[n] for n in senses[d] for s in senses[c])}
        rel = np.array([cc in nested for cc in coarse])
        strict = np.array([cc == c for cc in coarse])
        under = np.zeros(hi.NUM_CLASSES, bool)
        under[list(hi.classes_under(c))] = True

        def prf(hit: np.ndarray, rel: np.ndarray = rel) -> tuple[float, float, float]:
            tp = float((hit & rel).sum())
            p, r = tp / max(hit.sum(), 1), tp / max(rel.sum(), 1)
            return p, r, (2 * p * r / (p + r) if p + r else 0.0)

        hit1, hitm = hi.find_mask(c, top_idx), hi.find_mask(c, top_idx, top_p)
        p1, r1, f1 = prf(hit1)
        pm, rm, fm = prf(hitm)
        ft = prf(under[truth])[2]
        queries = dict(zip(hi.nodes_for(c), (query for _, query in hi.senses(c)), strict=True))
        own = [n for n in senses[c] if n in queries]
        meaning = queries[own[0]] if len(queries) > 1 and len(own) == 1 else c
        fs = prf(hi.find_mask(meaning, top_idx))[2]
        f1s.append((c, f1, fm, fs))
        print(f"   {c:22s} {rel.sum():4d} {strict.sum():6d} | {p1:7.2f} {r1:5.2f} {f1:5.2f} | "
              f"{pm:12.2f} {rm:5.2f} {fm:5.2f} | {ft:13.2f} | {prf(hit1, strict)[0]:15.2f} | "
              f"{meaning!r}, {fs:.2f}")
    low = [(c, round(float(f), 2)) for c, f, _, _ in f1s if f < 0.8]
    print(f"   min F1 top-1 {min(x[1] for x in f1s):.2f}, top-5 mass {min(x[2] for x in f1s):.2f}; "
          f"below 0.8 (top-1): {low or 'none'}; min F1 asking for the category's meaning "
          f"{min(x[3] for x in f1s):.2f}")
    try:
        hi.classes_under("dgo")
    except hi.UnknownWordError as exc:
        print(f"   find 'dgo': {exc}")

    # ---- 5. head cost
    timing(paths[:32], args.threads)


def timing(paths: list[Path], threads: int, reps: int = 5) -> None:
    import torch

    spec = resolve_model("effnet-lite0")
    wrapped, _ = load_torch_model(spec, threads)
    module = wrapped.body  # the backbone alone: features only

    pixels = torch.from_numpy(get_embedder(spec, backend="torch", threads=threads).preprocess(
        [Image.open(p).convert("RGB") for p in paths]))
    w, b = (torch.from_numpy(x) for x in classifier_head(spec))
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    head.weight.data, head.bias.data = w, b

    def best(fn: object) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        module(pixels)  # warm-up
        feats = module(pixels)
        t_feat = best(lambda: module(pixels))
        t_full = best(lambda: head(module(pixels)))
        t_head = best(lambda: head(feats))
    f_np = feats.numpy()
    t_np = best(lambda: logits_from_features(spec, f_np))
    lg = logits_from_features(spec, f_np)
    t_soft = best(lambda: hi.softmax(lg))
    t_topk = best(lambda: hi.top_k(hi.softmax(lg), 5))
    n = len(paths)
    print(f"\n== classifier head cost: torch CPU, {threads} threads, batch {n}, best of {reps}")
    print(f"   features only        {t_feat * 1e3:8.1f} ms  ({n / t_feat:6.1f} img/s)")
    print(f"   features + head      {t_full * 1e3:8.1f} ms  ({n / t_full:6.1f} img/s)  "
          f"+{(t_full - t_feat) / t_feat * 100:.1f}% (noise-level on a shared machine)")
    print(f"   head alone (torch)   {t_head * 1e3:8.3f} ms  = {t_head / t_feat * 100:.2f}% of the forward; "
          f"numpy {t_np * 1e3:.3f} ms")
    print(f"   softmax (numpy)      {t_soft * 1e3:8.3f} ms; softmax + top-5 {t_topk * 1e3:.3f} ms")
    print("   FLOPs: head 1280x1000 MACs = 1.28 M/image vs ~390 M for EfficientNet-Lite0 (0.3%)")


if __name__ == "__main__":
    sys.exit(main())
