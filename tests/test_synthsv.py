"""SynthSV: exact rendering, captions, referential rules, sampling, splits and the dataset schema."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from storygptv.data import STORY_COLUMNS
from storygptv.data.synthsv import (
    ACTIONS,
    BACKGROUND_COLORS,
    BACKGROUNDS,
    CHARACTER_COLORS,
    CHARACTERS,
    FOUR_SLOT_X,
    PRONOUNS,
    SPLIT_SIZES,
    SynthFrame,
    character_box,
    load_synthsv,
    make_caption,
    reference_images,
    render_frame,
    sample_stories,
    sample_story,
    split_of_captions,
    synthsv_features,
)
from storygptv.data.synthsv.grammar import parse_caption
from storygptv.data.synthsv.spec import pronoun_subject

SCHEMA = list(STORY_COLUMNS)  # the common story schema, in order


def _render_one(name: str, action: str = "standing", slot: int = 0, background: str = "snow"):
    frame = SynthFrame(characters=(name,), slots=(slot,), action=action, background=background)
    image, seg = render_frame(frame)
    return frame, np.asarray(image), seg


def _local_mask(name: str, action: str = "standing") -> np.ndarray:
    """Sprite mask inside its box, from the segmentation of a one-character frame."""
    frame, _, seg = _render_one(name, action)
    x1, y1, x2, y2 = frame.boxes[0]
    assert (seg > 0).sum() == (seg[y1:y2, x1:x2] > 0).sum(), "sprite leaks out of its box"
    return seg[y1:y2, x1:x2] > 0


# ---------------------------------------------------------------------------------------------- spec


def test_constants():
    assert CHARACTERS == ("Ava", "Bo", "Cleo", "Dax", "Eli", "Fay", "Gus", "Hana")
    assert BACKGROUNDS == ("forest", "beach", "kitchen", "night", "snow", "desert", "lake", "cave")
    assert ACTIONS == ("standing", "jumping", "sitting", "talking", "laughing", "waving")
    assert SPLIT_SIZES == {"train": 20000, "validation": 500, "test": 1000}
    assert sample_story(0, "val") == sample_story(0, "validation")
    assert [PRONOUNS[c] for c in CHARACTERS] == ["she", "he", "she", "he", "he", "she", "he", "she"]


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_background_bands(background):
    _, image, seg = _render_one("Bo", background=background)
    sky, ground = BACKGROUND_COLORS[background]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert seg.shape == (64, 64) and seg.dtype == np.uint8
    for y in (0, 20, 39):
        assert tuple(image[y, 63]) == sky
    for y in (40, 55, 63):
        assert tuple(image[y, 63]) == ground
    assert tuple(image[0, 0]) == sky and tuple(image[63, 0]) == ground


def test_boxes_per_pose():
    for slot, x in enumerate((6, 24, 42)):
        for action in ("standing", "talking", "laughing", "waving"):
            assert character_box(slot, action) == (x, 36, x + 16, 52)
        assert character_box(slot, "jumping") == (x, 24, x + 16, 40)
        assert character_box(slot, "sitting") == (x, 42, x + 16, 52)


@pytest.mark.parametrize("action", ACTIONS)
def test_square_fills_exact_box(action):
    frame, image, seg = _render_one("Bo", action=action, slot=1, background="forest")
    x1, y1, x2, y2 = frame.boxes[0]
    assert (x2 - x1, y2 - y1) == ((16, 10) if action == "sitting" else (16, 16))
    ys, xs = np.nonzero(seg)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
    assert np.all(image[y1:y2, x1:x2] == CHARACTER_COLORS["Bo"])
    assert (seg == 1).sum() == (x2 - x1) * (y2 - y1)
    assert tuple(image[y1 - 1, x1]) in BACKGROUND_COLORS["forest"]
    assert tuple(image[y1, x2]) in BACKGROUND_COLORS["forest"]


def test_sitting_squashes_sprite():
    standing = _local_mask("Ava", "standing")
    sitting = _local_mask("Ava", "sitting")
    assert standing.shape == (16, 16) and sitting.shape == (10, 16)
    assert sitting.sum() < standing.sum()
    assert sitting[5].all() and sitting[:, 8].all()  # ellipse spans the full squashed box
    assert not sitting[0, 0] and not sitting[9, 15]


def test_circle():
    mask = _local_mask("Ava")
    assert mask[8].all() and mask[:, 8].all()  # touches all four box edges
    assert not mask[0, 0] and not mask[15, 15] and not mask[0, 3]
    assert mask[0, 7] and mask[0, 8]
    assert np.array_equal(mask, mask[::-1]) and np.array_equal(mask, mask[:, ::-1])


def test_triangles_apex_directions():
    up = _local_mask("Cleo")
    down = _local_mask("Fay")
    widths_up = up.sum(axis=1)
    assert widths_up[0] == 0 and widths_up[15] == 16
    assert np.all(np.diff(widths_up) >= 0)
    assert np.flatnonzero(up[1]).tolist() == [7, 8]  # apex pixels
    assert np.array_equal(down, up[::-1])  # apex down is the mirror image
    assert down[0].all() and not down[15].any()


def test_diamond():
    mask = _local_mask("Dax")
    assert np.flatnonzero(mask[0]).tolist() == [7, 8]
    assert mask[7].all() and mask[8].all()
    assert not mask[0, 0] and not mask[3, 3]
    assert np.array_equal(mask, mask[::-1]) and np.array_equal(mask, mask.T)


def test_plus_arms_six_pixels():
    mask = _local_mask("Eli")
    assert mask[:, 5:11].all() and mask[5:11, :].all()
    assert not mask[:5, :5].any() and not mask[11:, 11:].any()
    assert not mask[0, 4] and not mask[4, 0]
    assert mask.sum() == 16 * 6 * 2 - 36


def test_bar_centred():
    mask = _local_mask("Gus")
    assert mask[:, 4:12].all()
    assert not mask[:, :4].any() and not mask[:, 12:].any()


def test_ring_hole():
    frame, image, _ = _render_one("Hana", background="night")
    x1, y1, _, _ = frame.boxes[0]
    mask = _local_mask("Hana")
    assert not mask[7:9, 7:9].any() and not mask[8, 4]  # hole of radius 4
    assert mask[8, 3] and mask[8, 0] and mask[0, 8]
    assert tuple(image[y1 + 8, x1 + 8]) == BACKGROUND_COLORS["night"][1]  # row 44 is ground
    assert tuple(image[y1 + 8, x1 + 1]) == CHARACTER_COLORS["Hana"]


def test_colours_and_segmentation_indices():
    frame = SynthFrame(characters=("Gus", "Ava", "Fay"), slots=(0, 1, 2), action="jumping", background="lake")
    image, seg = render_frame(frame)
    image = np.asarray(image)
    for i, (name, (x1, y1, x2, y2)) in enumerate(zip(frame.characters, frame.boxes)):
        cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
        assert tuple(image[cy, cx]) == CHARACTER_COLORS[name]
        assert seg[cy, cx] == i + 1
        assert set(np.unique(seg[y1:y2, x1:x2])) <= {0, i + 1}
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    assert np.all(image[seg == 0][:, :] != 0)  # nothing black: background everywhere else


def test_four_character_frame_layout():
    frame = SynthFrame(
        characters=("Dax", "Ava", "Hana", "Bo"), slots=(0, 1, 2, 3), action="sitting", background="lake"
    )
    assert frame.caption == "Dax, Ava, Hana and Bo are sitting in the lake."
    assert (
        frame.boxes
        == [(x, 42, x + 16, 52) for x in FOUR_SLOT_X]
        == [(0, 42, 16, 52), (16, 42, 32, 52), (32, 42, 48, 52), (48, 42, 64, 52)]
    )
    image, seg = render_frame(frame)
    image = np.asarray(image)
    for i, (name, (x1, y1, x2, y2)) in enumerate(zip(frame.characters, frame.boxes)):
        assert set(np.unique(seg[y1:y2, x1:x2])) <= {0, i + 1}
        assert (seg == i + 1).any() and np.all(image[seg == i + 1] == CHARACTER_COLORS[name])
    assert set(np.unique(seg)) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match=r"slots \(0, 1, 2, 3\)"):
        SynthFrame(
            characters=("Dax", "Ava", "Hana", "Bo"), slots=(0, 1, 2, 2), action="sitting", background="lake"
        )
    with pytest.raises(ValueError, match="0-4 characters"):
        SynthFrame(characters=CHARACTERS[:5], slots=(0, 1, 2, 3, 4), action="sitting", background="lake")


def test_four_character_variant():
    """Runs of a three-character set gain one fourth character each; every other frame is untouched."""
    base = sample_stories(range(300), "train", 6)
    assert sample_stories(range(300), "train", 6, four_character_rate=0.0) == base
    widened = sample_stories(range(300), "train", 6, four_character_rate=1.0)
    assert widened == [sample_story(i, "train", 6, four_character_rate=1.0) for i in range(300)]
    half = sample_stories(range(300), "train", 6, four_character_rate=0.5)
    for stories, rate in ((widened, 1.0), (half, 0.5)):
        kept = 0
        for story, original in zip(stories, base):
            assert (story.story_id, story.attempt) == (
                original.story_id,
                original.attempt,
            )  # split owned as before
            newcomer = None
            for t, (frame, before) in enumerate(zip(story.frames, original.frames)):
                assert (frame.action, frame.background, frame.names_background) == (
                    before.action,
                    before.background,
                    before.names_background,
                )
                if len(before.characters) != 3:
                    assert frame == before
                    continue
                run_start = t == 0 or set(before.characters) != set(original.frames[t - 1].characters)
                if len(frame.characters) == 3:
                    assert frame == before and rate < 1.0
                    kept += 1
                    newcomer = None
                    continue
                (added,) = set(frame.characters) - set(before.characters)
                assert run_start or added == newcomer  # one newcomer per run
                newcomer = added
                assert [c for c in frame.characters if c != added] == list(before.characters)  # order kept
                assert frame.slots == (0, 1, 2, 3)
                assert frame.boxes == [character_box(s, frame.action, four=True) for s in range(4)]
            for caption, referential, frame in zip(
                story.referential_captions, story.is_referential, story.frames
            ):
                parsed = parse_caption(caption)  # four names parse too
                subject = pronoun_subject(frame.characters) if referential else frame.characters
                background = frame.background if frame.names_background else None
                assert parsed is not None and caption == make_caption(subject, frame.action, background)
        assert (kept > 0) == (rate < 1.0)
    counts = Counter(len(f.characters) for s in half for f in s.frames)
    assert counts[4] > 50 and counts[3] > 50
    assert any(s.is_referential[t] and len(s.frames[t].characters) == 4 for s in widened for t in range(6))
    ds = load_synthsv("test", num_stories=20, four_character_rate=1.0)
    index = next(i for i, r in enumerate(ds) if any(len(c) == 4 for c in r["characters"]))
    story, row = sample_story(index, "test", four_character_rate=1.0), ds[index]
    t = next(i for i, c in enumerate(row["characters"]) if len(c) == 4)
    assert row["boxes"][t] == [[float(v) for v in box] for box in story.frames[t].boxes]
    assert row["referential_captions"] == list(story.referential_captions)
    assert set(np.unique(np.asarray(row["segmentation"][t]))) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="four_character_rate"):
        sample_story(0, four_character_rate=1.5)


def test_render_frame_accepts_mapping():
    frame = {"characters": ["Dax"], "slots": [2], "action": "waving", "background": "cave"}
    image, seg = render_frame(frame)
    assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert seg[44, 50] == 1


def test_invalid_frames_rejected():
    with pytest.raises(ValueError):
        SynthFrame(characters=("Ava", "Bo"), slots=(0, 0), action="standing", background="lake")
    with pytest.raises(ValueError):
        SynthFrame(characters=("Zed",), slots=(0,), action="standing", background="lake")
    with pytest.raises(ValueError):
        SynthFrame(characters=("Ava",), slots=(0,), action="running", background="lake")


@pytest.mark.parametrize("size", [64, 128])
def test_reference_images(size):
    refs = reference_images(size)
    assert list(refs) == list(CHARACTERS)
    for name, image in refs.items():
        array = np.asarray(image)
        assert image.mode == "RGB" and array.shape == (size, size, 3)
        assert tuple(array[0, 0]) == (128, 128, 128) and tuple(array[-1, -1]) == (128, 128, 128)
        colours = {tuple(c) for c in array.reshape(-1, 3)}
        assert colours == {(128, 128, 128), CHARACTER_COLORS[name]}
    ava = np.asarray(refs["Ava"])
    c = size // 2
    assert tuple(ava[c, c]) == CHARACTER_COLORS["Ava"]
    if size == 64:  # exact 16x16 sprite in box [24, 40)
        ys, xs = np.nonzero(np.any(np.asarray(refs["Bo"]) != 128, axis=-1))
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (24, 24, 39, 39)
        assert tuple(np.asarray(refs["Hana"])[32, 32]) == (128, 128, 128)  # ring hole


# ------------------------------------------------------------------------------------------ captions

_NAME = "(?:" + "|".join(CHARACTERS) + ")"
_CAPTION = re.compile(
    rf"^(?P<subject>{_NAME}|{_NAME} and {_NAME}|{_NAME}, {_NAME} and {_NAME}|He|She|They) "
    rf"(?P<verb>is|are) (?P<action>{'|'.join(ACTIONS)})(?: in the (?P<bg>{'|'.join(BACKGROUNDS)}))?\.$"
)


def test_make_caption():
    assert make_caption(["Ava"], "jumping", "forest") == "Ava is jumping in the forest."
    assert make_caption(["Ava", "Bo"], "sitting") == "Ava and Bo are sitting."
    assert make_caption(["Ava", "Bo", "Cleo"], "waving", "snow") == "Ava, Bo and Cleo are waving in the snow."
    assert make_caption("She", "jumping", "forest") == "She is jumping in the forest."
    assert make_caption("They", "jumping") == "They are jumping."


def test_caption_grammar_and_content():
    for story in sample_stories(range(200), frames_per_story=6):
        for t, frame in enumerate(story.frames):
            m = _CAPTION.match(story.captions[t])
            assert m, story.captions[t]
            assert m["subject"] == make_caption(frame.characters, "x").split(" is ")[0].split(" are ")[0]
            assert m["verb"] == ("are" if len(frame.characters) > 1 else "is")
            assert m["action"] == frame.action
            assert (m["bg"] is not None) == frame.names_background
            if m["bg"] is not None:
                assert m["bg"] == frame.background
            assert _CAPTION.match(story.referential_captions[t]), story.referential_captions[t]
        assert story.frames[0].names_background


def test_caption_order_is_slot_order():
    for story in sample_stories(range(100)):
        for frame in story.frames:
            assert list(frame.slots) == sorted(frame.slots)
            assert [b[0] for b in frame.boxes] == sorted(b[0] for b in frame.boxes)
            assert 1 <= len(frame.characters) <= 3


def test_referential_rules():
    seen = Counter()
    for story in sample_stories(range(300), frames_per_story=8):
        anchor = None
        for t, frame in enumerate(story.frames):
            current = frozenset(frame.characters)
            caption, ref = story.captions[t], story.referential_captions[t]
            if anchor is not None and current == anchor:
                assert story.is_referential[t]
                if len(current) == 1:
                    pronoun = PRONOUNS[frame.characters[0]].capitalize()
                    expected = caption.replace(frame.characters[0] + " is ", pronoun + " is ", 1)
                else:
                    pronoun = "They"
                    expected = "They are " + caption.split(" are ", 1)[1]
                assert ref == expected and ref.startswith(pronoun + " ")
                seen[pronoun] += 1
            else:
                anchor = current
                assert not story.is_referential[t]
                assert ref == caption
                seen["names"] += 1
        assert not story.is_referential[0]
    assert seen["He"] and seen["She"] and seen["They"] and seen["names"]


def test_referential_example():
    # a story where frame 2 keeps frame 1's single character uses "She"/"He"
    for story in sample_stories(range(200), frames_per_story=2):
        if story.is_referential[1] and len(story.frames[0].characters) == 1:
            name = story.frames[0].characters[0]
            assert story.referential_captions[1].split()[0] == PRONOUNS[name].capitalize()
            assert name not in story.referential_captions[1]
            return
    pytest.fail("no single-character referential frame in 200 stories")


# -------------------------------------------------------------------------------- sampling, splits


def test_determinism_per_seed_and_index():
    a = sample_story(17, "train", 5, seed=3)
    assert sample_story(17, "train", 5, seed=3) == a
    assert a.story_id == "synthsv-train-s3-000017"
    assert sample_story(17, "train", 5, seed=4).captions != a.captions
    many = sample_stories(range(30), "train", 5, seed=3)
    assert len({s.captions for s in many}) == 30
    assert many[17] == a  # bulk sampling gives the same stories
    expected = [sample_story(5, "test"), sample_story(2, "test"), sample_story(5, "test")]
    assert sample_stories([5, 2, 5], "test") == expected


def test_disjoint_splits():
    for length in (1, 4):
        captions = {
            split: {story.captions for story in sample_stories(range(n), split, length)}
            for split, n in (("train", 600), ("validation", 150), ("test", 150))
        }
        assert not captions["train"] & captions["validation"]
        assert not captions["train"] & captions["test"]
        assert not captions["validation"] & captions["test"]
        for split, caps in captions.items():
            assert all(split_of_captions(c) == split for c in caps)


@pytest.mark.parametrize("length", [1, 2, 500])
def test_story_lengths(length):
    story = sample_story(3, "test", length)
    assert len(story) == len(story.captions) == len(story.referential_captions) == length
    assert len(story.frame_ids) == length and len(set(story.frame_ids)) == length


def test_bad_arguments():
    for kwargs in ({"frames_per_story": 0}, {"frames_per_story": 501}, {"split": "eval"}):
        with pytest.raises(ValueError):
            sample_story(0, **kwargs)


def test_sampling_probabilities():
    n_stories = 2500
    sizes = Counter()
    keep = changes = named_stay = stay = 0
    ops = Counter()
    actions = Counter()
    transitions = 0
    for story in sample_stories(range(n_stories), "train", 4, seed=11):
        sizes[len(story.frames[0].characters)] += 1
        for prev, cur in zip(story.frames, story.frames[1:]):
            transitions += 1
            a, b = set(prev.characters), set(cur.characters)
            if a == b:
                keep += 1
            elif b > a and len(b) == len(a) + 1:
                ops["add"] += 1
            elif b < a and len(b) == len(a) - 1:
                ops["drop"] += 1
            else:
                ops["other"] += 1
            if cur.background != prev.background:
                changes += 1
                assert cur.names_background
            else:
                stay += 1
                named_stay += cur.names_background
        for frame in story.frames:
            actions[frame.action] += 1
    assert abs(sizes[1] / n_stories - 0.4) < 0.035
    assert abs(sizes[2] / n_stories - 0.4) < 0.035
    assert abs(sizes[3] / n_stories - 0.2) < 0.03
    assert abs(keep / transitions - 0.5) < 0.025
    assert abs(changes / transitions - 0.2) < 0.02
    assert abs(named_stay / stay - 0.3) < 0.025
    # add / drop / fresh are equally likely among the available operations; fresh sets can look
    # like an add or drop, so only check that every kind occurs with sensible frequency.
    assert min(ops.values()) > 0.1 * (transitions - keep)
    for action in ACTIONS:
        assert abs(actions[action] / (4 * n_stories) - 1 / 6) < 0.02


# --------------------------------------------------------------------------------------------- dataset


def _check_row(row, story):
    assert list(row) == SCHEMA
    n = len(story)
    assert row["story_id"] == story.story_id and row["frame_ids"] == story.frame_ids
    assert row["captions"] == list(story.captions)
    assert row["characters"] == [list(c) for c in story.characters]
    assert row["background"] == story.backgrounds
    for key in SCHEMA[1:]:
        assert len(row[key]) == n, key
    for t, frame in enumerate(story.frames):
        image, seg = render_frame(frame)
        assert isinstance(row["images"][t], PIL.Image.Image) and row["images"][t].mode == "RGB"
        assert row["images"][t].size == (64, 64)
        assert np.array_equal(np.asarray(row["images"][t]), np.asarray(image))
        assert row["segmentation"][t].mode == "L"
        assert np.array_equal(np.asarray(row["segmentation"][t]), seg)
        assert row["boxes"][t] == [[float(v) for v in box] for box in frame.boxes]
        assert row["character_labels"][t] == frame.character_labels.tolist()
        assert sum(row["character_labels"][t]) == len(frame.characters)
        assert row["background_labels"][t] == frame.background_labels.tolist()
        assert row["background_labels"][t][BACKGROUNDS.index(frame.background)] == 1


def test_load_synthsv_schema():
    import datasets

    ds = load_synthsv("validation", frames_per_story=3, num_stories=6, seed=2)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 6
    assert ds.column_names == SCHEMA
    assert ds.features == synthsv_features()
    assert ds.features["images"] == datasets.List(datasets.Image())
    for i in range(len(ds)):
        row = ds[i]
        story = sample_story(i, "validation", 3, seed=2)
        _check_row(row, story)
        assert row["referential_captions"] == list(story.referential_captions)
        assert row["is_referential"] == list(story.is_referential)
    batch = ds[1:3]
    assert isinstance(batch["images"][0][0], PIL.Image.Image)
    assert len(list(ds["images"])) == 6
    assert isinstance(next(iter(ds))["segmentation"][0], PIL.Image.Image)


def test_load_synthsv_not_referential():
    ds = load_synthsv("test", num_stories=20, referential=False)
    for row in ds:
        assert row["referential_captions"] == row["captions"]
        assert not any(row["is_referential"])


def test_streaming_matches_indexing():
    import datasets

    ds = load_synthsv("train", frames_per_story=2, num_stories=4, seed=1)
    stream = load_synthsv("train", frames_per_story=2, num_stories=4, seed=1, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    assert len(rows) == 4
    for i, row in enumerate(rows):
        ref = ds[i]
        assert list(row) == list(ref) == SCHEMA
        for key in SCHEMA:
            if key in ("images", "segmentation"):
                for a, b in zip(row[key], ref[key]):
                    assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
            else:
                assert row[key] == ref[key], key


def test_default_split_size_is_cheap():
    ds = load_synthsv("validation")
    assert len(ds) == SPLIT_SIZES["validation"]
    assert ds[499]["story_id"] == "synthsv-validation-s0-000499"
