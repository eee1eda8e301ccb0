"""Story continuation: the story LLM writes the next captions (StoryContext.write_caption) and the pipeline
draws them (StoryGPTVPipeline.continue_story); tiny random components, seconds each."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from storygptv.models.processing_storygptv import StoryGPTVProcessor
from storygptv.models.story_context import StoryContext
from storygptv.models.story_inputs import history_segment
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline, StoryGPTVPipelineOutput
from storygptv.testing.story_model import tiny_story_model
from storygptv.testing.storygptv import tiny_storygptv_components

STORY = ["Fred and Barney are in the yard.", "They start to argue."]
CAST = {"Fred": np.full((24, 24, 3), 220, np.uint8), "Barney": np.full((24, 24, 3), 30, np.uint8)}


@pytest.fixture(scope="module")
def pipe():
    pipe = StoryGPTVPipeline(**tiny_storygptv_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, captions=STORY, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return pipe(captions, characters=CAST, generator=torch.Generator().manual_seed(0), **kwargs)


def story_context():
    model, tokenizer = tiny_story_model()
    context = StoryContext(model, StoryGPTVProcessor.from_story_model_config(tokenizer, model.config))
    g = torch.Generator().manual_seed(0)
    for caption in STORY:
        context.append_frame(torch.randn(1, 32, generator=g), caption)
    return context


# ---------------------------------------------------------------------------------- write_caption
def test_write_caption_is_the_greedy_decode_of_the_whole_story_and_leaves_the_context_unchanged():
    context = story_context()
    length, total_before = context.cache_length, context.num_frames_committed
    before = context.next_frame_conditioning("They talk.")
    ids = context.write_caption(max_new_tokens=6)
    assert (
        1 <= len(ids) <= 6 and context.cache_length == length and context.num_frames_committed == total_before
    )
    torch.testing.assert_close(context.next_frame_conditioning("They talk."), before)

    # Reference: no cache, the whole sequence every step, the same banned tokens.
    tokens, model = context.tokens, context.model
    sequence = list(tokens.bos_ids)
    for frame in context.frames:
        sequence += history_segment(tokens, frame.caption_ids[0]).input_ids
    sequence += list(tokens.caption_prefix_ids)
    embeds = torch.cat([f.image_embeds for f in context.frames])
    banned = [
        tokens.image_token_id,
        *tokens.img_token_ids,
        *tokens.bos_ids,
        context.processor.tokenizer.pad_token_id,
    ]
    expected: list[int] = []
    for _ in range(len(ids)):
        logits = model(
            input_ids=torch.tensor([sequence + expected]), image_embeds=embeds, use_cache=False
        ).logits
        scores = logits[0, -1].clone()
        scores[banned] = float("-inf")
        expected.append(int(scores.argmax()))
    assert ids == expected


def test_write_caption_samples_reproducibly_and_never_writes_layout_tokens():
    context = story_context()
    first = context.write_caption(12, temperature=1.5, generator=torch.Generator().manual_seed(3))
    again = context.write_caption(12, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert first == again
    layout = {context.tokens.image_token_id, *context.tokens.img_token_ids, *context.tokens.bos_ids}
    for seed in range(5):
        ids = context.write_caption(12, temperature=5.0, generator=torch.Generator().manual_seed(seed))
        assert not layout & set(ids)


def test_write_caption_names_a_cast_member_once_and_never_a_stranger():
    context = story_context()
    tokenizer = context.processor.tokenizer
    # "Fred" and "They" are single tokens of the tiny tokenizer: a model fond of them writes them whole
    fred, they = context._name_start_ids("Fred"), context._name_start_ids("They")
    run = context._run

    def fond_of_names(*args, **kwargs):
        out = run(*args, **kwargs)
        out.logits[..., fred] += 100.0
        out.logits[..., they] += 50.0
        return out

    context._run = fond_of_names
    free = context.write_caption(8)
    assert tokenizer.decode(free).count("Fred") >= 2  # unconstrained, the name repeats
    once = tokenizer.decode(context.write_caption(8, once=["Fred", "They"]))
    assert once.count("Fred") == 1 and once.count("They") == 1
    never = tokenizer.decode(context.write_caption(8, once=["They"], never=["Fred"]))
    assert "Fred" not in never and never.count("They") == 1


def test_write_caption_stays_inside_a_constraint():
    context = story_context()
    decode = context.processor.decode_caption
    target = "Fred is in the yard."

    def starts_target(text):
        return target.startswith(text)

    def check(ids):
        written = decode(ids).strip()
        assert written and target.startswith(written)  # never outside the constraint
        if written != target:  # it stopped early only where no token continues the target
            longer = [decode([*ids, t]).strip() for t in range(context.model.config.text_config.vocab_size)]
            assert not any(target.startswith(x) and len(x) > len(written) for x in longer)

    check(context.write_caption(20, constraint=starts_target))
    for seed in range(3):
        check(
            context.write_caption(
                20, temperature=2.0, generator=torch.Generator().manual_seed(seed), constraint=starts_target
            )
        )
    assert context.write_caption(20, constraint=lambda text: False) == []  # nothing fits: an empty caption


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be >= 1"),
        ({"temperature": -1.0}, "`temperature` must be >= 0"),
    ],
)
def test_write_caption_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        story_context().write_caption(**kwargs)


# ---------------------------------------------------------------------------------- continue_story
@pytest.mark.parametrize("num_frames", [1, 3])
def test_continuation_adds_the_requested_frames_and_captions(pipe, num_frames):
    story = draw(pipe)
    more = pipe.continue_story(
        story,
        num_frames=num_frames,
        characters=CAST,
        num_inference_steps=2,
        output_type="np",
        max_caption_tokens=8,
    )
    assert isinstance(more, StoryGPTVPipelineOutput)
    assert more.images.shape == (num_frames, 32, 32, 3)
    assert (
        len(more.written_captions)
        == len(more.captions)
        == len(more.characters)
        == len(more.settings)
        == num_frames
    )
    assert all(isinstance(c, str) for c in more.written_captions)
    assert more.story_context is story.story_context
    assert more.story_context.num_frames_committed == len(STORY) + num_frames


def test_continuation_from_captions_returns_the_new_frames_only(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(len(STORY) + 2)]
    more = pipe.continue_story(
        STORY, num_frames=2, characters=CAST, generator=generators, num_inference_steps=2, output_type="pil"
    )
    assert len(more.images) == 2 and all(isinstance(i, PIL.Image.Image) for i in more.images)
    assert more.story_context.num_frames_committed == len(STORY) + 2


def test_continuation_is_deterministic_and_equals_drawing_the_written_captions(pipe):
    def seeds(*values):
        return [torch.Generator().manual_seed(v) for v in values]

    def go():
        story = pipe(STORY, characters=CAST, generator=seeds(0, 1), num_inference_steps=2)
        return pipe.continue_story(
            story, 2, characters=CAST, generator=seeds(2, 3), num_inference_steps=2, output_type="pt",
            return_conditioning=True,
        )  # fmt: skip

    first, second = go(), go()
    assert first.written_captions == second.written_captions
    torch.testing.assert_close(first.images, second.images)
    assert first.conditionings.shape[0] == 2
    # Drawing the written captions after the same story gives the same frames.
    captions = STORY + first.written_captions
    again = pipe(
        captions, characters=CAST, generator=seeds(0, 1, 2, 3), num_inference_steps=2, output_type="pt"
    )
    torch.testing.assert_close(again.images[len(STORY) :], first.images, atol=1e-5, rtol=1e-4)


def test_frame_callback_counts_the_new_frames(pipe):
    seen = []
    pipe.continue_story(
        draw(pipe),
        2,
        characters=CAST,
        num_inference_steps=1,
        callback_on_frame_end=lambda p, i, img: seen.append(i),
    )
    assert seen == [0, 1]


@pytest.mark.parametrize(
    ("story", "kwargs", "error", "match"),
    [
        ("drawn", {"num_frames": 0}, ValueError, "`num_frames` must be an integer >= 1"),
        ("drawn", {"num_frames": -2}, ValueError, "`num_frames` must be an integer >= 1"),
        ("drawn", {"num_frames": True}, ValueError, "`num_frames` must be an integer >= 1"),
        ("drawn", {"captions": ["x"]}, TypeError, "does not take `captions`"),
        ("drawn", {"latents": torch.zeros(1)}, TypeError, "does not take `latents`"),
        ("drawn", {"generator": [torch.Generator()] * 3}, ValueError, "3 generators for 1 new frames"),
        ("empty", {}, ValueError, "`story` has no frame yet"),
        ("text", {}, TypeError, "`story` is a single string"),
        ("number", {}, TypeError, "`story` must be a StoryGPTVPipelineOutput"),
        (
            "list",
            {"generator": [torch.Generator()] * 2},
            ValueError,
            r"one per caption and one per new frame \(2 \+ 1\)",
        ),
        ("drawn", {"characters": CAST, "character_embeds": {}}, ValueError, "not both"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, story, kwargs, error, match):
    stories = {
        "drawn": lambda: draw(pipe, STORY[:1], num_inference_steps=1),
        "empty": lambda: StoryContext(pipe.story_model, pipe.story_processor),
        "text": lambda: "Fred is in the yard.",
        "number": lambda: 3,
        "list": lambda: list(STORY),
    }
    kwargs.setdefault("characters", CAST)
    with pytest.raises(error, match=match):
        pipe.continue_story(stories[story](), num_inference_steps=1, **kwargs)


def test_continue_story_reads_a_context_without_a_processor_with_the_pipelines(pipe):
    story = draw(pipe)
    context = story.story_context
    context.processor = None  # e.g. a StoryContext(model) built by hand
    more = pipe.continue_story(
        context, num_frames=1, characters=CAST, num_inference_steps=2, output_type="np"
    )
    assert len(more.images) == 1 and context.processor is not None
