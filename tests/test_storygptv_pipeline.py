import json
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch

from storygptv.models.story_context import reference_conditioning
from storygptv.pipelines.pipeline_char_ldm import CharLDMPipeline
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline, encode_story_images
from storygptv.storyboard import make_storyboard
from storygptv.testing.storygptv import tiny_storygptv_components

STORY = ["Fred and Barney are in the yard.", "They start to argue.", "Fred's dog runs to Barney."]
CAST = {"Fred": np.full((24, 24, 3), 220, np.uint8), "Barney": np.full((24, 24, 3), 30, np.uint8)}


@pytest.fixture(scope="module")
def components():
    return tiny_storygptv_components()


@pytest.fixture
def pipe(components):
    pipe = StoryGPTVPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, captions=STORY, seed=0, **kwargs):
    kwargs.setdefault("characters", CAST)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe(captions, **kwargs)


def test_one_image_per_caption_and_output_types(pipe):
    out = run(pipe, output_type="pil", return_conditioning=True)
    assert len(out.images) == 3 and all(isinstance(i, PIL.Image.Image) for i in out.images)
    assert out.conditionings.shape == (3, 77, 32)
    assert run(pipe).images.shape == (3, 32, 32, 3)
    assert run(pipe, output_type="pt").images.shape == (3, 3, 32, 32)
    assert run(pipe, output_type="latent").images.shape == (3, 4, 16, 16)
    images, conditionings = run(pipe, return_dict=False)
    assert images.shape == (3, 32, 32, 3) and conditionings is None


def test_deterministic_with_seed(pipe):
    assert np.array_equal(run(pipe).images, run(pipe).images)
    assert not np.array_equal(run(pipe).images, run(pipe, seed=1).images)


def test_first_frame_is_char_ldm(pipe, components):
    char_ldm = CharLDMPipeline(**{k: v for k, v in components.items() if not k.startswith("story_")})
    char_ldm.set_progress_bar_config(disable=True)
    story = run(pipe).images
    single = char_ldm(
        STORY[0],
        characters=CAST,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(story[0], single[0], atol=1e-6)


def context_embeds(pipe, images):
    pil = [PIL.Image.fromarray((np.asarray(i) * 255).round().astype(np.uint8)) for i in images]
    return encode_story_images(pil, pipe.image_encoder, pipe.feature_extractor)


def test_later_frames_use_llm_over_generated_frames(pipe):
    out = run(pipe, output_type="pt", return_conditioning=True)
    model, tok = pipe.story_model, pipe.story_tokenizer
    from storygptv.models.story_inputs import encode_caption

    ids = [encode_caption(tok, c) for c in STORY]
    frames = out.images.permute(0, 2, 3, 1).numpy()
    embeds = context_embeds(pipe, frames[:2])
    expected = reference_conditioning(model, ids[:2], embeds, ids[2])
    torch.testing.assert_close(out.conditionings[2], expected[0], atol=2e-4, rtol=1e-4)
    fused = pipe.encode_fused(STORY[0], CAST).prompt_embeds
    torch.testing.assert_close(out.conditionings[0], fused[0])


def test_context_window_keeps_last_frames(pipe):
    out = run(pipe, output_type="pt", return_conditioning=True, context_window=1)
    from storygptv.models.story_inputs import encode_caption

    ids = [encode_caption(pipe.story_tokenizer, c) for c in STORY]
    frames = out.images.permute(0, 2, 3, 1).numpy()
    expected = reference_conditioning(pipe.story_model, ids[1:2], context_embeds(pipe, frames[1:2]), ids[2])
    torch.testing.assert_close(out.conditionings[2], expected[0], atol=2e-4, rtol=1e-4)
    whole = run(pipe, output_type="pt", return_conditioning=True)
    assert not torch.allclose(whole.conditionings[2], out.conditionings[2])


def test_pronoun_frames_merge_from_step_zero(pipe):
    seen = {}

    def record(p, step, timestep, kwargs):
        seen.setdefault(p.current_frame, []).append(kwargs["prompt_embeds"].clone())
        return {}

    out = run(
        pipe,
        num_inference_steps=4,
        start_merge_step=2,
        return_conditioning=True,
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    plain = {i: pipe.encode_fused(c, None).text_embeds for i, c in enumerate(STORY)}
    # frame 1 names characters: plain caption first, then fused
    torch.testing.assert_close(seen[0][0], plain[0])
    torch.testing.assert_close(seen[0][2][0], out.conditionings[0])
    # frame 2 ("They start to argue.") names nobody: the LLM conditioning from step 0
    torch.testing.assert_close(seen[1][0][0], out.conditionings[1])
    # frame 3 names Fred and Barney: delayed again
    torch.testing.assert_close(seen[2][0], plain[2])
    torch.testing.assert_close(seen[2][3][0], out.conditionings[2])


def test_frame_callback_receives_every_frame(pipe):
    got = []
    out = run(
        pipe, output_type="np", callback_on_frame_end=lambda p, i, image: got.append((i, np.asarray(image)))
    )
    assert [i for i, _ in got] == [0, 1, 2]
    for i, image in got:
        assert np.abs(image.astype(float) / 255 - out.images[i]).max() <= 1 / 255 + 1e-6


def test_round_trip_whole_pipeline(tmp_path, pipe):
    expected = run(pipe, return_conditioning=True)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["story_model"] == [
        "storygptv.models.modeling_storygptv",
        "StoryGPTVForConditionalGeneration",
    ]
    assert index["_class_name"] == "StoryGPTVPipeline"
    assert (tmp_path / "story_model" / "model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin"))
    loaded = StoryGPTVPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    again = run(loaded, return_conditioning=True)
    assert np.array_equal(again.images, expected.images)
    assert torch.equal(again.conditionings, expected.conditionings)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, pipe):
    uploaded = {}

    def fake_upload_folder(*args, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        uploaded["repo_id"] = kwargs["repo_id"]
        return "https://example.invalid/commit"

    with (
        mock.patch("huggingface_hub.create_repo", return_value=mock.MagicMock(repo_id="me/tiny-story")),
        mock.patch("huggingface_hub.upload_folder", side_effect=fake_upload_folder),
    ):
        pipe.push_to_hub("me/tiny-story", token="dummy")
    assert uploaded["repo_id"] == "me/tiny-story"
    assert {
        "README.md",
        "model_index.json",
        "story_model/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    } <= set(uploaded["files"])


def test_long_story_completes(pipe):
    captions = ["Fred and Barney are in the yard."] + ["They talk."] * 99
    out = run(
        pipe, captions, num_inference_steps=1, guidance_scale=1.0, output_type="latent", characters=CAST
    )
    assert out.images.shape[0] == 100


def test_budget_overflow_warns_and_keeps_recent_frames(components):
    small = dict(components)
    small["story_model"] = type(components["story_model"]).from_config if False else components["story_model"]
    pipe = StoryGPTVPipeline(**small)
    pipe.set_progress_bar_config(disable=True)
    original = pipe.story_model.config.max_context_tokens
    pipe.story_model.config.max_context_tokens = 60
    try:
        with pytest.warns(UserWarning, match="budget"):
            out = run(pipe, ["Fred is here."] + ["He talks to Barney."] * 5, num_inference_steps=1)
    finally:
        pipe.story_model.config.max_context_tokens = original
    assert out.images.shape[0] == 6


@pytest.mark.parametrize(
    ("captions", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "`captions` is an empty list"),
        (["Fred is here.", 7], {}, TypeError, r"`captions\[1\]`"),
        ("Fred is here.", {}, TypeError, "list of captions"),
        (STORY, {"context_window": 0}, ValueError, "`context_window` must be None"),
        (STORY, {"characters": {"Fred": "/missing/fred.png"}}, ValueError, "could not be read"),
        (STORY, {"characters": [CAST]}, TypeError, "story's cast"),
        (STORY, {"context_window": True}, ValueError, "`context_window` must be None"),
        (STORY, {"guidance_scale": float("nan")}, ValueError, "finite"),
        (STORY, {"height": 0}, ValueError, "`height` must be a positive integer"),
        (STORY, {"generator": 42}, TypeError, "torch.Generator"),
        (STORY, {"generator": [torch.Generator()]}, ValueError, "one per frame"),
        (STORY, {"callback_on_step_end": lambda *a: 1}, TypeError, "must return a dict"),
    ],
)
def test_bad_input(pipe, captions, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipe, captions, **kwargs)


def test_story_warns_about_names_it_cannot_fuse(pipe):
    long_caption = "The yard is " + "very " * 80 + "quiet, and Fred is there."
    with pytest.warns(UserWarning, match="token limit"):
        run(pipe, [long_caption], num_inference_steps=1)  # frame 1 warns as Char-LDM does
    with pytest.warns(UserWarning, match="max_characters=1"):
        run(
            pipe,
            ["Fred and Barney are here.", "Fred and Barney jump."],
            max_characters=1,
            num_inference_steps=1,
        )
    with pytest.warns(UserWarning, match="never used"):
        run(pipe, STORY[:2], num_inference_steps=2, start_merge_step=2)


def test_unused_character_warns(pipe):
    with pytest.warns(UserWarning, match=r"\['Wilma'\] are not named in any caption"):
        run(pipe, STORY[:1], characters={**CAST, "Wilma": CAST["Fred"]}, num_inference_steps=1)


def test_make_storyboard():
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255)]
    board = make_storyboard(
        frames, ["Fred and Barney are in the yard.", "They argue.", "Fred runs."], columns=2
    )
    assert board.mode == "RGB"
    array = np.asarray(board)
    # the first frame is pasted at the top-left, upscaled to at least 128 px
    assert (array[8:136, 8:136] == 0).all()
    # caption text is drawn (dark pixels) below the first frame, on the white board
    below = array[140:170, 8:136]
    assert (below < 100).any() and (below == 255).any()
    with pytest.raises(ValueError, match="one per frame"):
        make_storyboard(frames, ["only one"])
    with pytest.raises(ValueError, match="empty"):
        make_storyboard([])
