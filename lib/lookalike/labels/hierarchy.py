"""ImageNet-1k labels placed in WordNet's noun hierarchy: top-k labels, category names and `find WORD`.

Pure Python + numpy over the shipped ``imagenet_hierarchy.json`` (built by
scripts/build_label_hierarchy.py from Princeton WordNet 3.0; one chain per class, see there why).
The file is read once per process.

- :func:`top_labels` / :func:`top_k`: the k most probable classes of classifier outputs.
- :func:`name_category`: a name for a group of images (a cluster) from its members' labels: the most
  specific node that covers at least ``min_share`` of the members and is not too general
  (``max_classes``), else ``'mixed: a, b, c'``.
- :func:`classes_under` / :func:`find_mask`: images whose labels fall under a word (any node having
  that word as a lemma; plural and case tolerant); :func:`suggest` gives the closest names otherwise.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 1000
TOP_LABELS = 5  # labels kept per image and model (image_labels' ranks)
# bench/category_quality.py, imagenet-dev, real model, true coarse categories as clusters: right-level names
# 0.910 / 0.920 / 0.929 (votes from top-1 / stored top-5 / all probabilities) at 0.6; 0.55 drops top-1 votes
# to 0.866 (two halves of a category outvote its parent), 0.8 drops top-5 votes to 0.679 (stray labels keep
# the whole category from any one node). 0.6 is the lowest share in the plateau for every vote kind, and
# lower shares name impure clusters better (k-means: 0.155 at 0.6 vs 0.125 at 0.65).
DEFAULT_MIN_SHARE = 0.6
# A node holding more than this many of the 1000 classes (animal 398, artifact 516, instrumentality 347)
# says nothing about a picture: such a category is called 'mixed: ...' instead. mammal (218) still passes.
DEFAULT_MAX_CLASSES = 250
MIXED_PREFIX = "mixed: "


class Label(NamedTuple):
    index: int  # class index of the classifier's output
    name: str
    prob: float


class UnknownWordError(KeyError):
    """A search word that names no node of the hierarchy; ``suggestions`` holds the closest names."""

    def __init__(self, word: str, suggestions: list[str]) -> None:
        super().__init__(word)
        self.word = word
        self.suggestions = suggestions

    def __str__(self) -> str:
        hint = f"; closest names: {', '.join(self.suggestions)}" if self.suggestions else ""
        return f"no label or category is called {self.word!r}{hint}"


@dataclass(frozen=True)
class Hierarchy:
    wnids: tuple[str, ...]  # class index -> wnid (sorted wnids: the classifier's output order)
    names: tuple[str, ...]  # class index -> its node's name (see node_names)
    chains: tuple[tuple[str, ...], ...]  # class index -> (own wnid, parent, ..., root)
    node_names: dict[str, str]  # node -> readable name, distinct: see _distinct_names
    node_lemmas: dict[str, tuple[str, ...]]
    depth: dict[str, int]  # root 0
    members: dict[str, np.ndarray]  # node -> sorted class indices under it (itself included)
    lemma_index: dict[str, tuple[str, ...]]  # normalised lemma -> node ids having it
    plurals: dict[str, str]  # irregular plural -> lemma

    def name(self, node: str) -> str:
        return self.node_names[node]


@functools.cache
def load() -> Hierarchy:
    """The shipped hierarchy, parsed once per process."""
    text = resources.files("lookalike.labels").joinpath("imagenet_hierarchy.json").read_text("utf-8")
    raw = json.loads(text)
    wnids, chains = [], []
    for wnid, _name, ancestors in raw["classes"]:
        wnids.append(wnid)
        chains.append((wnid, *ancestors))
    if len(wnids) != NUM_CLASSES:
        raise ValueError(f"imagenet_hierarchy.json holds {len(wnids)} classes, expected {NUM_CLASSES}")
    depth: dict[str, int] = {}
    under: dict[str, list[int]] = {}
    for index, chain in enumerate(chains):
        for pos, node in enumerate(chain):
            depth[node] = len(chain) - 1 - pos
            under.setdefault(node, []).append(index)
    node_lemmas = {node: tuple(entry[1]) for node, entry in raw["nodes"].items()}
    node_names = _distinct_names({node: entry[0] for node, entry in raw["nodes"].items()}, chains)
    lemma_index: dict[str, list[str]] = {}
    for node, lemmas in node_lemmas.items():
        for lemma in lemmas:
            ids = lemma_index.setdefault(normalise(lemma), [])
            if node not in ids:
                ids.append(node)
    return Hierarchy(
        wnids=tuple(wnids), names=tuple(node_names[w] for w in wnids), chains=tuple(chains),
        node_names=node_names,
        node_lemmas=node_lemmas, depth=depth,
        members={node: np.asarray(ix, dtype=np.int64) for node, ix in under.items()},
        lemma_index={k: tuple(v) for k, v in lemma_index.items()}, plurals=dict(raw.get("plurals", {})))


def _distinct_names(first_lemmas: dict[str, str], chains: list[tuple[str, ...]]) -> dict[str, str]:
    """Each node's readable name: its first lemma, or, where other nodes share that lemma, the lemma
    qualified by its nearest ancestor that sets it apart, as a dictionary would: "crane (wading bird)"
    and "crane (lifting device)", "vessel (craft)" and "vessel (container)". Without it two
    categories, or a category's labels, would read the same and mean different things."""
    ancestors: dict[str, tuple[str, ...]] = {}
    for chain in chains:
        for pos, node in enumerate(chain):
            ancestors.setdefault(node, chain[pos + 1 :])
    sharing: dict[str, list[str]] = {}
    for node in sorted(first_lemmas):  # as find reads them: 'Cardigan' (a corgi) is 'cardigan' (a sweater)
        sharing.setdefault(normalise(first_lemmas[node]), []).append(node)
    names = dict(first_lemmas)
    for key, nodes in sharing.items():
        if len(nodes) == 1:
            continue
        taken: set[str] = set()
        for node in nodes:  # by node id: the same names every time
            qualifier = next((first_lemmas[a] for a in ancestors[node]
                              if normalise(first_lemmas[a]) != key and first_lemmas[a] not in taken), node)
            taken.add(qualifier)
            names[node] = f"{first_lemmas[node]} ({qualifier})"
    return names


def normalise(word: str) -> str:
    """Lower case, '_' and '-' as spaces, single spaces: 'Great_White shark' -> 'great white shark'."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", word)).strip().lower()


# --------------------------------------------------------------------------- top-k labels


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (max-subtracted, so large logits cannot overflow)."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(probs: np.ndarray, k: int = TOP_LABELS) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities), each (n, k), most probable first, of (n, 1000) class probabilities."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float32))
    k = min(k, p.shape[1])
    part = np.argpartition(-p, k - 1, axis=1)[:, :k]  # O(n * classes), then sort only the k
    order = np.argsort(-np.take_along_axis(p, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(p, idx, axis=1)


def top_labels(probs: np.ndarray, k: int = TOP_LABELS) -> list[list[Label]]:
    """The k most probable labels of each row of (n, 1000) (or one (1000,)) class probabilities."""
    names = load().names
    idx, p = top_k(probs, k)
    return [[Label(int(i), names[int(i)], float(q)) for i, q in zip(ri, rp, strict=True)]
            for ri, rp in zip(idx, p, strict=True)]


# --------------------------------------------------------------------------- category names


def _class_weights(members: np.ndarray | Sequence[int] | Sequence[Sequence[Label]]) -> np.ndarray:
    """Each member's vote over the 1000 classes, summed: (1000,) floats.

    - 1-D ints: top-1 class indices, one vote each.
    - 2-D floats (n, 1000): class probabilities; each member spreads one vote by probability.
    - lists of :class:`Label` (top-k as stored): each member's vote spread over its top-k, renormalised.
    """
    weights = np.zeros(NUM_CLASSES, np.float64)
    if isinstance(members, np.ndarray) and members.ndim == 2:
        p = members.astype(np.float64)
        weights += (p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)).sum(axis=0)
        return weights
    items = list(members)
    if items and not isinstance(items[0], int | np.integer):
        for labels in items:
            total = sum(lab.prob for lab in labels) or 1.0
            for lab in labels:
                weights[lab.index] += lab.prob / total
        return weights
    np.add.at(weights, np.asarray(items, dtype=np.int64), 1.0)
    return weights


def node_shares(members: np.ndarray | Sequence[int] | Sequence[Sequence[Label]]) -> dict[str, float]:
    """Share of the members' votes under each node that has any (a member's class and its ancestors)."""
    h = load()
    weights = _class_weights(members)
    total = weights.sum()
    shares: dict[str, float] = {}
    if total <= 0:
        return shares
    for index in np.flatnonzero(weights):
        w = weights[index] / total
        for node in h.chains[index]:
            shares[node] = shares.get(node, 0.0) + w
    return shares


def category_node(members: np.ndarray | Sequence[int] | Sequence[Sequence[Label]],
                  min_share: float = DEFAULT_MIN_SHARE, *,
                  max_classes: int = DEFAULT_MAX_CLASSES) -> tuple[str | None, dict[str, float]]:
    """(node id or None, shares of every node): the node :func:`name_category` names the group by."""
    h = load()
    shares = node_shares(members)
    ok = [(h.depth[node], share, node) for node, share in shares.items()
          if share >= min_share - 1e-9 and len(h.members[node]) <= max_classes]
    # deepest; at equal depth (possible only when min_share <= 0.5) the larger share
    return (max(ok)[2] if ok else None), shares


def name_category(members: np.ndarray | Sequence[int] | Sequence[Sequence[Label]],
                  min_share: float = DEFAULT_MIN_SHARE, *, max_classes: int = DEFAULT_MAX_CLASSES,
                  top: int = 5) -> tuple[str, list[tuple[str, float]]]:
    """(name, the ``top`` most frequent labels with their shares) for a group of images.

    The name is the most specific node (deepest in the hierarchy) covering at least ``min_share`` of the
    members and holding at most ``max_classes`` of the 1000 classes; when there is none (the members are
    spread over unrelated things), ``'mixed: a, b, c'`` with the three most frequent labels.
    """
    h = load()
    weights = _class_weights(members)
    total = weights.sum() or 1.0
    order = np.argsort(-weights, kind="stable")
    labels = [(h.names[i], float(weights[i] / total)) for i in order[:top] if weights[i] > 0]
    node, _ = category_node(members, min_share, max_classes=max_classes)
    if node is None:
        return MIXED_PREFIX + (", ".join(name for name, _ in labels[:3]) or "(no members)"), labels
    return h.name(node), labels


# --------------------------------------------------------------------------- find WORD


def _lemma_forms(word: str) -> list[str]:
    """The word and its possible singulars ('buses' -> buses, buse, bus); irregular ones from WordNet."""
    w = normalise(word)
    forms = [w]
    plurals = load().plurals
    head, _, last = w.rpartition(" ")  # only the last word is plural: 'sports cars', 'golden retrievers'
    prefix = f"{head} " if head else ""
    if last in plurals:
        forms.append(prefix + plurals[last])
    if last.endswith("ies") and len(last) > 3:
        forms.append(prefix + last[:-3] + "y")
    if last.endswith("es"):
        forms.append(prefix + last[:-2])
    if last.endswith("s") and not last.endswith("ss"):
        forms.append(prefix + last[:-1])
    return list(dict.fromkeys(forms))


def nodes_for(word: str) -> tuple[str, ...]:
    """Every node having ``word`` as a lemma (all its senses), or the one node given by its qualified
    name ('crane (wading bird)') or its id ('n02084071')."""
    h = load()
    w = word.strip()
    if re.fullmatch(r"n\d{8}", w) and w in h.node_names:
        return (w,)
    qualified = _qualified_names().get(normalise(w))  # a name as shown: 'crane (wading bird)'
    if qualified is not None:
        return (qualified,)
    for form in _lemma_forms(w):
        if form in h.lemma_index:
            return h.lemma_index[form]
    return ()


@functools.cache
def _qualified_names() -> dict[str, str]:
    """Normalised qualified name -> its node, for the nodes whose first lemma others share."""
    return {normalise(name): node for node, name in load().node_names.items() if name.endswith(")")}


def classes_under(word: str) -> set[int]:
    """Class indices under any node that ``word`` names (all senses: 'plant' is flora and factories).

    Raises :class:`UnknownWordError` with the closest names when the word names no node.
    """
    nodes = nodes_for(word)
    if not nodes:
        raise UnknownWordError(word, suggest(word))
    members = load().members
    return {int(i) for node in nodes for i in members[node]}


def senses(word: str) -> list[tuple[str, str]]:
    """(name as shown, a query that finds it alone) for each node ``word`` names: more than one when
    the word means several things. The query is the name when the name names that node alone
    ('plant (organism)'), else the node's id: 'cat' is the cat's first lemma and also big cat's.
    """
    h = load()
    return [(h.name(node), h.name(node) if nodes_for(h.name(node)) == (node,) else node)
            for node in nodes_for(word)]


# `find WORD`'s rule, for Catalog.find's SQL and find_mask alike: an image is found when its top
# label is under the word, or its top-5 labels put at least this much probability there.
FIND_MIN_MASS = 0.5


def find_mask(word: str, top_idx: np.ndarray, top_p: np.ndarray | None = None,
              min_mass: float = FIND_MIN_MASS) -> np.ndarray:
    """Which images' labels fall under ``word``: (n,) bools from their stored top-k labels.

    With ``top_p`` (the top-k probabilities), an image matches when the probability of its top-k labels
    under the word adds up to ``min_mass``, so a dog whose probability is spread over several breeds is
    found even when none is sure; without it, when its top-1 label is under the word.
    """
    under = np.zeros(NUM_CLASSES, bool)
    under[list(classes_under(word))] = True
    idx = np.atleast_2d(np.asarray(top_idx))
    if top_p is None:
        return under[idx[:, 0]]
    p = np.atleast_2d(np.asarray(top_p, dtype=np.float64))
    return under[idx[:, 0]] | ((p * under[idx]).sum(axis=1) >= min_mass)


def suggest(word: str, n: int = 5) -> list[str]:
    """The closest node names to a word that matched none (difflib ratio on lemmas, then substrings)."""
    h = load()
    w = normalise(word)
    close = difflib.get_close_matches(w, list(h.lemma_index), n=n, cutoff=0.6)
    if len(close) < n and len(w) >= 3:
        # 'retriever' -> 'golden retriever': whole-word containment catches what the ratio misses
        close += sorted((k for k in h.lemma_index if re.search(rf"\b{re.escape(w)}", k) and k not in close),
                        key=len)[: n - len(close)]
    return close
