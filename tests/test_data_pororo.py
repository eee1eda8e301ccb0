"""PororoSV loader on a tiny synthetic release in the original layout."""

import warnings

import numpy as np
import PIL.Image
import pytest

from storygptv.data import STORY_COLUMNS, load_story_dataset
from storygptv.data.pororo import CHARACTERS, FEMALE, MALE, crop_strip_frame
from tests.fixtures.story_releases import write_pororo


@pytest.fixture(scope="module")
def pororo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pororo")
    write_pororo(root, corrupt=("Pororo_ENGLISH1_1_ep3/2",))
    return root


def _load(root, tmp_path, **kwargs):
    return load_story_dataset("pororo", root, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_constants():
    assert CHARACTERS == ("Pororo", "Loopy", "Crong", "Eddy", "Poby", "Petty", "Tongtong", "Rody", "Harry")
    assert set(FEMALE) == {"Petty", "Loopy"} and "Pororo" in MALE and len(MALE) == 7


def test_rows_sorted_split_and_referential(pororo_dir, tmp_path):
    ds = _load(pororo_dir, tmp_path, split="train")
    assert tuple(ds.column_names) == STORY_COLUMNS
    assert ds["story_id"] == ["Pororo_ENGLISH1_1_ep1/0", "Pororo_ENGLISH1_1_ep2/0"]  # ids sorted
    row = ds[0]
    assert row["frame_ids"] == [f"Pororo_ENGLISH1_1_ep1/{i}" for i in range(4)]
    assert row["referential_captions"] == [
        "Pororo and Crong are playing in the snow.",
        "They are eating cake.",
        "Loopy is baking. Crong and Loopy watch.",
        "Pororo is skiing. She falls down.",
    ]
    assert row["is_referential"] == [False, True, False, True]
    assert row["characters"][0] == ["Pororo", "Crong"]
    assert row["character_labels"][0] == [1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert row["boxes"][0] == [[], []] and row["background"] == [""] * 4 and row["background_labels"][0] == []
    assert row["images"][0].size == (16, 16) and row["segmentation"][0].mode == "L"
    five = _load(pororo_dir, tmp_path, split="train", frames_per_story=5)
    assert five[0]["referential_captions"][4] == "She laughs."


def test_compat_and_captions(pororo_dir, tmp_path):
    ds = _load(pororo_dir, tmp_path, split="train", referential_compat="make-a-story", frames_per_story=5)
    assert ds[0]["referential_captions"][1] == "He and Crong are eating cake."
    assert ds[0]["referential_captions"][4] == "loopy laughs."
    ds = _load(pororo_dir, tmp_path, split="train", caption_index=2)
    assert ds[0]["captions"][0] == "Another caption of Pororo_ENGLISH1_1_ep1/0."
    a = _load(pororo_dir, tmp_path, split="train", caption_index="random", seed=3)
    b = _load(pororo_dir, tmp_path, split="train", caption_index="random", seed=3)
    assert a["captions"] == b["captions"]
    with pytest.raises(ValueError, match="caption_index"):
        _load(pororo_dir, tmp_path, caption_index="first")


def test_strip_frames(pororo_dir, tmp_path):
    for k in range(3):
        ds = _load(pororo_dir, tmp_path, split="train", frame_index=k)
        assert [img.getpixel((0, 0))[0] for img in ds[0]["images"]] == [50 * k] * 4
    strip = PIL.Image.new("RGB", (30, 10))
    strip.paste((255, 0, 0), (20, 0, 30, 10))
    frame = crop_strip_frame(strip, "x", seed=0, frame_index=2)
    assert frame.size == (10, 10) and frame.getpixel((5, 5)) == (255, 0, 0)


def test_corrupt_png_and_missing_files(pororo_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _load(pororo_dir, tmp_path, split="val")
    assert len(ds) == 0
    assert any("Pororo_ENGLISH1_1_ep3/2.png" in str(w.message) for w in caught)
    broken = tmp_path / "broken"
    write_pororo(broken)
    (broken / "img_cache4.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"img_cache4\.npy.*PororoSV"):
        _load(broken, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ValueError, match="1 to 5"):
        _load(pororo_dir, tmp_path, frames_per_story=6)


def test_labels_fallback_to_caption_names(tmp_path):
    root = tmp_path / "nolabels"
    write_pororo(root)
    (root / "labels.npy").unlink()
    ds = load_story_dataset("PororoSV", root, split="test", referential=False, cache_dir=str(tmp_path / "c"))
    assert ds[0]["characters"][2] == ["Eddy", "Rody"]
    assert ds[0]["character_labels"][2] == [0, 0, 0, 1, 0, 0, 0, 1, 0]
    assert np.asarray(ds[0]["segmentation"][0]).max() == 0


def test_storygptv_layout(tmp_path):
    from storygptv.data.pororo import detect_layout
    from tests.fixtures.story_releases import write_pororo_storygptv

    root = tmp_path / "pororo_gptv"
    ids = write_pororo_storygptv(root)
    assert detect_layout(root) == "storygptv"
    ds = load_story_dataset("pororo", root, split="test", frame_index=0, cache_dir=str(tmp_path / "c"))
    row = ds[0]
    assert row["frame_ids"] == ids
    # Frame k=0 of n=2 with C=3 captions: caption min(ceil(1/2*3), 2) = 2.
    assert row["captions"] == ["Loopy bakes a cake.", "Loopy is eating.", "Pororo visits.", "Crong naps."]
    assert row["referential_captions"][1] == "She is eating."
    assert row["characters"] == [["Loopy"], ["Loopy"], ["Pororo"], ["Crong"]]
    assert row["boxes"][2] == [[16.0, 0.0, 32.0, 16.0]]
    seg = np.asarray(row["segmentation"][0])
    assert seg[:, 0].max() == 0 and (seg[:, 1:8] == 1).all()  # release mask (first column empty)
    seg = np.asarray(row["segmentation"][3])
    assert (seg[16:32, 0:16] == 1).all() and seg.astype(int).sum() == 16 * 16  # box mask
    assert row["character_labels"][0] == [0, 1, 0, 0, 0, 0, 0, 0, 0]
    ds = load_story_dataset("pororo", root, split="test", caption_index=0, cache_dir=str(tmp_path / "c"))
    assert ds[0]["captions"][0] == "Loopy bakes."
    with pytest.raises(ValueError, match="1 to 4"):
        load_story_dataset("pororo", root, split="test", frames_per_story=5)
    with pytest.raises(ValueError, match="Unknown PororoSV layout"):
        load_story_dataset("pororo", root, layout="hdf5")


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("storygan", "descriptions.npy"),
        ("storygan", "labels.npy"),
        ("storygan", "train_seen_unseen_ids.npy"),
        ("storygan", "img_cache4.npy"),
        ("storygan", "following_cache4.npy"),
        ("storygptv", "following_cache3.pkl"),
        ("storygptv", "labels.pkl"),
    ],
)
def test_code_in_a_release_file_is_refused_and_never_runs(tmp_path, layout, name):
    from storygptv.data.safe_pickle import UnsafePickleError
    from tests.fixtures.story_releases import poison, write_pororo_storygptv

    root, marker = tmp_path / "release", tmp_path / "marker"
    (write_pororo if layout == "storygan" else write_pororo_storygptv)(root)
    poison(root / name, marker)
    with pytest.raises(UnsafePickleError, match=rf"{name}.*names the global io\.open"):
        load_story_dataset("pororo", root, split="test", cache_dir=str(tmp_path / "c"))
    assert not marker.exists()
