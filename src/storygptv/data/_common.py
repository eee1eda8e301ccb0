"""Shared pieces of the story-dataset loaders: the common schema, splits, frame reading, dataset building."""

from __future__ import annotations

import hashlib
import json
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image

from .masks import box_label_map, label_map_from_segment_ids, refine_label_map_with_sam, resize_label_map

__all__ = [
    "STORY_COLUMNS",
    "FrameRecord",
    "LoadStats",
    "UnreadableFrameError",
    "build_story_dataset",
    "multi_hot",
    "normalize_split",
    "pick_frame_index",
    "read_npy_frame",
    "release_story_dataset",
    "require_file",
    "story_features",
]

#: Bump when the produced rows change, so that cached Arrow files are not reused.
_FORMAT_VERSION = "1"

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

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}


def normalize_split(split: str) -> str:
    """Return ``"train"``, ``"validation"`` or ``"test"`` for a split name (``"val"`` is accepted)."""
    key = str(split).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"Unknown split {split!r}; valid splits: 'train', 'validation' (or 'val'), 'test'.")
    return _SPLIT_ALIASES[key]


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


def require_file(path: Path, layout: str) -> Path:
    """Raise a ``FileNotFoundError`` naming ``path`` and the expected layout when it does not exist."""
    if not path.exists():
        raise FileNotFoundError(f"Missing file {str(path)!r}. Expected layout: {layout}")
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


class UnreadableFrameError(Exception):
    """A frame file exists but cannot be decoded (the loaders skip its story with a warning)."""


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
        UnreadableFrameError: the file cannot be parsed as a clip.
    """
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


def multi_hot(names: Iterable[str], order: Sequence[str]) -> list[int]:
    """Multi-hot vector of ``names`` (case-insensitive) in the label ``order``."""
    wanted = {n.lower() for n in names}
    return [1 if o.lower() in wanted else 0 for o in order]


@dataclass
class FrameRecord:
    """One frame of a story before it becomes part of a row of the common schema."""

    frame_id: str
    image: PIL.Image.Image
    caption: str
    characters: list[str]
    referential_set: list[str]
    boxes: list[list[float]] = field(default_factory=list)
    label_map: np.ndarray | None = None
    character_labels: list[int] = field(default_factory=list)
    background: str = ""
    background_labels: list[int] = field(default_factory=list)


@dataclass
class LoadStats:
    """Counters of one pass over a release (read by the loaders to warn once at the end)."""

    stories: int = 0
    skipped_stories: int = 0
    unreadable_frames: list[str] = field(default_factory=list)

    def skip(self, story_id: str, reason: str) -> None:
        """Record a skipped story and warn about it."""
        self.skipped_stories += 1
        self.unreadable_frames.append(reason)
        warnings.warn(f"Skipping story {story_id!r}: {reason}", stacklevel=3)

    def summary(self, name: str) -> None:
        """Warn once with the number of skipped stories (nothing when none was skipped)."""
        if self.skipped_stories:
            warnings.warn(
                f"{name}: {self.skipped_stories} stor{'y' if self.skipped_stories == 1 else 'ies'} skipped "
                f"because of unreadable or missing frames ({self.stories} kept).",
                stacklevel=3,
            )


def parse_segments(
    segments: Iterable[dict[str, Any]],
    caption: str,
    canonical: Callable[[str], str | None],
    width: int,
    height: int,
    bbox_resolution: float = 128.0,
) -> tuple[list[str], list[list[float]], dict[int, int]]:
    """Characters, boxes and ``{segment id: character index}`` from StoryGPT-V ``segments``.

    Each segment is ``{id, bbox, start, end, word}``; ``word`` (else the caption's words ``start`` to
    ``end``) is mapped to a canonical name by ``canonical`` (``None``: not a character, skipped).
    Boxes are given at ``bbox_resolution`` pixels and scaled to ``width`` x ``height``; a character
    with several segments gets the union of their boxes.
    """
    words = caption.split()
    characters: list[str] = []
    boxes: list[list[float]] = []
    segment_to_index: dict[int, int] = {}
    sx, sy = width / float(bbox_resolution), height / float(bbox_resolution)
    for segment in segments or []:
        word = segment.get("word")
        if word is None and "start" in segment and "end" in segment:
            word = " ".join(words[int(segment["start"]) : int(segment["end"]) + 1])
        name = canonical(str(word or ""))
        if name is None:
            continue
        if name not in characters:
            characters.append(name)
            boxes.append([])
        index = characters.index(name)
        if "id" in segment:
            segment_to_index[int(segment["id"])] = index
        bbox = segment.get("bbox")
        if bbox is not None and len(bbox) == 4:
            box = [bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy]
            if boxes[index]:
                old = boxes[index]
                box = [min(old[0], box[0]), min(old[1], box[1]), max(old[2], box[2]), max(old[3], box[3])]
            boxes[index] = [float(v) for v in box]
    return characters, boxes, segment_to_index


def read_segment_mask(path: Path, segment_to_index: dict[int, int]) -> np.ndarray | None:
    """The label map of a StoryGPT-V mask file (values = segment ids), or ``None`` when absent/unreadable."""
    if not path.exists():
        return None
    try:
        return label_map_from_segment_ids(np.load(path, allow_pickle=False), segment_to_index)
    except (OSError, ValueError, EOFError) as error:
        warnings.warn(f"Unreadable mask {str(path)!r} ({error}); using box masks.", stacklevel=2)
        return None


def finalize_frame(record: FrameRecord, sam_model: Any = None, sam_processor: Any = None) -> dict[str, Any]:
    """Turn a :class:`FrameRecord` into per-frame values of the schema (the label map becomes an image).

    The label map is the release's mask when present, else the box mask (refined with SAM when a
    model is given), else all zeros.
    """
    width, height = record.image.size
    boxes = [list(map(float, b)) if b is not None and len(b) == 4 else [] for b in record.boxes]
    while len(boxes) < len(record.characters):
        boxes.append([])
    if record.label_map is not None:
        label = resize_label_map(np.asarray(record.label_map, dtype=np.uint8), height, width)
    elif any(boxes):
        label = box_label_map(boxes, height, width)
        if sam_model is not None and sam_processor is not None:
            label = refine_label_map_with_sam(record.image, boxes, sam_model, sam_processor)
    else:
        label = np.zeros((height, width), dtype=np.uint8)
    return {
        "frame_id": record.frame_id,
        "image": record.image,
        "segmentation": PIL.Image.fromarray(label, mode="L"),
        "boxes": boxes,
    }


def fingerprint_of(parts: dict[str, Any], files: Iterable[Path], uncacheable: bool = False) -> str:
    """A cache fingerprint from the loader arguments and the index files' sizes and times."""
    signature = []
    for path in files:
        try:
            stat = path.stat()
            signature.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            signature.append([str(path), None, None])
    payload = json.dumps(
        {"v": _FORMAT_VERSION, "args": parts, "files": signature}, sort_keys=True, default=str
    )
    if uncacheable:
        payload += uuid.uuid4().hex
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def build_story_dataset(
    generator: Callable[[], Iterator[dict[str, Any]]],
    fingerprint: str,
    streaming: bool = False,
    cache_dir: str | None = None,
    split: str = "train",
) -> datasets.Dataset | datasets.IterableDataset:
    """Materialise ``generator`` (rows of the common schema) as a Dataset or an IterableDataset."""
    features = story_features()
    named_split = datasets.NamedSplit(split)
    if streaming:
        return datasets.IterableDataset.from_generator(generator, features=features, split=named_split)
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, cache_dir=cache_dir, fingerprint=fingerprint, split=named_split
        )
    except ValueError as error:
        if "corresponds to no data" in str(error):  # every story was skipped
            return empty_dataset(split)
        raise
    except datasets.exceptions.DatasetGenerationError as error:
        # Re-raise the user-facing cause (e.g. FileNotFoundError) rather than the wrapper.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, FileNotFoundError | ValueError):
            raise cause from error
        raise


def empty_dataset(split: str = "train") -> datasets.Dataset:
    """An empty dataset with the common schema (``from_generator`` cannot build one)."""
    features = story_features()
    return datasets.Dataset.from_dict(
        {k: [] for k in features}, features=features, split=datasets.NamedSplit(split)
    )


def assemble_row(
    story_id: str,
    frames: list[dict[str, Any]],
    records: list[FrameRecord],
    referential_captions: list[str],
    ref_flags: list[bool],
) -> dict[str, Any]:
    """One row of the common schema from finalised frames and their records."""
    return {
        "story_id": story_id,
        "frame_ids": [f["frame_id"] for f in frames],
        "images": [f["image"] for f in frames],
        "captions": [r.caption for r in records],
        "referential_captions": referential_captions,
        "is_referential": ref_flags,
        "characters": [r.characters for r in records],
        "boxes": [f["boxes"] for f in frames],
        "segmentation": [f["segmentation"] for f in frames],
        "character_labels": [list(map(int, r.character_labels)) for r in records],
        "background": [r.background for r in records],
        "background_labels": [list(map(int, r.background_labels)) for r in records],
    }


#: ``(referential captions, ref flags)`` of a story's frame records.
ReferentialRule = Callable[[list[FrameRecord]], tuple[list[str], list[bool]]]


def release_story_dataset(
    label: str,
    root: Path,
    split: str,
    stories: list[list[str]],
    frame_record: Callable[[str], FrameRecord],
    index_files: Iterable[Path],
    *,
    name: str,
    layout: str,
    frames_per_story: int,
    referential: bool,
    referential_rule: ReferentialRule,
    compat: str | None,
    seed: int,
    frame_index: int | None,
    num_stories: int | None,
    bbox_resolution: int,
    sam_model: Any = None,
    sam_processor: Any = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    story_key: Callable[[str], str] | None = None,
    **cache_key: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """The end of a release loader (FlintstonesSV, PororoSV ``label``): the dataset of ``stories``.

    Keeps the first ``num_stories`` stories (an empty dataset, with a warning, when none is left). Each
    row reads its frames with ``frame_record`` (a story with an unreadable frame is skipped with a
    warning naming ``story_key(first frame id)``, and one summary warning counts them), takes its
    referential captions from ``referential_rule`` (when ``referential``) and finalises the frames
    (SAM-refined box masks with ``sam_model``). The Arrow cache is keyed by the loader arguments
    (``name`` ... ``bbox_resolution`` and the loader's own ``cache_key``) and the ``index_files``; a
    SAM run is never reused.
    """
    if num_stories is not None:
        stories = stories[: int(num_stories)]
    if not stories:
        warnings.warn(f"{label} {split}: no story found in {str(root)!r}.", stacklevel=3)
        return empty_dataset(split)

    def generate() -> Iterator[dict[str, Any]]:
        stats = LoadStats()
        for story in stories:
            try:
                records = [frame_record(frame_id) for frame_id in story]
            except UnreadableFrameError as error:
                stats.skip(story_key(story[0]) if story_key else story[0], str(error))
                continue
            stats.stories += 1
            captions = [r.caption for r in records]
            if referential:
                ref_captions, flags = referential_rule(records)
            else:
                ref_captions, flags = list(captions), [False] * len(captions)
            frames = [finalize_frame(r, sam_model, sam_processor) for r in records]
            yield assemble_row(records[0].frame_id, frames, records, ref_captions, flags)
        stats.summary(f"{label} {split}")

    fingerprint = fingerprint_of(
        {
            "name": name,
            "root": str(root.resolve()),
            "layout": layout,
            "split": split,
            "frames_per_story": frames_per_story,
            "referential": referential,
            "compat": compat,
            "seed": seed,
            "frame_index": frame_index,
            "num_stories": num_stories,
            "bbox_resolution": bbox_resolution,
            **cache_key,
        },
        index_files,
        uncacheable=sam_model is not None,
    )
    return build_story_dataset(generate, fingerprint, streaming=streaming, cache_dir=cache_dir, split=split)
