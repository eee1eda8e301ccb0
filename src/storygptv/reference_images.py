"""Reference images of characters: any image form in, an RGB PIL image out, with clear errors.

Pixel values mean what they show (8-bit, 16-bit, floats in [0, 1], alpha composited onto white);
files are size-checked before decoding. :func:`normalize_characters` turns a pipeline's
``characters`` argument into one ``{name: RGB image}`` dict per prompt. Re-exported by
:mod:`storygptv.characters`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = ["MAX_REFERENCE_PIXELS", "load_character_image", "normalize_characters"]

#: Largest reference image accepted from a file (Pillow's decompression-bomb limit; references are
#: resized to about 224 px anyway).
MAX_REFERENCE_PIXELS = 89_478_485
#: Float pixels may overshoot [0, 1] by this much (rounding in a preprocessing step) and are clipped.
_FLOAT_TOLERANCE = 1e-3
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_character_image(image: Any, name: str = "character") -> PIL.Image.Image:
    """Turn a reference image given as a path, PIL image, array or tensor into an RGB PIL image.

    Accepted: a ``str`` / ``pathlib.Path`` to an image file, a ``PIL.Image.Image``, a ``numpy`` array
    (H, W) or (H, W, 1|3|4), or a ``torch.Tensor`` (1|3|4, H, W). Pixel values mean what they show:

    - ``uint8`` and integer arrays with values 0-255 are 8-bit; ``uint16`` arrays and 16-bit images
      (PNG ``I;16`` / ``I``) are scaled by their range (65535 -> 255);
    - floats must lie in [0, 1] (a float image above 1 is an error, not a white image);
    - an alpha channel is composited onto white (transparent areas become white, not their hidden colour);
    - an empty (0-pixel) image, or a file above :data:`MAX_REFERENCE_PIXELS` (a decompression bomb), is an
      error naming the character and the file.
    """
    if isinstance(image, str | Path):
        return _read_image_file(Path(image), name)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image, name, "the given PIL image")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"The reference image of {name!r} is a tensor of shape {tuple(image.shape)}; "
                "pass a (3, H, W) tensor with values in [0, 1]."
            )
        tensor = image.detach().cpu()
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        return _array_to_rgb(tensor.permute(1, 2, 0).numpy(), name, "the given tensor")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, name, "the given array")
    raise TypeError(
        f"The reference image of {name!r} has type {type(image).__name__}; pass a PIL image, a file path, "
        "a (H, W, 3) uint8 numpy array or a (3, H, W) tensor in [0, 1]."
    )


def _read_image_file(path: Path, name: str) -> PIL.Image.Image:
    """Open an image file; the size is checked from the header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # the size check below replaces Pillow's warning
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            opened = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"The reference image of {name!r} in {str(path)!r} is too large to decode safely ({error}); pass "
            f"an image of at most {MAX_REFERENCE_PIXELS} pixels."
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise _unreadable(name, path, error) from error
    with opened:
        width, height = opened.size
        if width * height > MAX_REFERENCE_PIXELS:
            raise ValueError(
                f"The reference image of {name!r} in {str(path)!r} is {width}x{height} pixels, more than "
                f"{MAX_REFERENCE_PIXELS} (a decompression bomb?); pass a smaller image."
            )
        try:
            opened.load()
        except (OSError, ValueError, SyntaxError) as error:
            raise _unreadable(name, path, error) from error
        return _pil_to_rgb(opened, name, repr(str(path)))


def _unreadable(name: str, path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"The reference image of {name!r} could not be read from {str(path)!r} ({error}). "
        "Pass the path of a readable image file (PNG, JPEG, ...) or a PIL image."
    )


def _check_not_empty(width: int, height: int, name: str, source: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(
            f"The reference image of {name!r} ({source}) is empty ({width}x{height} pixels); pass a picture "
            "of the character."
        )


def _pil_to_rgb(image: PIL.Image.Image, name: str, source: str) -> PIL.Image.Image:
    """RGB of a PIL image: 16-bit and float modes by their range, alpha composited onto white."""
    _check_not_empty(image.width, image.height, name, source)
    if image.mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(image), name, source)
    if image.mode == "I":  # 32-bit integers, what Pillow makes of 16-bit greyscale: scaled as 16 bit
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                f"The reference image of {name!r} ({source}) holds 32-bit values from {array.min()} to "
                f"{array.max()}; pass an 8-bit or 16-bit image."
            )
        return _array_to_rgb(array.astype(np.uint16), name, source)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), name, source)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, name: str, source: str) -> np.ndarray:
    """8-bit pixel values of an array, by its dtype's meaning (see :func:`load_character_image`)."""
    if array.dtype.byteorder not in "=|":
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 / 257 = 255
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = array.min(), array.max()
    if np.issubdtype(array.dtype, np.integer):
        if low < 0 or high > 255:
            raise ValueError(
                f"The reference image of {name!r} ({source}) is a {array.dtype} array with values from {low} "
                f"to {high}; integer images must hold 0-255 (or be uint16, 0-65535)."
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if (
            not (np.isfinite(low) and np.isfinite(high))
            or low < -_FLOAT_TOLERANCE
            or high > 1 + _FLOAT_TOLERANCE
        ):
            raise ValueError(
                f"The reference image of {name!r} ({source}) is a float image with values from {low:g} to "
                f"{high:g}; float images must lie in [0, 1] (divide 0-255 values by 255)."
            )
        return np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(
        f"The reference image of {name!r} ({source}) has dtype {array.dtype}; pass uint8, uint16 or floats in [0, 1]."
    )


def _array_to_rgb(array: np.ndarray, name: str, source: str) -> PIL.Image.Image:
    """RGB of an (H, W) or (H, W, 1|3|4) array; a 4th channel is alpha, composited onto white."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"The reference image of {name!r} is an array of shape {array.shape}; pass an (H, W, 3) uint8 array."
        )
    _check_not_empty(array.shape[1], array.shape[0], name, source)
    pixels = _to_uint8(array, name, source)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.shape[-1] == 4:
        alpha = pixels[..., 3:].astype(np.float64) / 255.0
        pixels = np.round(pixels[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))


def normalize_characters(
    characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None, batch_size: int
) -> list[dict[str, PIL.Image.Image]]:
    """Validate ``characters`` and return one ``{name: RGB image}`` dict per prompt.

    ``characters`` is ``None``, one dict shared by every prompt, or a list with one dict (or ``None``)
    per prompt.
    """
    if characters is None:
        return [{} for _ in range(batch_size)]
    if isinstance(characters, Mapping):
        shared = _load_mapping(characters)
        return [shared for _ in range(batch_size)]
    if isinstance(characters, list | tuple):
        if len(characters) != batch_size:
            raise ValueError(
                f"`characters` is a list of {len(characters)} dicts but there are {batch_size} prompts; "
                "pass one dict per prompt, or a single dict shared by all prompts."
            )
        return [_load_mapping(entry) if entry is not None else {} for entry in characters]
    raise TypeError(
        f"`characters` has type {type(characters).__name__}; pass a dict {{name: reference image}}, "
        "a list of such dicts (one per prompt), or None."
    )


def _load_mapping(characters: Mapping[str, Any]) -> dict[str, PIL.Image.Image]:
    if not isinstance(characters, Mapping):
        raise TypeError(
            f"Each entry of `characters` must be a dict {{name: reference image}}, got "
            f"{type(characters).__name__}."
        )
    loaded = {}
    for name, image in characters.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Character names must be non-empty strings, got {name!r} in `characters`.")
        loaded[name] = load_character_image(image, name=name)
    return loaded
