"""SynthSV: a procedural, referential story-visualisation world rendered exactly on the fly.

SynthSV is a tiny benchmark in which every frame is drawn by a deterministic renderer, so the
characters and background shown in a generated frame can be judged exactly
(:mod:`storygptv.evaluation.synthsv`), and in which later captions refer to characters by pronoun, so
a model must resolve "She" / "They" from the story context, as in StoryGPT-V's extended Flintstones
and Pororo sets.

The spec is fixed (evaluation tools outside the package rely on it):

* **Canvas** 64x64 RGB; rows 0-39 are the background's sky colour, rows 40-63 its ground colour.
* **Backgrounds** (sky; ground): forest (110,160,110; 55,95,45), beach (150,200,240; 235,215,160),
  kitchen (225,215,195; 150,105,75), night (25,30,70; 60,60,80), snow (200,220,240; 250,250,252),
  desert (245,205,150; 205,150,85), lake (175,215,235; 70,140,150), cave (95,85,75; 60,55,50).
* **Characters** (pronoun, colour, sprite in a 16x16 box): Ava (she, 230,30,40, filled circle),
  Bo (he, 30,70,230, filled square), Cleo (she, 250,220,20, filled triangle apex up), Dax (he,
  140,40,190, filled diamond), Eli (he, 255,140,0, plus sign whose arms are 6 px thick, i.e. the
  centre columns 5-10 and rows 5-10 of the box), Fay (she, 255,110,190, filled triangle apex down),
  Gus (he, 0,200,200, bar 8 wide and 16 tall, centred: box columns 4-11), Hana (she, 120,230,30,
  ring of outer radius 8 and hole radius 4).
* **Layout**: 1-3 characters per frame in distinct slots drawn at random among box left x = 6, 24,
  42. The box top is y = 36 (box 16x16) for standing, talking, laughing and waving, y = 24 for
  jumping; sitting squashes the box to 16 wide by 10 tall with top y = 42. Boxes are half-open
  ``[x1, x2) x [y1, y2)`` pixel ranges and never overlap.
* **Captions**: ``<subject> <is|are> <action>[ in the <background>].`` with subject ``A``,
  ``A and B`` or ``A, B and C``; actions standing, jumping, sitting, talking, laughing, waving.

Sprites are rasterised at pixel centres in box-normalised coordinates ``u, v`` in ``[-1, 1]``
(``u = (2x + 1 - w) / w``), with integer arithmetic so there is no floating-point ambiguity on
edges: circle ``u^2 + v^2 <= 1``; square: the whole box; triangle apex up ``2|u| <= v + 1``
(apex down ``2|u| <= 1 - v``); diamond ``|u| + |v| <= 1``; plus ``|u| <= 6/16 or |v| <= 6/16``;
bar ``|u| <= 1/2``; ring ``1/4 <= u^2 + v^2 <= 1``. A sitting sprite is the same shape rasterised in
the 16x10 box (vertically squashed).

Choices left open by the spec, fixed here:

* **Caption order is slot order**: the characters of a frame are listed left to right, so
  ``characters[i]`` is drawn in ``boxes[i]`` and has segmentation value ``i + 1``. The assignment of
  characters to the chosen slots is a random permutation, so caption order changes between frames
  even when the set does not.
* **Action**: one action per frame, uniform over the six, shared by all its characters.
* **New character sets**: when a later frame does not keep the set (probability 0.5), it picks
  uniformly among the available operations: *add one* (only when fewer than 3 characters), *drop
  one* (only when more than one) and *fresh random set* (size 1/2/3 with probabilities
  0.4/0.4/0.2, redrawn until it differs from the current set, so "new" is always new). The added or
  dropped character is uniform. A background change picks uniformly among the 7 other backgrounds.
* **Referential captions**: the anchor is frame 1's character set; a later frame with the anchor's
  set gets subject "He" / "She" (one character, by pronoun) or "They" (several; "They are ...");
  any other frame becomes the new anchor and keeps its names. Frame 1 is never referential.
* **Determinism**: a story is a function of ``(seed, split, index, frames_per_story)`` only. Its
  random numbers are counter-based: draw ``k`` of frame ``t`` of candidate ``attempt`` is a
  SplitMix64 hash of ``(seed, split_id, index, attempt, t, k)`` mapped to ``[0, 1)``, so any story
  can be regenerated alone (:func:`sample_story`) and a whole split can be drawn in bulk with
  vectorised numpy (:func:`sample_stories`, :func:`load_synthsv`) giving the very same stories.
* **Disjoint splits by content hash**: the caption sequence of a candidate story is hashed
  (BLAKE2b, seed-independent) to a number ``h`` in ``[0, 1)``; test owns ``h < 0.1``, validation
  ``0.1 <= h < 0.2`` and train ``h >= 0.2``. A split rejects candidates owned by another split and
  draws the next ``attempt``. Since the captions determine every character set and named
  background, two stories of different splits never share their caption sequence, hence never
  their full content either, for any seeds and lengths. Train needs 1.25 candidates per story on
  average, validation and test 10. The hash filter is independent of the sampling decisions, so
  the sampling probabilities above hold within every split (for very short stories each split
  only sees its own share of the possible caption sequences).

Datasets: :func:`load_synthsv` returns rows in the package's common story schema. The non-streaming
:class:`datasets.Dataset` stores the cheap spec columns (``images`` and ``segmentation`` hold null
placeholders) and renders frames in a format transform, so loading the 20,000 training stories
takes about 2.5 s of CPU (validation 0.15 s, test 0.3 s); ``ds[i]``, slicing, iteration and
``ds["images"]`` return PIL images (rendering costs about 1 ms per story of 4 frames). Replacing the transform with ``ds.set_transform(fn)`` drops the rendering: compose instead, e.g.
``ds.set_transform(lambda b: fn(render_synthsv_batch(b)))``, or call
:func:`materialize_synthsv` to store real images (e.g. before ``push_to_hub``).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import PIL.Image

from ._common import STORY_COLUMNS

__all__ = [
    "ACTIONS",
    "BACKGROUNDS",
    "BACKGROUND_COLORS",
    "CANVAS_SIZE",
    "CHARACTERS",
    "CHARACTER_COLORS",
    "PRONOUNS",
    "REFERENCE_GREY",
    "SHAPES",
    "SLOT_X",
    "SPLIT_SIZES",
    "SynthFrame",
    "SynthStory",
    "character_box",
    "load_synthsv",
    "make_caption",
    "materialize_synthsv",
    "reference_images",
    "render_frame",
    "render_synthsv_batch",
    "sample_stories",
    "sample_story",
    "split_of_captions",
    "synthsv_features",
]

CANVAS_SIZE = 64
HORIZON = 40  # first ground row
SPRITE_SIZE = 16
SITTING_HEIGHT = 10
SLOT_X: tuple[int, ...] = (6, 24, 42)
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
SPLIT_SIZES: dict[str, int] = {"train": 20000, "validation": 500, "test": 1000}
SPLIT_IDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
# Owned ranges of the content hash in [0, 1): (low, high).
SPLIT_HASH_RANGES: dict[str, tuple[float, float]] = {
    "test": (0.0, 0.1),
    "validation": (0.1, 0.2),
    "train": (0.2, 1.0),
}
MAX_FRAMES = 500
_NUM_SIZE_PROBS = (0.4, 0.4, 0.2)
_KEEP_PROB = 0.5
_BG_CHANGE_PROB = 0.2
_BG_NAME_PROB = 0.3
_MAX_ATTEMPTS = 100_000


# --------------------------------------------------------------------------------------------------
# Frames, boxes and rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthFrame:
    """One SynthSV frame.

    Attributes:
        characters: character names in caption order (= slot order, left to right).
        slots: slot index (0, 1, 2 for box left x = 6, 24, 42) of each character, ascending.
        action: one of :data:`ACTIONS`, shared by all characters of the frame.
        background: one of :data:`BACKGROUNDS`.
        names_background: whether the caption ends with "in the <background>".
    """

    characters: tuple[str, ...]
    slots: tuple[int, ...]
    action: str
    background: str
    names_background: bool = True

    def __post_init__(self) -> None:
        if not 0 <= len(self.characters) <= len(SLOT_X) or len(self.characters) != len(self.slots):
            raise ValueError(f"need 0-3 characters with one slot each, got {self.characters} {self.slots}")
        if len(set(self.slots)) != len(self.slots) or any(s not in (0, 1, 2) for s in self.slots):
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
        return [character_box(slot, self.action) for slot in self.slots]

    @property
    def caption(self) -> str:
        """The caption with names, e.g. ``"Ava and Bo are sitting in the lake."``."""
        return make_caption(self.characters, self.action, self.background if self.names_background else None)

    @property
    def character_labels(self) -> np.ndarray:
        """Multi-hot int8 vector over :data:`CHARACTERS`."""
        labels = np.zeros(len(CHARACTERS), dtype=np.int8)
        for name in self.characters:
            labels[CHARACTERS.index(name)] = 1
        return labels

    @property
    def background_labels(self) -> np.ndarray:
        """One-hot int8 vector over :data:`BACKGROUNDS`."""
        labels = np.zeros(len(BACKGROUNDS), dtype=np.int8)
        labels[BACKGROUNDS.index(self.background)] = 1
        return labels


def character_box(slot: int, action: str) -> tuple[int, int, int, int]:
    """Exact box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of a character in ``slot`` doing ``action``."""
    x1 = SLOT_X[slot]
    top = POSE_TOP[action]
    height = SITTING_HEIGHT if action == "sitting" else SPRITE_SIZE
    return (x1, top, x1 + SPRITE_SIZE, top + height)


@lru_cache(maxsize=256)
def _shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` rasterised at pixel centres (integer maths)."""
    w, h = width, height
    xs = 2 * np.arange(w, dtype=np.int64) + 1 - w  # u * w, odd integers in (-w, w)
    ys = 2 * np.arange(h, dtype=np.int64) + 1 - h  # v * h
    u, v = np.meshgrid(xs, ys)  # (h, w)
    au, av = np.abs(u), np.abs(v)
    r2 = u * u * h * h + v * v * w * w  # (u^2 + v^2) * w^2 h^2
    full = w * w * h * h
    if shape == "circle":
        mask = r2 <= full
    elif shape == "square":
        mask = np.ones((h, w), dtype=bool)
    elif shape == "triangle_up":  # 2|u| <= v + 1
        mask = 2 * au * h <= (v + h) * w
    elif shape == "triangle_down":  # 2|u| <= 1 - v
        mask = 2 * au * h <= (h - v) * w
    elif shape == "diamond":  # |u| + |v| <= 1
        mask = au * h + av * w <= w * h
    elif shape == "plus":  # |u| <= 6/16 or |v| <= 6/16
        mask = (au * 16 <= 6 * w) | (av * 16 <= 6 * h)
    elif shape == "bar":  # |u| <= 1/2
        mask = np.broadcast_to(2 * au <= w, (h, w)).copy()
    elif shape == "ring":  # 1/4 <= u^2 + v^2 <= 1
        mask = (r2 <= full) & (4 * r2 >= full)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def _render_arrays(
    characters: Sequence[str], boxes: Sequence[Sequence[float]], background: str
) -> tuple[np.ndarray, np.ndarray]:
    """Render a frame given its characters, boxes and background; returns (rgb, segmentation)."""
    sky, ground = BACKGROUND_COLORS[background]
    image = np.empty((CANVAS_SIZE, CANVAS_SIZE, 3), dtype=np.uint8)
    image[:HORIZON] = sky
    image[HORIZON:] = ground
    seg = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=np.uint8)
    for i, (name, box) in enumerate(zip(characters, boxes)):
        x1, y1, x2, y2 = (int(round(float(c))) for c in box)
        mask = _shape_mask(SHAPES[name], x2 - x1, y2 - y1)
        image[y1:y2, x1:x2][mask] = CHARACTER_COLORS[name]
        seg[y1:y2, x1:x2][mask] = i + 1
    return image, seg


def render_frame(frame: SynthFrame | Mapping[str, Any]) -> tuple[PIL.Image.Image, np.ndarray]:
    """Render a frame exactly.

    Args:
        frame: a :class:`SynthFrame`, or a mapping with keys ``characters``, ``slots``, ``action`` and
            ``background``.

    Returns:
        ``(image, segmentation)``: a 64x64 RGB PIL image and a ``(64, 64)`` uint8 array whose value is
        ``1 + index`` of the character (in ``frame.characters``) covering the pixel, 0 elsewhere. The
        exact boxes are ``frame.boxes`` (see :func:`character_box`).
    """
    if not isinstance(frame, SynthFrame):
        frame = SynthFrame(
            characters=tuple(frame["characters"]),
            slots=tuple(frame["slots"]),
            action=frame["action"],
            background=frame["background"],
        )
    image, seg = _render_arrays(frame.characters, frame.boxes, frame.background)
    return PIL.Image.fromarray(image, mode="RGB"), seg


def reference_images(size: int = 64) -> dict[str, PIL.Image.Image]:
    """Reference image of each character: its standing sprite centred on a grey (128,128,128) canvas.

    At ``size=64`` the sprite is the exact 16x16 sprite at box ``[24, 40) x [24, 40)``; other sizes
    rasterise the same shape in a box of ``round(16 * size / 64)`` pixels (crisp, no resampling).

    Returns:
        ``{name: PIL RGB image}`` in :data:`CHARACTERS` order.
    """
    if size < 4:
        raise ValueError(f"size must be >= 4, got {size}")
    sprite = max(1, round(SPRITE_SIZE * size / CANVAS_SIZE))
    offset = (size - sprite) // 2
    out = {}
    for name in CHARACTERS:
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        canvas[:] = REFERENCE_GREY
        mask = _shape_mask(SHAPES[name], sprite, sprite)
        canvas[offset : offset + sprite, offset : offset + sprite][mask] = CHARACTER_COLORS[name]
        out[name] = PIL.Image.fromarray(canvas, mode="RGB")
    return out


# --------------------------------------------------------------------------------------------------
# Captions and stories
# --------------------------------------------------------------------------------------------------


def _join_names(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def make_caption(subject: str | Sequence[str], action: str, background: str | None = None) -> str:
    """Build a caption ``<subject> <is|are> <action>[ in the <background>].``.

    Args:
        subject: a list of names (joined as ``A``, ``A and B`` or ``A, B and C``) or a ready subject
            string such as ``"She"`` or ``"They"`` (``"They"`` takes ``are``).
        action: one of :data:`ACTIONS`.
        background: background to name, or ``None``.
    """
    if isinstance(subject, str):
        text, plural = subject, subject == "They"
    else:
        if not subject:
            raise ValueError("a caption needs at least one character")
        text, plural = _join_names(list(subject)), len(subject) > 1
    verb = "are" if plural else "is"
    place = f" in the {background}" if background is not None else ""
    return f"{text} {verb} {action}{place}."


def _pronoun_subject(characters: Sequence[str]) -> str:
    if len(characters) > 1:
        return "They"
    return PRONOUNS[characters[0]].capitalize()


@dataclass(frozen=True)
class SynthStory:
    """A SynthSV story: frames plus captions with names and referential captions.

    Attributes:
        index: index of the story in its split.
        split: "train", "validation" or "test".
        seed: generation seed.
        frames: the frames, in order.
        captions: captions with names.
        referential_captions: captions where a subject repeating the anchor set is a pronoun.
        is_referential: whether each frame's subject was replaced by a pronoun.
        attempt: candidate number that passed the split's content-hash filter.
    """

    index: int
    split: str
    seed: int
    frames: tuple[SynthFrame, ...]
    captions: tuple[str, ...]
    referential_captions: tuple[str, ...]
    is_referential: tuple[bool, ...]
    attempt: int = 0

    @property
    def story_id(self) -> str:
        """Unique id, e.g. ``"synthsv-train-s0-000012"``."""
        return _story_id(self.split, self.seed, self.index)

    @property
    def frame_ids(self) -> list[str]:
        """Per-frame ids ``"<story_id>-f000"``..."""
        return _frame_ids(self.story_id, len(self.frames))

    @property
    def characters(self) -> list[tuple[str, ...]]:
        """Per frame, character names in caption order."""
        return [f.characters for f in self.frames]

    @property
    def slots(self) -> list[tuple[int, ...]]:
        """Per frame, slot of each character."""
        return [f.slots for f in self.frames]

    @property
    def actions(self) -> list[str]:
        """Per frame action."""
        return [f.action for f in self.frames]

    @property
    def backgrounds(self) -> list[str]:
        """Per frame background."""
        return [f.background for f in self.frames]

    @property
    def boxes(self) -> list[list[tuple[int, int, int, int]]]:
        """Per frame, per character exact box ``(x1, y1, x2, y2)``."""
        return [f.boxes for f in self.frames]

    def __len__(self) -> int:
        return len(self.frames)

    def render(self) -> list[tuple[PIL.Image.Image, np.ndarray]]:
        """Render every frame; returns ``[(image, segmentation), ...]``."""
        return [render_frame(f) for f in self.frames]


def _story_id(split: str, seed: int, index: int) -> str:
    return f"synthsv-{split}-s{seed}-{index:06d}"


def _frame_ids(story_id: str, num_frames: int) -> list[str]:
    return [f"{story_id}-f{t:03d}" for t in range(num_frames)]


# Layout of the per-frame uniform draws.
_U_KEEP, _U_OP, _U_SIZE = 0, 1, 2
_U_RANK = slice(3, 11)  # 8 character ranking keys
_U_BG_CHANGE, _U_BG, _U_BG_NAME, _U_ACTION = 11, 12, 13, 14
_U_SLOT = slice(15, 18)
_U_ORDER = slice(18, 21)
_U_PER_FRAME = 21
_U_REDRAW = 1 + 8  # draws per redraw of a fresh set (size + 8 ranking keys)
# The scalar draws the sequential sampler reads, in this order (the others are pre-sorted in numpy).
_U_SCALARS = [_U_KEEP, _U_OP, _U_SIZE, _U_BG_CHANGE, _U_BG, _U_BG_NAME, _U_ACTION]
_C_KEEP, _C_OP, _C_SIZE, _C_BG_CHANGE, _C_BG, _C_BG_NAME, _C_ACTION = range(7)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _story_keys(seed: int, split_id: int, indices: np.ndarray, attempts: np.ndarray) -> np.ndarray:
    """One 64-bit key per (seed, split, index, attempt) candidate story."""
    key = _mix64(np.full(indices.shape, (seed * _GOLDEN + 1) & _MASK64, dtype=np.uint64))
    key = _mix64(key + np.uint64(split_id))
    key = _mix64(key + indices.astype(np.uint64))
    return _mix64(key + attempts.astype(np.uint64))


def _uniforms(keys: np.ndarray, frames: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): element-wise on broadcast (story key, frame, draw) arrays.

    Every draw of a story is a pure function of its key and position, so a story can be regenerated
    alone and a whole split can be drawn at once with the same numbers.
    """
    counter = frames.astype(np.uint64) * np.uint64(1 << 24) + draws.astype(np.uint64)
    bits = _mix64(_mix64(keys + counter * np.uint64(_GOLDEN)) ^ keys)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _frame_draws(keys: np.ndarray, num_frames: int) -> np.ndarray:
    """``(num_stories, num_frames, _U_PER_FRAME)`` uniforms of candidate stories."""
    return _uniforms(
        keys[:, None, None],
        np.arange(num_frames)[None, :, None],
        np.arange(_U_PER_FRAME)[None, None, :],
    )


def _redraw(key: int, frame: int, round_: int) -> list[float]:
    """Extra uniforms of a story, used when a fresh set must be redrawn (draws 21 onwards)."""
    draws = _U_PER_FRAME + round_ * _U_REDRAW + np.arange(_U_REDRAW)
    return _uniforms(np.array([key], dtype=np.uint64), np.array([frame]), draws).tolist()


RawFrame = tuple[tuple[str, ...], tuple[int, ...], int, int, bool]

# For each ordering of 3 keys (code o0 * 9 + o1 * 3 + o2 of its argsort), and each n: the n
# lowest-key slots in ascending order, and the order of the first n keys (caption permutation).
_SLOTS_BY_CODE: dict[int, list[tuple[int, ...]]] = {}
_PERM_BY_CODE: dict[int, list[list[int]]] = {}
for _order in itertools.permutations(range(3)):
    _code = _order[0] * 9 + _order[1] * 3 + _order[2]
    _SLOTS_BY_CODE[_code] = [tuple(sorted(_order[:n])) for n in range(4)]
    _PERM_BY_CODE[_code] = [[i for i in _order if i < n] for n in range(4)]


def _size_of(u_size: float) -> int:
    return (
        1 if u_size < _NUM_SIZE_PROBS[0] else (2 if u_size < _NUM_SIZE_PROBS[0] + _NUM_SIZE_PROBS[1] else 3)
    )


def _sample_raw(
    draws: list[list[float]],
    char_orders: list[list[int]],
    slot_codes: list[int],
    order_codes: list[int],
    key: int,
) -> list[RawFrame]:
    """Raw frames ``(characters, slots, action_index, background_index, names_background)``.

    Args:
        draws: per frame, the scalar uniforms :data:`_U_SCALARS`.
        char_orders: per frame, the characters sorted by their ranking keys (argsort of ``_U_RANK``).
        slot_codes / order_codes: per frame, the code of the argsort of ``_U_SLOT`` / ``_U_ORDER``.
        key: the story key (for the rare redraws of a fresh set).
    """
    frames: list[RawFrame] = []
    members: frozenset[int] = frozenset()
    bg = 0
    num_backgrounds = len(BACKGROUNDS)
    for t, u in enumerate(draws):
        order = char_orders[t]
        if t == 0:
            members = frozenset(order[: _size_of(u[_C_SIZE])])
            bg = int(u[_C_BG] * num_backgrounds)
            named = True
        else:
            if u[_C_KEEP] >= _KEEP_PROB:
                ops = []
                if len(members) < len(SLOT_X):
                    ops.append("add")
                if len(members) > 1:
                    ops.append("drop")
                ops.append("fresh")
                op = ops[int(u[_C_OP] * len(ops))]
                if op == "add":  # the lowest-key character outside the set
                    members = members | {next(c for c in order if c not in members)}
                elif op == "drop":  # the lowest-key member
                    members = members - {next(c for c in order if c in members)}
                else:
                    new = frozenset(order[: _size_of(u[_C_SIZE])])
                    round_ = 0
                    while new == members:  # a new set is always different
                        extra = _redraw(key, t, round_)
                        redrawn = sorted(range(len(CHARACTERS)), key=extra[1:].__getitem__)
                        new = frozenset(redrawn[: _size_of(extra[0])])
                        round_ += 1
                    members = new
            if u[_C_BG_CHANGE] < _BG_CHANGE_PROB:
                others = [b for b in range(num_backgrounds) if b != bg]
                bg = others[int(u[_C_BG] * len(others))]
                named = True
            else:
                named = u[_C_BG_NAME] < _BG_NAME_PROB
        n = len(members)
        ordered = sorted(members)
        characters = tuple(CHARACTERS[ordered[i]] for i in _PERM_BY_CODE[order_codes[t]][n])
        frames.append(
            (characters, _SLOTS_BY_CODE[slot_codes[t]][n], int(u[_C_ACTION] * len(ACTIONS)), bg, named)
        )
    return frames


@lru_cache(maxsize=1024)
def _subject_verb(characters: tuple[str, ...]) -> str:
    return f"{_join_names(characters)} {'are' if len(characters) > 1 else 'is'} "


_PLACES = [f" in the {b}." for b in BACKGROUNDS]


def _raw_captions(raw: Sequence[RawFrame]) -> tuple[str, ...]:
    """Captions with names (same text as :func:`make_caption`, built from cached pieces)."""
    return tuple(
        _subject_verb(chars) + ACTIONS[action] + (_PLACES[bg] if named else ".")
        for chars, _, action, bg, named in raw
    )


def _trusted_frame(
    characters: tuple[str, ...], slots: tuple[int, ...], action: str, background: str, named: bool
) -> SynthFrame:
    """Build a :class:`SynthFrame` from sampler output without re-validating it (hot path)."""
    frame = object.__new__(SynthFrame)
    object.__setattr__(frame, "characters", characters)
    object.__setattr__(frame, "slots", slots)
    object.__setattr__(frame, "action", action)
    object.__setattr__(frame, "background", background)
    object.__setattr__(frame, "names_background", named)
    return frame


def _referential_captions(frames: Sequence[SynthFrame]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    captions: list[str] = []
    flags: list[bool] = []
    anchor: frozenset[str] | None = None
    for frame in frames:
        background = frame.background if frame.names_background else None
        current = frozenset(frame.characters)
        if anchor is not None and current == anchor:
            captions.append(make_caption(_pronoun_subject(frame.characters), frame.action, background))
            flags.append(True)
        else:
            anchor = current
            captions.append(make_caption(frame.characters, frame.action, background))
            flags.append(False)
    return tuple(captions), tuple(flags)


def _content_hash(captions: Sequence[str]) -> float:
    digest = hashlib.blake2b("\n".join(captions).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of_captions(captions: Sequence[str]) -> str:
    """The split that owns a story with these captions (with names), by content hash."""
    h = _content_hash(captions)
    for split, (low, high) in SPLIT_HASH_RANGES.items():
        if low <= h < high:
            return split
    raise AssertionError("unreachable")  # pragma: no cover


_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def _normalize_split(split: str) -> str:
    key = str(split).strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}; valid splits: 'train', 'validation' (or 'val'), 'test'.")
    return key


def _check_args(split: str, frames_per_story: int, seed: int) -> str:
    split = _normalize_split(split)
    if not 1 <= frames_per_story <= MAX_FRAMES:
        raise ValueError(f"frames_per_story must be in 1..{MAX_FRAMES}, got {frames_per_story}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return split


def _order_codes(keys: np.ndarray) -> np.ndarray:
    """Code ``o0 * 9 + o1 * 3 + o2`` of the argsort of the last axis (size 3)."""
    order = np.argsort(keys, axis=-1)
    return order[..., 0] * 9 + order[..., 1] * 3 + order[..., 2]


def _sample_accepted(
    indices: Sequence[int], split: str, frames_per_story: int, seed: int
) -> dict[int, tuple[int, list[RawFrame], tuple[str, ...]]]:
    """``{index: (attempt, raw frames, captions)}`` of the accepted candidates, drawn in bulk."""
    low, high = SPLIT_HASH_RANGES[split]
    split_id = SPLIT_IDS[split]
    accepted: dict[int, tuple[int, list[RawFrame], tuple[str, ...]]] = {}
    pending = np.asarray(indices, dtype=np.int64)
    attempt = 0
    while pending.size:
        if attempt >= _MAX_ATTEMPTS:  # pragma: no cover
            raise RuntimeError("no story passed the split filter")
        keys = _story_keys(seed, split_id, pending, np.full(pending.shape, attempt))
        uniforms = _frame_draws(keys, frames_per_story)
        char_orders = np.argsort(uniforms[..., _U_RANK], axis=-1).tolist()
        slot_codes = _order_codes(uniforms[..., _U_SLOT]).tolist()
        order_codes = _order_codes(uniforms[..., _U_ORDER]).tolist()
        rejected = []
        scalars = uniforms[..., _U_SCALARS].tolist()
        for i, (index, key, draws) in enumerate(zip(pending.tolist(), keys.tolist(), scalars)):
            raw = _sample_raw(draws, char_orders[i], slot_codes[i], order_codes[i], key)
            captions = _raw_captions(raw)
            if low <= _content_hash(captions) < high:
                accepted[index] = (attempt, raw, captions)
            else:
                rejected.append(index)
        pending = np.asarray(rejected, dtype=np.int64)
        attempt += 1
    return accepted


def _story_from_raw(
    index: int, split: str, seed: int, attempt: int, raw: Sequence[RawFrame], captions: tuple[str, ...]
) -> SynthStory:
    frames = tuple(
        _trusted_frame(chars, slots, ACTIONS[action], BACKGROUNDS[bg], named)
        for chars, slots, action, bg, named in raw
    )
    referential, flags = _referential_captions(frames)
    return SynthStory(
        index=index,
        split=split,
        seed=seed,
        frames=frames,
        captions=captions,
        referential_captions=referential,
        is_referential=flags,
        attempt=attempt,
    )


def sample_story(index: int, split: str = "train", frames_per_story: int = 4, seed: int = 0) -> SynthStory:
    """Sample story ``index`` of ``split`` deterministically.

    Args:
        index: non-negative story index (any index, also beyond :data:`SPLIT_SIZES`).
        split: "train", "validation" (or "val") or "test".
        frames_per_story: story length, 1 to 500.
        seed: non-negative generation seed.

    Returns:
        The :class:`SynthStory`; the same arguments always give the same story, and stories of
        different splits never share their caption sequence.
    """
    return sample_stories([index], split, frames_per_story, seed)[0]


def sample_stories(
    indices: Iterable[int], split: str = "train", frames_per_story: int = 4, seed: int = 0
) -> list[SynthStory]:
    """:func:`sample_story` for many indices at once (drawn in bulk, much faster; same stories)."""
    split = _check_args(split, frames_per_story, seed)
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise ValueError("story indices must be non-negative")
    accepted = _sample_accepted(sorted(set(indices)), split, frames_per_story, seed)
    return [_story_from_raw(i, split, seed, *accepted[i]) for i in indices]


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def synthsv_features() -> Any:
    """The :class:`datasets.Features` of the package's common story schema (used by :func:`load_synthsv`)."""
    from ._common import story_features

    return story_features()


_CHAR_INDEX = {name: i for i, name in enumerate(CHARACTERS)}
_BG_ONE_HOT = {name: [1 if b == name else 0 for b in BACKGROUNDS] for name in BACKGROUNDS}


def _multi_hot(characters: Sequence[str]) -> list[int]:
    labels = [0] * len(CHARACTERS)
    for name in characters:
        labels[_CHAR_INDEX[name]] = 1
    return labels


def _story_row(story: SynthStory, referential: bool, render: bool) -> dict[str, Any]:
    """One row of the story schema; images are PIL images when ``render`` else ``None`` placeholders."""
    frames = story.frames
    images: list[Any] = [None] * len(frames)
    segmentation: list[Any] = [None] * len(frames)
    if render:
        for t, frame in enumerate(frames):
            image, seg = render_frame(frame)
            images[t] = image
            segmentation[t] = PIL.Image.fromarray(seg, mode="L")
    return {
        "story_id": story.story_id,
        "frame_ids": story.frame_ids,
        "images": images,
        "captions": list(story.captions),
        "referential_captions": list(story.referential_captions if referential else story.captions),
        "is_referential": list(story.is_referential) if referential else [False] * len(frames),
        "characters": [list(f.characters) for f in frames],
        "boxes": [[[float(c) for c in character_box(s, f.action)] for s in f.slots] for f in frames],
        "segmentation": segmentation,
        "character_labels": [_multi_hot(f.characters) for f in frames],
        "background": [f.background for f in frames],
        "background_labels": [list(_BG_ONE_HOT[f.background]) for f in frames],
    }


def _raw_row(
    split: str, seed: int, index: int, raw: Sequence[RawFrame], captions: Sequence[str], referential: bool
) -> dict[str, Any]:
    """Row of the story schema straight from sampler output, with null image placeholders."""
    story_id = _story_id(split, seed, index)
    n = len(raw)
    ref_captions: list[str] = list(captions)
    flags = [False] * n
    if referential:
        anchor: frozenset[str] | None = None
        for t, (chars, _, action, bg, named) in enumerate(raw):
            current = frozenset(chars)
            if current == anchor:
                subject = _pronoun_subject(chars)
                ref_captions[t] = make_caption(subject, ACTIONS[action], BACKGROUNDS[bg] if named else None)
                flags[t] = True
            else:
                anchor = current
    boxes = []
    for _, slots, action, _, _ in raw:
        key = (slots, action)
        cached = _BOX_CACHE.get(key)
        if cached is None:
            cached = [[float(c) for c in character_box(slot, ACTIONS[action])] for slot in slots]
            _BOX_CACHE[key] = cached
        boxes.append(cached)
    return {
        "story_id": story_id,
        "frame_ids": _frame_ids(story_id, n),
        "images": [None] * n,
        "captions": list(captions),
        "referential_captions": ref_captions,
        "is_referential": flags,
        "characters": [f[0] for f in raw],
        "boxes": boxes,
        "segmentation": [None] * n,
        "character_labels": [_cached_multi_hot(f[0]) for f in raw],
        "background": [BACKGROUNDS[f[3]] for f in raw],
        "background_labels": [_BG_ONE_HOT[BACKGROUNDS[f[3]]] for f in raw],
    }


_BOX_CACHE: dict[tuple[tuple[int, ...], int], list[list[float]]] = {}


@lru_cache(maxsize=1024)
def _cached_multi_hot(characters: tuple[str, ...]) -> list[int]:
    return _multi_hot(characters)


def render_synthsv_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Format transform of the lazy SynthSV dataset: render ``images`` and ``segmentation``.

    Frames are drawn from the ``characters``, ``boxes`` and ``background`` columns (the boxes encode
    slot and pose). A batch without those columns is returned unchanged. Use this to compose your own
    transform: ``ds.set_transform(lambda b: my_fn(render_synthsv_batch(b)))``.
    """
    if not all(key in batch for key in ("characters", "boxes", "background")):
        return batch
    want_images = "images" in batch
    want_seg = "segmentation" in batch
    if not (want_images or want_seg):
        return batch
    all_images, all_segs = [], []
    for characters, boxes, backgrounds in zip(batch["characters"], batch["boxes"], batch["background"]):
        images, segs = [], []
        for chars, frame_boxes, background in zip(characters, boxes, backgrounds):
            rgb, seg = _render_arrays(chars, frame_boxes, background)
            images.append(PIL.Image.fromarray(rgb, mode="RGB"))
            segs.append(PIL.Image.fromarray(seg, mode="L"))
        all_images.append(images)
        all_segs.append(segs)
    out = dict(batch)
    if want_images:
        out["images"] = all_images
    if want_seg:
        out["segmentation"] = all_segs
    ordered = {key: out[key] for key in STORY_COLUMNS if key in out}
    ordered.update((key, value) for key, value in out.items() if key not in ordered)
    return ordered


def _iter_rows(
    split: str, frames_per_story: int, referential: bool, num_stories: int, seed: int
) -> Iterator[dict[str, Any]]:
    for index in range(num_stories):
        story = sample_story(index, split=split, frames_per_story=frames_per_story, seed=seed)
        yield _story_row(story, referential, render=True)


def load_synthsv(
    split: str = "train",
    frames_per_story: int = 4,
    referential: bool = True,
    num_stories: int | None = None,
    seed: int = 0,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Any:
    """Load a SynthSV split in the package's common story schema.

    Args:
        split: "train" (20,000 stories by default), "validation" (500) or "test" (1,000).
        frames_per_story: story length, 1 to 500.
        referential: if ``False``, ``referential_captions`` equals ``captions`` and ``is_referential``
            is all ``False``.
        num_stories: number of stories (default :data:`SPLIT_SIZES` ``[split]``); story ``i`` is
            :func:`sample_story` ``(i, split, frames_per_story, seed)``.
        seed: generation seed.
        streaming: return a :class:`datasets.IterableDataset` generating rows on the fly.
        cache_dir: ignored (accepted like the other loaders; SynthSV is generated, nothing is cached).

    Returns:
        A :class:`datasets.Dataset` (spec columns stored, frames rendered by a format transform, see
        the module docstring) or :class:`datasets.IterableDataset`, with columns ``story_id``,
        ``frame_ids``, ``images``, ``captions``, ``referential_captions``, ``is_referential``,
        ``characters``, ``boxes``, ``segmentation``, ``character_labels``, ``background``,
        ``background_labels``. ``ds[i]`` and iteration give PIL images (RGB frames, mode "L"
        segmentation) and the same values in both modes.
    """
    import datasets
    import pyarrow as pa

    split = _normalize_split(split)
    if not 1 <= frames_per_story <= MAX_FRAMES:
        raise ValueError(f"frames_per_story must be in 1..{MAX_FRAMES}, got {frames_per_story}")
    if num_stories is None:
        num_stories = SPLIT_SIZES[split]
    if num_stories < 0:
        raise ValueError(f"num_stories must be >= 0, got {num_stories}")
    features = synthsv_features()
    if streaming:
        return datasets.IterableDataset.from_generator(
            _iter_rows,
            features=features,
            gen_kwargs={
                "split": split,
                "frames_per_story": frames_per_story,
                "referential": referential,
                "num_stories": num_stories,
                "seed": seed,
            },
        )
    columns: dict[str, list[Any]] = {key: [] for key in STORY_COLUMNS}
    accepted = _sample_accepted(range(num_stories), split, frames_per_story, seed)
    for index in range(num_stories):
        _, raw, captions = accepted[index]
        row = _raw_row(split, seed, index, raw, captions, referential)
        for key in STORY_COLUMNS:
            columns[key].append(row[key])
    # pyarrow directly: ~4x faster than Dataset.from_dict for nested lists.
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    ds = datasets.Dataset(table, split=datasets.Split(split))
    ds.set_transform(render_synthsv_batch)
    return ds


def materialize_synthsv(dataset: Any, batch_size: int = 256) -> Any:
    """Render the frames of a lazy :func:`load_synthsv` dataset into stored images (PNG bytes).

    The result has the same features and rows but no format transform, so it can be saved, pushed
    to the Hub or given another ``set_transform``. Takes about a second per few thousand frames.
    """
    plain = dataset.with_format(None)

    def _render(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return render_synthsv_batch(batch)

    return plain.map(_render, batched=True, batch_size=batch_size, features=dataset.features)
