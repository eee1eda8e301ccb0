"""Sequence layout of StoryGPT-V stage 2 (storygptv.models.story_inputs)."""

import pytest

from storygptv.models.story_inputs import (
    IGNORE_INDEX,
    StoryTokens,
    add_story_special_tokens,
    build_story_sequence,
    encode_caption,
    history_segment,
    target_segment,
)
from storygptv.testing.story_model import tiny_story_tokenizer
from storygptv.testing.tokenizers import build_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_story_tokenizer()


@pytest.fixture(scope="module")
def st(tok):
    return StoryTokens.from_tokenizer(tok)


def test_story_tokens_from_tokenizer(tok, st):
    assert st.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert list(st.img_token_ids) == tok.convert_tokens_to_ids([f"[IMG{i}]" for i in range(8)])
    assert st.bos_token_id == tok.bos_token_id
    assert st.num_visual_tokens == 4
    assert (
        tok.decode(list(st.caption_prefix_ids)).strip()
        == tok.decode(tok(" Caption:", add_special_tokens=False)["input_ids"]).strip()
    )


def test_missing_special_tokens_are_reported():
    plain = build_bpe_tokenizer(style="causal_lm")
    with pytest.raises(ValueError, match="add_story_special_tokens"):
        StoryTokens.from_tokenizer(plain)
    info = add_story_special_tokens(plain, 8)
    assert info["num_added"] == 9 and len(info["img_token_ids"]) == 8
    assert add_story_special_tokens(plain, 8)["num_added"] == 0  # idempotent
    StoryTokens.from_tokenizer(plain)


def test_segments(tok, st):
    cap = encode_caption(tok, "Fred is in the yard.")
    hist = history_segment(st, cap)
    assert (
        hist.input_ids
        == list(st.image_prefix_ids) + [st.image_token_id] * 4 + list(st.caption_prefix_ids) + cap
    )
    assert [i for i, m in zip(hist.input_ids, hist.caption_mask) if m] == cap
    tgt = target_segment(st, cap)
    assert tgt.input_ids == list(st.caption_prefix_ids) + cap + list(st.target_suffix_ids) + list(
        st.img_token_ids
    )
    short = target_segment(st, cap, max_caption_tokens=2)
    assert short.input_ids[-8:] == list(st.img_token_ids) and sum(short.caption_mask) == 2
    with pytest.raises(TypeError, match="encode_caption"):
        history_segment(st, "text")


def test_build_sequence_layout_and_labels(tok, st):
    caps = [encode_caption(tok, c) for c in ["Fred is in the yard.", "Wilma talks."]]
    target = encode_caption(tok, "He talks to Wilma.")
    seq = build_story_sequence(st, caps, target, max_length=None)
    expected = [st.bos_token_id]
    for c in caps:
        expected += history_segment(st, c).input_ids
    expected += target_segment(st, target).input_ids
    assert seq.input_ids == expected
    assert seq.context_frames == [0, 1] and seq.num_images == 2
    labelled = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE_INDEX]
    assert labelled == caps[0] + caps[1] + target + [st.img_token_ids[0]]
    assert all(lab in (t, IGNORE_INDEX) for t, lab in zip(seq.input_ids, seq.labels))
    # placeholders, [IMG1..7] and BOS are never labelled
    for t, lab in zip(seq.input_ids, seq.labels):
        if t == st.image_token_id or t in st.img_token_ids[1:] or t == st.bos_token_id:
            assert lab == IGNORE_INDEX

    only_target = build_story_sequence(st, caps, target, max_length=None, label_scope="target")
    labelled = [t for t, lab in zip(only_target.input_ids, only_target.labels) if lab != IGNORE_INDEX]
    assert labelled == target + [st.img_token_ids[0]]

    with_markers = build_story_sequence(st, caps, target, max_length=None, label_markers=True)
    n_markers = (
        2 * (len(st.image_prefix_ids) + len(st.caption_prefix_ids))
        + len(st.caption_prefix_ids)
        + len(st.target_suffix_ids)
    )
    assert (
        sum(lab != IGNORE_INDEX for lab in with_markers.labels)
        == sum(lab != IGNORE_INDEX for lab in seq.labels) + n_markers
    )


def test_left_truncation_drops_oldest_frames(tok, st):
    caps = [encode_caption(tok, f"Fred and Wilma are in the kitchen {i}.") for i in range(10)]
    target = encode_caption(tok, "They talk.")
    seq = build_story_sequence(st, caps, target, max_length=160)
    assert len(seq.input_ids) <= 160
    assert seq.context_frames == list(range(10 - seq.num_images, 10)) and 0 < seq.num_images < 10
    assert seq.input_ids[0] == st.bos_token_id
    assert seq.input_ids.count(st.image_token_id) == 4 * seq.num_images


def test_long_target_caption_truncated_before_img_tokens(tok, st):
    long_caption = encode_caption(tok, " ".join(["Fred and Barney are in the yard."] * 40))
    seq = build_story_sequence(st, [encode_caption(tok, "Fred.")], long_caption, max_length=60)
    assert len(seq.input_ids) == 60
    assert seq.input_ids[-8:] == list(st.img_token_ids)
    assert seq.num_images == 0
    assert seq.labels[-8] == st.img_token_ids[0]
    with pytest.raises(ValueError, match="too small"):
        build_story_sequence(st, [], long_caption, max_length=5)
