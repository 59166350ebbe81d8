"""Build lib/lookalike/labels/imagenet_hierarchy.json: the 1000 ImageNet-1k classes in WordNet's nouns.

Sources (both install offline from a package registry; nothing is typed by hand):
- WordNet: Princeton WordNet 3.0, Debian package ``wordnet-base`` (``apt-get install wordnet-base``,
  files in /usr/share/wordnet). Licence: the WordNet 3.0 licence (permissive, BSD-like: use, copy,
  modify and distribute with the copyright notice kept), reproduced in the output file.
- The class list: ``timm/data/_info/imagenet_synsets.txt`` of the PyPI package ``timm`` (Apache-2.0;
  installed with open_clip_torch): the 1000 wnids, sorted, which is the class-index order of
  ImageNet-1k classifiers (checked against EfficientNet-Lite0's outputs by bench/category_quality.py).

An ImageNet wnid ``n01440764`` is the WordNet 3.0 noun synset at byte offset 01440764 of data.noun.

Multiple hypernym paths (304 of the 1000 classes have one on the way up): each synset keeps only its
FIRST listed hypernym, so the hierarchy is a tree and every class has exactly one chain to the root.
WordNet's lexicographers list the defining "kind of" parent first (dog: canine before domestic animal;
wheeled vehicle: vehicle before container; clothing: covering before consumer goods). Measured on
imagenet-dev against its categories.csv with the true labels, this rule agrees best of the rules tried
(find F1 >= 0.93 on every coarse category but 'plant', whose 0.67 is a word-sense clash that no path rule
fixes): all paths together put every car under 'container' (find container F1 0.75); the longest path
loses fruit from 'food' and clothing from 'covering' (F1 0.83, 0.69). Its known misses: grouse, peacock
and partridge go up through 'game' (hunted animals), not 'bird'; Petri dish and wooden spoon are not under
'container'.

Usage: python scripts/build_label_hierarchy.py [--wordnet /usr/share/wordnet] [--synsets FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "lib" / "lookalike" / "labels" / "imagenet_hierarchy.json"
DEFAULT_WORDNET = Path("/usr/share/wordnet")
SOURCE = "Princeton WordNet 3.0 (Debian package wordnet-base, data.noun)"
CLASS_SOURCE = "timm (PyPI) timm/data/_info/imagenet_synsets.txt"
LICENCE = (
    "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to use, copy, "
    "modify and distribute this software and database and its documentation for any purpose and without "
    "fee or royalty is hereby granted, provided that you agree to comply with the following copyright "
    "notice and statements, including the disclaimer, and that the same appear on ALL copies of the "
    "software, database and documentation, including modifications that you make for internal use or for "
    "distribution. THIS SOFTWARE AND DATABASE IS PROVIDED \"AS IS\" AND PRINCETON UNIVERSITY MAKES NO "
    "REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON "
    "UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-ABILITY OR FITNESS FOR ANY PARTICULAR "
    "PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY "
    "THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or "
    "Princeton may not be used in advertising or publicity pertaining to distribution of the software "
    "and/or database. Title to copyright in this software, database and any associated documentation shall "
    "at all times remain with Princeton University and LICENSEE agrees to preserve same."
)


@dataclass(frozen=True)
class Synset:
    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]  # noun offsets, in the order data.noun lists them


def read_nouns(data_noun: Path) -> dict[str, Synset]:
    """Every noun synset of a WordNet data.noun file (format: wndb(5)), keyed by its 8-digit offset."""
    synsets: dict[str, Synset] = {}
    with data_noun.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" ")
            n_words = int(fields[3], 16)
            lemmas = tuple(fields[4 + 2 * i] for i in range(n_words))
            i = 4 + 2 * n_words
            n_pointers = int(fields[i])
            i += 1
            hypernyms = []
            for _ in range(n_pointers):
                symbol, offset, pos = fields[i], fields[i + 1], fields[i + 2]
                i += 4
                # '@' hypernym, '@i' instance hypernym (ImageNet has no instances, but a chain must not break)
                if symbol in ("@", "@i") and pos == "n":
                    hypernyms.append(offset)
            synsets[fields[0]] = Synset(lemmas, tuple(hypernyms))
    return synsets


def default_synsets_file() -> Path:
    # find_spec locates the installed package without importing it (importing timm pulls in torchvision).
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        sys.exit("timm is not installed (pip install timm, or pass --synsets)")
    return Path(spec.origin).parent / "data" / "_info" / "imagenet_synsets.txt"


def read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise SystemExit(f"{path}: expected 1000 distinct wnids, got {len(wnids)}")
    if wnids != sorted(wnids):
        # ImageNet-1k classifiers index classes in sorted-wnid order; another order would mislabel all.
        raise SystemExit(f"{path}: wnids are not sorted, so they are not the classifier's index order")
    return wnids


def readable(lemma: str) -> str:
    return lemma.replace("_", " ")


def chain(offset: str, synsets: dict[str, Synset]) -> list[str]:
    """Hypernym offsets from ``offset``'s parent up to the root, following each first-listed hypernym."""
    out: list[str] = []
    while synsets[offset].hypernyms:
        offset = synsets[offset].hypernyms[0]
        if offset in out:  # WordNet 3.0 has no cycles; guard against a corrupt file looping forever
            raise SystemExit(f"hypernym cycle at {offset}")
        out.append(offset)
    return out


def read_plurals(noun_exc: Path, lemmas: set[str]) -> dict[str, str]:
    """WordNet's irregular plurals (noun.exc: 'geese goose') of the given lemmas, lower-case, spaced.

    Regular plurals ('dogs', 'buses', 'butterflies') are handled by rule at lookup; only the irregular
    ones of names in the file are kept, which keeps it small.
    """
    out: dict[str, str] = {}
    for line in noun_exc.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            plural, base = readable(parts[0]).lower(), readable(parts[1]).lower()
            if base in lemmas and plural != base:
                out[plural] = base
    return dict(sorted(out.items()))


def build(synsets: dict[str, Synset], wnids: list[str], noun_exc: Path | None = None) -> dict[str, object]:
    classes = []
    used: dict[str, None] = {}  # node ids in first-seen order, so the file is stable between builds
    for wnid in wnids:
        offset = wnid[1:]
        if offset not in synsets:
            raise SystemExit(f"{wnid} is not a noun synset of this WordNet: is it WordNet 3.0?")
        ids = [f"n{o}" for o in chain(offset, synsets)]
        classes.append([wnid, readable(synsets[offset].lemmas[0]), ids])
        for node in (wnid, *ids):
            used[node] = None
    nodes = {node: [readable(synsets[node[1:]].lemmas[0]), [readable(x) for x in synsets[node[1:]].lemmas]]
             for node in used}
    lemmas = {lemma.lower() for _, names in nodes.values() for lemma in names}
    plurals = read_plurals(noun_exc, lemmas) if noun_exc is not None and noun_exc.is_file() else {}
    return {
        "source": SOURCE,
        "classes_source": CLASS_SOURCE,
        "licence": LICENCE,
        "path_rule": "first-listed hypernym of each synset (a tree: one chain per class)",
        "format": {"classes": "[wnid, name, [ancestor ids, parent first, root last]] in class-index order",
                   "nodes": "id -> [name, [lemmas]]",
                   "plurals": "irregular plural -> lemma (WordNet noun.exc), for find"},
        "classes": classes,
        "nodes": nodes,
        "plurals": plurals,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", type=Path, default=DEFAULT_WORDNET, help="folder with WordNet 3.0 data.noun")
    ap.add_argument("--synsets", type=Path, default=None, help="1000 wnids, one a line (default: timm's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    data_noun = args.wordnet / "data.noun"
    if not data_noun.is_file():
        sys.exit(f"{data_noun} missing: apt-get install wordnet-base (Princeton WordNet 3.0)")
    synsets = read_nouns(data_noun)
    wnids = read_wnids(args.synsets or default_synsets_file())
    tree = build(synsets, wnids, args.wordnet / "noun.exc")
    text = json.dumps(tree, ensure_ascii=False, separators=(",", ":"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(tree['classes'])} classes, {len(tree['nodes'])} nodes, "  # type: ignore[arg-type]
          f"{len(text) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
