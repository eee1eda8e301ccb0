"""The SynthSV package layout: public names, shared split rules, streamed rows that belong to the caller."""

from __future__ import annotations

import pytest

import storygptv.data.synthsv as synthsv
from storygptv.data.synthsv import load_synthsv, sample_stories


def test_public_names_are_importable_from_the_package():
    for name in synthsv.__all__:
        assert getattr(synthsv, name) is not None, name


@pytest.mark.parametrize(
    ("alias", "split"), [("training", "train"), ("dev", "validation"), (" VAL ", "validation")]
)
def test_split_aliases_are_the_loaders_aliases(alias, split):
    assert sample_stories([0, 1], alias, 3, seed=2) == sample_stories([0, 1], split, 3, seed=2)


@pytest.mark.parametrize("streaming", [False, True])
def test_negative_seed_is_refused_in_both_modes(streaming):
    with pytest.raises(ValueError, match="seed must be non-negative"):
        load_synthsv("test", num_stories=1, seed=-1, streaming=streaming)


def test_streamed_rows_belong_to_the_caller():
    stream = load_synthsv("test", frames_per_story=2, num_stories=2, streaming=True)
    row = next(iter(stream))
    expected_labels = [list(v) for v in row["character_labels"]]
    expected_boxes = [[list(b) for b in frame] for frame in row["boxes"]]
    row["character_labels"][0][0] = 7
    row["boxes"][0][0][0] = -5.0
    again = next(iter(stream))
    assert again["character_labels"] == expected_labels
    assert again["boxes"] == expected_boxes


def test_streaming_draws_in_blocks_without_changing_stories():
    stream = list(load_synthsv("train", frames_per_story=2, num_stories=300, seed=4, streaming=True))
    stored = load_synthsv("train", frames_per_story=2, num_stories=300, seed=4).with_format(None)
    for index in (0, 255, 256, 299):  # both sides of a block boundary
        assert stream[index]["captions"] == stored[index]["captions"]
        assert stream[index]["story_id"] == stored[index]["story_id"]
