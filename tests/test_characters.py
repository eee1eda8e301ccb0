import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from storygptv.characters import (
    find_character_mentions,
    find_character_tokens,
    load_character_image,
    normalize_characters,
)
from storygptv.testing import build_bpe_tokenizer


def tokens_of(tokenizer, caption, mention):
    ids = tokenizer(caption)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids)[mention.token_index]


@pytest.mark.parametrize(
    ("caption", "names", "expected"),
    [
        ("Fred and Barney are in the yard.", ["Barney", "Fred"], ["Fred", "Barney"]),
        ("fred, barney and WILMA talk.", ["Wilma", "Fred", "Barney"], ["Fred", "Barney", "Wilma"]),
        ("Fred's car is red.", ["Fred"], ["Fred"]),
        ("Freddy is not Fred.", ["Fred"], ["Fred"]),
        ("Mr  Slate shouts at Fred.", ["Mr Slate", "Fred"], ["Mr Slate", "Fred"]),
        ("Bamm Bamm and Bamm.", ["Bamm", "Bamm Bamm"], ["Bamm Bamm", "Bamm"]),
        ("Nobody is here.", ["Fred"], []),
    ],
)
def test_mentions_order_and_rules(caption, names, expected):
    assert [m.name for m in find_character_mentions(caption, names)] == expected


def test_whole_word_and_first_mention():
    caption = "Freddy sees Fred. Fred waves."
    (mention,) = find_character_mentions(caption, ["Fred"])
    assert caption[mention.start : mention.end] == "Fred"
    assert mention.start == caption.index(" Fred") + 1  # the first whole-word mention, not "Freddy"


def test_possessive_is_excluded_from_the_span():
    caption = "Barney’s hat and Fred's car."
    mentions = find_character_mentions(caption, ["Fred", "Barney"])
    assert [caption[m.start : m.end] for m in mentions] == ["Barney", "Fred"]


def test_token_index_is_last_subtoken_of_name(clip_tokenizer):
    caption = "Mr Slate and Tongtong, then Barney's dog."
    mentions = find_character_tokens(caption, ["Barney", "Tongtong", "Mr Slate"], clip_tokenizer)
    assert [m.name for m in mentions] == ["Mr Slate", "Tongtong", "Barney"]
    ids = clip_tokenizer(caption)["input_ids"]
    tokens = clip_tokenizer.convert_ids_to_tokens(ids)
    # "Tongtong" splits into several pieces with the tiny BPE; the fused token is the last one.
    offsets = clip_tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    tong = mentions[1]
    pieces = [i for i, (s, e) in enumerate(offsets) if e > s and s < tong.end and e > tong.start]
    assert len(pieces) > 1 and tong.token_index == pieces[-1]
    assert offsets[tong.token_index][1] == tong.end
    assert tokens[mentions[0].token_index] == "e</w>"  # "Slate" -> s la t e</w>: the last piece
    assert tokens[mentions[2].token_index] == "barney</w>"
    assert tokens[mentions[2].token_index + 1] == "'</w>"  # the possessive is not part of the name


def test_case_insensitive_positions_identical(clip_tokenizer):
    a = find_character_tokens("FRED is here.", ["fred"], clip_tokenizer)
    b = find_character_tokens("fred is here.", ["Fred"], clip_tokenizer)
    assert [m.token_index for m in a] == [m.token_index for m in b] == [1]


def test_repeated_name_fused_at_first_mention(clip_tokenizer):
    (mention,) = find_character_tokens("Fred sees Fred.", ["Fred"], clip_tokenizer)
    assert mention.token_index == 1


def test_byte_level_style_tokenizer_offsets():
    # A case-preserving tokenizer (causal-LM style) also works through offsets.
    tokenizer = build_bpe_tokenizer(style="causal_lm")
    caption = "Barney, Fred and Mr Slate."
    mentions = find_character_tokens(caption, ["Fred", "Barney", "Mr Slate"], tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])
    assert [m.name for m in mentions] == ["Barney", "Fred", "Mr Slate"]
    offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    for mention in mentions:
        start, end = offsets[mention.token_index]
        assert end == mention.end, (mention, tokens[mention.token_index])


def test_max_characters_and_warnings(clip_tokenizer):
    caption = "Fred, Barney, Wilma, Betty and Dino play."
    with pytest.warns(UserWarning, match=r"more than max_characters=2.*\['Wilma', 'Betty', 'Dino'\]"):
        kept = find_character_tokens(caption, ["Dino", "Betty", "Wilma", "Barney", "Fred"], clip_tokenizer, 2)
    assert [m.name for m in kept] == ["Fred", "Barney"]
    with pytest.warns(UserWarning, match=r"\['Pebbles'\] are not named"):
        find_character_tokens(caption, ["Fred", "Pebbles"], clip_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_character_tokens(caption, ["Fred", "Pebbles"], clip_tokenizer, warn=False)


def test_name_beyond_truncation_is_dropped(clip_tokenizer):
    caption = "a " * 100 + "Fred"
    with pytest.warns(UserWarning, match="not named"):
        assert find_character_tokens(caption, ["Fred"], clip_tokenizer) == []


def test_load_character_image_types(tmp_path):
    array = np.zeros((8, 6, 3), dtype=np.uint8)
    array[..., 0] = 255
    path = tmp_path / "fred.png"
    PIL.Image.fromarray(array).save(path)
    for image in (
        array,
        PIL.Image.fromarray(array),
        str(path),
        path,
        torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 6),
    ):
        loaded = load_character_image(image)
        assert loaded.mode == "RGB" and loaded.size == (6, 8)
        assert loaded.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(TypeError, match="'Fred'.*has type int"):
        load_character_image(3, name="Fred")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not be read"):
        load_character_image(tmp_path / "broken.png", name="Fred")
    with pytest.raises(ValueError, match="shape"):
        load_character_image(np.zeros((2, 2, 5), np.uint8))


def test_normalize_characters():
    image = np.zeros((4, 4, 3), np.uint8)
    shared = normalize_characters({"Fred": image}, 3)
    assert len(shared) == 3 and shared[0] is shared[2]
    assert normalize_characters(None, 2) == [{}, {}]
    with pytest.raises(ValueError, match="one dict per prompt"):
        normalize_characters([{"Fred": image}], 2)
    with pytest.raises(TypeError, match="`characters` has type str"):
        normalize_characters("Fred", 1)


def test_slow_tokenizer_is_a_clear_error():
    class SlowTokenizer:
        is_fast = False
        model_max_length = 77

    with pytest.raises(TypeError, match="needs a fast tokenizer"):
        find_character_tokens("Fred is here.", ["Fred"], SlowTokenizer())
