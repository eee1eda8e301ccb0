"""How SynthSV stories are drawn: the choices the spec leaves open, referential captions and splits.

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
* **Four-character frames** (opt-in, ``four_character_rate`` > 0; the default world has 1-3 per frame):
  each maximal run of consecutive frames sharing one three-character set gains a fourth character
  with probability ``four_character_rate``, uniform among the five outside the set, the same one for
  the whole run, so the run's pronoun frames still refer to all of them. Its frames use the four
  slots of :data:`~storygptv.data.synthsv.spec.FOUR_SLOT_X` and the newcomer's place in caption
  (= slot) order is uniform per frame. Split ownership is decided on the story before widening.
* **Determinism**: a story is a function of ``(seed, split, index, frames_per_story)`` only; its
  random numbers are counter-based (:mod:`storygptv.data.synthsv.rng`), so one story drawn alone
  (:func:`~storygptv.data.synthsv.sample_story`) equals the same story drawn in bulk.
* **Disjoint splits by content hash**: the caption sequence of a candidate story is hashed
  (BLAKE2b, seed-independent) to a number ``h`` in ``[0, 1)``; test owns ``h < 0.1``, validation
  ``0.1 <= h < 0.2`` and train ``h >= 0.2``. A split rejects candidates owned by another split and
  draws the next ``attempt``. Since the captions determine every character set and named
  background, two stories of different splits never share their caption sequence, hence never
  their full content either, for any seeds and lengths. Train needs 1.25 candidates per story on
  average, validation and test 10. The hash filter is independent of the sampling decisions, so
  the sampling probabilities above hold within every split (for very short stories each split
  only sees its own share of the possible caption sequences).

A sampled frame is a *raw frame* ``(characters, slots, action index, background index,
names_background)``: plain tuples, cheap to turn into dataset rows or :class:`SynthFrame` objects.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .._common import normalize_split
from .rng import story_keys, uniforms
from .spec import (
    ACTIONS,
    BACKGROUNDS,
    CHARACTERS,
    MAX_FRAMES,
    SLOT_X,
    join_names,
    make_caption,
    pronoun_subject,
)

#: The split's number in the random-number keys (part of the determinism spec: never renumber).
SPLIT_IDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
#: Owned ranges of the content hash in [0, 1): (low, high).
SPLIT_HASH_RANGES: dict[str, tuple[float, float]] = {
    "test": (0.0, 0.1),
    "validation": (0.1, 0.2),
    "train": (0.2, 1.0),
}
_NUM_SIZE_PROBS = (0.4, 0.4, 0.2)
_KEEP_PROB = 0.5
_BG_CHANGE_PROB = 0.2
_BG_NAME_PROB = 0.3
_MAX_ATTEMPTS = 100_000

#: ``(characters, slots, action index, background index, names_background)`` of a sampled frame.
RawFrame = tuple[tuple[str, ...], tuple[int, ...], int, int, bool]

# Layout of the per-frame uniform draws.
_U_KEEP, _U_OP, _U_SIZE = 0, 1, 2
_U_RANK = slice(3, 11)  # 8 character ranking keys
_U_BG_CHANGE, _U_BG, _U_BG_NAME, _U_ACTION = 11, 12, 13, 14
_U_SLOT = slice(15, 18)
_U_ORDER = slice(18, 21)
_U_PER_FRAME = 21
_U_REDRAW = 1 + 8  # draws per redraw of a fresh set (size + 8 ranking keys)
# Draws of the four-character variant, far above the redraws: widen the run starting at this frame?,
# which outsider joins it (both read at a run's first frame), the newcomer's place (read at every frame).
_U_WIDEN, _U_NEWCOMER, _U_PLACE = 1 << 23, (1 << 23) + 1, (1 << 23) + 2
# The scalar draws the sequential sampler reads, in this order (the others are pre-sorted in numpy).
_U_SCALARS = [_U_KEEP, _U_OP, _U_SIZE, _U_BG_CHANGE, _U_BG, _U_BG_NAME, _U_ACTION]
_C_KEEP, _C_OP, _C_SIZE, _C_BG_CHANGE, _C_BG, _C_BG_NAME, _C_ACTION = range(7)

# For each ordering of 3 keys (code o0 * 9 + o1 * 3 + o2 of its argsort), and each n: the n
# lowest-key slots in ascending order, and the order of the first n keys (caption permutation).
_SLOTS_BY_CODE: dict[int, list[tuple[int, ...]]] = {}
_PERM_BY_CODE: dict[int, list[list[int]]] = {}
for _order in itertools.permutations(range(3)):
    _code = _order[0] * 9 + _order[1] * 3 + _order[2]
    _SLOTS_BY_CODE[_code] = [tuple(sorted(_order[:n])) for n in range(4)]
    _PERM_BY_CODE[_code] = [[i for i in _order if i < n] for n in range(4)]


def _frame_draws(keys: np.ndarray, num_frames: int) -> np.ndarray:
    """``(num_stories, num_frames, _U_PER_FRAME)`` uniforms of candidate stories."""
    return uniforms(
        keys[:, None, None],
        np.arange(num_frames)[None, :, None],
        np.arange(_U_PER_FRAME)[None, None, :],
    )


def _redraw(key: int, frame: int, round_: int) -> list[float]:
    """Extra uniforms of a story, used when a fresh set must be redrawn (draws 21 onwards)."""
    draws = _U_PER_FRAME + round_ * _U_REDRAW + np.arange(_U_REDRAW)
    return uniforms(np.array([key], dtype=np.uint64), np.array([frame]), draws).tolist()


def _order_codes(keys: np.ndarray) -> np.ndarray:
    """Code ``o0 * 9 + o1 * 3 + o2`` of the argsort of the last axis (size 3)."""
    order = np.argsort(keys, axis=-1)
    return order[..., 0] * 9 + order[..., 1] * 3 + order[..., 2]


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
    """Raw frames of one candidate story.

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


def widen_to_four(raw: Sequence[RawFrame], key: int, rate: float) -> list[RawFrame]:
    """The four-character variant of a story's raw frames (module doc): runs of a three-character set widened.

    Args:
        raw: the story's raw frames (:func:`sample_accepted`).
        key: the story key (the draws are counter-based, so the variant is deterministic).
        rate: probability that a run of a three-character set gains a fourth character.
    """
    if rate <= 0.0:
        return list(raw)
    frames = np.arange(len(raw))
    u = uniforms(
        np.array([key], dtype=np.uint64),
        frames[:, None],
        np.array([_U_WIDEN, _U_NEWCOMER, _U_PLACE])[None, :],
    ).tolist()
    widened: list[RawFrame] = []
    newcomer: str | None = None
    for t, (chars, slots, action, bg, named) in enumerate(raw):
        if len(chars) != 3:
            newcomer = None
        elif t == 0 or frozenset(chars) != frozenset(raw[t - 1][0]):  # a run starts
            outsiders = [name for name in CHARACTERS if name not in chars]
            newcomer = outsiders[int(u[t][1] * len(outsiders))] if u[t][0] < rate else None
        if newcomer is None:
            widened.append((chars, slots, action, bg, named))
            continue
        place = int(u[t][2] * 4)
        widened.append((chars[:place] + (newcomer,) + chars[place:], (0, 1, 2, 3), action, bg, named))
    return widened


@lru_cache(maxsize=1024)
def _subject_verb(characters: tuple[str, ...]) -> str:
    return f"{join_names(characters)} {'are' if len(characters) > 1 else 'is'} "


_PLACES = [f" in the {b}." for b in BACKGROUNDS]


def raw_captions(raw: Sequence[RawFrame]) -> tuple[str, ...]:
    """Captions with names (the text of :func:`make_caption`, built from cached pieces: the hot path)."""
    return tuple(
        _subject_verb(chars) + ACTIONS[action] + (_PLACES[bg] if named else ".")
        for chars, _, action, bg, named in raw
    )


def referential_captions(raw: Sequence[RawFrame], captions: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Referential captions and flags of a story: the subject of a frame repeating the anchor set is a pronoun.

    ``captions`` are the story's captions with names (:func:`raw_captions`), kept where no pronoun applies.
    """
    ref_captions = list(captions)
    flags = [False] * len(raw)
    anchor: frozenset[str] | None = None
    for t, (chars, _, action, bg, named) in enumerate(raw):
        current = frozenset(chars)
        if current == anchor:
            background = BACKGROUNDS[bg] if named else None
            ref_captions[t] = make_caption(pronoun_subject(chars), ACTIONS[action], background)
            flags[t] = True
        else:
            anchor = current
    return ref_captions, flags


def _content_hash(captions: Sequence[str]) -> float:
    digest = hashlib.blake2b("\n".join(captions).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of_captions(captions: Sequence[str]) -> str:
    """The split that owns a story with these captions (with names), by content hash.

    Example:
        >>> split_of_captions(["Ava is standing in the forest.", "She is jumping."])
        'train'
    """
    h = _content_hash(captions)
    for split, (low, high) in SPLIT_HASH_RANGES.items():
        if low <= h < high:
            return split
    raise AssertionError("unreachable")  # pragma: no cover


def check_sampling_args(
    split: str, frames_per_story: int, seed: int, four_character_rate: float = 0.0
) -> str:
    """The normalised ``split`` after checking the story length, the seed and the rate (clear errors otherwise)."""
    split = normalize_split(split)
    if not 0.0 <= four_character_rate <= 1.0:
        raise ValueError(f"four_character_rate must be in [0, 1], got {four_character_rate}")
    if not 1 <= frames_per_story <= MAX_FRAMES:
        raise ValueError(f"frames_per_story must be in 1..{MAX_FRAMES}, got {frames_per_story}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return split


def sample_accepted(
    indices: Sequence[int], split: str, frames_per_story: int, seed: int, four_character_rate: float = 0.0
) -> dict[int, tuple[int, list[RawFrame], tuple[str, ...]]]:
    """``{index: (attempt, raw frames, captions)}`` of the candidates ``split`` accepts, drawn in bulk.

    ``split`` must be normalised (:func:`check_sampling_args`). Each pass draws the next attempt of
    every story still pending, all at once. With ``four_character_rate`` > 0 the accepted stories are
    widened (:func:`widen_to_four`) after the split filter.
    """
    low, high = SPLIT_HASH_RANGES[split]
    split_id = SPLIT_IDS[split]
    accepted: dict[int, tuple[int, list[RawFrame], tuple[str, ...]]] = {}
    pending = np.asarray(indices, dtype=np.int64)
    attempt = 0
    while pending.size:
        if attempt >= _MAX_ATTEMPTS:  # pragma: no cover
            raise RuntimeError("no story passed the split filter")
        keys = story_keys(seed, split_id, pending, np.full(pending.shape, attempt))
        draws = _frame_draws(keys, frames_per_story)
        char_orders = np.argsort(draws[..., _U_RANK], axis=-1).tolist()
        slot_codes = _order_codes(draws[..., _U_SLOT]).tolist()
        order_codes = _order_codes(draws[..., _U_ORDER]).tolist()
        rejected = []
        scalars = draws[..., _U_SCALARS].tolist()
        for i, (index, key, story_draws) in enumerate(zip(pending.tolist(), keys.tolist(), scalars)):
            raw = _sample_raw(story_draws, char_orders[i], slot_codes[i], order_codes[i], key)
            captions = raw_captions(raw)
            if low <= _content_hash(captions) < high:
                if four_character_rate > 0.0:
                    raw = widen_to_four(raw, key, four_character_rate)
                    captions = raw_captions(raw)
                accepted[index] = (attempt, raw, captions)
            else:
                rejected.append(index)
        pending = np.asarray(rejected, dtype=np.int64)
        attempt += 1
    return accepted
