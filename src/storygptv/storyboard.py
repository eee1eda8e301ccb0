"""One picture of a whole story: the frames in a grid with each caption under its frame."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .characters import load_character_image

__all__ = ["make_storyboard"]


def make_storyboard(
    images: Sequence[Any],
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    frame_size: int | None = None,
    padding: int = 8,
    font_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> PIL.Image.Image:
    """Lay out ``images`` in a grid, each with its caption wrapped underneath.

    Args:
        images: the frames (PIL images, uint8 arrays, (3, H, W) tensors in [0, 1], or paths).
        captions: one caption per frame (optional).
        columns: frames per row; defaults to at most 4.
        frame_size: resize every frame to this square size; defaults to the first frame's width
            (at least 128 px, so captions stay legible under small frames).
        padding: space between cells, in pixels.
        font_size: caption font size (defaults to about a tenth of the frame size).
        background: the board colour.

    Returns:
        The storyboard as an RGB PIL image.

    Example:
        >>> import numpy as np
        >>> board = make_storyboard([np.zeros((64, 64, 3), np.uint8)] * 2, ["Ava jumps.", "She waves."])
        >>> board.mode, board.width > 2 * 128
        ('RGB', True)
    """
    if len(images) == 0:
        raise ValueError("`images` is empty; pass at least one frame.")
    if captions is not None and len(captions) != len(images):
        raise ValueError(
            f"`captions` has {len(captions)} entries for {len(images)} images; pass one per frame."
        )
    frames = [load_character_image(image, name=f"frame {i}") for i, image in enumerate(images)]
    size = frame_size or max(frames[0].width, 128)
    frames = [f.resize((size, size), PIL.Image.Resampling.NEAREST) for f in frames]
    columns = columns or min(4, len(frames))
    rows = -(-len(frames) // columns)
    font_size = font_size or max(10, size // 10)
    try:
        font: Any = PIL.ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = PIL.ImageFont.load_default()
    chars_per_line = max(8, int(size / (0.55 * font_size)))
    wrapped = [textwrap.wrap(c, chars_per_line) if c else [] for c in (captions or [""] * len(frames))]
    line_height = font_size + 4
    text_height = max(len(lines) for lines in wrapped) * line_height + (padding if captions else 0)
    cell_w, cell_h = size + padding, size + text_height + padding
    board = PIL.Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), background)
    draw = PIL.ImageDraw.Draw(board)
    for index, (frame, lines) in enumerate(zip(frames, wrapped)):
        x = padding + (index % columns) * cell_w
        y = padding + (index // columns) * cell_h
        board.paste(frame, (x, y))
        for line_number, line in enumerate(lines):
            draw.text(
                (x, y + size + padding // 2 + line_number * line_height), line, fill=(0, 0, 0), font=font
            )
    return board
