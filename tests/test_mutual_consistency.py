import numpy as np
import pytest
import torch

from storygptv.pipelines.mutual_consistency import check_character_masks
from storygptv.pipelines.pipeline_char_ldm import CharLDMPipeline
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline
from storygptv.testing.storygptv import tiny_storygptv_components

CAST = {"Fred": np.full((24, 24, 3), 220, np.uint8), "Barney": np.full((24, 24, 3), 30, np.uint8)}
LEFT, RIGHT = (0, 0, 16, 32), (16, 0, 32, 32)  # boxes (x0, y0, x1, y1) in pixels of the 32x32 image


@pytest.fixture(scope="module")
def components():
    return tiny_storygptv_components()


@pytest.fixture
def story(components):
    pipe = StoryGPTVPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def char_ldm(components):
    pipe = CharLDMPipeline(**{k: v for k, v in components.items() if not k.startswith("story_")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_masks(pipe):
    """The masks each call of ``pipe.attention_masks`` returns, in a list that fills as the pipeline runs."""
    seen, original = [], pipe.attention_masks

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    pipe.attention_masks = spy
    return seen


def draw(pipe, prompt, **kwargs):
    kwargs.setdefault("characters", CAST)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(prompt, **kwargs)


def test_char_ldm_mutual_without_names_or_with_empty_masks_is_stock(char_ldm):
    processors = char_ldm.unet.attn_processors
    with pytest.warns(UserWarning, match="not named"):
        unnamed = draw(char_ldm, "The yard is empty.").images
        assert np.array_equal(draw(char_ldm, "The yard is empty.", consistency="mutual").images, unnamed)
    stock = draw(char_ldm, "Fred and Barney are here.").images
    empty = {"Fred": np.zeros((32, 32))}  # a portrait is prepared and cached, but no pixel is Fred's
    out = draw(char_ldm, "Fred and Barney are here.", consistency="mutual", character_masks=[empty])
    assert np.array_equal(out.images, stock)
    after = char_ldm.unet.attn_processors
    assert all(after[name] is processor for name, processor in processors.items())  # uninstalled again


def test_char_ldm_mutual_cache_equals_recompute_and_changes_the_image(char_ldm):
    masks = [{"Fred": LEFT, "Barney": RIGHT}]
    stock = draw(char_ldm, "Fred and Barney are here.").images
    cached = draw(char_ldm, "Fred and Barney are here.", consistency="mutual", character_masks=masks).images
    recomputed = draw(
        char_ldm,
        "Fred and Barney are here.",
        consistency="mutual",
        character_masks=masks,
        mutual_attention="recompute",
    ).images
    assert not np.allclose(cached, stock, atol=1e-4)
    np.testing.assert_allclose(recomputed, cached, atol=1e-4)


def test_story_frames_without_characters_are_stock(story):
    captions = ["The yard is empty.", "Fred is in the yard."]
    fred = {"Fred": CAST["Fred"]}
    stock = draw(story, captions, characters=fred)
    out = draw(story, captions, characters=fred, consistency="mutual", character_masks=[None, {"Fred": LEFT}])
    assert out.characters == stock.characters == [[], ["Fred"]]
    assert np.array_equal(out.images[0], stock.images[0])  # bit-identical
    assert not np.allclose(out.images[1], stock.images[1], atol=1e-4)


def test_story_uses_only_the_masks_of_the_frames_characters(story):
    captions = ["The yard is empty.", "Fred is in the yard."]
    with pytest.warns(UserWarning, match="Barney"):
        stock = draw(story, captions, characters=CAST, grounding="none")
    # Barney is in neither frame: his masks are not used, so the story stays stock
    with pytest.warns(UserWarning, match="Barney"):
        out = draw(
            story,
            captions,
            grounding="none",
            consistency="mutual",
            character_masks=[{"Barney": LEFT}, {"Barney": RIGHT}],
        )
    assert np.array_equal(out.images, stock.images)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"consistency": "dreamstory"}, ValueError, "`consistency` must be one of"),
        (
            {"consistency": "mutual", "mutual_attention": "sometimes"},
            ValueError,
            "`mutual_attention` must be",
        ),
        (
            {"consistency": "mutual", "mutual_attention_weight": 0},
            ValueError,
            "`mutual_attention_weight` must be a finite number > 0",
        ),
        (
            {"consistency": "mutual", "mutual_attention_weight": float("inf")},
            ValueError,
            "`mutual_attention_weight` must be a finite number > 0",
        ),
        ({"mutual_attention_weight": 8.0}, ValueError, "used with `consistency='mutual'`"),
        ({"character_masks": [None, None]}, ValueError, "consistency='mutual'"),
        (
            {"consistency": "mutual", "character_masks": [None]},
            ValueError,
            "1 entries but there are 2 frames",
        ),
        (
            {"consistency": "mutual", "character_masks": [{"Fred": np.zeros((2, 32, 32))}, None]},
            ValueError,
            r"`character_masks\[0\]\['Fred'\]` must be a 2-D mask",
        ),
        (
            {"consistency": "mutual", "character_masks": [{"Fred": np.zeros((32, 16))}, None]},
            ValueError,
            "aspect ratio",
        ),
        (
            {"consistency": "mutual", "character_masks": [None, {"Fred": (0, 0, 40, 10)}]},
            ValueError,
            r"`character_masks\[1\]\['Fred'\]` = \(0, 0, 40, 10\) is not a box",
        ),
        (
            {"consistency": "mutual", "character_masks": [None, {"Wilma": LEFT}]},
            ValueError,
            r"`character_masks\[1\]\['Wilma'\]`: 'Wilma' has a mask but no portrait",
        ),
        (
            {
                "consistency": "mutual",
                "max_characters": 1,
                "character_masks": [None, {"Fred": LEFT, "Barney": RIGHT}],
            },
            ValueError,
            "at most 1 are allowed",
        ),
    ],
)
def test_bad_inputs_fail_before_denoising(story, kwargs, error, match):
    calls = []
    hook = story.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            draw(story, ["Fred is here.", "Barney is here."], **kwargs)
    finally:
        hook.remove()
    assert calls == []


def test_char_ldm_bad_masks_are_clear_errors(char_ldm):
    with pytest.raises(ValueError, match="`consistency` must be one of"):
        draw(char_ldm, "Fred is here.", consistency=True)
    with pytest.raises(ValueError, match="has a mask but no portrait"):
        draw(char_ldm, "Fred is here.", characters=None, consistency="mutual", character_masks={"Fred": LEFT})
    with pytest.raises(ValueError, match="2 entries but there are 1 frames"):
        draw(char_ldm, "Fred is here.", consistency="mutual", character_masks=[None, None])


def test_boxes_in_pixels_and_fractions():
    pixels, fractions = check_character_masks(
        [{"A": (8, 0, 24, 16)}, {"A": (0.25, 0.0, 0.75, 0.5)}], 2, 32, 32, ["A"], 4
    )
    assert torch.equal(pixels["A"], fractions["A"])
    assert pixels["A"].sum() == 16 * 16 and pixels["A"][:16, 8:24].all()


def test_story_masks_from_cross_attention_when_none_are_given(story):
    captions = ["The yard is empty.", "Fred and Barney are in the yard."]
    stock = draw(story, captions)
    seen = record_masks(story)
    processors = story.unet.attn_processors
    out = draw(story, captions, consistency="mutual")
    assert len(seen) == 1 and set(seen[0]) == {"Fred", "Barney"}  # only the frame with characters
    fred, barney = seen[0]["Fred"], seen[0]["Barney"]
    assert fred.shape == (32, 32) and fred.any() and barney.any()
    assert not (fred.bool() & barney.bool()).any()  # no pixel belongs to both
    assert np.array_equal(out.images[0], stock.images[0])
    assert not np.allclose(out.images[1], stock.images[1], atol=1e-4)
    assert all(story.unet.attn_processors[n] is p for n, p in processors.items())


def test_char_ldm_masks_from_cross_attention_per_caption(char_ldm):
    captions = ["The yard is empty.", "Fred and Barney are here."]
    stock = draw(char_ldm, captions).images
    seen = record_masks(char_ldm)
    out = draw(char_ldm, captions, consistency="mutual").images
    assert [set(masks) for masks in seen] == [set(), {"Fred", "Barney"}]  # one call per image
    assert not (seen[1]["Fred"].bool() & seen[1]["Barney"].bool()).any()
    assert np.array_equal(out[0], stock[0])  # the caption without names is untouched
    assert not np.allclose(out[1], stock[1], atol=1e-4)


def test_char_ldm_mutual_with_prompt_embeds_needs_masks(char_ldm):
    fred = {"Fred": CAST["Fred"]}
    encoded = char_ldm.encode_fused(["Fred is here."], fred)
    with pytest.raises(ValueError, match="needs `character_masks`"):
        draw(char_ldm, None, characters=fred, prompt_embeds=encoded.prompt_embeds, consistency="mutual")
