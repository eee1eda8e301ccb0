"""Reference crops of the characters, cut from the training frame itself (Char-LDM stage 1).

Pixels outside the character's mask become noise, the crop is cut to its box, padded to a square, resized and,
optionally, augmented (zoom, rotation, colour jitter, blur, grayscale, flip), as the method notes (section 2.1)
describe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageFilter
import PIL.ImageOps
import torch

__all__ = ["augment_reference", "make_reference_crop", "to_pil", "valid_box"]


# ----------------------------------------------------------------------------------------------
# Reading images, boxes, crops and their augmentation
# ----------------------------------------------------------------------------------------------


def to_pil(value: Any, mode: str) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        return value.convert(mode) if value.mode != mode else value
    if isinstance(value, dict):  # an undecoded datasets.Image value
        return datasets.Image().decode_example(value).convert(mode)
    if isinstance(value, np.ndarray):
        return PIL.Image.fromarray(value).convert(mode)
    if isinstance(value, torch.Tensor):
        return PIL.Image.fromarray(value.cpu().numpy()).convert(mode)
    raise TypeError(f"Cannot read an image from a {type(value).__name__}.")


def valid_box(box: Sequence[float] | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    if box is None or len(box) != 4:
        return None
    x1, y1 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x2, y2 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def make_reference_crop(
    image: np.ndarray,
    mask: np.ndarray,
    box: Sequence[float] | None,
    size: int,
    rng: np.random.Generator,
) -> PIL.Image.Image:
    """A character's reference crop from its own frame (FastComposer style).

    Pixels outside ``mask`` become uniform noise; the image is cropped to ``box`` (the mask's bounding
    box when ``box`` is missing), zero-padded to a centred square and resized to ``size``.

    Args:
        image: the (H, W, 3) uint8 frame.
        mask: the character's (H, W) boolean mask.
        box: ``[x1, y1, x2, y2]`` in pixels, or ``None``/``[]``.
        size: output side (e.g. 224).
        rng: the noise source.
    """
    height, width = mask.shape
    noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    filled = np.where(mask[..., None], image, noise)
    bounds = valid_box(box, width, height)
    if bounds is None:
        rows, cols = np.nonzero(mask)
        bounds = (
            (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
            if rows.size
            else None
        )
    if bounds is None:
        bounds = (0, 0, width, height)
    x1, y1, x2, y2 = bounds
    crop = filled[y1:y2, x1:x2]
    side = max(crop.shape[0], crop.shape[1])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    result = PIL.Image.fromarray(square, mode="RGB")
    if result.size != (size, size):
        result = result.resize((size, size), PIL.Image.Resampling.BICUBIC)
    return result


def augment_reference(image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """Reference-crop augmentation with PIL only (a subset of FastComposer's, same probabilities)."""
    size = image.size
    if rng.random() < 0.5:  # zoom in 1-2x
        factor = float(rng.uniform(1.0, 2.0))
        w, h = size[0] / factor, size[1] / factor
        left, top = (size[0] - w) / 2, (size[1] - h) / 2
        image = image.crop((round(left), round(top), round(left + w), round(top + h))).resize(
            size, PIL.Image.Resampling.BICUBIC
        )
    if rng.random() < 0.75:
        image = image.rotate(float(rng.uniform(-30.0, 30.0)), resample=PIL.Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        for enhancer in (PIL.ImageEnhance.Brightness, PIL.ImageEnhance.Contrast, PIL.ImageEnhance.Color):
            image = enhancer(image).enhance(float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        image = image.filter(PIL.ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    if rng.random() < 0.1:
        image = PIL.ImageOps.grayscale(image).convert("RGB")
    if rng.random() < 0.5:
        image = PIL.ImageOps.mirror(image)
    return image
