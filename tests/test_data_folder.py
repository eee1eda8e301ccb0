"""Story folders (``load_story_dataset("folder", data_dir=...)``) on a copy of ``examples/my_stories``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from storygptv.data import STORY_COLUMNS, load_story_dataset
from storygptv.data.folder import StoryFolderError, folder_referential, read_story_folder
from storygptv.training.checks import TrainingSetupError, check_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_stories"


@pytest.fixture
def folder(tmp_path):
    """A writable copy of the example folder."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "my_stories"))


def _load(root: Path, tmp_path: Path, **kwargs):
    return load_story_dataset("folder", data_dir=root, cache_dir=str(tmp_path / "cache"), **kwargs)


def _lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def _write_lines(root: Path, lines: list) -> None:
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    (root / "metadata.jsonl").write_text("\n".join(text) + "\n")


# ------------------------------------------------------------------------------------------------ rows
def test_example_folder_loads_in_the_story_schema(tmp_path):
    train = _load(EXAMPLE, tmp_path)
    assert tuple(train.column_names) == STORY_COLUMNS
    assert train["story_id"] == ["picnic", "snowday"]  # the order of splits.json
    picnic, snowday = train[0], train[1]
    assert picnic["frame_ids"] == [f"frames/picnic/{i}.png" for i in range(4)]
    assert picnic["captions"][1] == "Nia and Rex are waving."
    # The generic rule ("They" for a repeated pair), a given referential caption, a single name kept.
    referential = dict(zip(picnic["captions"], picnic["referential_captions"]))
    assert referential["Nia and Rex are waving."] == "They are waving."
    assert referential["Nia is sitting."] == "She is sitting."
    assert referential["Nia is jumping in the beach."] == "Nia is jumping in the beach."
    assert picnic["is_referential"] == [False, True, False, True]
    assert picnic["characters"] == [["Nia", "Rex"], ["Nia", "Rex"], ["Nia"], ["Nia"]]
    assert picnic["character_labels"] == [[1, 1], [1, 1], [1, 0], [1, 0]]  # cast order: Nia, Rex
    assert picnic["background"] == ["beach"] * 4
    assert picnic["background_labels"][0] == [1, 0, 0]  # beach, night, snow
    assert picnic["boxes"][0] == [[6.0, 36.0, 22.0, 52.0], [42.0, 36.0, 58.0, 52.0]]
    assert picnic["images"][0].size == (64, 64) and picnic["images"][0].mode == "RGB"
    # Box masks: label i + 1 inside box i.
    seg = np.asarray(picnic["segmentation"][0])
    assert seg[40, 10] == 1 and seg[40, 50] == 2 and seg[0, 0] == 0
    # A mask without boxes gives the boxes, and is the segmentation as given.
    assert snowday["referential_captions"][1] == "He is jumping."
    given = np.asarray(PIL.Image.open(EXAMPLE / "masks" / "snowday" / "2.png"))
    assert np.array_equal(np.asarray(snowday["segmentation"][2]), given)
    rows, cols = np.nonzero(given == 1)
    assert snowday["boxes"][2][0] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]

    validation = _load(EXAMPLE, tmp_path, split="val")
    assert validation["story_id"] == ["night_walk"]
    assert validation[0]["referential_captions"][2] == "They are laughing."
    with pytest.raises(StoryFolderError, match="no 'test' list"):
        _load(EXAMPLE, tmp_path, split="test")


def test_options_order_and_streaming(folder, tmp_path):
    lines = _lines(folder)
    _write_lines(folder, lines[::-1])  # frames are ordered by `frame`, not by line
    (folder / "splits.json").unlink()  # then every story is "train", in order of first appearance
    stories = _load(folder, tmp_path)
    assert stories["story_id"] == ["night_walk", "snowday", "picnic"]
    assert stories[2]["frame_ids"] == [f"frames/picnic/{i}.png" for i in range(4)]
    short = _load(folder, tmp_path, frames_per_story=2, num_stories=2, referential=False)
    assert [len(c) for c in short["captions"]] == [2, 2]
    assert short[0]["referential_captions"] == short[0]["captions"]
    streamed = list(load_story_dataset("folder", data_dir=folder, streaming=True))
    assert [r["story_id"] for r in streamed] == stories["story_id"]
    assert streamed[2]["referential_captions"] == stories[2]["referential_captions"]
    with pytest.raises(StoryFolderError, match="no splits.json.*'validation'"):
        _load(folder, tmp_path, split="validation")
    with pytest.raises(TypeError, match="referential_compat"):
        _load(folder, tmp_path, referential_compat="make-a-story")


def test_unlisted_stories_warn(folder, tmp_path):
    (folder / "splits.json").write_text(json.dumps({"train": ["picnic"]}))
    with pytest.warns(UserWarning, match="2 stories.*in no split"):
        assert _load(folder, tmp_path)["story_id"] == ["picnic"]


def test_generic_referential_rule_knows_no_gender():
    captions = ["Fred and Ava sit.", "Ava, Fred sit.", "Ava and Fred's dog sit.", "Fred sits.", "Fred jumps."]
    sets = [["Fred", "Ava"], ["Ava", "Fred"], ["Fred", "Ava"], ["Fred"], ["Fred"]]
    out, flags = folder_referential(captions, sets)
    # "Fred" is a FlintstonesSV name, but a folder's single characters always stay named.
    assert out == ["Fred and Ava sit.", "Ava, Fred sit.", "Their dog sit.", "Fred sits.", "Fred jumps."]
    assert flags == [False, False, True, False, False]


# ------------------------------------------------------------------------------------------------ errors
def _first_line_with(root: Path, **changes) -> None:
    lines = _lines(root)
    lines[0].update(changes)
    _write_lines(root, [{k: v for k, v in lines[0].items() if v is not ...}, *lines[1:]])


BAD_LINES = [
    ({"file_name": "frames/picnic/9.png"}, 1, "file_name", "no such file"),
    ({"file_name": "../picnic.png"}, 1, "file_name", "relative to the folder"),
    ({"file_name": "metadata.jsonl"}, 1, "file_name", "not a readable image"),
    ({"story_id": ...}, 1, None, "missing field 'story_id'"),
    ({"colour": "red"}, 1, None, "unknown field 'colour'"),
    ({"frame": "0"}, 1, "frame", "expected an integer"),
    ({"frame": 1}, 2, "frame", r"story 'picnic' already has frame 1 \(line 1\)"),
    (
        {"characters": ["Nia", "Mia"]},
        1,
        "characters",
        r"'Mia' has no reference image .*add characters/Mia.png",
    ),
    ({"characters": "Nia"}, 1, "characters", "expected a list of names"),
    ({"boxes": [[6, 36, 22, 52]]}, 1, "boxes", "expected a list of 2 boxes"),
    ({"boxes": [[6, 36, 2, 52], None]}, 1, "boxes", "box 0 .* is empty"),
    ({"mask": "frames/picnic/0.png"}, 1, "mask", "is a RGB image; a label map has one channel"),
    ({"caption": " "}, 1, "caption", "is empty"),
]


@pytest.mark.parametrize(("change", "line", "field", "message"), BAD_LINES)
def test_bad_lines_name_file_line_and_field(folder, change, line, field, message):
    _first_line_with(folder, **change)
    where = f"{folder / 'metadata.jsonl'}:{line}: " + (f"field '{field}': " if field else "")
    with pytest.raises(StoryFolderError) as info:
        read_story_folder(folder)
    assert str(info.value).startswith(where), str(info.value)
    assert re.search(message, str(info.value)), str(info.value)
    # The training scripts' check says the same, before any work.
    with pytest.raises(TrainingSetupError, match=f"--data_dir: {re.escape(where)}"):
        check_dataset("folder", str(folder))


def test_invalid_json_and_folder_errors(folder, tmp_path):
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    _write_lines(folder, [lines[0], "", lines[1][:-1]])  # a blank line is skipped
    with pytest.raises(StoryFolderError, match=r"metadata.jsonl:3: invalid JSON"):
        read_story_folder(folder)
    _write_lines(folder, ["[1, 2]"])
    with pytest.raises(StoryFolderError, match=r"metadata.jsonl:1: expected a JSON object"):
        read_story_folder(folder)
    _write_lines(folder, lines)
    (folder / "splits.json").write_text(json.dumps({"train": ["picnic", "lost"]}))
    with pytest.raises(StoryFolderError, match=r"splits.json: split 'train' names story 'lost'"):
        read_story_folder(folder)
    (folder / "splits.json").write_text(json.dumps({"train": ["picnic"], "dev": ["picnic"]}))
    with pytest.raises(StoryFolderError, match=r"story 'picnic' is in both 'train' and 'validation'"):
        read_story_folder(folder)
    (folder / "splits.json").write_text(json.dumps({"holdout": []}))
    with pytest.raises(StoryFolderError, match=r"unknown split 'holdout'"):
        read_story_folder(folder)
    shutil.rmtree(folder / "characters")
    with pytest.raises(StoryFolderError, match="no characters/ folder"):
        read_story_folder(folder)
    with pytest.raises(StoryFolderError, match="no metadata.jsonl"):
        read_story_folder(tmp_path)
    with pytest.raises(TrainingSetupError, match="--dataset folder needs --data_dir: your story folder"):
        check_dataset("folder")


def test_a_bad_mask_label_fails_the_load_and_leaves_no_cache(folder, tmp_path):
    mask = folder / "masks" / "snowday" / "0.png"
    PIL.Image.fromarray(np.full((64, 64), 3, dtype=np.uint8), mode="L").save(mask)
    read_story_folder(folder)  # the header is fine: the values are read with the frame
    with pytest.raises(
        StoryFolderError, match=r"metadata.jsonl:5: field 'mask': .* has label 3, but the frame lists 1"
    ):
        _load(folder, tmp_path)
    assert not list((tmp_path / "cache").rglob("*.arrow"))
