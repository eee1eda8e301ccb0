"""PororoSV from its public release files (the package downloads nothing).

Two layouts are read; :func:`detect_layout` picks one from the files present.

``"storygan"`` (the original StoryGAN / StoryDALL-E layout, ``data_dir``)::

    descriptions.npy            pickled dict {frame id: [caption, ...]}  (a 0-d object array)
    img_cache4.npy              (N,) array of first-frame paths relative to data_dir, e.g.
                                b"Pororo_ENGLISH1_1_ep6/12.png"
    following_cache4.npy        (N, 4) array of the 4 following frame paths (5-frame stories)
    train_seen_unseen_ids.npy   pickled (train, val, test) arrays of indices into img_cache4.npy
    labels.npy                  pickled dict {frame id: 9-dim multi-hot}  (optional)
    {episode}/{n}.png           frame "strips": the sampled 128-px frames of one shot stacked
                                vertically (height = k * width)

A frame id is its path without ``.png`` (``"Pororo_ENGLISH1_1_ep6/12"``); ``descriptions`` and
``labels`` are keyed by it.

Assumptions, where the release leaves room (the loader is tolerant of the variants named here):

- Paths in the caches may be ``bytes``, ``str`` or the text ``"b'...'"`` (the public code slices
  ``str(path)[2:-1]``); the ``.png`` suffix is optional. Strips may also be horizontal; a square
  image is a single frame.
- Split ids are sorted, as in the public code; stories have 5 frames and are truncated to
  ``frames_per_story``.
- Captions: ``descriptions[id][caption_index]`` with ``caption_index=0`` (earlier work; Make-A-Story
  uses ``[0]``); ``caption_index="random"`` picks one per frame seeded by ``(seed, id)`` (StoryGPT-V
  samples a random caption). A plain string value is used as is.
- ``characters`` come from ``labels.npy`` (label order, :data:`CHARACTERS`); frames missing from it
  use the names found in the caption (whole words, any case).
- There are no boxes or masks: ``boxes`` are empty lists and ``segmentation`` is all zeros;
  ``background`` is ``""`` and ``background_labels`` are empty (PororoSV has no background labels).
- Bad frames: a missing or unreadable PNG drops its whole story with a warning naming the file, and
  one summary warning counts the dropped stories.
- The pickles and object arrays are read by :mod:`storygptv.data.safe_pickle`: only data types are
  rebuilt, and a file naming anything else is refused (nothing from it runs).

``"storygptv"`` (StoryGPT-V's ``data/pororo``; detected from ``split.json`` + ``cleaned_annotations.json``)::

    split.json                          {"train": [id, ...], "val": [...], "test": [...]}
    following_cache3.pkl                {first id: [3 following ids]}          (4-frame stories)
    cleaned_annotations.json            {id: {captions: [...], segments: [{id, bbox, start, end, word}]}}
    video_frames_sampled_4x/{id}.npy    (n, 512, 512, 3) uint8 clip
    seg_mask_4x_comb/{id}-frame{k}.npy  integer mask of frame k, value = segment id (optional)
    labels.pkl (or labels.npy)          {id: 9-dim multi-hot}                  (optional)

- Ids may contain "/" (they are then sub-folders); captions default to StoryGPT-V's stage-1 rule
  (``caption_index="frame"``: caption ``min(ceil((k + 1) / n * C), C - 1)`` for frame k of n, so
  caption 0 is never used); segments give ``characters`` (segment words matched to
  :data:`CHARACTERS`, any case), ``boxes`` (given at 128 px, scaled) and, with the mask files,
  ``segmentation`` (else box masks, optionally refined with SAM). The name word of a segment is taken
  from ``word``, else from the chosen caption's words ``start``..``end`` (which assumes the segments
  refer to that caption).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image

from ._common import (
    FrameRecord,
    UnreadableFrameError,
    multi_hot,
    normalize_split,
    parse_segments,
    pick_frame_index,
    read_npy_frame,
    read_segment_mask,
    release_story_dataset,
    require_file,
)
from .referential import (
    PORORO_CHARACTERS,
    PORORO_FEMALE,
    PORORO_MALE,
    normalize_compat,
    pororo_referential,
)
from .safe_pickle import safe_load_npy, safe_load_pickle

__all__ = [
    "CHARACTERS",
    "FEMALE",
    "LAYOUT",
    "MALE",
    "STORYGPTV_LAYOUT",
    "crop_strip_frame",
    "detect_layout",
    "load_pororo",
]

#: Label order of ``labels.npy`` (and of ``character_labels``).
CHARACTERS: tuple[str, ...] = PORORO_CHARACTERS
#: Names referred to as "She" / "He".
FEMALE: tuple[str, ...] = PORORO_FEMALE
MALE: tuple[str, ...] = PORORO_MALE

LAYOUT = (
    "PororoSV (StoryGAN / StoryDALL-E): descriptions.npy, img_cache4.npy, following_cache4.npy, "
    "train_seen_unseen_ids.npy, labels.npy (optional) and the PNG frame strips {episode}/{n}.png"
)
STORYGPTV_LAYOUT = (
    "PororoSV (StoryGPT-V): split.json, following_cache3.pkl, cleaned_annotations.json, "
    "video_frames_sampled_4x/{id}.npy, seg_mask_4x_comb/{id}-frame{k}.npy and labels.pkl (optional)"
)


def _path_text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        text = bytes(value).decode("utf-8", errors="replace")
    else:
        text = str(value)
        if len(text) >= 3 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
            text = text[2:-1]
    return text.strip().lstrip("/")


def _frame_id(value: Any) -> str:
    text = _path_text(value)
    return text[:-4] if text.lower().endswith(".png") else text


def _load_dict(path: Path) -> dict[str, Any]:
    """A pickled ``{frame id: value}`` dict from a ``.npy`` (0-d object array) or ``.pkl`` file."""
    value = safe_load_pickle(path) if path.suffix == ".pkl" else safe_load_npy(path)
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        value = value.item()
    if not isinstance(value, dict):
        raise ValueError(
            f"{str(path)!r} should hold a pickled dict, got {type(value).__name__}. Expected layout: {LAYOUT}"
        )
    return {_frame_id(k): v for k, v in value.items()}


def crop_strip_frame(
    image: PIL.Image.Image, frame_id: str, seed: int, frame_index: int | None
) -> PIL.Image.Image:
    """Cut one square frame out of a strip of frames (vertical or horizontal), seeded or by index."""
    width, height = image.size
    shorter, longer = min(width, height), max(width, height)
    count = max(longer // shorter, 1)
    k = pick_frame_index(count, frame_id, seed, frame_index)
    if height >= width:
        box = (0, k * shorter, shorter, (k + 1) * shorter)
    else:
        box = (k * shorter, 0, (k + 1) * shorter, shorter)
    return image.crop(box)


def _names_in(caption: str) -> list[str]:
    return [n for n in CHARACTERS if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", caption, re.IGNORECASE)]


def _pick_caption(value: Any, frame_id: str, seed: int, caption_index: int | str) -> str:
    if isinstance(value, str | bytes):
        return _path_text(value) if isinstance(value, bytes) else value
    captions = [str(c) for c in list(value)]
    if not captions:
        return ""
    if caption_index == "random":
        rng = np.random.default_rng(zlib.crc32(f"caption:{int(seed)}:{frame_id}".encode()))
        return captions[int(rng.integers(len(captions)))]
    return captions[min(int(caption_index), len(captions) - 1)]


def _caption_for_frame(captions: list[str], k: int, n: int) -> str:
    """StoryGPT-V's stage-1 rule: caption ``min(ceil((k + 1) / n * C), C - 1)`` for frame k of n."""
    if not captions:
        return ""
    count = len(captions)
    return captions[max(min(math.ceil((k + 1) / max(n, 1) * count), count - 1), 0)]


def detect_layout(data_dir: str | Path) -> str:
    """Return ``"storygptv"`` or ``"storygan"`` (the original layout) from the files in ``data_dir``."""
    root = Path(data_dir)
    if (root / "split.json").exists() and (root / "cleaned_annotations.json").exists():
        return "storygptv"
    return "storygan"


def _canonical(word: str) -> str | None:
    key = re.sub(r"['’]s$", "", str(word).strip()).lower()
    for name in CHARACTERS:
        if name.lower() == key:
            return name
    return None


def load_pororo(
    data_dir: str | Path,
    split: str = "train",
    frames_per_story: int = 4,
    referential: bool = True,
    referential_compat: str | None = None,
    seed: int = 0,
    frame_index: int | None = None,
    sam_model: Any = None,
    sam_processor: Any = None,
    streaming: bool = False,
    num_stories: int | None = None,
    caption_index: int | str | None = None,
    layout: str | None = None,
    bbox_resolution: int = 128,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a PororoSV split in the common story schema (one row per story).

    Args:
        data_dir: the release folder (see the module docstring).
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``.
        frames_per_story: frames per story, 1 to 5 (1 to 4 in the StoryGPT-V layout).
        referential: substitute pronouns (:func:`storygptv.data.referential.pororo_referential`).
        referential_compat: ``None`` (ours), ``"storygptv"`` or ``"make-a-story"``.
        seed: seeds the choice of one frame per clip (and of the caption with ``caption_index="random"``).
        frame_index: use this frame of every clip instead of a seeded choice.
        sam_model: optional ``transformers.SamModel`` refining box masks where the StoryGPT-V layout
            has no mask file (the original layout has no boxes, so it is unused there).
        sam_processor: the matching ``transformers.SamProcessor``.
        streaming: return an ``IterableDataset`` that reads frames lazily.
        num_stories: keep only the first stories of the split.
        caption_index: which of a frame's captions to use: an int, ``"random"``, or ``"frame"``
            (StoryGPT-V's rule tied to the sampled frame). ``None``: 0 in the original layout,
            ``"frame"`` in the StoryGPT-V layout.
        layout: ``"storygan"`` (original) or ``"storygptv"``; detected when ``None``.
        bbox_resolution: the resolution the StoryGPT-V segment boxes are given at.
        cache_dir: where ``datasets`` writes the Arrow cache (its default when ``None``).
    """
    if data_dir is None:
        raise ValueError("PororoSV is not downloaded by the package: pass `data_dir`, the release folder.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"PororoSV directory {str(root)!r} does not exist. Expected layout: {LAYOUT}")
    split = normalize_split(split)
    compat = normalize_compat(referential_compat)
    layout = detect_layout(root) if layout is None else str(layout).lower()
    if layout not in ("storygan", "storygptv"):
        raise ValueError(f"Unknown PororoSV layout {layout!r}; valid: ['storygan', 'storygptv'].")
    max_len = 5 if layout == "storygan" else 4
    if not 1 <= int(frames_per_story) <= max_len:
        raise ValueError(
            f"frames_per_story={frames_per_story}: PororoSV stories have {max_len} frames in the {layout} "
            f"layout; pass 1 to {max_len}."
        )
    frames_per_story = int(frames_per_story)
    if caption_index is None:
        caption_index = 0 if layout == "storygan" else "frame"
    if caption_index not in ("random", "frame") and not isinstance(caption_index, int | np.integer):
        raise ValueError(f"caption_index must be an int, 'random' or 'frame', got {caption_index!r}.")

    if layout == "storygptv":
        stories, frame_record, index_files = _storygptv_plan(
            root, split, frames_per_story, seed, frame_index, caption_index, bbox_resolution
        )
    else:
        stories, frame_record, index_files = _storygan_plan(
            root, split, frames_per_story, seed, frame_index, caption_index
        )
    return release_story_dataset(
        "PororoSV",
        root,
        split,
        stories,
        frame_record,
        index_files,
        name="pororo",
        layout=layout,
        frames_per_story=frames_per_story,
        referential=referential,
        referential_rule=lambda records: pororo_referential([r.caption for r in records], compat=compat),
        compat=compat,
        seed=seed,
        frame_index=frame_index,
        num_stories=num_stories,
        bbox_resolution=bbox_resolution,
        sam_model=sam_model,
        sam_processor=sam_processor,
        streaming=streaming,
        cache_dir=cache_dir,
        story_key=_frame_id,
        caption_index=caption_index,
    )


_FrameReader = Callable[[str], FrameRecord]


def _storygan_plan(
    root: Path,
    split: str,
    frames_per_story: int,
    seed: int,
    frame_index: int | None,
    caption_index: int | str,
) -> tuple[list[list[str]], _FrameReader, list[Path]]:
    desc_path = require_file(root / "descriptions.npy", LAYOUT)
    cache_path = require_file(root / "img_cache4.npy", LAYOUT)
    follow_path = require_file(root / "following_cache4.npy", LAYOUT)
    ids_path = require_file(root / "train_seen_unseen_ids.npy", LAYOUT)
    labels_path = root / "labels.npy"
    descriptions = _load_dict(desc_path)
    labels = _load_dict(labels_path) if labels_path.exists() else {}
    firsts = np.asarray(safe_load_npy(cache_path)).reshape(-1)
    followings = np.asarray(safe_load_npy(follow_path))
    if followings.ndim == 1:
        followings = followings.reshape(len(firsts), -1)
    split_arrays = list(safe_load_npy(ids_path))
    if len(split_arrays) != 3:
        raise ValueError(
            f"{str(ids_path)!r} must hold 3 arrays (train, val, test), found {len(split_arrays)}."
        )
    chosen = np.sort(
        np.asarray(split_arrays[{"train": 0, "validation": 1, "test": 2}[split]]).astype(np.int64)
    )

    stories: list[list[str]] = []
    for index in chosen.tolist():
        if not 0 <= index < len(firsts):
            continue
        follow = [_frame_id(p) for p in np.asarray(followings[index]).reshape(-1).tolist()]
        ids = [_frame_id(firsts[index])] + follow
        if len(ids) >= frames_per_story:
            stories.append(ids[:frames_per_story])

    def frame_record(frame_id: str) -> FrameRecord:
        path = root / (frame_id + ".png")
        if not path.exists():
            raise UnreadableFrameError(f"missing frame file {str(path)!r}")
        try:
            with PIL.Image.open(path) as opened:
                strip = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:
            raise UnreadableFrameError(f"{path}: {error}") from error
        image = crop_strip_frame(strip, frame_id, seed, frame_index)
        index = 0 if caption_index == "frame" else caption_index
        caption = _pick_caption(descriptions.get(frame_id, ""), frame_id, seed, index)
        characters, vector = _characters(labels, frame_id, caption)
        return FrameRecord(
            frame_id=frame_id,
            image=image,
            caption=caption,
            characters=characters,
            referential_set=[n.lower() for n in characters],
            boxes=[[] for _ in characters],
            character_labels=vector,
        )

    return stories, frame_record, [desc_path, cache_path, follow_path, ids_path, labels_path]


def _characters(labels: dict[str, Any], frame_id: str, caption: str) -> tuple[list[str], list[int]]:
    if frame_id in labels:
        vector = [int(v) for v in np.asarray(labels[frame_id]).reshape(-1).tolist()]
        return [name for name, on in zip(CHARACTERS, vector) if on], vector
    characters = _names_in(caption)
    return characters, multi_hot(characters, CHARACTERS)


def _storygptv_plan(
    root: Path,
    split: str,
    frames_per_story: int,
    seed: int,
    frame_index: int | None,
    caption_index: int | str,
    bbox_resolution: int,
) -> tuple[list[list[str]], _FrameReader, list[Path]]:
    split_path = require_file(root / "split.json", STORYGPTV_LAYOUT)
    follow_path = require_file(root / "following_cache3.pkl", STORYGPTV_LAYOUT)
    ann_path = require_file(root / "cleaned_annotations.json", STORYGPTV_LAYOUT)
    frame_dir = root / "video_frames_sampled_4x"
    if not frame_dir.is_dir():
        raise FileNotFoundError(
            f"Missing frame folder {str(frame_dir)!r}. Expected layout: {STORYGPTV_LAYOUT}"
        )
    with open(split_path, encoding="utf-8") as handle:
        splits = json.load(handle)
    key = next(
        (
            k
            for k in {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}[split]
            if k in splits
        ),
        None,
    )
    if key is None:
        raise ValueError(f"{str(split_path)!r} has no list for split {split!r} (keys: {sorted(splits)}).")
    followings = {_frame_id(k): [_frame_id(i) for i in v] for k, v in _load_dict(follow_path).items()}
    with open(ann_path, encoding="utf-8") as handle:
        annotations = {_frame_id(k): v for k, v in json.load(handle).items()}
    labels: dict[str, Any] = {}
    for labels_path in (root / "labels.pkl", root / "labels.npy"):
        if labels_path.exists():
            labels = _load_dict(labels_path)
            break
    stories = [
        [first] + followings[first][: frames_per_story - 1]
        for first in (_frame_id(i) for i in splits[key])
        if first in followings and len(followings[first]) >= frames_per_story - 1
    ]
    mask_dir = root / "seg_mask_4x_comb"

    def frame_record(frame_id: str) -> FrameRecord:
        path = frame_dir / f"{frame_id}.npy"
        if not path.exists():
            raise UnreadableFrameError(f"missing frame file {str(path)!r}")
        entry = annotations.get(frame_id)
        if entry is None:
            raise UnreadableFrameError(f"{frame_id!r} is not in cleaned_annotations.json")
        array, k = read_npy_frame(path, frame_id, seed, frame_index)
        height, width = array.shape[:2]
        captions = entry.get("captions")
        if captions is None:
            captions = [entry.get("caption", "")]
        captions = [str(c) for c in ([captions] if isinstance(captions, str) else captions)]
        if caption_index == "frame":
            num_frames = _clip_length(path)
            caption = _caption_for_frame(captions, k, num_frames)
        else:
            caption = _pick_caption(captions, frame_id, seed, caption_index)
        characters, boxes, segment_to_index = parse_segments(
            entry.get("segments", []), caption, _canonical, width, height, bbox_resolution
        )
        label_map = None
        if characters:
            label_map = read_segment_mask(mask_dir / f"{frame_id}-frame{k}.npy", segment_to_index)
        if frame_id in labels:
            vector = [int(v) for v in np.asarray(labels[frame_id]).reshape(-1).tolist()]
        else:
            vector = multi_hot(characters, CHARACTERS)
        return FrameRecord(
            frame_id=frame_id,
            image=PIL.Image.fromarray(array, mode="RGB"),
            caption=caption,
            characters=characters,
            referential_set=[n.lower() for n in characters],
            boxes=boxes,
            label_map=label_map,
            character_labels=vector,
        )

    return (
        stories,
        frame_record,
        [split_path, follow_path, ann_path, root / "labels.pkl", root / "labels.npy"],
    )


def _clip_length(path: Path) -> int:
    clip = np.load(path, mmap_mode="r", allow_pickle=False)
    return int(clip.shape[0]) if clip.ndim == 4 else 1
