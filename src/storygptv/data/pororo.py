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
  use the names the caption mentions (:func:`storygptv.characters.find_character_mentions`:
  whole words, any case).
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
  :data:`CHARACTERS` by :func:`storygptv.characters.canonical_name`: any case, possessive dropped),
  ``boxes`` (given at 128 px, scaled) and, with the mask files,
  ``segmentation`` (else box masks, optionally refined with SAM). The name word of a segment is taken
  from ``word``, else from the chosen caption's words ``start``..``end`` (which assumes the segments
  refer to that caption).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image

from ..characters import canonical_name, find_character_mentions
from ._common import (
    SPLITS,
    UnreadableFrameError,
    label_vector,
    multi_hot,
    pick_frame_index,
    read_npy_frame,
    release_split,
    require_files,
    require_frame_file,
)
from ._release import FrameRecord, ReleaseOptions, chain_stories, release_root, release_story_dataset
from ._storygptv import read_segment_annotations
from .referential import PORORO_CHARACTERS, PORORO_FEMALE, PORORO_MALE, pororo_referential
from .safe_pickle import safe_load_dict, safe_load_npy

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
    return {_frame_id(k): v for k, v in safe_load_dict(path, LAYOUT).items()}


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
    """The characters a caption names (the library's name matching), in label order."""
    named = {m.name for m in find_character_mentions(caption, CHARACTERS)}
    return [name for name in CHARACTERS if name in named]


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
    return canonical_name(word, CHARACTERS)


def load_pororo(
    data_dir: str | Path,
    split: str = "train",
    *,
    caption_index: int | str | None = None,
    layout: str | None = None,
    **options: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a PororoSV split in the common story schema (one row per story).

    Args:
        data_dir: the release folder (see the module docstring).
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``.
        caption_index: which of a frame's captions to use: an int, ``"random"``, or ``"frame"``
            (StoryGPT-V's rule tied to the sampled frame). ``None``: 0 in the original layout,
            ``"frame"`` in the StoryGPT-V layout.
        layout: ``"storygan"`` (original) or ``"storygptv"``; detected when ``None``.
        **options: the loading options of :class:`~storygptv.data.ReleaseOptions`: ``frames_per_story``
            (1 to 5, 1 to 4 in the StoryGPT-V layout), ``num_stories``, ``referential``
            (:func:`~storygptv.data.referential.pororo_referential`), ``referential_compat``, ``seed``
            (which frame of a clip, and which caption with ``caption_index="random"``), ``frame_index``,
            ``bbox_resolution``, ``sam_model`` and ``sam_processor`` (box masks refined where the
            StoryGPT-V layout has no mask file; the original layout has no boxes), ``streaming`` and
            ``cache_dir``.
    """
    options = ReleaseOptions.from_kwargs("PororoSV", split, options)
    root = release_root(data_dir, "PororoSV", LAYOUT)
    layout = detect_layout(root) if layout is None else str(layout).lower()
    if layout not in ("storygan", "storygptv"):
        raise ValueError(f"Unknown PororoSV layout {layout!r}; valid: ['storygan', 'storygptv'].")
    options.check_frames_per_story("PororoSV", layout, 5 if layout == "storygan" else 4)
    if caption_index is None:
        caption_index = 0 if layout == "storygan" else "frame"
    if caption_index not in ("random", "frame") and not isinstance(caption_index, int | np.integer):
        raise ValueError(f"caption_index must be an int, 'random' or 'frame', got {caption_index!r}.")

    plan = _storygptv_plan if layout == "storygptv" else _storygan_plan
    stories, frame_record, index_files = plan(root, options, caption_index)
    return release_story_dataset(
        "PororoSV",
        root,
        options,
        stories,
        frame_record,
        index_files,
        name="pororo",
        layout=layout,
        referential_rule=lambda records: pororo_referential(
            [r.caption for r in records], compat=options.referential_compat
        ),
        story_key=_frame_id,
        caption_index=caption_index,
    )


_FrameReader = Callable[[str], FrameRecord]


def _storygan_plan(
    root: Path, options: ReleaseOptions, caption_index: int | str
) -> tuple[list[list[str]], _FrameReader, list[Path]]:
    """Stories, frame reader and index files of the original (StoryGAN) layout."""
    desc_path, cache_path, follow_path, ids_path = require_files(
        root,
        LAYOUT,
        "descriptions.npy",
        "img_cache4.npy",
        "following_cache4.npy",
        "train_seen_unseen_ids.npy",
    )
    labels_path = root / "labels.npy"
    descriptions = _load_dict(desc_path)
    labels = _load_dict(labels_path) if labels_path.exists() else {}
    firsts = np.asarray(safe_load_npy(cache_path)).reshape(-1)
    followings = np.asarray(safe_load_npy(follow_path))
    if followings.ndim == 1:
        followings = followings.reshape(len(firsts), -1)
    split_arrays = list(safe_load_npy(ids_path))
    if len(split_arrays) != len(SPLITS):
        raise ValueError(
            f"{str(ids_path)!r} must hold 3 arrays (train, val, test), found {len(split_arrays)}."
        )
    chosen = np.sort(np.asarray(split_arrays[SPLITS.index(options.split)]).astype(np.int64))
    # Indices into the caches, sorted as the public code does; an index beyond them starts no story.
    stories: list[list[str]] = []
    for index in chosen.tolist():
        if 0 <= index < len(firsts):
            follow = [_frame_id(p) for p in np.asarray(followings[index]).reshape(-1).tolist()]
            ids = [_frame_id(firsts[index]), *follow]
            if len(ids) >= options.frames_per_story:
                stories.append(ids[: options.frames_per_story])

    def frame_record(frame_id: str) -> FrameRecord:
        path = require_frame_file(root / (frame_id + ".png"))
        try:
            with PIL.Image.open(path) as opened:
                strip = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:
            raise UnreadableFrameError(f"{path}: {error}") from error
        image = crop_strip_frame(strip, frame_id, options.seed, options.frame_index)
        index = 0 if caption_index == "frame" else caption_index
        caption = _pick_caption(descriptions.get(frame_id, ""), frame_id, options.seed, index)
        if frame_id in labels:
            vector = label_vector(labels[frame_id])
            characters = [name for name, on in zip(CHARACTERS, vector) if on]
        else:
            characters = _names_in(caption)
            vector = multi_hot(characters, CHARACTERS)
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


def _storygptv_plan(
    root: Path, options: ReleaseOptions, caption_index: int | str
) -> tuple[list[list[str]], _FrameReader, list[Path]]:
    """Stories, frame reader and index files of StoryGPT-V's layout."""
    split_path, follow_path, ann_path = require_files(
        root, STORYGPTV_LAYOUT, "split.json", "following_cache3.pkl", "cleaned_annotations.json"
    )
    frame_dir = root / "video_frames_sampled_4x"
    if not frame_dir.is_dir():
        raise FileNotFoundError(
            f"Missing frame folder {str(frame_dir)!r}. Expected layout: {STORYGPTV_LAYOUT}"
        )
    with open(split_path, encoding="utf-8") as handle:
        firsts = [_frame_id(i) for i in release_split(json.load(handle), options.split, split_path)]
    followings = {_frame_id(k): [_frame_id(i) for i in v] for k, v in _load_dict(follow_path).items()}
    with open(ann_path, encoding="utf-8") as handle:
        annotations = {_frame_id(k): v for k, v in json.load(handle).items()}
    labels_paths = [root / "labels.pkl", root / "labels.npy"]
    labels = next((_load_dict(path) for path in labels_paths if path.exists()), {})
    stories = chain_stories(firsts, followings, options.frames_per_story)
    mask_dir = root / "seg_mask_4x_comb"

    def frame_record(frame_id: str) -> FrameRecord:
        path = require_frame_file(frame_dir / f"{frame_id}.npy")
        entry = annotations.get(frame_id)
        if entry is None:
            raise UnreadableFrameError(f"{frame_id!r} is not in cleaned_annotations.json")
        array, k = read_npy_frame(path, frame_id, options.seed, options.frame_index)
        captions = entry.get("captions")
        if captions is None:
            captions = [entry.get("caption", "")]
        captions = [str(c) for c in ([captions] if isinstance(captions, str) else captions)]
        if caption_index == "frame":
            caption = _caption_for_frame(captions, k, _clip_length(path))
        else:
            caption = _pick_caption(captions, frame_id, options.seed, caption_index)
        characters, boxes, label_map = read_segment_annotations(
            entry,
            caption,
            _canonical,
            array.shape,
            mask_dir / f"{frame_id}-frame{k}.npy",
            options.bbox_resolution,
        )
        return FrameRecord(
            frame_id=frame_id,
            image=PIL.Image.fromarray(array, mode="RGB"),
            caption=caption,
            characters=characters,
            referential_set=[n.lower() for n in characters],
            boxes=boxes,
            label_map=label_map,
            character_labels=(
                label_vector(labels[frame_id]) if frame_id in labels else multi_hot(characters, CHARACTERS)
            ),
        )

    return stories, frame_record, [split_path, follow_path, ann_path, *labels_paths]


def _clip_length(path: Path) -> int:
    clip = np.load(path, mmap_mode="r", allow_pickle=False)
    return int(clip.shape[0]) if clip.ndim == 4 else 1
