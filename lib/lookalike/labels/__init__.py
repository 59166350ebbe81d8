"""Labels for images: ImageNet-1k top-k classes from the embedding model's classifier head, placed in
WordNet's noun hierarchy to name categories and to search by word (see :mod:`.hierarchy`)."""

from lookalike.labels.hierarchy import (
    DEFAULT_MAX_CLASSES,
    DEFAULT_MIN_SHARE,
    Label,
    UnknownWordError,
    category_node,
    classes_under,
    find_mask,
    load,
    name_category,
    node_shares,
    senses,
    softmax,
    suggest,
    top_k,
    top_labels,
)

__all__ = [
    "DEFAULT_MAX_CLASSES",
    "DEFAULT_MIN_SHARE",
    "Label",
    "UnknownWordError",
    "category_node",
    "classes_under",
    "find_mask",
    "load",
    "name_category",
    "node_shares",
    "senses",
    "softmax",
    "suggest",
    "top_k",
    "top_labels",
]
