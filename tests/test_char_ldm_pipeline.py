import json

import numpy as np
import PIL.Image
import pytest
import torch

from storygptv import CharLDMPipeline, CharLDMPipelineOutput
from storygptv.testing import tiny_char_ldm_components

PROMPT = "Fred and Barney are in the yard."


def solid(value):
    return np.full((24, 24, 3), value, dtype=np.uint8)


CAST = {"Fred": solid(220), "Barney": solid(30)}


@pytest.fixture
def pipe():
    pipe = CharLDMPipeline(**tiny_char_ldm_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("characters", CAST)
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe(prompt, **kwargs)


def test_output_types_and_shapes(pipe):
    out = run(pipe, output_type="pil")
    assert isinstance(out, CharLDMPipelineOutput)
    assert (
        len(out.images) == 1 and isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (32, 32)
    )
    assert run(pipe).images.shape == (1, 32, 32, 3)
    pt = run(pipe, output_type="pt").images
    assert pt.shape == (1, 3, 32, 32) and pt.min() >= 0 and pt.max() <= 1
    assert run(pipe, output_type="latent").images.shape == (1, 4, 16, 16)
    (images,) = run(pipe, return_dict=False)
    assert images.shape == (1, 32, 32, 3)


def test_seeded_generator_is_deterministic(pipe):
    a, b, c = run(pipe).images, run(pipe).images, run(pipe, seed=1).images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batched_prompts_match_single_runs(pipe):
    prompts = [PROMPT, "Barney is alone."]
    batch = pipe(
        prompts,
        characters=CAST,
        num_inference_steps=3,
        output_type="np",
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
    ).images
    for index, prompt in enumerate(prompts):
        single = run(pipe, prompt, seed=index).images
        np.testing.assert_allclose(batch[index], single[0], atol=1e-4)


def test_num_images_per_prompt(pipe):
    out = run(pipe, prompt=[PROMPT, "Barney is alone."], num_images_per_prompt=2)
    assert out.images.shape == (4, 32, 32, 3)


def test_characters_change_the_image_and_start_merge_step_delays_them(pipe):
    plain = run(pipe, characters=None).images
    fused = run(pipe, start_merge_step=0).images
    other = run(pipe, start_merge_step=0, characters={"Fred": solid(0), "Barney": solid(255)}).images
    assert not np.allclose(plain, fused)
    assert not np.allclose(fused, other)
    # merging after the last step never uses the fused embedding: identical to the plain caption
    late = run(pipe, start_merge_step=10).images
    np.testing.assert_array_equal(late, plain)


def test_delayed_conditioning_switches_at_start_merge_step(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append(kwargs["prompt_embeds"].clone())
        return {}

    run(
        pipe,
        start_merge_step=2,
        num_inference_steps=4,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    encoded = pipe.encode_fused(PROMPT, CAST)
    assert len(seen) == pipe.num_timesteps
    for step, embeds in enumerate(seen):
        expected = encoded.text_embeds if step < 2 else encoded.prompt_embeds
        torch.testing.assert_close(embeds, expected)


def test_callback_can_change_latents(pipe):
    def zero(p, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    a = run(pipe, callback_on_step_end=zero, output_type="latent").images
    assert torch.count_nonzero(a) == 0


def test_prompt_embeds_path_equals_prompt_path(pipe):
    fused = pipe.encode_fused(PROMPT, CAST).prompt_embeds
    a = run(pipe, start_merge_step=0).images
    b = pipe(
        prompt_embeds=fused,
        num_inference_steps=3,
        output_type="np",
        start_merge_step=0,
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_save_load_round_trip_is_bit_identical(tmp_path, pipe):
    expected = run(pipe).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "CharLDMPipeline"
    assert index["fuser"] == ["storygptv.models.fuser", "CharacterFuser"]
    assert not list(tmp_path.rglob("*.bin"))
    assert (tmp_path / "fuser" / "diffusion_pytorch_model.safetensors").exists()
    loaded = CharLDMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(loaded).images, expected)


def test_dtype_argument(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    loaded = CharLDMPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.fuser.dtype == torch.bfloat16
    loaded.set_progress_bar_config(disable=True)
    assert run(loaded, output_type="latent").images.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt": []}, ValueError, "`prompt` is an empty list"),
        ({"prompt": [PROMPT, 3]}, TypeError, r"`prompt\[1\]`"),
        ({"characters": {"Fred": 42}}, TypeError, "reference image of 'Fred'"),
        ({"characters": {"Fred": "/no/such/file.png"}}, ValueError, "could not be read"),
        ({"height": 31}, ValueError, "divisible by the VAE scale factor 2"),
        ({"width": 33}, ValueError, "divisible by the VAE scale factor 2"),
        ({"guidance_scale": -1.0}, ValueError, "`guidance_scale` must be a finite number >= 0"),
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps` must be an integer >= 1"),
        ({"output_type": "jpg"}, ValueError, "`output_type`"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "callback_on_step_end_tensor_inputs"),
        ({"guidance_scale": float("nan")}, ValueError, "finite"),
        ({"guidance_scale": float("inf")}, ValueError, "finite"),
        ({"height": -32}, ValueError, "`height` must be a positive integer"),
        ({"width": 32.0}, ValueError, "`width` must be a positive integer"),
        ({"generator": 0}, TypeError, "`generator` must be a torch.Generator"),
        ({"callback_on_step_end": lambda *a: None}, TypeError, "must return a dict"),
    ],
)
def test_bad_input_errors(pipe, kwargs, error, match):
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(error, match=match):
        run(pipe, prompt=prompt, **kwargs)


def test_ignored_characters_warn(pipe):
    with pytest.warns(UserWarning, match=r"\['Wilma'\] are not named"):
        run(pipe, characters={**CAST, "Wilma": solid(9)})
    with pytest.warns(UserWarning, match=r"max_characters=1.*\['Barney'\]"):
        run(pipe, max_characters=1)


def test_model_cpu_offload_order_lists_components(pipe):
    names = pipe.model_cpu_offload_seq.split("->")
    assert names == ["text_encoder", "image_encoder", "fuser", "unet", "vae"]
    assert all(name in pipe.components for name in names)


def test_merge_step_past_the_last_step_warns(pipe):
    with pytest.warns(UserWarning, match="never used") as record:
        run(pipe, start_merge_step=3)  # run() uses 3 steps
    assert any(w.filename == __file__ for w in record)


def test_names_past_the_token_limit_or_max_characters_warn(pipe):
    refs = {"Fred": np.zeros((8, 8, 3), np.uint8), "Barney": np.zeros((8, 8, 3), np.uint8)}
    long_caption = "The yard is " + "very " * 80 + "quiet, and Fred is there."
    with pytest.warns(UserWarning, match="token limit"):
        pipe.encode_fused(long_caption, refs)
    with pytest.warns(UserWarning, match="max_characters=1"):
        pipe.encode_fused("Fred and Barney.", refs, max_characters=1)
