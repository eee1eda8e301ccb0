"""Grounded captions (pronouns and settings filled back in) and the grounding metrics."""

import pytest

from storygptv.data.referential import flintstones_referential
from storygptv.data.synthsv import BACKGROUNDS, sample_story
from storygptv.evaluation.grounding import grounding_metrics, score_story_grounding
from storygptv.grounding import ground_caption, join_names, named_setting, restore_characters, with_setting


def test_pronouns_become_the_open_characters():
    assert restore_characters("They are jumping.", ["Ava", "Bo"]) == "Ava and Bo are jumping."
    assert restore_characters("They are jumping.", ["Ava", "Bo", "Cleo"]) == "Ava, Bo and Cleo are jumping."
    # A singular pronoun takes the most probable character; the verb after a plural one agrees.
    assert restore_characters("She is laughing.", ["Cleo", "Fay"]) == "Cleo is laughing."
    assert restore_characters("They are sitting.", ["Gus"]) == "Gus is sitting."
    assert restore_characters("They were here. They have fun.", ["Gus"]) == "Gus was here. Gus has fun."
    # Possessives, lower case, whole words only ("Thessaly", "hers" untouched).
    assert restore_characters("Fred waves at her dog in Thessaly.", ["Wilma"]) == (
        "Fred waves at Wilma's dog in Thessaly."
    )
    assert restore_characters("he sees hers.", ["Bo"]) == "Bo sees hers."


def test_named_characters_are_kept_and_never_added_twice():
    assert restore_characters("He waves at Bo.", ["Bo", "Dax"]) == "Dax waves at Bo."
    assert restore_characters("He waves at Bo.", ["Bo"]) == "He waves at Bo."  # no open character
    assert restore_characters("They talk to Bo.", ["Ava", "Bo", "Cleo"]) == "Ava and Cleo talk to Bo."
    assert restore_characters("Bo waves.", ["Bo"]) == "Bo waves."  # nothing open
    assert restore_characters("Bo waves.", ["Ava"]) == "Bo waves."  # no pronoun: names are not invented
    assert restore_characters("They jump.", []) == "They jump."


def test_setting_is_added_only_when_the_caption_names_none():
    assert with_setting("Bo is waving.", "lake") == "Bo is waving in the lake."
    assert with_setting("Bo is waving in the Lake.", "lake") == "Bo is waving in the Lake."
    assert with_setting("Bo sits", "cave") == "Bo sits in the cave."
    assert named_setting("Bo sits in the snow.", BACKGROUNDS) == "snow"
    # A caption naming another known setting keeps its own (explicit text wins).
    assert ground_caption("Bo sits in the snow.", [], "cave", BACKGROUNDS) == "Bo sits in the snow."
    assert ground_caption("They sit.", ["Ava", "Bo"], "cave", BACKGROUNDS) == "Ava and Bo sit in the cave."
    assert join_names(["A"]) == "A"
    with pytest.raises(ValueError, match="empty"):
        join_names([])


def test_grounding_inverts_synthsv_referential_captions():
    # With the labelled cast and setting, every referential caption grounds back to the original caption
    # with its setting stated: the stage-2 target caption.
    for index in range(200):
        story = sample_story(index, split="test", frames_per_story=6)
        for caption, referential, frame in zip(story.captions, story.referential_captions, story.frames):
            grounded = ground_caption(referential, frame.characters, frame.background, BACKGROUNDS)
            assert grounded == with_setting(caption, frame.background)


def test_grounding_inverts_flintstones_referential_captions():
    captions = [
        "Fred and Barney are in the yard.",
        "Fred and Barney argue about Fred's car.",
        "Wilma laughs.",
    ]
    sets = [["fred", "barney"], ["fred", "barney"], ["wilma"]]
    referential, _ = flintstones_referential(captions, sets)
    assert referential[1] == "They argue about Fred's car."
    assert ground_caption(referential[1], ["Fred", "Barney"]) == captions[1]
    assert ground_caption(referential[2], ["Wilma"]) == "Wilma laughs."
    referential, flags = flintstones_referential(["Wilma laughs.", "Wilma cooks."], [["wilma"], ["wilma"]])
    assert referential[1] == "She cooks." and flags == [False, True]
    assert ground_caption(referential[1], ["Wilma"]) == "Wilma cooks."


def test_grounding_metrics_by_hand():
    metrics = grounding_metrics([["Ava", "Bo"], ["Cleo"], []], [["bo", "AVA"], ["Cleo", "Fay"], []])
    # TP 3 (Ava, Bo, Cleo), FP 0, FN 1 (Fay); exact on frames 1 and 3.
    assert metrics["precision"] == 100.0
    assert metrics["recall"] == pytest.approx(75.0)
    assert metrics["f1"] == pytest.approx(100 * 6 / 7)
    assert metrics["exact"] == pytest.approx(200 / 3)
    assert grounding_metrics([[]], [[]])["f1"] == 100.0
    with pytest.raises(ValueError, match="2 labelled"):
        grounding_metrics([["A"]], [["A"], ["B"]])


def test_story_grounding_scores_the_loader_columns():
    rows = [
        {
            "characters": [["Fred", "Barney"], ["Fred", "Barney"], ["Wilma"]],
            "is_referential": [False, True, False],
        },
        {"characters": [["Dino"], ["Dino"]], "is_referential": [False, True]},
    ]
    predicted = [[["Fred", "Barney"], ["Fred"], ["Wilma"]], [["Dino"], ["Dino"]]]
    assert score_story_grounding(rows, predicted)["exact"] == pytest.approx(80.0)
    pronouns = score_story_grounding(rows, predicted, frames="referential")
    assert pronouns["num_frames"] == 2 and pronouns["recall"] == pytest.approx(200 / 3)
    assert score_story_grounding(rows, predicted, frames="named")["exact"] == 100.0
    with pytest.raises(ValueError, match="frames"):
        score_story_grounding(rows, predicted, frames="pronouns")
    with pytest.raises(ValueError, match="3 labelled frames but 2"):
        score_story_grounding(rows[:1], [[["Fred"], ["Fred"]]])
