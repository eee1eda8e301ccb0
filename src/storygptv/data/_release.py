"""The release loaders' shared machinery: loading options, frame records, rows, caching and the dataset.

A release loader (:mod:`~storygptv.data.flintstones`, :mod:`~storygptv.data.pororo`) only knows its
files: it lists the stories (lists of frame ids) and reads one frame into a :class:`FrameRecord`.
:func:`release_story_dataset` does the rest the same way for every release: referential captions,
masks, skipped stories, the row of the common schema and the Arrow cache.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image

from ._common import UnreadableFrameError, normalize_split, story_features
from .masks import box_label_map, refine_label_map_with_sam, resize_label_map
from .referential import normalize_compat

__all__ = [
    "FrameRecord",
    "LoadStats",
    "ReleaseOptions",
    "release_root",
    "release_story_dataset",
    "chain_stories",
]

#: Bump when the produced rows change, so that cached Arrow files are not reused.
_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ReleaseOptions:
    """The loading options every release loader takes (FlintstonesSV, PororoSV), checked once.

    Pass them to a loader as keywords, e.g. ``load_flintstones(root, split="val", seed=1, streaming=True)``.

    Attributes:
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"`` (stored normalised).
        frames_per_story: frames per story, 1 to the release's story length.
        num_stories: keep only the first stories of the split.
        referential: substitute pronouns (otherwise ``referential_captions`` equals ``captions``).
        referential_compat: ``None`` (our fixed rules), ``"make-a-story"`` or ``"storygptv"`` to
            reproduce the public code (see :mod:`storygptv.data.referential`; stored normalised).
        seed: seeds every random choice (which frame of a clip, which caption).
        frame_index: use this frame of every clip instead of a seeded choice.
        bbox_resolution: the resolution the StoryGPT-V segment boxes are given at (128).
        sam_model: optional ``transformers.SamModel`` turning box prompts into masks where the release
            has no mask (a SAM run is never cached).
        sam_processor: the matching ``transformers.SamProcessor``.
        streaming: return an ``IterableDataset`` that reads frames lazily.
        cache_dir: where ``datasets`` writes the Arrow cache (its default when ``None``).
    """

    split: str = "train"
    frames_per_story: int = 4
    num_stories: int | None = None
    referential: bool = True
    referential_compat: str | None = None
    seed: int = 0
    frame_index: int | None = None
    bbox_resolution: int = 128
    sam_model: Any = None
    sam_processor: Any = None
    streaming: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", normalize_split(self.split))
        object.__setattr__(self, "referential_compat", normalize_compat(self.referential_compat))
        object.__setattr__(self, "frames_per_story", int(self.frames_per_story))

    @classmethod
    def from_kwargs(cls, label: str, split: str, options: Mapping[str, Any]) -> ReleaseOptions:
        """The options of a ``label`` loader call; an unknown keyword is a ``TypeError`` listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"{label} loader got unknown options {unknown}; valid options: {valid}.")
        return cls(split=split, **options)

    def check_frames_per_story(self, label: str, layout: str, story_length: int) -> int:
        """``frames_per_story`` when the release's stories (of ``story_length`` frames) are long enough."""
        if not 1 <= self.frames_per_story <= story_length:
            raise ValueError(
                f"frames_per_story={self.frames_per_story}: {label} stories have {story_length} frames in the "
                f"{layout} layout; pass 1 to {story_length}."
            )
        return self.frames_per_story


def release_root(data_dir: str | Path | None, label: str, layouts: str) -> Path:
    """The release folder ``data_dir`` of ``label``, checked (the package downloads nothing)."""
    if data_dir is None:
        raise ValueError(f"{label} is not downloaded by the package: pass `data_dir`, the release folder.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{label} directory {str(root)!r} does not exist. Expected layout: {layouts}")
    return root


def chain_stories(
    firsts: Iterable[str], followings: Mapping[str, Sequence[str]], frames_per_story: int
) -> list[list[str]]:
    """Chain each first frame id with its followers into stories (lists of ``frames_per_story`` frame ids).

    A first frame without enough followers starts no story; stories keep the order of ``firsts``.

    Example:
        >>> chain_stories(["a", "x", "b"], {"a": ["a1", "a2"], "b": ["b1"]}, 3)
        [['a', 'a1', 'a2']]
    """
    return [
        [first, *followings[first][: frames_per_story - 1]]
        for first in firsts
        if first in followings and len(followings[first]) >= frames_per_story - 1
    ]


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
    options: ReleaseOptions,
    stories: list[list[str]],
    frame_record: Callable[[str], FrameRecord],
    index_files: Iterable[Path],
    *,
    name: str,
    layout: str,
    referential_rule: ReferentialRule,
    story_key: Callable[[str], str] | None = None,
    **cache_key: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """The end of a release loader (FlintstonesSV, PororoSV ``label``): the dataset of ``stories``.

    Keeps the first ``options.num_stories`` stories (an empty dataset, with a warning, when none is
    left). Each row reads its frames with ``frame_record`` (a story with an unreadable frame is
    skipped with a warning naming ``story_key(first frame id)``, and one summary warning counts them),
    takes its referential captions from ``referential_rule`` (when ``options.referential``) and
    finalises the frames (SAM-refined box masks with ``options.sam_model``). The Arrow cache is keyed
    by the options, ``name``, ``layout``, the loader's own ``cache_key`` and the ``index_files``; a
    SAM run is never reused.
    """
    split = options.split
    if options.num_stories is not None:
        stories = stories[: int(options.num_stories)]
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
            if options.referential:
                ref_captions, flags = referential_rule(records)
            else:
                ref_captions, flags = list(captions), [False] * len(captions)
            frames = [finalize_frame(r, options.sam_model, options.sam_processor) for r in records]
            yield assemble_row(records[0].frame_id, frames, records, ref_captions, flags)
        stats.summary(f"{label} {split}")

    fingerprint = fingerprint_of(
        {
            "name": name,
            "root": str(root.resolve()),
            "layout": layout,
            "split": split,
            "frames_per_story": options.frames_per_story,
            "referential": options.referential,
            "compat": options.referential_compat,
            "seed": options.seed,
            "frame_index": options.frame_index,
            "num_stories": options.num_stories,
            "bbox_resolution": options.bbox_resolution,
            **cache_key,
        },
        index_files,
        uncacheable=options.sam_model is not None,
    )
    return build_story_dataset(
        generate, fingerprint, streaming=options.streaming, cache_dir=options.cache_dir, split=split
    )
