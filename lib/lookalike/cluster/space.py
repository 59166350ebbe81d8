"""What categories are clustered on: an image's embedding joined with where its labels sit in the
WordNet hierarchy.

Embeddings alone group what looks alike: on imagenet-dev (one photo per ImageNet class) a category
of them mixes dogs, snakes and shop fronts that share colours or a layout, and only 0.36 of the
images end up under a name at the right level ("dog" for a dog, not "mixed" or "animal"; #19).
Every image also has its top-5 labels, from the classifier head of the same forward pass. Their
probabilities spread over each label's ancestors give a vector on which two dog breeds are close
(they share dog, canine, carnivore, ...), a dog and a cat less so, a dog and a bus not at all: the
hierarchy's structure, which the embedding does not know. Only the broad nodes count, those over
at least BROAD_NODE_CLASSES classes (92 of the 1,808): the classes themselves and the narrow
groups are the embedding's to tell apart, and on imagenet-dev the names came out right for 0.854
of images with the broad nodes against 0.835 with all of them (bench/category_quality.py). A node
counts by how specific it is (the square root of log(1000 / its classes): the root counts 0).

The two parts are joined, each normalised, so that the cosine of two joined vectors is
(1 - w) * their embeddings' cosine + w * their labels' cosine, w = [cluster] label_weight; with
w = 0 categories are clustered on the embeddings alone. An image without labels has only its
embedding part. Centroids live in this joined space; near-duplicates and `similar` use the
embeddings, never these.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from lookalike.labels.hierarchy import NUM_CLASSES, load
from lookalike.vectors import l2_normalize

BROAD_NODE_CLASSES = 10


@functools.cache
def _ancestry() -> np.ndarray:
    """(1000, broad nodes) float32: class c's row weights the broad nodes of its chain by their
    specificity."""
    h = load()
    nodes = sorted(n for n, classes in h.members.items() if len(classes) >= BROAD_NODE_CLASSES)
    column = {node: j for j, node in enumerate(nodes)}
    weight = np.sqrt(np.log(NUM_CLASSES / np.array([len(h.members[n]) for n in nodes], np.float64)))
    matrix = np.zeros((NUM_CLASSES, len(nodes)), np.float32)
    for c, chain in enumerate(h.chains):
        cols = [column[n] for n in chain if n in column]
        matrix[c, cols] = weight[cols]
    return matrix


def label_vectors(class_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n, broad nodes) unit vectors from each image's top labels: (n, k) class indices (-1: none)
    and their probabilities. A row without labels is all zeros."""
    class_ids = np.asarray(class_ids, np.int64)
    scores = np.where(class_ids >= 0, np.asarray(scores, np.float32), 0)
    ancestry = _ancestry()
    vectors = np.zeros((len(class_ids), ancestry.shape[1]), np.float32)
    for k in range(class_ids.shape[1]):
        vectors += scores[:, k, None] * ancestry[np.maximum(class_ids[:, k], 0)]
    return l2_normalize(vectors)


def joined(embeddings: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
           label_weight: float) -> np.ndarray:
    """The vectors categories are clustered on (unit length): embeddings and labels, see above."""
    if label_weight <= 0:
        return l2_normalize(embeddings)
    emb = np.asarray(embeddings, np.float32)
    labels = label_vectors(class_ids, scores)  # unit rows, or zero rows without labels
    # Each part scaled once, straight into the joined array: the joined row's length is known
    # ((1 - w) + w, or 1 - w without labels), so no second normalisation pass over a million rows.
    length = np.sqrt((1 - label_weight) + label_weight * labels.any(axis=1)).astype(np.float32)
    emb_scale = np.sqrt(np.float32(1 - label_weight)) / (
        np.maximum(np.linalg.norm(emb, axis=1), np.float32(1e-12)) * length)
    out = np.empty((len(emb), emb.shape[1] + labels.shape[1]), np.float32)
    np.multiply(emb, emb_scale[:, None], out=out[:, : emb.shape[1]])
    np.multiply(labels, (np.sqrt(np.float32(label_weight)) / length)[:, None], out=out[:, emb.shape[1] :])
    return out


def space_name(label_weight: float) -> str:
    """How a catalog's centroids were made (kept in catalog_meta): a change means a full refit.
    With labels it names the weight and a digest of the label part's nodes and weights, so that a
    new hierarchy file or another choice of broad nodes also counts as a change."""
    if label_weight <= 0:
        return "embedding"
    return f"embedding+labels:{label_weight:g}@{hashlib.sha256(_ancestry().tobytes()).hexdigest()[:12]}"
