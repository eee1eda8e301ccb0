"""FlintstonesSV from its public release files (the package downloads nothing).

Two layouts are read; :func:`detect_layout` picks one from the files present.

``"storydalle"`` (StoryDALL-E / AR-LDM / Make-A-Story; alias ``"arldm"``)::

    flintstones_annotations_v1-0.json   [{globalID, description, setting, characters: [{entityLabel, ...}]}]
    train-val-test_split.json           {"train": [globalID, ...], "val": [...], "test": [...]}
    following_cache4.pkl                {globalID: [4 following globalIDs]}  (5-frame stories)
    labels.pkl                          {globalID: 7-dim multi-hot}           (optional)
    video_frames_sampled/{globalID}.npy (n, 128, 128, 3) uint8 clip

``"storygptv"`` (StoryGPT-V's ``data/flintstones``)::

    split.json                          {"train": [id, ...], "val": [...], "test": [...]}
    following_cache3.pkl                {first id: [3 following ids]}         (4-frame stories)
    cleaned_annotations.json            {id: {caption, tokens, segments: [{id, bbox, start, end, word}]}}
    video_frames_sampled_4x/{id}.npy    (n, 512, 512, 3) uint8 clip (4x super-resolved)
    seg_mask_4x_comb/{id}-frame{k}.npy  integer mask of frame k, value = segment id (optional)
    labels.pkl                          {id: 7-dim multi-hot}                 (optional)
    labels_bg.pkl                       {"label": {id: 323-dim multi-hot}}    (optional)

Choices and assumptions:

- A story is a first id of the split that has at least ``frames_per_story - 1`` followers in the
  following cache, truncated to ``frames_per_story`` frames (5 at most in the StoryDALL-E layout,
  4 in the StoryGPT-V layout). Stories keep the split file's order.
- One frame per clip: ``frame_index`` if given, else a choice seeded by ``(seed, id)``; the same
  ``k`` selects the StoryGPT-V mask file.
- ``characters``: the 7 main characters (:data:`CHARACTERS`), canonically capitalised, from
  ``entityLabel`` (StoryDALL-E layout) or from the segments' ``word`` (StoryGPT-V layout), in
  annotation order without repeats. Other people ("woman", ...) are not characters.
- The referential rules use the full lower-cased ``entityLabel`` list (all people, as the public
  code does) when ``flintstones_annotations_v1-0.json`` is present, else the segment words.
- ``boxes``: StoryGPT-V segment boxes (given at ``bbox_resolution`` = 128 px) scaled to the stored
  frame; the union when a character has several segments. The StoryDALL-E layout has no usable
  boxes (empty lists).
- ``segmentation``: the release mask when present; else box masks (refined with SAM when
  ``sam_model`` and ``sam_processor`` are given); else zeros.
- ``background``: the annotation's ``setting`` (from ``flintstones_annotations_v1-0.json`` when the
  StoryGPT-V annotations lack it). ``background_labels``: ``labels_bg.pkl`` when present, else ``[]``.
- Bad frames: a missing or unreadable clip drops its whole story, with a warning naming the file,
  and one summary warning counts the dropped stories; an unreadable mask falls back to box masks.
- The pickles are read by :mod:`storygptv.data.safe_pickle`: only data types are rebuilt, and a file
  naming anything else is refused (nothing from it runs).
"""

from __future__ import annotations

import json
import re
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
    read_npy_frame,
    read_segment_mask,
    release_story_dataset,
    require_file,
)
from .referential import FLINTSTONES_FEMALE, FLINTSTONES_MALE, flintstones_referential, normalize_compat
from .safe_pickle import safe_load_pickle

__all__ = [
    "CHARACTERS",
    "FEMALE",
    "LAYOUTS",
    "MALE",
    "canonical_character",
    "detect_layout",
    "load_flintstones",
]

#: Label order of ``labels.pkl`` (and of ``character_labels``).
CHARACTERS: tuple[str, ...] = ("Wilma", "Fred", "Betty", "Barney", "Dino", "Pebbles", "Mr Slate")
#: Lower-case names referred to as "She" / "He".
FEMALE: tuple[str, ...] = FLINTSTONES_FEMALE
MALE: tuple[str, ...] = FLINTSTONES_MALE

LAYOUTS: dict[str, str] = {
    "storydalle": (
        "StoryDALL-E / AR-LDM: flintstones_annotations_v1-0.json, train-val-test_split.json, "
        "following_cache4.pkl, labels.pkl (optional) and video_frames_sampled/{globalID}.npy"
    ),
    "storygptv": (
        "StoryGPT-V: split.json, following_cache3.pkl, cleaned_annotations.json, "
        "video_frames_sampled_4x/{id}.npy, seg_mask_4x_comb/{id}-frame{k}.npy (optional), "
        "labels.pkl and labels_bg.pkl (optional)"
    ),
}
_LAYOUT_ALIASES = {
    "storydalle": "storydalle",
    "arldm": "storydalle",
    "ar-ldm": "storydalle",
    "storygptv": "storygptv",
}

_CANONICAL = {name.lower(): name for name in CHARACTERS}
_CANONICAL.update({"slate": "Mr Slate", "mister slate": "Mr Slate", "mrslate": "Mr Slate"})


def canonical_character(word: str) -> str | None:
    """The canonical name (e.g. ``"Mr Slate"``) of an annotated name, or ``None`` for other people."""
    key = re.sub(r"['’]s$", "", str(word).strip().lower())
    key = " ".join(key.replace(".", " ").replace("_", " ").split())
    return _CANONICAL.get(key)


def detect_layout(data_dir: str | Path) -> str:
    """Return ``"storygptv"`` or ``"storydalle"`` from the files present in ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"FlintstonesSV directory {str(root)!r} does not exist. Expected one of the layouts: "
            + "; ".join(LAYOUTS.values())
        )
    if (root / "split.json").exists() or (root / "cleaned_annotations.json").exists():
        return "storygptv"
    if (root / "train-val-test_split.json").exists() or (root / "flintstones_annotations_v1-0.json").exists():
        return "storydalle"
    raise FileNotFoundError(
        f"No FlintstonesSV release found in {str(root)!r}: expected split.json (StoryGPT-V layout) or "
        "train-val-test_split.json (StoryDALL-E layout). Layouts: " + " | ".join(LAYOUTS.values())
    )


def _load_dict(path: Path) -> dict[Any, Any]:
    """A pickled dict (restricted unpickler: no code from the file runs)."""
    value = safe_load_pickle(path)
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} should hold a pickled dict, got {type(value).__name__}.")
    return value


def _split_ids(splits: dict[str, Any], split: str, path: Path) -> list[str]:
    keys = {"train": ("train",), "validation": ("val", "validation", "valid"), "test": ("test",)}[split]
    for key in keys:
        if key in splits:
            return [str(i) for i in splits[key]]
    raise ValueError(f"{str(path)!r} has no {keys[0]!r} list (keys: {sorted(splits)}).")


def _first_existing(root: Path, names: tuple[str, ...], layout: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"Missing frame folder {str(root / names[0])!r}. Expected layout: {layout}")


def _vector(value: Any) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1).tolist()]


def load_flintstones(
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
    layout: str | None = None,
    num_stories: int | None = None,
    bbox_resolution: int = 128,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a FlintstonesSV split in the common story schema (one row per story).

    Args:
        data_dir: the release folder (either layout, see the module docstring).
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``.
        frames_per_story: frames per story (at most 5 in the StoryDALL-E layout, 4 in StoryGPT-V's).
        referential: substitute pronouns (:func:`storygptv.data.referential.flintstones_referential`).
        referential_compat: ``None`` (fixed rules), ``"make-a-story"`` or ``"storygptv"``.
        seed: seeds the choice of one frame per clip.
        frame_index: use this frame of every clip instead of a seeded choice.
        sam_model: optional ``transformers.SamModel`` refining box masks where no release mask exists.
        sam_processor: the matching ``transformers.SamProcessor``.
        streaming: return an ``IterableDataset`` that reads frames lazily.
        layout: ``"storygptv"`` or ``"storydalle"`` (alias ``"arldm"``); detected when ``None``.
        num_stories: keep only the first stories of the split.
        bbox_resolution: the resolution the segment boxes are given at (StoryGPT-V: 128).
        cache_dir: where ``datasets`` writes the Arrow cache (its default when ``None``).
    """
    if data_dir is None:
        raise ValueError(
            "FlintstonesSV is not downloaded by the package: pass `data_dir`, the release folder."
        )
    root = Path(data_dir).expanduser()
    split = normalize_split(split)
    compat = normalize_compat(referential_compat)
    if layout is None:
        layout = detect_layout(root)
    else:
        key = str(layout).lower()
        if key not in _LAYOUT_ALIASES:
            raise ValueError(f"Unknown FlintstonesSV layout {layout!r}; valid: {sorted(_LAYOUT_ALIASES)}.")
        layout = _LAYOUT_ALIASES[key]
    layout_text = LAYOUTS[layout]
    max_len = 5 if layout == "storydalle" else 4
    if not 1 <= int(frames_per_story) <= max_len:
        raise ValueError(
            f"frames_per_story={frames_per_story} is not available in the {layout} layout of FlintstonesSV "
            f"(its stories have {max_len} frames); pass 1 to {max_len}."
        )
    frames_per_story = int(frames_per_story)

    v1_path = root / "flintstones_annotations_v1-0.json"
    v1: dict[str, dict[str, Any]] = {}
    index_files: list[Path] = []
    if layout == "storydalle":
        split_path = require_file(root / "train-val-test_split.json", layout_text)
        follow_path = require_file(root / "following_cache4.pkl", layout_text)
        require_file(v1_path, layout_text)
        frame_dir = _first_existing(root, ("video_frames_sampled", "video_frames_sampled_4x"), layout_text)
        annotations: dict[str, dict[str, Any]] = {}
    else:
        split_path = require_file(root / "split.json", layout_text)
        follow_path = require_file(root / "following_cache3.pkl", layout_text)
        ann_path = require_file(root / "cleaned_annotations.json", layout_text)
        frame_dir = _first_existing(root, ("video_frames_sampled_4x", "video_frames_sampled"), layout_text)
        with open(ann_path, encoding="utf-8") as handle:
            annotations = {str(k): v for k, v in json.load(handle).items()}
        index_files.append(ann_path)
    if v1_path.exists():
        with open(v1_path, encoding="utf-8") as handle:
            v1 = {str(s["globalID"]): s for s in json.load(handle)}
        index_files.append(v1_path)
    with open(split_path, encoding="utf-8") as handle:
        ids = _split_ids(json.load(handle), split, split_path)
    followings = {str(k): [str(i) for i in v] for k, v in _load_dict(follow_path).items()}
    labels_path, bg_path = root / "labels.pkl", root / "labels_bg.pkl"
    labels = {str(k): v for k, v in _load_dict(labels_path).items()} if labels_path.exists() else {}
    bg_labels: dict[str, Any] = {}
    if bg_path.exists():
        raw = safe_load_pickle(bg_path)
        raw = raw.get("label", raw) if isinstance(raw, dict) else {}
        bg_labels = {str(k): v for k, v in raw.items()}
    mask_dir = root / "seg_mask_4x_comb"
    index_files += [split_path, follow_path, labels_path, bg_path]

    stories = [
        [first] + followings[first][: frames_per_story - 1]
        for first in ids
        if first in followings and len(followings[first]) >= frames_per_story - 1
    ]

    def frame_record(frame_id: str) -> FrameRecord:
        path = frame_dir / f"{frame_id}.npy"
        if not path.exists():
            raise UnreadableFrameError(f"missing frame file {str(path)!r}")
        array, k = read_npy_frame(path, frame_id, seed, frame_index)
        image = PIL.Image.fromarray(array, mode="RGB")
        height, width = array.shape[:2]
        v1_entry = v1.get(frame_id, {})
        entity_labels = [str(c.get("entityLabel", "")).strip() for c in v1_entry.get("characters", [])]
        characters: list[str] = []
        boxes: list[list[float]] = []
        label_map = None
        if layout == "storydalle":
            caption = str(v1_entry.get("description", ""))
            for label in entity_labels:
                name = canonical_character(label)
                if name and name not in characters:
                    characters.append(name)
                    boxes.append([])
            background = str(v1_entry.get("setting", "") or "")
            ref_set = [" ".join(e.lower().split()) for e in entity_labels if e]
        else:
            entry = annotations.get(frame_id)
            if entry is None:
                raise UnreadableFrameError(f"{frame_id!r} is not in cleaned_annotations.json")
            caption = str(entry.get("caption", v1_entry.get("description", "")))
            characters, boxes, segment_to_index = parse_segments(
                entry.get("segments", []), caption, canonical_character, width, height, bbox_resolution
            )
            if characters:
                label_map = read_segment_mask(mask_dir / f"{frame_id}-frame{k}.npy", segment_to_index)
            background = str(entry.get("setting", v1_entry.get("setting", "")) or "")
            if entity_labels:
                ref_set = [" ".join(e.lower().split()) for e in entity_labels if e]
            else:
                ref_set = [n.lower() for n in characters]
        char_labels = _vector(labels[frame_id]) if frame_id in labels else multi_hot(characters, CHARACTERS)
        bg = _vector(bg_labels[frame_id]) if frame_id in bg_labels else []
        return FrameRecord(
            frame_id=frame_id,
            image=image,
            caption=caption,
            characters=characters,
            referential_set=ref_set,
            boxes=boxes,
            label_map=label_map,
            character_labels=char_labels,
            background=background,
            background_labels=bg,
        )

    def referential_rule(records: list[FrameRecord]) -> tuple[list[str], list[bool]]:
        captions = [r.caption for r in records]
        return flintstones_referential(captions, [r.referential_set for r in records], compat=compat)

    return release_story_dataset(
        "FlintstonesSV",
        root,
        split,
        stories,
        frame_record,
        index_files,
        name="flintstones",
        layout=layout,
        frames_per_story=frames_per_story,
        referential=referential,
        referential_rule=referential_rule,
        compat=compat,
        seed=seed,
        frame_index=frame_index,
        num_stories=num_stories,
        bbox_resolution=bbox_resolution,
        sam_model=sam_model,
        sam_processor=sam_processor,
        streaming=streaming,
        cache_dir=cache_dir,
    )
