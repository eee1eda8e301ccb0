"""StoryContext: the KV-cached story of the stage-2 model equals one full forward; window, budget, batching."""

import warnings

import pytest
import torch

from storygptv.models.processing_storygptv import StoryGPTVProcessor
from storygptv.models.story_context import StoryContext, reference_conditioning
from storygptv.models.story_inputs import encode_caption
from storygptv.testing.story_model import tiny_story_frames, tiny_story_model


@pytest.mark.parametrize("text_model_type", ["opt", "llama", "gpt2"])
def test_cached_conditioning_equals_full_forward(text_model_type):
    model, tok = tiny_story_model(text_model_type=text_model_type)
    caps, embeds = tiny_story_frames(tok, 5)
    state = StoryContext(model)
    for t in range(5):
        cached = state.next_frame_conditioning(caps[t])
        full = reference_conditioning(model, caps[:t], embeds[:t], caps[t])
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        again = state.next_frame_conditioning(caps[t])  # not committed: same result
        torch.testing.assert_close(again, cached, atol=1e-6, rtol=1e-6)
        state.append_frame(embeds[t : t + 1], caps[t])
    assert len(state.frames) == 5 and state.cache_length == 1 + sum(
        state.tokens.history_length(len(c)) for c in caps
    )


def test_context_window_matches_full_forward_over_last_frames():
    model, tok = tiny_story_model()
    caps, embeds = tiny_story_frames(tok, 7)
    state = StoryContext(model, context_window=2)
    for t in range(7):
        cached = state.next_frame_conditioning(caps[t])
        lo = max(0, t - 2)
        full = reference_conditioning(model, caps[lo:t], embeds[lo:t], caps[t])
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        state.append_frame(embeds[t], caps[t])
    assert [f.index for f in state.frames] == [5, 6]
    assert state.num_frames_dropped == 5 and state.num_rebuilds == 5
    # per-frame LLM work is set by the window, not by the story length
    cap = caps[0]
    state = StoryContext(model, context_window=2)
    for _ in range(8):
        state.next_frame_conditioning(cap)
        state.append_frame(embeds[0], cap)
    seg, tgt = state.tokens.history_length(len(cap)), len(cap) + state.tokens.target_overhead()
    assert state.llm_tokens_per_frame[2:] == [tgt + 1 + 2 * seg] * 6  # target + rebuild of BOS + 2 frames
    assert state.cache_length == 1 + 2 * seg


def test_tokens_per_frame_constant_with_whole_story():
    model, tok = tiny_story_model()
    cap = encode_caption(tok, "Fred is in the yard.")
    state = StoryContext(model)
    x = torch.zeros(1, 32)
    for _ in range(30):
        state.next_frame_conditioning(cap)
        state.append_frame(x, cap)
    per_frame = state.llm_tokens_per_frame
    seg = state.tokens.history_length(len(cap))
    tgt = len(cap) + state.tokens.target_overhead()
    assert per_frame[0] == 1 + tgt + seg  # BOS once
    assert set(per_frame[1:]) == {tgt + seg}
    assert state.num_rebuilds == 0 and state.cache_length == 1 + 30 * seg


def test_budget_truncation_warns_and_drops_oldest():
    model, tok = tiny_story_model(max_context_tokens=150)
    caps, embeds = tiny_story_frames(tok, 8)
    state = StoryContext(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t in range(8):
            cond = state.next_frame_conditioning(caps[t])
            kept = [f.index for f in state.frames]
            full = reference_conditioning(model, [caps[i] for i in kept], embeds[kept], caps[t])
            torch.testing.assert_close(cond, full, atol=1e-5, rtol=1e-5)
            state.append_frame(embeds[t], caps[t])
            assert state.cache_length <= 150
    budget_warnings = [w for w in record if "budget" in str(w.message)]
    assert len(budget_warnings) == 1 and "dropping" in str(budget_warnings[0].message)  # once per story
    assert budget_warnings[0].filename == __file__  # points at the caller
    assert state.num_frames_dropped > 0 and state.frames[-1].index == 7
    with pytest.warns(UserWarning) as record:
        cond = state.next_frame_conditioning(encode_caption(tok, " ".join(["Fred is in the yard."] * 40)))
    assert any("truncated" in str(w.message) for w in record) and cond.shape == (1, 77, 32)


def test_budget_overflow_rebuilds_once_per_block_of_frames():
    model, tok = tiny_story_model(max_context_tokens=150)
    caps, embeds = tiny_story_frames(tok, 40)
    state = StoryContext(model)
    rebuilt = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t in range(40):
            before = state.num_rebuilds
            state.next_frame_conditioning(caps[t])
            state.append_frame(embeds[t], caps[t])
            rebuilt.append(state.num_rebuilds > before)
            assert state.cache_length <= 150
    assert sum("budget" in str(w.message) for w in record) == 1
    # A block of old frames leaves at once (down to half the budget), so the cache is never rebuilt on two
    # frames in a row; the old policy (drop just enough) rebuilt on every frame once the story was full.
    assert 3 <= sum(rebuilt) <= 40 // 3
    assert not any(a and b for a, b in zip(rebuilt, rebuilt[1:]))
    assert state.num_frames_dropped + len(state.frames) == 40


def test_batched_story_and_text_captions():
    model, tok = tiny_story_model()
    caps, embeds = tiny_story_frames(tok, 3)
    other = [list(reversed(c)) for c in caps]  # same lengths, other content
    state = StoryContext(model, batch_size=2)
    singles = [StoryContext(model), StoryContext(model)]
    for t in range(3):
        cond = state.next_frame_conditioning([caps[t], other[t]])
        for b, (s, c) in enumerate(zip(singles, (caps, other))):
            torch.testing.assert_close(cond[b : b + 1], s.next_frame_conditioning(c[t]), atol=1e-5, rtol=1e-5)
            s.append_frame(embeds[t] + b, c[t])
        state.append_frame(torch.stack([embeds[t], embeds[t] + 1]), torch.tensor([caps[t], other[t]]))
    with pytest.raises(ValueError, match="equal token lengths"):
        state.next_frame_conditioning([caps[0], caps[0][:-1]])

    with pytest.raises(ValueError, match="processor"):
        StoryContext(model).next_frame_conditioning("Fred is here.")
    text_state = StoryContext(model, StoryGPTVProcessor(tok))
    id_state = StoryContext(model)
    torch.testing.assert_close(
        text_state.next_frame_conditioning("Fred is in the yard."),
        id_state.next_frame_conditioning(encode_caption(tok, "Fred is in the yard.")),
    )
