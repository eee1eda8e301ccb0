"""The SynthSV caption grammar read back: every sampled caption parses, ungrammatical ones do not."""

from __future__ import annotations

import pytest

from storygptv.data.synthsv import (
    caption_prefix_validator,
    check_reference,
    make_caption,
    parse_caption,
    sample_stories,
)


@pytest.mark.parametrize("four_character_rate", [0.0, 1.0])
def test_every_sampled_caption_parses_and_refers_to_the_previous_frame(four_character_rate):
    for story in sample_stories(range(60), "test", 5, four_character_rate=four_character_rate):
        previous: tuple[str, ...] = ()
        for named, referential, frame in zip(story.captions, story.referential_captions, story.frames):
            for caption in (named, referential):
                parsed = parse_caption(caption)
                assert parsed is not None, caption
                assert parsed.action == frame.action
                assert check_reference(parsed, previous), (caption, previous)
            assert parse_caption(named).characters == frame.characters
            previous = frame.characters


@pytest.mark.parametrize(
    "caption",
    [
        "Ava, Bo are sitting.",  # a list of three needs "and"
        "Ava, Bo, Cleo are sitting.",  # so does a list of four
        "Ava, Bo, Cleo, Dax and Eli are sitting.",  # at most four
        "Ava and Ava are sitting.",  # names are distinct
        "They is jumping.",  # agreement
        "Ava are jumping.",
        "Ava is jumping in the park.",  # unknown background
        "ava is jumping.",  # case
        "Ava is jumping",  # full stop
        "Zed is jumping.",  # unknown name
        "Ava and Bo and Cleo are jumping.",
    ],
)
def test_ungrammatical_captions_do_not_parse(caption):
    assert parse_caption(caption) is None


def test_pronouns_must_match_the_previous_frame():
    she, they = parse_caption("She is waving."), parse_caption("They are waving.")
    assert check_reference(she, ("Cleo",)) and not check_reference(she, ("Bo",))
    assert not check_reference(she, ("Ava", "Bo")) and not check_reference(she, ())
    assert check_reference(they, ("Ava", "Bo")) and not check_reference(they, ("Ava",))
    assert check_reference(parse_caption(make_caption(["Gus"], "sitting", "cave")), ())
    assert not check_reference(parse_caption("Gus is sitting."), (), known=["Ava"])


def test_non_strings_are_a_clear_error():
    with pytest.raises(TypeError, match="`caption` must be a string"):
        parse_caption(None)


def test_caption_prefix_validator_accepts_the_grammar_and_its_prefixes_only():
    cast = ["Ava", "Bo", "Cleo"]
    valid = caption_prefix_validator(cast)
    for story in sample_stories(range(40), "test", 4):
        for caption in story.referential_captions:
            if all(name in cast for name in parse_caption(caption).characters):
                assert valid(caption) and all(valid(caption[:k]) for k in range(len(caption)))
    for caption in (
        "Ava and Bo is jumping.",  # agreement
        "Ava and Ava are jumping.",  # a name twice
        "Dax is jumping.",  # not in the cast
        "They are flying.",  # not an action
        "She is waving in the forest. She",  # past the end
        "Ava, Bo are sitting.",  # a list of three needs "and"
        "Ava, Bo, Cleo are sitting.",  # so does a list of four
        "Ava, Bo, Cleo, Dax and Eli are sitting.",  # at most four
    ):
        assert not valid(caption), caption
    for text in ("Ava, Bo and Cleo are sit", "  They are waving in the l", "He is"):
        assert valid(text), text


def test_caption_prefix_validator_takes_any_iterable_and_refuses_unknown_names():
    valid = caption_prefix_validator(name for name in ["Ava", "Bo", "Bo"])  # a generator, a repeat
    assert valid("Bo is jumping.") and valid("Ava and Bo are jumping.") and not valid("Bo and Bo are")
    with pytest.raises(ValueError, match=r"`names` \['Zed'\] are not SynthSV characters"):
        caption_prefix_validator(["Ava", "Zed"])
