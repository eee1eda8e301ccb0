"""Story rows flattened into frame rows (one row per frame), and a frame's target pixels.

:func:`story_frames` turns a story dataset (common schema, one row per story) into one row per frame, the unit
of stage-1 training; :func:`frame_pixel_values` is the one definition of a target frame's VAE input.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

from .reference_crops import to_pil

__all__ = ["frame_features", "frame_pixel_values", "story_frames"]


# ----------------------------------------------------------------------------------------------
# Story rows -> frame rows
# ----------------------------------------------------------------------------------------------


def frame_features(decode: bool = True) -> datasets.Features:
    """The ``datasets.Features`` of frame rows produced by :func:`story_frames`."""
    return datasets.Features(
        {
            "story_id": datasets.Value("string"),
            "frame_id": datasets.Value("string"),
            "frame_index": datasets.Value("int32"),
            "image": datasets.Image(decode=decode),
            "caption": datasets.Value("string"),
            "referential_caption": datasets.Value("string"),
            "is_referential": datasets.Value("bool"),
            "characters": datasets.List(datasets.Value("string")),
            "boxes": datasets.List(datasets.List(datasets.Value("float32"))),
            "segmentation": datasets.Image(decode=decode),
            "character_labels": datasets.List(datasets.Value("int8")),
            "background": datasets.Value("string"),
            "background_labels": datasets.List(datasets.Value("int8")),
        }
    )


_STORY_TO_FRAME = {
    "frame_ids": "frame_id",
    "images": "image",
    "captions": "caption",
    "referential_captions": "referential_caption",
    "is_referential": "is_referential",
    "characters": "characters",
    "boxes": "boxes",
    "segmentation": "segmentation",
    "character_labels": "character_labels",
    "background": "background",
    "background_labels": "background_labels",
}


def _explode(batch: dict[str, list[Any]], drop_charless_frames: bool = False) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ["story_id", "frame_index", *_STORY_TO_FRAME.values()]}
    for row in range(len(batch["story_id"])):
        for position in range(len(batch["frame_ids"][row])):
            if drop_charless_frames and not batch["characters"][row][position]:
                continue
            out["story_id"].append(batch["story_id"][row])
            out["frame_index"].append(position)
            for story_key, frame_key in _STORY_TO_FRAME.items():
                out[frame_key].append(batch[story_key][row][position])
    return out


def story_frames(
    dataset: datasets.Dataset | datasets.IterableDataset, drop_charless_frames: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """Flatten story rows (common schema) into frame rows, one per frame (see :func:`frame_features`).

    Frame rows have ``story_id``, ``frame_id``, ``frame_index`` (position in the story), ``image``,
    ``caption``, ``referential_caption``, ``is_referential``, ``characters``, ``boxes``,
    ``segmentation``, ``character_labels``, ``background`` and ``background_labels``.
    Images are not decoded and re-encoded on the way (they are copied as bytes).

    Args:
        dataset: a story dataset (``Dataset`` or ``IterableDataset``).
        drop_charless_frames: drop frames without characters (the public code's ``min_num_objects=1``).
    """
    story_columns = list(dataset.features) if dataset.features is not None else None
    fn_kwargs = {"drop_charless_frames": drop_charless_frames}
    if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") == "custom":
        # A lazy dataset (e.g. SynthSV) renders its frames in a format transform, which ``map`` applies
        # to its input: keep the rendered images, and drop the transform from the frame rows.
        frames = dataset.map(
            _explode,
            batched=True,
            remove_columns=story_columns,
            features=frame_features(),
            fn_kwargs=fn_kwargs,
        )
        return frames.with_format(None)
    raw = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    raw = raw.cast_column("segmentation", datasets.List(datasets.Image(decode=False)))
    frames = raw.map(
        _explode,
        batched=True,
        remove_columns=story_columns,
        features=frame_features(decode=False),
        fn_kwargs=fn_kwargs,
    )
    frames = frames.cast_column("image", datasets.Image())
    return frames.cast_column("segmentation", datasets.Image())


def frame_pixel_values(image: Any, resolution: int, raw: bool = False) -> torch.Tensor:
    """(3, R, R) float VAE input of a frame: RGB, resized (bicubic) to ``resolution``, scaled to [-1, 1].

    The one definition of a target frame's pixels in training (the Char-LDM collator, stage 2's L_img and
    the latent cache of ``train_char_ldm.py --cache_latents`` all use it); no randomness, so a frame's VAE
    posterior can be cached. ``raw=True`` keeps the 0-255 values (stage 2's ``--vae_input_compat``, the
    public code's input). ``image``: a PIL image, an undecoded ``datasets.Image`` value or an array.
    """
    image = to_pil(image, "RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels if raw else pixels / 127.5 - 1.0
