"""SynthSV stories as objects: :class:`SynthStory` and the samplers :func:`sample_story` / :func:`sample_stories`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image

from .render import render_frame
from .sampling import RawFrame, check_sampling_args, referential_captions, sample_accepted
from .spec import ACTIONS, BACKGROUNDS, SynthFrame


def make_story_id(split: str, seed: int, index: int) -> str:
    """The id of story ``index`` of ``split`` drawn with ``seed``, e.g. ``"synthsv-train-s0-000012"``."""
    return f"synthsv-{split}-s{seed}-{index:06d}"


def make_frame_ids(story_id: str, num_frames: int) -> list[str]:
    """Per-frame ids ``"<story_id>-f000"``, ``"<story_id>-f001"``..."""
    return [f"{story_id}-f{t:03d}" for t in range(num_frames)]


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
        return make_story_id(self.split, self.seed, self.index)

    @property
    def frame_ids(self) -> list[str]:
        """Per-frame ids ``"<story_id>-f000"``..."""
        return make_frame_ids(self.story_id, len(self.frames))

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


def _story_from_raw(
    index: int, split: str, seed: int, attempt: int, raw: Sequence[RawFrame], captions: tuple[str, ...]
) -> SynthStory:
    frames = tuple(
        _trusted_frame(chars, slots, ACTIONS[action], BACKGROUNDS[bg], named)
        for chars, slots, action, bg, named in raw
    )
    referential, flags = referential_captions(raw, captions)
    return SynthStory(
        index=index,
        split=split,
        seed=seed,
        frames=frames,
        captions=captions,
        referential_captions=tuple(referential),
        is_referential=tuple(flags),
        attempt=attempt,
    )


def sample_story(
    index: int,
    split: str = "train",
    frames_per_story: int = 4,
    seed: int = 0,
    four_character_rate: float = 0.0,
) -> SynthStory:
    """Sample story ``index`` of ``split`` deterministically.

    Args:
        index: non-negative story index (any index, also beyond :data:`SPLIT_SIZES`).
        split: "train", "validation" (or "val") or "test".
        frames_per_story: story length, 1 to 500.
        seed: non-negative generation seed.
        four_character_rate: the opt-in four-character variant (see
            :mod:`~storygptv.data.synthsv.sampling`); 0 draws the standard world.

    Returns:
        The :class:`SynthStory`; the same arguments always give the same story, and stories of
        different splits never share their caption sequence.

    Example:
        >>> story = sample_story(3, split="test", frames_per_story=3, seed=1)
        >>> story.story_id, len(story), story == sample_stories([0, 3], "test", 3, seed=1)[1]
        ('synthsv-test-s1-000003', 3, True)
    """
    return sample_stories([index], split, frames_per_story, seed, four_character_rate)[0]


def sample_stories(
    indices: Iterable[int],
    split: str = "train",
    frames_per_story: int = 4,
    seed: int = 0,
    four_character_rate: float = 0.0,
) -> list[SynthStory]:
    """:func:`sample_story` for many indices at once (drawn in bulk, much faster; same stories)."""
    split = check_sampling_args(split, frames_per_story, seed, four_character_rate)
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise ValueError("story indices must be non-negative")
    accepted = sample_accepted(sorted(set(indices)), split, frames_per_story, seed, four_character_rate)
    return [_story_from_raw(i, split, seed, *accepted[i]) for i in indices]
