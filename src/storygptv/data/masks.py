"""Character masks: label maps from release masks, from boxes, or refined with Segment Anything.

A frame's character mask is stored as one ``"L"`` image (a *label map*): pixel value ``1 + i`` where
character ``i`` of that frame's ``characters`` list is, ``0`` elsewhere. Where characters overlap,
the later character wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = [
    "box_label_map",
    "boxes_from_label_map",
    "label_map_from_segment_ids",
    "refine_label_map_with_sam",
    "resize_label_map",
]


def box_label_map(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """A ``uint8`` (height, width) label map with box ``i`` (``[x1, y1, x2, y2]`` pixels) filled with ``i + 1``.

    Empty or missing boxes (``[]``) leave their character without pixels.
    """
    label = np.zeros((height, width), dtype=np.uint8)
    for index, box in enumerate(boxes):
        if box is None or len(box) != 4:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        c1, r1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        c2, r2 = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
        if c2 > c1 and r2 > r1:
            label[r1:r2, c1:c2] = index + 1
    return label


def label_map_from_segment_ids(mask: np.ndarray, segment_to_index: Mapping[int, int]) -> np.ndarray:
    """Convert a release mask whose values are segment ids into a label map (``1 + character index``).

    Args:
        mask: an integer (H, W) array (a (H, W, C) array uses its first channel).
        segment_to_index: ``{segment id: index into the frame's characters}``; other values become 0.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    label = np.zeros(mask.shape, dtype=np.uint8)
    for segment_id, index in segment_to_index.items():
        label[mask == segment_id] = index + 1
    return label


def resize_label_map(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a label map with nearest-neighbour sampling (labels are never blended)."""
    if label.shape == (height, width):
        return label
    image = PIL.Image.fromarray(label.astype(np.uint8), mode="L")
    return np.asarray(image.resize((width, height), PIL.Image.Resampling.NEAREST))


def boxes_from_label_map(label: np.ndarray, num_characters: int) -> list[list[float]]:
    """Tight ``[x1, y1, x2, y2]`` boxes (exclusive max) of each character's pixels; ``[]`` when absent."""
    boxes: list[list[float]] = []
    for index in range(num_characters):
        rows, cols = np.nonzero(label == index + 1)
        if rows.size == 0:
            boxes.append([])
        else:
            boxes.append([float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)])
    return boxes


def refine_label_map_with_sam(
    image: PIL.Image.Image,
    boxes: Sequence[Sequence[float]],
    sam_model: Any,
    sam_processor: Any,
    fallback: np.ndarray | None = None,
) -> np.ndarray:
    """Segment each character with Segment Anything, prompted by its box.

    Args:
        image: the RGB frame.
        boxes: per character ``[x1, y1, x2, y2]`` in pixels of ``image`` (``[]`` for unknown).
        sam_model: a ``transformers.SamModel`` (any size; it runs under ``torch.no_grad``).
        sam_processor: the matching ``transformers.SamProcessor``.
        fallback: a label map to keep for characters without a box (defaults to zeros).

    Returns:
        A ``uint8`` (H, W) label map: ``1 + i`` where SAM put character ``i`` (one mask per box,
        ``multimask_output=False``); characters without a box keep their ``fallback`` pixels.
    """
    width, height = image.size
    label = (
        np.zeros((height, width), dtype=np.uint8) if fallback is None else fallback.astype(np.uint8).copy()
    )
    valid = [(i, [float(v) for v in box]) for i, box in enumerate(boxes) if box is not None and len(box) == 4]
    if not valid:
        return label
    inputs = sam_processor(
        images=image.convert("RGB"), input_boxes=[[box for _, box in valid]], return_tensors="pt"
    )
    device = next(sam_model.parameters()).device
    dtype = next(sam_model.parameters()).dtype
    inputs = {
        k: (v.to(device=device, dtype=dtype) if k in ("pixel_values", "input_boxes") else v.to(device))
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
    }
    with torch.no_grad():
        outputs = sam_model(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
        )
    masks = sam_processor.post_process_masks(
        outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
    )[0]  # (num_boxes, 1, H, W) bool
    masks = np.asarray(masks[:, 0].numpy(), dtype=bool)
    for (index, _), mask in zip(valid, masks):
        label[label == index + 1] = 0
        label[mask] = index + 1
    return label
