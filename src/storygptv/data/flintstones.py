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
from pathlib import Path
from typing import Any

import datasets
import PIL.Image

from ..characters import canonical_name
from ._common import (
    UnreadableFrameError,
    label_vector,
    multi_hot,
    read_npy_frame,
    release_split,
    require_files,
)
from ._release import FrameRecord, ReleaseOptions, chain_stories, release_root, release_story_dataset
from ._storygptv import read_segment_annotations
from .referential import FLINTSTONES_FEMALE, FLINTSTONES_MALE, flintstones_referential
from .safe_pickle import safe_load_dict, safe_load_pickle

__all__ = [
    "CHARACTERS",
    "FEMALE",
    "LAYOUTS",
    "MALE",
    "background_label_width",
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

#: Other spellings of a character in the annotations (keys as :func:`storygptv.characters.canonical_name` reads them).
_ALIASES = {"slate": "Mr Slate", "mister slate": "Mr Slate", "mrslate": "Mr Slate"}


def canonical_character(word: str) -> str | None:
    """The canonical name (e.g. ``"Mr Slate"``) of an annotated name, or ``None`` for other people.

    Example:
        >>> canonical_character("mr. slate"), canonical_character("Fred's"), canonical_character("woman")
        ('Mr Slate', 'Fred', None)
    """
    return canonical_name(word, CHARACTERS, _ALIASES)


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


def _first_existing(root: Path, names: tuple[str, ...], layout: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"Missing frame folder {str(root / names[0])!r}. Expected layout: {layout}")


def _read_background_labels(path: Path) -> dict[str, Any]:
    """``{frame id: 323-dim vector}`` of a ``labels_bg.pkl`` (``{"label": {...}}``, or the inner dict)."""
    raw = safe_load_pickle(path)
    raw = raw.get("label", raw) if isinstance(raw, dict) else {}
    return {str(k): v for k, v in raw.items()}


def background_label_width(data_dir: str | Path) -> int:
    """The length of the background label vectors of a release (``labels_bg.pkl``; 323 in StoryGPT-V's).

    Raises:
        FileNotFoundError: the release has no ``labels_bg.pkl`` (the StoryDALL-E layout has none).
        ValueError: the file holds no vector.
    """
    root = release_root(data_dir, "FlintstonesSV", " | ".join(LAYOUTS.values()))
    (path,) = require_files(root, LAYOUTS["storygptv"], "labels_bg.pkl")
    for vector in _read_background_labels(path).values():
        return len(label_vector(vector))
    raise ValueError(f"{str(path)!r} holds no background label vector.")


def load_flintstones(
    data_dir: str | Path, split: str = "train", *, layout: str | None = None, **options: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a FlintstonesSV split in the common story schema (one row per story).

    Args:
        data_dir: the release folder (either layout, see the module docstring).
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``.
        layout: ``"storygptv"`` or ``"storydalle"`` (alias ``"arldm"``); detected when ``None``.
        **options: the loading options of :class:`~storygptv.data.ReleaseOptions`: ``frames_per_story``
            (at most 5 in the StoryDALL-E layout, 4 in StoryGPT-V's), ``num_stories``, ``referential``
            (:func:`~storygptv.data.referential.flintstones_referential`), ``referential_compat``,
            ``seed`` (which frame of a clip), ``frame_index``, ``bbox_resolution``, ``sam_model``,
            ``sam_processor``, ``streaming`` and ``cache_dir``.
    """
    options = ReleaseOptions.from_kwargs("FlintstonesSV", split, options)
    root = release_root(data_dir, "FlintstonesSV", " | ".join(LAYOUTS.values()))
    if layout is None:
        layout = detect_layout(root)
    else:
        key = str(layout).lower()
        if key not in _LAYOUT_ALIASES:
            raise ValueError(f"Unknown FlintstonesSV layout {layout!r}; valid: {sorted(_LAYOUT_ALIASES)}.")
        layout = _LAYOUT_ALIASES[key]
    layout_text = LAYOUTS[layout]
    frames_per_story = options.check_frames_per_story(
        "FlintstonesSV", layout, 5 if layout == "storydalle" else 4
    )

    v1_path = root / "flintstones_annotations_v1-0.json"
    v1: dict[str, dict[str, Any]] = {}
    index_files: list[Path] = []
    if layout == "storydalle":
        split_path, follow_path, _ = require_files(
            root, layout_text, "train-val-test_split.json", "following_cache4.pkl", v1_path.name
        )
        frame_dir = _first_existing(root, ("video_frames_sampled", "video_frames_sampled_4x"), layout_text)
        annotations: dict[str, dict[str, Any]] = {}
    else:
        split_path, follow_path, ann_path = require_files(
            root, layout_text, "split.json", "following_cache3.pkl", "cleaned_annotations.json"
        )
        frame_dir = _first_existing(root, ("video_frames_sampled_4x", "video_frames_sampled"), layout_text)
        with open(ann_path, encoding="utf-8") as handle:
            annotations = {str(k): v for k, v in json.load(handle).items()}
        index_files.append(ann_path)
    if v1_path.exists():
        with open(v1_path, encoding="utf-8") as handle:
            v1 = {str(s["globalID"]): s for s in json.load(handle)}
        index_files.append(v1_path)
    with open(split_path, encoding="utf-8") as handle:
        ids = [str(i) for i in release_split(json.load(handle), options.split, split_path)]
    followings = {str(k): [str(i) for i in v] for k, v in safe_load_dict(follow_path, layout_text).items()}
    labels_path, bg_path = root / "labels.pkl", root / "labels_bg.pkl"
    labels = {str(k): v for k, v in safe_load_dict(labels_path).items()} if labels_path.exists() else {}
    bg_labels = _read_background_labels(bg_path) if bg_path.exists() else {}
    mask_dir = root / "seg_mask_4x_comb"
    index_files += [split_path, follow_path, labels_path, bg_path]
    stories = chain_stories(ids, followings, frames_per_story)

    def frame_record(frame_id: str) -> FrameRecord:
        array, k = read_npy_frame(frame_dir / f"{frame_id}.npy", frame_id, options.seed, options.frame_index)
        v1_entry = v1.get(frame_id, {})
        entity_labels = [str(c.get("entityLabel", "")).strip() for c in v1_entry.get("characters", [])]
        label_map = None
        if layout == "storydalle":
            caption = str(v1_entry.get("description", ""))
            characters = list(dict.fromkeys(n for n in map(canonical_character, entity_labels) if n))
            boxes: list[list[float]] = [[] for _ in characters]
            background = str(v1_entry.get("setting", "") or "")
        else:
            entry = annotations.get(frame_id)
            if entry is None:
                raise UnreadableFrameError(f"{frame_id!r} is not in cleaned_annotations.json")
            caption = str(entry.get("caption", v1_entry.get("description", "")))
            characters, boxes, label_map = read_segment_annotations(
                entry,
                caption,
                canonical_character,
                array.shape,
                mask_dir / f"{frame_id}-frame{k}.npy",
                options.bbox_resolution,
            )
            background = str(entry.get("setting", v1_entry.get("setting", "")) or "")
        # The referential rules use every annotated person (as the public code does), else the characters.
        if entity_labels or layout == "storydalle":
            ref_set = [" ".join(e.lower().split()) for e in entity_labels if e]
        else:
            ref_set = [n.lower() for n in characters]
        return FrameRecord(
            frame_id=frame_id,
            image=PIL.Image.fromarray(array, mode="RGB"),
            caption=caption,
            characters=characters,
            referential_set=ref_set,
            boxes=boxes,
            label_map=label_map,
            character_labels=(
                label_vector(labels[frame_id]) if frame_id in labels else multi_hot(characters, CHARACTERS)
            ),
            background=background,
            background_labels=label_vector(bg_labels[frame_id]) if frame_id in bg_labels else [],
        )

    def referential_rule(records: list[FrameRecord]) -> tuple[list[str], list[bool]]:
        captions = [r.caption for r in records]
        return flintstones_referential(
            captions, [r.referential_set for r in records], compat=options.referential_compat
        )

    return release_story_dataset(
        "FlintstonesSV",
        root,
        options,
        stories,
        frame_record,
        index_files,
        name="flintstones",
        layout=layout,
        referential_rule=referential_rule,
    )
