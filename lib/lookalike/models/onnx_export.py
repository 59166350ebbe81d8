"""Export a torch image model to ONNX, verified against torch before it is published.

Only the export side needs torch; lookalike.models imports this module only when an export is
missing, so executors that find the file never load torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lookalike.files import replacing
from lookalike.vectors import l2_normalize

if TYPE_CHECKING:
    import torch

OPSET = 17
LOGITS_ATOL = 1e-4  # max abs difference of the softmax probabilities, where the top-1 class differs


class ExportError(RuntimeError):
    """The ONNX export does not reproduce the torch model."""


def export_image_model(module: torch.nn.Module, path: Path, pixels: np.ndarray, *,
                       metadata: dict[str, str], atol: float,
                       outputs: Sequence[str] = ("features",)) -> float:
    """Export ``module`` ((n, 3, H, W) float32 -> (n, dim)) to ``path`` with a dynamic batch axis.

    ``outputs`` names the module's outputs: ``("features",)``, or ``("features", "logits")`` for a
    module returning (features, classifier logits) from one forward.
    The file is checked with ONNX Runtime against torch on ``pixels`` (max abs difference of the
    L2-normalised features below ``atol``; logits: softmax probabilities within LOGITS_ATOL, or the
    same top-1 class) before it atomically replaces ``path``, so readers see either no file or a
    verified one. ``metadata`` is stored in the model (``model_ver``, which the loader checks) with
    ``outputs``. Returns the measured max abs difference of the features.
    """
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        # Traced at batch 2 and checked at the full batch below, which proves the batch axis dynamic.
        example = torch.from_numpy(np.ascontiguousarray(pixels[:2], dtype=np.float32))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # nn.MultiheadAttention's fused inference kernel has no ONNX mapping: trace the plain ops.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about Python-level shape logic in model code
                # dynamo=False: the TorchScript exporter; the dynamo one needs onnxscript, not installed.
                torch.onnx.export(module, (example,), str(tmp), input_names=["pixels"],
                                  output_names=list(outputs), opset_version=OPSET, dynamo=False,
                                  dynamic_axes={"pixels": {0: "batch"}, **{o: {0: "batch"} for o in outputs}})
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.inference_mode():
            expected = module(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        expected = [t.numpy() for t in expected] if isinstance(expected, tuple) else [expected.numpy()]
        got = _run_onnx(tmp, pixels)
        what = metadata.get("model_ver", type(module).__name__)
        diff = float(np.abs(l2_normalize(expected[0]) - l2_normalize(got[0])).max())
        if not diff < atol:
            raise ExportError(f"ONNX export of {what} differs from torch by {diff:.2e} (> {atol:.0e}) "
                              "on normalised outputs; not published")
        if "logits" in outputs:
            i = list(outputs).index("logits")
            _check_logits(expected[i], got[i], what)
        model = onnx.load(str(tmp))
        extra = {"outputs": ",".join(outputs), "verified_max_abs_diff": f"{diff:.2e}"}
        for key, value in {**metadata, **extra}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        tmp.chmod(0o644)  # executors may run as another user
    return diff


def _check_logits(expected: np.ndarray, got: np.ndarray, what: str) -> None:
    """Each image's class probabilities within LOGITS_ATOL of torch's, or its top-1 class the same."""
    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    close = np.abs(softmax(expected) - softmax(got)).max(axis=1) < LOGITS_ATOL
    same_top1 = expected.argmax(axis=1) == got.argmax(axis=1)
    if not np.all(close | same_top1):
        raise ExportError(f"ONNX export of {what}: the classifier's logits differ from torch on "
                          f"{int((~(close | same_top1)).sum())} of {len(close)} images; not published")


def _run_onnx(path: Path, pixels: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(pixels, dtype=np.float32)}
    return session.run(None, feed)


def synthetic_photos(n: int, height: int = 384, width: int = 512) -> list[Image.Image]:
    """Deterministic photo-like images (smooth colour fields, hard edges, grain).

    A fallback for verifying an export when the caller has no real photos at hand.
    """
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32).copy()
        for _ in range(4):
            y, x = int(rng.integers(0, height - 32)), int(rng.integers(0, width - 32))
            arr[y : y + int(rng.integers(16, height // 2)), x : x + int(rng.integers(16, width // 2))] = \
                rng.uniform(0, 255, 3)
        arr += rng.normal(0, 6, arr.shape)
        photos.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return photos
