"""The SynthSV world as data: canvas, cast, backgrounds, poses, layout, frames and captions.

Everything here is fixed by the spec in :mod:`storygptv.data.synthsv` (evaluation tools outside the
package rely on it): change a value and every generated story, render and judgement changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._common import multi_hot

CANVAS_SIZE = 64
HORIZON = 40  # first ground row
SPRITE_SIZE = 16
SITTING_HEIGHT = 10
SLOT_X: tuple[int, ...] = (6, 24, 42)
#: Box left x of the four slots of a four-character frame (the opt-in crowded layout: side by side, touching).
FOUR_SLOT_X: tuple[int, ...] = (0, 16, 32, 48)
#: Top row of a character's box for each action (sitting boxes are also shorter).
POSE_TOP = {"standing": 36, "talking": 36, "laughing": 36, "waving": 36, "jumping": 24, "sitting": 42}
REFERENCE_GREY = (128, 128, 128)

CHARACTERS: tuple[str, ...] = ("Ava", "Bo", "Cleo", "Dax", "Eli", "Fay", "Gus", "Hana")
PRONOUNS: dict[str, str] = {
    "Ava": "she",
    "Bo": "he",
    "Cleo": "she",
    "Dax": "he",
    "Eli": "he",
    "Fay": "she",
    "Gus": "he",
    "Hana": "she",
}
CHARACTER_COLORS: dict[str, tuple[int, int, int]] = {
    "Ava": (230, 30, 40),
    "Bo": (30, 70, 230),
    "Cleo": (250, 220, 20),
    "Dax": (140, 40, 190),
    "Eli": (255, 140, 0),
    "Fay": (255, 110, 190),
    "Gus": (0, 200, 200),
    "Hana": (120, 230, 30),
}
SHAPES: dict[str, str] = {
    "Ava": "circle",
    "Bo": "square",
    "Cleo": "triangle_up",
    "Dax": "diamond",
    "Eli": "plus",
    "Fay": "triangle_down",
    "Gus": "bar",
    "Hana": "ring",
}
BACKGROUNDS: tuple[str, ...] = ("forest", "beach", "kitchen", "night", "snow", "desert", "lake", "cave")
#: ``(sky, ground)`` colour of each background.
BACKGROUND_COLORS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "forest": ((110, 160, 110), (55, 95, 45)),
    "beach": ((150, 200, 240), (235, 215, 160)),
    "kitchen": ((225, 215, 195), (150, 105, 75)),
    "night": ((25, 30, 70), (60, 60, 80)),
    "snow": ((200, 220, 240), (250, 250, 252)),
    "desert": ((245, 205, 150), (205, 150, 85)),
    "lake": ((175, 215, 235), (70, 140, 150)),
    "cave": ((95, 85, 75), (60, 55, 50)),
}
ACTIONS: tuple[str, ...] = ("standing", "jumping", "sitting", "talking", "laughing", "waving")
#: Default number of stories of each split.
SPLIT_SIZES: dict[str, int] = {"train": 20000, "validation": 500, "test": 1000}
#: Longest story the sampler draws.
MAX_FRAMES = 500


@dataclass(frozen=True)
class SynthFrame:
    """One SynthSV frame.

    Attributes:
        characters: character names in caption order (= slot order, left to right).
        slots: slot index of each character, ascending: 0, 1, 2 for box left x = 6, 24, 42 (:data:`SLOT_X`);
            a frame of four characters has slots 0, 1, 2, 3 at x = 0, 16, 32, 48 (:data:`FOUR_SLOT_X`).
        action: one of :data:`ACTIONS`, shared by all characters of the frame.
        background: one of :data:`BACKGROUNDS`.
        names_background: whether the caption ends with "in the <background>".

    Example:
        >>> frame = SynthFrame(characters=("Ava", "Bo"), slots=(0, 2), action="sitting", background="lake")
        >>> frame.caption, frame.boxes[1]
        ('Ava and Bo are sitting in the lake.', (42, 42, 58, 52))
    """

    characters: tuple[str, ...]
    slots: tuple[int, ...]
    action: str
    background: str
    names_background: bool = True

    def __post_init__(self) -> None:
        if not 0 <= len(self.characters) <= len(FOUR_SLOT_X) or len(self.characters) != len(self.slots):
            raise ValueError(f"need 0-4 characters with one slot each, got {self.characters} {self.slots}")
        if len(self.slots) == len(FOUR_SLOT_X):
            if tuple(self.slots) != (0, 1, 2, 3):
                raise ValueError(f"a frame of four characters has slots (0, 1, 2, 3), got {self.slots}")
        elif len(set(self.slots)) != len(self.slots) or any(s not in (0, 1, 2) for s in self.slots):
            raise ValueError(f"slots must be distinct values in 0..2, got {self.slots}")
        if len(set(self.characters)) != len(self.characters):
            raise ValueError(f"characters must be distinct, got {self.characters}")
        for name in self.characters:
            if name not in CHARACTER_COLORS:
                raise ValueError(f"unknown character {name!r}")
        if self.action not in POSE_TOP:
            raise ValueError(f"unknown action {self.action!r}")
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(f"unknown background {self.background!r}")

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Exact ``(x1, y1, x2, y2)`` box of each character (x2, y2 exclusive), in caption order."""
        return slot_boxes(self.slots, self.action)

    @property
    def caption(self) -> str:
        """The caption with names, e.g. ``"Ava and Bo are sitting in the lake."``."""
        return make_caption(self.characters, self.action, self.background if self.names_background else None)

    @property
    def character_labels(self) -> np.ndarray:
        """Multi-hot int8 vector over :data:`CHARACTERS`."""
        return np.array(multi_hot(self.characters, CHARACTERS), dtype=np.int8)

    @property
    def background_labels(self) -> np.ndarray:
        """One-hot int8 vector over :data:`BACKGROUNDS`."""
        return np.array(multi_hot([self.background], BACKGROUNDS), dtype=np.int8)


def character_box(slot: int, action: str, four: bool = False) -> tuple[int, int, int, int]:
    """Exact box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of a character in ``slot`` doing ``action``.

    ``four``: the slot is one of a four-character frame's (:data:`FOUR_SLOT_X`), not :data:`SLOT_X`.
    """
    x1 = (FOUR_SLOT_X if four else SLOT_X)[slot]
    top = POSE_TOP[action]
    height = SITTING_HEIGHT if action == "sitting" else SPRITE_SIZE
    return (x1, top, x1 + SPRITE_SIZE, top + height)


def slot_boxes(slots: Sequence[int], action: str) -> list[tuple[int, int, int, int]]:
    """The boxes of a frame's ``slots``: four slots are the four-character layout (:data:`FOUR_SLOT_X`)."""
    four = len(slots) == len(FOUR_SLOT_X)
    return [character_box(slot, action, four=four) for slot in slots]


def join_names(names: Sequence[str]) -> str:
    """``A``, ``A and B``, ``A, B and C`` or ``A, B, C and D``."""
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def make_caption(subject: str | Sequence[str], action: str, background: str | None = None) -> str:
    """Build a caption ``<subject> <is|are> <action>[ in the <background>].``.

    Args:
        subject: a list of names (joined as ``A``, ``A and B``, ``A, B and C``...) or a ready subject
            string such as ``"She"`` or ``"They"`` (``"They"`` takes ``are``).
        action: one of :data:`ACTIONS`.
        background: background to name, or ``None``.

    Example:
        >>> make_caption(["Ava", "Bo", "Cleo"], "jumping", "forest")
        'Ava, Bo and Cleo are jumping in the forest.'
        >>> make_caption("She", "waving")
        'She is waving.'
    """
    if isinstance(subject, str):
        text, plural = subject, subject == "They"
    else:
        if not subject:
            raise ValueError("a caption needs at least one character")
        text, plural = join_names(list(subject)), len(subject) > 1
    verb = "are" if plural else "is"
    place = f" in the {background}" if background is not None else ""
    return f"{text} {verb} {action}{place}."


def pronoun_subject(characters: Sequence[str]) -> str:
    """The subject that refers back to ``characters``: "They", or the one character's "He" / "She"."""
    if len(characters) > 1:
        return "They"
    return PRONOUNS[characters[0]].capitalize()
