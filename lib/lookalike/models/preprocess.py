"""Each model's reference eval transform, numpy/PIL only, so executors apply it without torch."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from lookalike.models.registry import Preprocess

if TYPE_CHECKING:
    pass


def preprocess_image(image: Image.Image, pp: Preprocess) -> np.ndarray:
    """One image as the model's (3, H, W) float32 input, exactly as its reference transform makes it."""
    out = np.empty((3, *pp.size), np.float32)
    write_image(image, pp, out)
    return out


def write_image(image: Image.Image, pp: Preprocess, out: np.ndarray) -> None:
    """preprocess_image into a (3, H, W) slot, from a PIL image of any mode."""
    if pp.kind == "open_clip":
        out[...] = _open_clip_pixels(image, pp)  # resized in its own mode, then RGB, as open_clip does
    else:
        pixel_writer(pp)(np.asarray(image if image.mode == "RGB" else image.convert("RGB")), out)


PixelWriter = Callable[[np.ndarray, np.ndarray], None]  # (h, w, 3) uint8 RGB -> its (3, H, W) model input


@functools.lru_cache(maxsize=16)
def pixel_writer(pp: Preprocess) -> PixelWriter:
    """Writes the model's reference transform of a decoded RGB image (the embed stage's thumbnails)
    into a (3, H, W) float32 slot."""
    if pp.kind == "tf-efficientnet":
        from lookalike.models import tf_preprocess  # here, not at import: numba loads in ~0.3 s

        return tf_preprocess.writer(pp.size, pp.mean, pp.std)
    if pp.kind == "open_clip":
        def write(rgb: np.ndarray, out: np.ndarray) -> None:
            out[...] = _open_clip_pixels(Image.fromarray(rgb), pp)  # PIL's C resize: already cheap

        return write
    raise ValueError(f"unknown preprocessing kind {pp.kind!r}")


_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _open_clip_pixels(image: Image.Image, pp: Preprocess) -> np.ndarray:
    """open_clip's eval transform (open_clip.transform.image_transform, is_train=False) without torch.

    torchvision applies these same PIL calls in the same order (resize, crop, RGB) to PIL input,
    so the result is bit-identical to open_clip's preprocess (tested).
    """
    th, tw = pp.size
    resample = _PIL_FILTERS[pp.interpolation]
    if pp.resize_mode == "squash":
        image = _pil_resize(image, th, tw, resample)
    elif pp.resize_mode == "shortest" and th == tw:
        # torchvision Resize(int): short side to th, long side truncated.
        w, h = image.size
        long = int(th * max(w, h) / min(w, h))
        image = _pil_resize(image, *((long, th) if w <= h else (th, long)), resample)
        image = _center_crop_or_pad(image, th, tw, 0)
    else:
        # open_clip's ResizeKeepRatio (its non-square "shortest" path is always bicubic, fill 0).
        longest = 1.0 if pp.resize_mode == "longest" else 0.0
        if pp.resize_mode == "shortest":
            resample = Image.Resampling.BICUBIC
        w, h = image.size
        ratio_h, ratio_w = h / th, w / tw
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        image = _pil_resize(image, round(h / ratio), round(w / ratio), resample)
        image = _center_crop_or_pad(image, th, tw, pp.fill_color if longest else 0)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    pixels = (rgb - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return pixels.transpose(2, 0, 1)


def _pil_resize(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    # torchvision returns the image untouched when the size already matches.
    return image if image.size == (width, height) else image.resize((width, height), resample)


def _center_crop_or_pad(image: Image.Image, th: int, tw: int, fill: int) -> Image.Image:
    """torchvision CenterCrop / open_clip CenterCropOrPad on a PIL image."""
    w, h = image.size
    if tw > w or th > h:
        border = ((tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0,
                  (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0)
        bands = len(image.getbands())
        padded = ImageOps.expand(image, border=border, fill=(fill,) * bands if bands > 1 else fill)
        if image.mode == "P":
            padded.putpalette(image.getpalette())
        image = padded
        w, h = image.size
        if (w, h) == (tw, th):
            return image
    top, left = round((h - th) / 2.0), round((w - tw) / 2.0)  # Python's round: half to even, as torchvision
    return image.crop((left, top, left + tw, top + th))
