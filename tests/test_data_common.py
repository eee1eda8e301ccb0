"""The rules the story loaders share: split names, label vectors, release files and loading options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storygptv.data import ReleaseOptions, load_story_dataset, multi_hot, normalize_split
from storygptv.data._common import (
    RELEASE_SPLIT_KEYS,
    SPLITS,
    UnreadableFrameError,
    label_vector,
    read_npy_frame,
    release_split,
    require_files,
)
from storygptv.data._release import chain_stories, release_root


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("train", "train"),
        ("Training", "train"),
        ("val", "validation"),
        ("valid", "validation"),
        ("dev", "validation"),
        ("validation", "validation"),
        (" TEST ", "test"),
    ],
)
def test_normalize_split(name, split):
    assert normalize_split(name) == split


def test_unknown_split_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"Unknown split 'dev2'; valid splits: 'train', 'validation' \(or 'val'\)"
    ):
        normalize_split("dev2")


def test_release_split_keys_cover_every_split_in_lookup_order():
    assert set(RELEASE_SPLIT_KEYS) == set(SPLITS)
    splits = {"train": [1], "validation": [2], "val": [3], "test": [4]}
    assert release_split(splits, "val", Path("s.json")) == [3]  # "val" is looked up before "validation"
    assert release_split({"valid": ["a"]}, "dev", Path("s.json")) == ["a"]
    with pytest.raises(
        ValueError, match=r"'s\.json' has no list for split 'test'.*\['test'\].*keys: \['train'\]"
    ):
        release_split({"train": []}, "test", Path("s.json"))


def test_multi_hot_and_label_vectors():
    assert multi_hot(["BETTY", "Fred", "Gazoo"], ("Wilma", "Fred", "Betty")) == [0, 1, 1]
    assert multi_hot([], ("a", "b")) == [0, 0]
    assert label_vector(np.array([[1, 0], [0, 1]], dtype=np.uint8)) == [1, 0, 0, 1]
    assert label_vector([True, False]) == [1, 0]


def test_require_files_names_the_missing_file_and_the_layout(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    assert require_files(tmp_path, "LAYOUT", "a.json") == [tmp_path / "a.json"]
    with pytest.raises(FileNotFoundError, match=r"b\.pkl'\. Expected layout: LAYOUT"):
        require_files(tmp_path, "LAYOUT", "a.json", "b.pkl")


def test_missing_frame_file_is_an_unreadable_frame(tmp_path):
    with pytest.raises(UnreadableFrameError, match="missing frame file"):
        read_npy_frame(tmp_path / "nope.npy", "nope", seed=0, frame_index=None)


def test_release_options_are_checked_once():
    options = ReleaseOptions.from_kwargs(
        "X", "val", {"referential_compat": "StoryGPT-V", "frames_per_story": "3"}
    )
    assert (options.split, options.referential_compat, options.frames_per_story) == (
        "validation",
        "storygptv",
        3,
    )
    assert options.check_frames_per_story("X", "layout", 4) == 3
    with pytest.raises(
        ValueError, match=r"frames_per_story=3: X stories have 2 frames in the l layout; pass 1 to 2"
    ):
        options.check_frames_per_story("X", "l", 2)
    with pytest.raises(
        TypeError, match=r"X loader got unknown options \['caption_index'\]; valid options: \['split'"
    ):
        ReleaseOptions.from_kwargs("X", "train", {"caption_index": 0})
    with pytest.raises(ValueError, match="Unknown referential compat mode"):
        ReleaseOptions(referential_compat="nope")


def test_an_option_of_another_release_is_a_clear_error(tmp_path):
    (tmp_path / "split.json").write_text("{}")
    with pytest.raises(TypeError, match=r"FlintstonesSV loader got unknown options \['caption_index'\]"):
        load_story_dataset("flintstones", tmp_path, caption_index=0)


def test_release_root(tmp_path):
    assert release_root(str(tmp_path), "X", "L") == tmp_path
    with pytest.raises(ValueError, match="X is not downloaded by the package: pass `data_dir`"):
        release_root(None, "X", "L")
    with pytest.raises(FileNotFoundError, match="X directory .* does not exist. Expected layout: L"):
        release_root(tmp_path / "nope", "X", "L")


def test_chain_stories_keeps_order_and_skips_short_chains():
    followings = {"a": ["a1", "a2", "a3"], "b": ["b1"], "c": ["c1", "c2"]}
    assert chain_stories(["c", "z", "b", "a"], followings, 3) == [["c", "c1", "c2"], ["a", "a1", "a2"]]
    assert chain_stories(["b"], followings, 1) == [["b"]]
