"""The rules every story loader shares: the common schema, split names, label vectors and frame files."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

__all__ = [
    "RELEASE_SPLIT_KEYS",
    "SPLITS",
    "STORY_COLUMNS",
    "UnreadableFrameError",
    "label_vector",
    "multi_hot",
    "normalize_split",
    "pick_frame_index",
    "read_npy_frame",
    "release_split",
    "require_files",
    "require_frame_file",
    "story_features",
]

#: The columns of the common story schema, in order.
STORY_COLUMNS: tuple[str, ...] = (
    "story_id",
    "frame_ids",
    "images",
    "captions",
    "referential_captions",
    "is_referential",
    "characters",
    "boxes",
    "segmentation",
    "character_labels",
    "background",
    "background_labels",
)


def story_features() -> datasets.Features:
    """The ``datasets.Features`` of the common story schema (one row per story)."""
    return datasets.Features(
        {
            "story_id": datasets.Value("string"),
            "frame_ids": datasets.List(datasets.Value("string")),
            "images": datasets.List(datasets.Image()),
            "captions": datasets.List(datasets.Value("string")),
            "referential_captions": datasets.List(datasets.Value("string")),
            "is_referential": datasets.List(datasets.Value("bool")),
            "characters": datasets.List(datasets.List(datasets.Value("string"))),
            "boxes": datasets.List(datasets.List(datasets.List(datasets.Value("float32")))),
            "segmentation": datasets.List(datasets.Image()),
            "character_labels": datasets.List(datasets.List(datasets.Value("int8"))),
            "background": datasets.List(datasets.Value("string")),
            "background_labels": datasets.List(datasets.List(datasets.Value("int8"))),
        }
    )


# ------------------------------------------------------------------------------------------------ splits

#: The canonical split names, in the order the releases list them (train, val, test).
SPLITS: tuple[str, ...] = ("train", "validation", "test")

_SPLIT_ALIASES = {"training": "train", "val": "validation", "valid": "validation", "dev": "validation"}


def normalize_split(split: str) -> str:
    """Return ``"train"``, ``"validation"`` or ``"test"`` for a split name (``"val"`` is accepted).

    Example:
        >>> normalize_split(" Val "), normalize_split("training")
        ('validation', 'train')
    """
    key = str(split).strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: 'train', 'validation' (or 'val'), 'test'.")
    return key


#: The keys a release's split file may give each split's list, in lookup order.
RELEASE_SPLIT_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("val", "validation", "valid"),
    "test": ("test",),
}


def release_split(splits: Mapping[str, Any], split: str, path: Path) -> list[Any]:
    """The entries of ``split`` in a release's split file ``path`` (parsed into ``splits``).

    ``split`` is any name :func:`normalize_split` accepts; the file's keys are looked up in
    :data:`RELEASE_SPLIT_KEYS` order.

    Example:
        >>> release_split({"train": [1, 2], "val": [3]}, "validation", Path("split.json"))
        [3]
    """
    keys = RELEASE_SPLIT_KEYS[normalize_split(split)]
    for key in keys:
        if key in splits:
            return list(splits[key])
    raise ValueError(
        f"{str(path)!r} has no list for split {split!r}: expected one of the keys {list(keys)} "
        f"(keys: {sorted(splits)})."
    )


# ------------------------------------------------------------------------------------------------ labels


def multi_hot(names: Iterable[str], order: Sequence[str]) -> list[int]:
    """Multi-hot vector of ``names`` (case-insensitive) in the label ``order``; other names are ignored.

    This is the one rule for label vectors: character labels, one-hot backgrounds and judged frames.

    Example:
        >>> multi_hot(["fred", "Mr Slate"], ("Wilma", "Fred", "Mr Slate"))
        [0, 1, 1]
    """
    wanted = {n.lower() for n in names}
    return [1 if o.lower() in wanted else 0 for o in order]


def label_vector(value: Any) -> list[int]:
    """A release's stored label vector (array, list, nested) as a flat list of ints."""
    return [int(v) for v in np.asarray(value).reshape(-1).tolist()]


# ------------------------------------------------------------------------------------------------ files


def require_files(root: Path, layout: str, *names: str) -> list[Path]:
    """``root / name`` for each of ``names``; a missing file is a ``FileNotFoundError`` naming it and ``layout``."""
    paths = [root / name for name in names]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"Missing file {str(path)!r}. Expected layout: {layout}")
    return paths


class UnreadableFrameError(Exception):
    """A frame file is missing or cannot be decoded (the loaders skip its story with a warning)."""


def require_frame_file(path: Path) -> Path:
    """``path`` when it exists, else :class:`UnreadableFrameError` (its story is skipped, not the split)."""
    if not path.exists():
        raise UnreadableFrameError(f"missing frame file {str(path)!r}")
    return path


def pick_frame_index(num_frames: int, frame_id: str, seed: int, frame_index: int | None = None) -> int:
    """Choose which frame of a clip to use: ``frame_index`` (clipped to the clip), else a seeded choice.

    The seeded choice depends only on ``(seed, frame_id)``, so it is the same in every process and
    does not depend on the order in which clips are read.
    """
    if num_frames <= 0:
        raise ValueError("A clip must hold at least one frame.")
    if frame_index is not None:
        index = int(frame_index)
        if index < 0:
            index += num_frames
        return min(max(index, 0), num_frames - 1)
    mixed = zlib.crc32(f"{int(seed)}:{frame_id}".encode())
    return int(np.random.default_rng(mixed).integers(num_frames))


def to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """Convert an (H, W), (H, W, 1|3|4) array of uint8 or floats into an (H, W, 3) uint8 array."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise UnreadableFrameError(f"a frame of shape {array.shape} is not an (H, W, 3) image")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(array.round(), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def read_npy_frame(path: Path, frame_id: str, seed: int, frame_index: int | None) -> tuple[np.ndarray, int]:
    """Read one frame of a ``.npy`` clip ((n, H, W, 3) or (H, W, 3)); return ``(frame, k)``.

    Raises:
        UnreadableFrameError: the file is missing or cannot be parsed as a clip.
    """
    require_frame_file(path)
    try:
        clip = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UnreadableFrameError(f"{path}: {error}") from error
    try:
        if clip.ndim == 4:
            k = pick_frame_index(clip.shape[0], frame_id, seed, frame_index)
            frame = np.array(clip[k])
        elif clip.ndim in (2, 3):
            k = 0
            frame = np.array(clip)
        else:
            raise UnreadableFrameError(f"{path}: array of shape {clip.shape} is not a clip of frames")
        return to_uint8_rgb(frame), k
    except (OSError, ValueError) as error:
        raise UnreadableFrameError(f"{path}: {error}") from error
