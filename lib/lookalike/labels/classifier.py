"""EfficientNet-Lite0's classifier head beside the embedding: (pooled features, logits) of one forward.

lookalike.models.runtime builds the model with ``_fc`` moved out of the backbone: its image module
returns (the 1280-d pooled features the embed stage stores, ``_fc`` applied to them). Eval-mode dropout
is the identity, so those logits are exactly the original model's. The embed stage gets its labels from
Embedder.embed_labelled; this module is the torch reference for benches and tests.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from lookalike.models.registry import ModelSpec
from lookalike.models.runtime import get_embedder, load_torch_model


@functools.cache
def classifier_head(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(W (1000, 1280), b (1000,)) float32 of an EfficientNet checkpoint's classifier."""
    if spec.family != "effnet":
        raise ValueError(f"{spec.name} has no ImageNet classifier head (only EfficientNet-Lite0 does)")
    import torch

    state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    return state["_fc.weight"].numpy().astype(np.float32), state["_fc.bias"].numpy().astype(np.float32)


def logits_from_features(spec: ModelSpec, features: np.ndarray) -> np.ndarray:
    """(n, 1000) logits from (n, 1280) raw pooled features (NOT the L2-normalised embeddings)."""
    w, b = classifier_head(spec)
    return np.asarray(features, np.float32) @ w.T + b


def features_and_logits(spec: ModelSpec, images: Sequence[Image.Image], *, threads: int | None = None,
                        batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Raw pooled features (n, 1280) and logits (n, 1000) of images, with the reference torch model and
    the model's own preprocessing, from one forward."""
    import torch

    if spec.family != "effnet":
        raise ValueError(f"{spec.name} has no ImageNet classifier head (only EfficientNet-Lite0 does)")
    embedder = get_embedder(spec, backend="torch", threads=threads, batch_size=batch_size)
    module, _ = load_torch_model(spec, threads)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        pixels = embedder.preprocess(images[i : i + batch_size])
        with torch.inference_mode():
            f, z = module(torch.from_numpy(pixels))
        feats.append(f.numpy())
        logits.append(z.numpy())
    if not feats:
        return np.empty((0, spec.dim), np.float32), np.empty((0, 1000), np.float32)
    return np.concatenate(feats), np.concatenate(logits)
