"""FlintstonesSV loaders on tiny synthetic releases in both layouts."""

import warnings

import numpy as np
import pytest

from storygptv.data import STORY_COLUMNS, load_story_dataset
from storygptv.data.flintstones import CHARACTERS, FEMALE, MALE, canonical_character, detect_layout
from tests.fixtures.story_releases import write_flintstones_storydalle, write_flintstones_storygptv


@pytest.fixture(scope="module")
def storydalle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flintstones_storydalle")
    write_flintstones_storydalle(root, corrupt=("s_02_e_01_shot_000302_000352",))
    return root


@pytest.fixture(scope="module")
def storygptv_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flintstones_storygptv")
    write_flintstones_storygptv(root)
    return root


def _load(root, tmp_path, **kwargs):
    return load_story_dataset("flintstones", root, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_constants():
    assert CHARACTERS == ("Wilma", "Fred", "Betty", "Barney", "Dino", "Pebbles", "Mr Slate")
    assert set(FEMALE) == {"wilma", "betty", "pebbles"}
    assert set(MALE) == {"fred", "barney", "mr slate", "dino"}
    assert canonical_character("mr. slate") == "Mr Slate"
    assert canonical_character("Fred's") == "Fred"
    assert canonical_character("woman") is None


def test_storydalle_layout_rows(storydalle_dir, tmp_path):
    assert detect_layout(storydalle_dir) == "storydalle"
    ds = _load(storydalle_dir, tmp_path, split="train")
    assert tuple(ds.column_names) == STORY_COLUMNS
    assert len(ds) == 2
    row = ds[0]
    assert row["story_id"] == "s_01_e_01_shot_000100_000150"
    assert row["frame_ids"][1] == "s_01_e_01_shot_000101_000151"
    assert row["captions"][:2] == ["Fred and Barney are in the yard.", "Barney and Fred start to argue."]
    assert row["referential_captions"] == [
        "Fred and Barney are in the yard.",
        "They start to argue.",
        "Wilma is in the kitchen.",
        "She smiles at the dog.",
    ]
    assert row["is_referential"] == [False, True, False, True]
    assert row["characters"] == [["Fred", "Barney"], ["Fred", "Barney"], ["Wilma"], ["Wilma"]]
    assert row["character_labels"][0] == [0, 1, 0, 1, 0, 0, 0]
    assert row["background"][0] == "yard"
    assert row["background_labels"] == [[], [], [], []]
    assert row["boxes"][0] == [[], []]
    image, seg = row["images"][0], row["segmentation"][0]
    assert image.mode == "RGB" and image.size == (16, 16)
    assert seg.mode == "L" and seg.size == (16, 16) and np.asarray(seg).max() == 0


def test_storydalle_compat_and_no_referential(storydalle_dir, tmp_path):
    compat = _load(storydalle_dir, tmp_path, split="train", referential_compat="make-a-story")
    assert compat[0]["referential_captions"][3] == "He smiles at the dog."  # the public code's gender bug
    assert compat[1]["referential_captions"][1:3] == [
        "Betty, Fred and Wilma sit down.",
        "Wilma, Betty and Fred stand up.",
    ]
    plain = _load(storydalle_dir, tmp_path, split="train", referential=False, frames_per_story=5)
    assert plain[0]["referential_captions"] == plain[0]["captions"]
    assert len(plain[0]["captions"]) == 5
    assert plain[0]["is_referential"] == [False] * 5


def test_frame_choice_seeded_and_indexed(storydalle_dir, tmp_path):
    def markers(ds):
        return [img.getpixel((0, 0))[0] // 50 for img in ds[0]["images"]]

    for k in range(3):
        assert markers(_load(storydalle_dir, tmp_path, split="train", frame_index=k)) == [k] * 4
    seeded = [markers(_load(storydalle_dir, tmp_path, split="train", seed=s)) for s in (0, 0, 1, 2, 3)]
    assert seeded[0] == seeded[1]  # deterministic per seed
    assert len({tuple(m) for m in seeded}) > 1  # and the seed matters


def test_corrupt_frame_drops_story_with_warning(storydalle_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _load(storydalle_dir, tmp_path, split="test")
    messages = [str(w.message) for w in caught]
    assert len(ds) == 1 and ds[0]["story_id"] == "s_01_e_02_shot_000200_000250"
    assert any("s_02_e_01_shot_000302_000352.npy" in m for m in messages)
    assert any("1 story skipped" in m for m in messages)
    # All stories unreadable: an empty dataset with the schema, not an exception.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = _load(storydalle_dir, tmp_path, split="val")
    assert len(empty) == 0 and tuple(empty.column_names) == STORY_COLUMNS


def test_streaming(storydalle_dir):
    ds = load_story_dataset("flintstones", storydalle_dir, split="validation", streaming=True, frame_index=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(ds) == []
    ds = load_story_dataset("flintstones", storydalle_dir, split="train", streaming=True, frame_index=0)
    rows = list(ds)
    assert [r["story_id"] for r in rows] == ["s_01_e_01_shot_000100_000150", "s_01_e_02_shot_000200_000250"]
    assert rows[0]["images"][0].size == (16, 16)


def test_storygptv_layout_boxes_masks_labels(storygptv_dir, tmp_path):
    assert detect_layout(storygptv_dir) == "storygptv"
    ds = _load(storygptv_dir, tmp_path, split="test", frame_index=1)
    assert len(ds) == 2
    row = ds[0]
    assert row["referential_captions"] == [
        "Fred and Barney are in the yard.",
        "They start to argue.",
        "Wilma is in the kitchen.",
        "She cooks dinner.",
    ]
    assert row["characters"][0] == ["Fred", "Barney"]
    # Boxes at 128 px scaled to the 32-px frames.
    assert row["boxes"][0] == [[0.0, 0.0, 16.0, 32.0], [16.0, 0.0, 32.0, 32.0]]
    # Release mask: segment ids mapped to 1 + character index; the mask's first row is empty.
    seg = np.asarray(row["segmentation"][0])
    assert seg[0].max() == 0
    assert (seg[1:, :16] == 1).all() and (seg[1:, 16:] == 2).all()
    # Last frame has no mask file: box mask of Wilma's box [8, 8, 24, 24].
    seg = np.asarray(row["segmentation"][3])
    assert (seg[8:24, 8:24] == 1).all() and seg.sum() == 16 * 16
    assert len(row["background_labels"][0]) == 323 and row["background_labels"][2][2] == 1
    assert row["character_labels"][2] == [1, 0, 0, 0, 0, 0, 0]
    other = ds[1]
    assert other["characters"] == [["Mr Slate", "Fred"], ["Mr Slate", "Fred"], [], ["Betty"]]
    assert other["character_labels"][0] == [0, 1, 0, 0, 0, 0, 1]
    assert np.asarray(other["segmentation"][2]).max() == 0


def test_layout_argument_and_frames_limit(storygptv_dir, tmp_path):
    with pytest.raises(ValueError, match="frames_per_story=5"):
        _load(storygptv_dir, tmp_path, frames_per_story=5)
    with pytest.raises(ValueError, match="Unknown FlintstonesSV layout"):
        _load(storygptv_dir, tmp_path, layout="nope")
    with pytest.raises(FileNotFoundError, match="train-val-test_split.json"):
        _load(storygptv_dir, tmp_path, layout="arldm")
    ds = _load(storygptv_dir, tmp_path, split="val", frames_per_story=2)
    assert len(ds[0]["frame_ids"]) == 2


def test_errors(tmp_path, storydalle_dir):
    with pytest.raises(ValueError, match=r"valid names: \['flintstones', 'pororo', 'synthsv'\]"):
        load_story_dataset("mugen", tmp_path)
    with pytest.raises(ValueError, match="'train', 'validation'"):
        load_story_dataset("flintstones", storydalle_dir, split="dev2")
    with pytest.raises(FileNotFoundError, match="split.json"):
        load_story_dataset("flintstones", tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        load_story_dataset("flintstones")
    broken = tmp_path / "broken"
    write_flintstones_storydalle(broken)
    (broken / "following_cache4.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"following_cache4\.pkl.*StoryDALL-E"):
        load_story_dataset("flintstones", broken, cache_dir=str(tmp_path / "cache"))


def test_sam_refinement_hook(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    from storygptv.data.masks import refine_label_map_with_sam

    torch.manual_seed(0)
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            window_size=2,
            global_attn_indexes=(1,),
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    model = SamModel(config).eval()
    processor = SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    )
    import PIL.Image

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    label = refine_label_map_with_sam(image, [[0, 0, 16, 32], [], [16, 0, 32, 32]], model, processor)
    assert label.shape == (32, 32) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 3}

    # Through the loader: frames without release masks get SAM masks from their boxes.
    root = tmp_path / "release"
    write_flintstones_storygptv(root, masks=False)
    ds = load_story_dataset(
        "flintstones",
        root,
        split="train",
        sam_model=model,
        sam_processor=processor,
        cache_dir=str(tmp_path / "c"),
    )
    seg = ds[0]["segmentation"][0]
    assert seg.mode == "L" and seg.size == (32, 32)
    assert set(np.unique(np.asarray(seg))) <= {0, 1, 2}


def test_mask_helpers_and_unreadable_mask_fallback(tmp_path):
    from storygptv.data.masks import (
        box_label_map,
        boxes_from_label_map,
        label_map_from_segment_ids,
        resize_label_map,
    )

    label = box_label_map([[1, 1, 3, 4], [], [2.5, 0, 8, 2]], 4, 6)
    assert label.dtype == np.uint8 and label.shape == (4, 6)
    assert (label[1:4, 1:2] == 1).all() and (label[0:2, 2:6] == 3).all() and 2 not in label
    assert boxes_from_label_map(label, 3) == [[1.0, 1.0, 3.0, 4.0], [], [2.0, 0.0, 6.0, 2.0]]
    release = np.array([[0, 10, 10], [11, 11, 99]])
    assert label_map_from_segment_ids(release, {10: 0, 11: 1}).tolist() == [[0, 1, 1], [2, 2, 0]]
    assert resize_label_map(np.array([[1, 2], [3, 0]], dtype=np.uint8), 4, 4)[3, 3] == 0

    root = tmp_path / "release"
    write_flintstones_storygptv(root)
    first = "s_03_e_01_shot_000400_000450"
    (root / "seg_mask_4x_comb" / f"{first}-frame0.npy").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_story_dataset(
            "flintstones", root, split="train", frame_index=0, cache_dir=str(tmp_path / "c")
        )
    assert any("Unreadable mask" in str(w.message) for w in caught)
    seg = np.asarray(ds[0]["segmentation"][0])
    assert (seg[:, :16] == 1).all() and (seg[:, 16:] == 2).all()  # box masks (rows 0.. included)


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("storydalle", "following_cache4.pkl"),
        ("storydalle", "labels.pkl"),
        ("storygptv", "following_cache3.pkl"),
        ("storygptv", "labels.pkl"),
        ("storygptv", "labels_bg.pkl"),
    ],
)
def test_code_in_a_release_file_is_refused_and_never_runs(tmp_path, layout, name):
    from storygptv.data.safe_pickle import UnsafePickleError
    from tests.fixtures.story_releases import poison

    root, marker = tmp_path / "release", tmp_path / "marker"
    (write_flintstones_storydalle if layout == "storydalle" else write_flintstones_storygptv)(root)
    poison(root / name, marker)
    with pytest.raises(UnsafePickleError, match=rf"{name}.*names the global io\.open"):
        _load(root, tmp_path, split="test")
    assert not marker.exists()


def test_the_poisoned_fixture_really_runs_code_with_plain_pickle(tmp_path):
    """Guards the test above: the payload is live, so only the restricted loader keeps it from running."""
    import pickle

    from tests.fixtures.story_releases import poison

    root, marker = tmp_path / "release", tmp_path / "marker"
    write_flintstones_storygptv(root)
    poison(root / "labels.pkl", marker)
    with open(root / "labels.pkl", "rb") as handle:
        pickle.load(handle)
    assert marker.exists()
