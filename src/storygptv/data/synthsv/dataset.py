"""SynthSV as a ``datasets`` dataset in the package's common story schema.

The non-streaming :class:`datasets.Dataset` stores the cheap spec columns (``images`` and
``segmentation`` hold null placeholders) and renders frames in a format transform
(:func:`~storygptv.data.synthsv.render_synthsv_batch`), so loading the 20,000 training stories takes
about 2.5 s of CPU. The streaming dataset renders each row as it is read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

from .._common import STORY_COLUMNS, multi_hot, story_features
from .render import render_story_frames, render_synthsv_batch
from .sampling import RawFrame, check_sampling_args, referential_captions, sample_accepted
from .spec import ACTIONS, BACKGROUNDS, CHARACTERS, SPLIT_SIZES, slot_boxes
from .story import make_frame_ids, make_story_id

#: Stories drawn at once by the streaming dataset (the same stories as one by one, only faster).
_STREAM_BLOCK = 256


def synthsv_features() -> Any:
    """The :class:`datasets.Features` of the package's common story schema (used by :func:`load_synthsv`)."""
    return story_features()


# A story's labels repeat a few hundred distinct values; caching them keeps a split's load fast.
@lru_cache(maxsize=1024)
def _character_labels(characters: tuple[str, ...]) -> list[int]:
    return multi_hot(characters, CHARACTERS)


@lru_cache(maxsize=len(BACKGROUNDS))
def _background_labels(background: str) -> list[int]:
    return multi_hot([background], BACKGROUNDS)


@lru_cache(maxsize=1024)
def _boxes(slots: tuple[int, ...], action: int) -> list[list[float]]:
    return [[float(c) for c in box] for box in slot_boxes(slots, ACTIONS[action])]


def story_row(
    split: str, seed: int, index: int, raw: Sequence[RawFrame], captions: Sequence[str], referential: bool
) -> dict[str, Any]:
    """One row of the story schema straight from sampler output, with null image placeholders.

    Label and box lists are shared with caches (building a 20,000-story split without copies keeps it
    fast): copy the row before handing it to code that may change it.
    """
    story_id = make_story_id(split, seed, index)
    n = len(raw)
    if referential:
        ref_captions, flags = referential_captions(raw, captions)
    else:
        ref_captions, flags = list(captions), [False] * n
    backgrounds = [BACKGROUNDS[bg] for _, _, _, bg, _ in raw]
    return {
        "story_id": story_id,
        "frame_ids": make_frame_ids(story_id, n),
        "images": [None] * n,
        "captions": list(captions),
        "referential_captions": ref_captions,
        "is_referential": flags,
        "characters": [frame[0] for frame in raw],
        "boxes": [_boxes(slots, action) for _, slots, action, _, _ in raw],
        "segmentation": [None] * n,
        "character_labels": [_character_labels(frame[0]) for frame in raw],
        "background": backgrounds,
        "background_labels": [_background_labels(bg) for bg in backgrounds],
    }


def _iter_rows(
    split: str,
    frames_per_story: int,
    referential: bool,
    num_stories: int,
    seed: int,
    four_character_rate: float,
) -> Iterator[dict[str, Any]]:
    """Rows of the streaming dataset, frames rendered (stories drawn in blocks, one block at a time)."""
    for start in range(0, num_stories, _STREAM_BLOCK):
        block = range(start, min(start + _STREAM_BLOCK, num_stories))
        accepted = sample_accepted(block, split, frames_per_story, seed, four_character_rate)
        for index in block:
            _, raw, captions = accepted[index]
            # The row's lists are shared with the label caches; a streamed row is the user's to change.
            row = copy.deepcopy(story_row(split, seed, index, raw, captions, referential))
            row["images"], row["segmentation"] = render_story_frames(
                row["characters"], row["boxes"], row["background"]
            )
            yield row


def load_synthsv(
    split: str = "train",
    frames_per_story: int = 4,
    referential: bool = True,
    num_stories: int | None = None,
    seed: int = 0,
    streaming: bool = False,
    cache_dir: str | None = None,
    four_character_rate: float = 0.0,
) -> Any:
    """Load a SynthSV split in the package's common story schema.

    Args:
        split: "train" (20,000 stories by default), "validation" (500) or "test" (1,000).
        frames_per_story: story length, 1 to 500.
        referential: if ``False``, ``referential_captions`` equals ``captions`` and ``is_referential``
            is all ``False``.
        num_stories: number of stories (default :data:`SPLIT_SIZES` ``[split]``); story ``i`` is
            :func:`sample_story` ``(i, split, frames_per_story, seed)``.
        seed: non-negative generation seed.
        streaming: return a :class:`datasets.IterableDataset` generating rows on the fly.
        cache_dir: ignored (accepted like the other loaders; SynthSV is generated, nothing is cached).
        four_character_rate: the opt-in four-character variant: the probability that a run of frames
            sharing a three-character set gains a fourth character (:mod:`~storygptv.data.synthsv.sampling`);
            0 (the default) is the standard world of 1-3 characters per frame.

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

    split = check_sampling_args(split, frames_per_story, seed, four_character_rate)
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
                "four_character_rate": four_character_rate,
            },
        )
    columns: dict[str, list[Any]] = {key: [] for key in STORY_COLUMNS}
    accepted = sample_accepted(range(num_stories), split, frames_per_story, seed, four_character_rate)
    for index in range(num_stories):
        _, raw, captions = accepted[index]
        row = story_row(split, seed, index, raw, captions, referential)
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
