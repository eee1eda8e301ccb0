"""Our own conformance tests: what diffusers' ``PipelineTesterMixin`` and transformers' ``ModelTesterMixin`` check,
written for our pipelines and the story model (the upstream harnesses are not importable from their wheels)."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from storygptv import (
    CharLDMPipeline,
    StoryGPTVPipeline,
    install_character_attention_processors,
    uninstall_character_attention_processors,
)
from storygptv.models.processing_storygptv import StoryGPTVProcessor
from storygptv.models.story_context import StoryContext
from storygptv.testing import tiny_char_ldm_components, tiny_storygptv_components
from storygptv.testing.story_model import tiny_story_frames, tiny_story_model

PROMPT = "Fred and Barney are in the yard."
STORY = ["Fred and Barney are in the yard.", "They start to argue.", "Fred's dog runs to Barney."]
CAST = {"Fred": np.full((24, 24, 3), 220, np.uint8), "Barney": np.full((24, 24, 3), 30, np.uint8)}


@pytest.fixture(scope="module")
def char_ldm():
    pipe = CharLDMPipeline(**tiny_char_ldm_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def story():
    pipe = StoryGPTVPipeline(**tiny_storygptv_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    if isinstance(pipe, StoryGPTVPipeline):
        return pipe(kwargs.pop("captions", STORY), characters=kwargs.pop("characters", CAST), **kwargs)
    return pipe(kwargs.pop("prompt", PROMPT), characters=kwargs.pop("characters", CAST), **kwargs)


# ----------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("kind", ["char_ldm", "story"])
def test_save_load_without_optional_components(tmp_path, request, kind):
    pipe = request.getfixturevalue(kind)
    components = {**pipe.components, "feature_extractor": None}
    bare = type(pipe)(**components)
    bare.set_progress_bar_config(disable=True)
    expected = draw(bare).images
    bare.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.feature_extractor is None
    assert np.array_equal(draw(loaded).images, expected)


@pytest.mark.parametrize("kind", ["char_ldm", "story"])
def test_dict_and_tuple_outputs_agree(request, kind):
    pipe = request.getfixturevalue(kind)
    assert np.array_equal(draw(pipe).images, draw(pipe, return_dict=False)[0])


@pytest.mark.parametrize("kind", ["char_ldm", "story"])
def test_half_precision_runs(kind):
    components = tiny_char_ldm_components() if kind == "char_ldm" else tiny_storygptv_components()
    pipe = (CharLDMPipeline if kind == "char_ldm" else StoryGPTVPipeline)(**components).to(
        dtype=torch.bfloat16
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.bfloat16
    latents = draw(pipe, output_type="latent").images
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents.float()).all()


@pytest.mark.parametrize("kind", ["char_ldm", "story"])
def test_callback_receives_the_requested_tensors_and_can_change_latents(request, kind):
    pipe = request.getfixturevalue(kind)
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append(sorted(kwargs))
        if step == p.num_timesteps - 1:  # the last step: zero the latents of every frame
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    inputs = ["latents", "prompt_embeds"]
    out = draw(
        pipe, output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs
    )
    assert seen and all(keys == sorted(inputs) for keys in seen)
    assert torch.count_nonzero(out.images) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        draw(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_encode_prompt_works_in_isolation(char_ldm):
    # As diffusers' test: only the text components, every other component None.
    text_only = {k: (v if "text" in k or "tokenizer" in k else None) for k, v in char_ldm.components.items()}
    isolated = CharLDMPipeline(**text_only)
    expected = char_ldm.encode_prompt(PROMPT, "cpu", 2, True, negative_prompt="noise")
    got = isolated.encode_prompt(PROMPT, "cpu", 2, True, negative_prompt="noise")
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert got[0].shape[0] == 2


def test_char_ldm_latents_and_character_embeds_are_precomputed_twins(char_ldm):
    shape = char_ldm.latent_shape(1, 32, 32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sampled = draw(char_ldm, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(draw(char_ldm, generator=None, latents=noise).images, sampled)
    embeds = char_ldm.encode_characters(CAST)
    assert np.array_equal(draw(char_ldm, characters=None, character_embeds=embeds).images, sampled)
    # prompt_embeds + text_embeds reproduce the delayed conditioning of the prompt.
    encoded = char_ldm.encode_fused(PROMPT, CAST)
    twin = draw(char_ldm, prompt=None, characters=None, prompt_embeds=encoded.prompt_embeds,
                text_embeds=encoded.text_embeds)  # fmt: skip
    assert np.array_equal(twin.images, sampled)
    with pytest.raises(ValueError, match="text_embeds"):
        draw(char_ldm, prompt=None, characters=None, prompt_embeds=encoded.prompt_embeds, start_merge_step=1)


def test_story_latents_and_character_embeds_are_precomputed_twins(story):
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    sampled = draw(story, generator=generators).images
    noise = [
        torch.randn(story.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(seed))[0]
        for seed in range(3)
    ]
    assert np.array_equal(draw(story, generator=None, latents=noise).images, sampled)
    assert np.array_equal(draw(story, generator=None, latents=torch.stack(noise)).images, sampled)
    embeds = story.encode_characters(CAST)
    twin = draw(
        story,
        characters=None,
        character_embeds=embeds,
        generator=[torch.Generator().manual_seed(s) for s in range(3)],
    )
    assert np.array_equal(twin.images, sampled)
    with pytest.raises(ValueError, match="one noise of shape"):
        draw(story, latents=noise[:2])


def test_step_callback_changes_last_one_frame(story):
    seen = {}

    def callback(p, step, timestep, kwargs):
        seen.setdefault(p.current_frame, p.guidance_scale)
        p._guidance_scale = 1.0  # e.g. a guidance cut-off callback
        return kwargs

    draw(story, guidance_scale=4.0, callback_on_step_end=callback)
    assert seen == {0: 4.0, 1: 4.0, 2: 4.0}
    assert story.guidance_scale == 4.0 and story.story_context is None  # nothing of the call is left behind


def test_a_story_continues_from_its_context(story):
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    whole = draw(story, generator=generators)
    first = draw(story, captions=STORY[:2], generator=[torch.Generator().manual_seed(s) for s in range(2)])
    rest = draw(
        story,
        captions=STORY[2:],
        generator=[torch.Generator().manual_seed(2)],
        story_context=first.story_context,
    )
    assert np.array_equal(np.concatenate([first.images, rest.images]), whole.images)
    assert rest.story_context is first.story_context and rest.story_context.num_frames_committed == 3
    with pytest.raises(TypeError, match="story_context"):
        draw(story, story_context="earlier story")


def test_attention_processors_set_and_unset(char_ldm):
    unet = char_ldm.unet
    before = dict(unet.attn_processors)
    expected = draw(char_ldm).images
    store = install_character_attention_processors(unet)
    assert store.enabled_layers and all(
        type(unet.attn_processors[f"{layer}.processor"]).__name__ == "CharacterAttentionProcessor"
        for layer in store.enabled_layers
    )
    assert np.array_equal(draw(char_ldm).images, expected)  # capture off: the fused SDPA path, bit-identical
    install_character_attention_processors(unet)  # twice: still restores the originals
    assert uninstall_character_attention_processors(unet) == len(store.enabled_layers)
    after = unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert uninstall_character_attention_processors(unet) == 0
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())  # the stock processors


def test_story_model_must_fit_the_char_ldm():
    components = tiny_storygptv_components()
    mismatched, _ = tiny_story_model(vision_embed_dim=32, ldm_hidden_size=16)
    with pytest.raises(ValueError, match="ldm_hidden_size"):
        StoryGPTVPipeline(**{**components, "story_model": mismatched})


# ----------------------------------------------------------------------------------------- the story model
def test_config_output_flags_are_honoured():
    model, tok = tiny_story_model(attn_implementation="eager")
    seq = StoryGPTVProcessor(tok).build_sequence(["Fred is here."], "He waves.")
    ids, embeds = torch.tensor([seq.input_ids]), torch.randn(1, 32)
    plain = model(input_ids=ids, image_embeds=embeds)
    assert plain.hidden_states is None and plain.attentions is None
    model.config.output_hidden_states = model.config.output_attentions = True
    flagged = model(input_ids=ids, image_embeds=embeds)
    assert len(flagged.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert len(flagged.attentions) == model.config.text_config.num_hidden_layers
    assert isinstance(model(input_ids=ids, image_embeds=embeds, return_dict=False), tuple)


def test_sdpa_and_eager_attention_agree():
    sdpa, tok = tiny_story_model(attn_implementation="sdpa")
    eager, _ = tiny_story_model(attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    caps, embeds = tiny_story_frames(tok, 3)
    outputs = []
    for model in (sdpa, eager):
        context = StoryContext(model)
        for t in range(2):
            context.append_frame(embeds[t], caps[t])
        outputs.append(context.next_frame_conditioning(caps[2]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_resize_keeps_the_story_tokens_and_their_row_mask():
    model, tok = tiny_story_model()
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 8)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == old + 8 == model.config.text_config.vocab_size and weight.requires_grad
    model.train()
    seq = StoryGPTVProcessor(tok).build_sequence([], "He waves.")
    model(input_ids=torch.tensor([seq.input_ids]), labels=torch.tensor([seq.labels])).loss.backward()
    rows = weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert rows and set(rows) <= set(model.config.img_token_ids)  # only the [IMG] rows train
    with pytest.raises(ValueError, match="story tokens"):
        model.resize_token_embeddings(max(model.config.img_token_ids))
    assert model.get_input_embeddings().weight.shape[0] == old + 8  # nothing changed half-way


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model, tok = tiny_story_model(lora_rank=2)
        if checkpointing:
            model.language_model.gradient_checkpointing_enable()
        model.train()
        seq = StoryGPTVProcessor(tok).build_sequence(["Fred is here."], "He waves.")
        out = model(
            input_ids=torch.tensor([seq.input_ids]),
            labels=torch.tensor([seq.labels]),
            image_embeds=torch.ones(1, 32),
            target_conditioning=torch.zeros(1, 77, 32),
        )
        out.loss.backward()
        lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
        results.append((out.loss.detach(), lora.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
