"""StoryGPT-V's annotation format, shared by its FlintstonesSV and PororoSV layouts.

``cleaned_annotations.json`` gives each frame ``segments`` (``{id, bbox, start, end, word}``: a
character's box at 128 px and the caption words naming it) and ``seg_mask_4x_comb/{id}-frame{k}.npy``
an integer mask whose values are segment ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .masks import label_map_from_segment_ids

__all__ = ["parse_segments", "read_segment_annotations", "read_segment_mask"]


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


def read_segment_annotations(
    entry: Mapping[str, Any],
    caption: str,
    canonical: Callable[[str], str | None],
    frame_shape: Sequence[int],
    mask_path: Path,
    bbox_resolution: float = 128.0,
) -> tuple[list[str], list[list[float]], np.ndarray | None]:
    """Characters, boxes and label map of one frame's annotation ``entry`` (see :func:`parse_segments`).

    ``frame_shape`` is the stored frame's ``(height, width, ...)``; the label map comes from the mask
    file ``mask_path`` (``None`` when the frame names no character or the file is absent/unreadable).
    """
    height, width = frame_shape[:2]
    characters, boxes, segment_to_index = parse_segments(
        entry.get("segments", []), caption, canonical, width, height, bbox_resolution
    )
    label_map = read_segment_mask(mask_path, segment_to_index) if characters else None
    return characters, boxes, label_map
