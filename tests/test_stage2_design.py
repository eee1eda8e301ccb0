"""Stage-2 design options: caption-anchored mapper, identity-weighted L_align, grounding head, grounding="fuse"."""

import json
from pathlib import Path

import pytest
import torch

from storygptv import StoryGPTVPipeline
from storygptv.data.collators_story import StoryGPTVCollator
from storygptv.data.synthsv import reference_images
from storygptv.grounding import ground_caption
from storygptv.models.configuration_storygptv import StoryGPTVConfig
from storygptv.models.mapper import StoryLDMMapper
from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration
from storygptv.models.processing_storygptv import StoryGPTVProcessor
from storygptv.models.story_context import StoryContext, reference_conditioning
from storygptv.models.story_inputs import encode_caption
from storygptv.testing import tiny_storygptv_components
from storygptv.testing.story_model import tiny_story_frames, tiny_story_model

CAST = ["Ava", "Bo", "Cleo"]
SETTINGS = ["forest", "lake"]
DESIGN = {
    "mapper_queries": "caption",
    "align_character_weight": 4.0,
    "align_setting_weight": 2.0,
    "grounding_characters": CAST,
    "grounding_settings": SETTINGS,
}


def story_rows(model, seed=0, anchored=True):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    rows = []
    for n in (4, 3):
        row = {
            "captions": ["Ava and Bo stand in the forest.", "Ava and Bo jump.", "Cleo waves.", "Cleo sits."][
                :n
            ],
            "referential_captions": [
                "Ava and Bo stand in the forest.",
                "They jump.",
                "Cleo waves.",
                "She sits.",
            ][:n],
            "characters": [["Ava", "Bo"], ["Ava", "Bo"], ["Cleo"], ["Cleo"]][:n],
            "background": ["forest", "forest", "lake", ""][:n],
            "image_embeds": torch.randn(n, cfg.vision_embed_dim, generator=g),
            "target_conditioning": torch.randn(n, cfg.ldm_seq_len, cfg.ldm_hidden_size, generator=g),
            "target_token_roles": torch.randint(0, 3, (n, cfg.ldm_seq_len), generator=g),
        }
        if anchored:
            row["caption_conditioning"] = torch.randn(n, cfg.ldm_seq_len, cfg.ldm_hidden_size, generator=g)
        rows.append(row)
    return rows


def batch_of(model, tok, **collator_kwargs):
    batch = StoryGPTVCollator(tok, model.config, target_frame=-1, **collator_kwargs)(story_rows(model))
    batch.pop("target_frame")
    return batch


# ------------------------------------------------------------------------------------------- config
def test_design_fields_round_trip_and_default_to_the_paper(tmp_path):
    paper = StoryGPTVConfig()
    assert paper.mapper_queries == "learned" and not paper.has_grounding_head
    assert (paper.align_character_weight, paper.align_setting_weight) == (1.0, 1.0)
    assert paper.loss_weights == {"gen": 1.0, "align": 1.0}  # no grounding term without a head

    model, tok = tiny_story_model(**DESIGN)
    assert model.config.loss_weights == {"gen": 1.0, "align": 1.0, "grounding": 1.0}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in DESIGN.items():
        assert saved[key] == value
    loaded = StoryGPTVForConditionalGeneration.from_pretrained(tmp_path)
    for key, value in DESIGN.items():
        assert getattr(loaded.config, key) == value
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert loaded.ldm_mapper.anchored and loaded.grounding_head is not None


def test_the_shipped_paper_config_still_loads():
    # The story model of the earlier default (learned queries, no head) as it was saved.
    saved = json.loads((Path(__file__).parent / "fixtures" / "paper_story_config.json").read_text())
    config = StoryGPTVConfig.from_dict(saved)
    assert config.mapper_queries == "learned" and not config.has_grounding_head
    assert config.loss_weights == {"gen": 0.5, "align": 1.0}
    model = StoryGPTVForConditionalGeneration(config)
    assert model.grounding_head is None and not model.ldm_mapper.anchored


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mapper_queries": "prompt"}, "mapper_queries"),
        ({"grounding_characters": []}, "empty list"),
        ({"grounding_characters": ["Ava", "ava"]}, "distinct"),
        ({"loss_weights": {"grounding": 1.0}}, "no grounding head"),
        ({"align_character_weight": -1.0}, "align_character_weight"),
        ({"loss_weights": {"align": -1.0}}, ">= 0"),
    ],
)
def test_incompatible_configs_are_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        StoryGPTVConfig(**overrides)


# ------------------------------------------------------------------------------------------- mapper
def test_caption_anchored_mapper_reproduces_its_anchor_with_a_zero_residual():
    model, tok = tiny_story_model(mapper_queries="caption")
    assert torch.count_nonzero(model.ldm_mapper.out_proj.weight) == 0  # post_init keeps the zero residual
    batch = batch_of(model, tok)
    with torch.no_grad():
        out = model(**batch)
    assert torch.equal(out.conditioning, batch["caption_conditioning"])
    # A trained residual moves it; the standalone module behaves the same way.
    mapper = StoryLDMMapper(in_dim=8, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                            ffn_dim=32, num_queries=5, out_dim=6, anchored=True)  # fmt: skip
    anchor = torch.randn(2, 5, 6)
    assert torch.equal(mapper(torch.randn(2, 3, 8), anchor), anchor)
    torch.nn.init.normal_(mapper.out_proj.weight)
    assert not torch.equal(mapper(torch.randn(2, 3, 8), anchor), anchor)
    with pytest.raises(ValueError, match="caption_conditioning"):
        mapper(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="takes no `anchor`"):
        StoryLDMMapper(in_dim=8, d_model=16, num_heads=2, num_queries=5, out_dim=6)(
            torch.randn(1, 3, 8), anchor
        )


def test_collator_can_anchor_on_the_target():
    model, tok = tiny_story_model(mapper_queries="caption")
    batch = batch_of(model, tok, restored_anchor_prob=1.0)
    assert torch.equal(batch["caption_conditioning"], batch["target_conditioning"])
    batch = batch_of(model, tok)
    assert not torch.equal(batch["caption_conditioning"], batch["target_conditioning"])
    rows = story_rows(model, anchored=False)
    with pytest.raises(KeyError, match="caption encoding"):
        StoryGPTVCollator(tok, model.config)(rows)


# ------------------------------------------------------------------------------------------- L_align
@pytest.mark.parametrize("align_loss", ["mse", "l2"])
def test_identity_weighted_alignment_equals_a_hand_computation(align_loss):
    model, _ = tiny_story_model(align_character_weight=4.0, align_setting_weight=2.0, align_loss=align_loss)
    g = torch.Generator().manual_seed(0)
    cond, target = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    roles = torch.zeros(2, 77, dtype=torch.long)
    roles[0, 3], roles[0, 7], roles[1, 5] = 1, 2, 1
    expected = 0.0
    for b in range(2):
        total = weight_sum = 0.0
        for i in range(77):
            d = cond[b, i] - target[b, i]
            error = float((d * d).mean()) if align_loss == "mse" else float(d.norm())
            w = {0: 1.0, 1: 4.0, 2: 2.0}[int(roles[b, i])]
            total, weight_sum = total + w * error, weight_sum + w
        expected += total / weight_sum / 2
    assert float(model.compute_align_loss(cond, target, roles)) == pytest.approx(expected, rel=1e-5)
    # Unit weights (the paper) give the plain loss, with or without roles.
    paper, _ = tiny_story_model(align_loss=align_loss)
    plain = (cond - target).pow(2).mean() if align_loss == "mse" else (cond - target).norm(dim=-1).mean()
    assert torch.equal(paper.compute_align_loss(cond, target, roles), plain)


# ------------------------------------------------------------------------------------------- grounding
def test_grounding_head_trains_from_the_labels():
    model, tok = tiny_story_model(grounding_characters=CAST, grounding_settings=SETTINGS)
    batch = batch_of(model, tok)
    # Target frames: "She sits." (Cleo, unknown setting) and "Cleo waves." (Cleo, lake).
    assert batch["character_labels"].tolist() == [[0, 0, 1], [0, 0, 1]]
    assert batch["setting_labels"].tolist() == [-100, 1]
    out = model(**batch)
    assert out.character_logits.shape == (2, 3) and out.setting_logits.shape == (2, 2)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        out.character_logits, batch["character_labels"]
    ) + torch.nn.functional.cross_entropy(out.setting_logits[1:], batch["setting_labels"][1:])
    torch.testing.assert_close(out.grounding_loss, expected)
    torch.testing.assert_close(out.loss, out.gen_loss + out.align_loss + out.grounding_loss)
    out.loss.backward()
    assert model.grounding_head.proj.weight.grad.abs().sum() > 0


def test_cached_story_api_equals_one_full_forward_with_anchor_and_head():
    model, tok = tiny_story_model(**DESIGN)
    with torch.no_grad():
        torch.nn.init.normal_(model.ldm_mapper.out_proj.weight, std=0.1)  # a non-trivial residual
    g = torch.Generator().manual_seed(1)
    captions = ["Ava and Bo stand.", "They jump.", "She waves."]
    embeds = torch.randn(3, 32, generator=g)
    anchor = torch.randn(1, 77, 32, generator=g)
    context = StoryContext(model, StoryGPTVProcessor(tok))
    for t, caption in enumerate(captions):
        reading = context.read_next_frame(caption)
        cached = model.map_img_tokens(reading.img_hidden_states, reading.img_input_embeds, anchor)
        full = reference_conditioning(
            model, [encode_caption(tok, c) for c in captions[:t]], embeds[:t] if t else None,
            encode_caption(tok, caption), caption_conditioning=anchor,
        )  # fmt: skip
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        again = context.next_frame_conditioning(caption, caption_conditioning=anchor)
        torch.testing.assert_close(again, full, atol=1e-5, rtol=1e-5)
        assert reading.character_logits.shape == (1, 3) and reading.setting_logits.shape == (1, 2)
        context.append_frame(embeds[t], caption)


# ------------------------------------------------------------------------------------------- pipeline
def forced_grounding(pipe, characters, setting):
    """Make the grounding head predict exactly ``characters`` and ``setting`` for every frame."""
    head = pipe.story_model.grounding_head
    with torch.no_grad():
        head.proj.weight.zero_()
        bias = torch.full((len(CAST) + len(SETTINGS),), -20.0)
        for name in characters:
            bias[CAST.index(name)] = 20.0
        bias[len(CAST) + SETTINGS.index(setting)] = 20.0
        head.proj.bias.copy_(bias)


@pytest.fixture(scope="module")
def cast():
    refs = reference_images(32)
    return {name: refs[name] for name in CAST}


@pytest.mark.parametrize("mapper_queries", ["learned", "caption"])
def test_fuse_grounds_exactly_the_predicted_characters(cast, mapper_queries):
    pipe = StoryGPTVPipeline(
        **tiny_storygptv_components(
            grounding_characters=CAST, grounding_settings=SETTINGS, mapper_queries=mapper_queries
        )
    )
    pipe.set_progress_bar_config(disable=True)
    forced_grounding(pipe, ["Cleo"], "lake")
    story = ["Ava and Bo stand in the forest.", "She waves.", "Bo jumps in the forest."]
    out = pipe(story, characters=cast, num_inference_steps=2, return_conditioning=True)
    assert out.captions == [story[0], "Cleo waves in the lake.", story[2]]  # named text is kept
    assert out.characters == [["Ava", "Bo"], ["Cleo"], ["Bo"]]
    assert out.settings == ["forest", "lake", "forest"]
    # Frame 2 is conditioned on the grounded caption with Cleo's reference fused at her name (the caption
    # anchor of a caption-anchored mapper with a zero residual is exactly that).
    encoded = pipe.encode_fused("Cleo waves in the lake.", cast, warn=False)
    assert encoded.character_names == [["Cleo"]]
    torch.testing.assert_close(out.conditionings[1], encoded.prompt_embeds[0])
    assert ground_caption("She waves.", ["Cleo"], "lake", SETTINGS) == out.captions[1]

    # grounding="none": the mapper alone; the prediction is still reported.
    plain = pipe(story, characters=cast, num_inference_steps=2, grounding="none", return_conditioning=True)
    assert plain.captions == story and plain.characters[1] == ["Cleo"] and plain.settings[1] == "lake"
    if mapper_queries == "learned":
        assert not torch.allclose(plain.conditionings[1], out.conditionings[1])

    # A pronoun resolves within the cast the call gives: Cleo without a reference image is not drawn in.
    forced_grounding(pipe, ["Cleo", "Bo"], "lake")
    duo = {name: cast[name] for name in ("Ava", "Bo")}
    out = pipe(story, characters=duo, num_inference_steps=1)
    assert out.captions[1] == "Bo waves in the lake." and out.characters[1] == ["Bo"]


def test_paper_model_defaults_to_no_grounding(cast):
    pipe = StoryGPTVPipeline(**tiny_storygptv_components())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["Ava and Bo stand.", "They jump."], characters=cast, num_inference_steps=1)
    assert out.captions == ["Ava and Bo stand.", "They jump."]
    assert out.characters == [["Ava", "Bo"], []] and out.settings == [None, None]


def test_bad_grounding_is_refused_before_denoising(cast):
    pipe = StoryGPTVPipeline(**tiny_storygptv_components())
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="grounds frames"):
        pipe(["Ava stands.", "She jumps."], characters=cast, grounding="fuse", num_inference_steps=1)
    with pytest.raises(ValueError, match="`grounding` must be one of"):
        pipe(["Ava stands.", "She jumps."], characters=cast, grounding="yes", num_inference_steps=1)
    assert not calls


# ------------------------------------------------------------------------------------------- restating
def test_restated_sequences_label_the_restatement_and_keep_a_restated_history():
    model, tok = tiny_story_model(grounding="restate", grounding_characters=CAST, grounding_settings=SETTINGS)
    processor = StoryGPTVProcessor(tok)
    rows = story_rows(model, anchored=False)
    batch = StoryGPTVCollator(tok, model.config, target_frame=1)(rows[:1])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    # History: frame 0 restated ("... in the forest." already named); target: "They jump." then its restatement.
    restated = processor.encode_caption("Ava and Bo jump in the forest.")
    expected = processor.build_sequence(
        ["Ava and Bo stand in the forest."], "They jump.", target_restated="Ava and Bo jump in the forest."
    )
    assert ids[: len(expected.input_ids)] == expected.input_ids
    marker = list(processor.tokens.restate_prefix_ids)
    start = max(i for i in range(len(ids)) if ids[i : i + len(marker)] == marker) + len(marker)
    assert (
        ids[start : start + len(restated)] == restated and labels[start : start + len(restated)] == restated
    )
    assert "character_labels" not in batch  # a restating model has no head to train


def test_restating_context_equals_the_full_forward_and_generation_stops():
    model, tok = tiny_story_model(grounding="restate", max_restate_tokens=5)
    processor = StoryGPTVProcessor(tok)
    caps, embeds = tiny_story_frames(tok, 3)
    context = StoryContext(model, processor)
    for t in range(2):
        context.append_frame(embeds[t], caps[t])
    restated = processor.encode_caption("Fred is in the yard.")
    reading = context.read_next_frame(caps[2], restated=restated)
    cached = model.map_img_tokens(reading.img_hidden_states, reading.img_input_embeds)
    full = reference_conditioning(model, caps[:2], embeds[:2], caps[2], target_restated_ids=restated)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    length = context.cache_length
    generated = context.read_next_frame(caps[2])  # a random tiny model: stops at max_restate_tokens
    assert 1 <= len(generated.restated_ids[0]) <= 5 and isinstance(generated.restated_captions[0], str)
    assert context.cache_length == length  # nothing of the reading stays in the context
    with pytest.raises(ValueError, match="processor"):
        StoryContext(model).read_next_frame(caps[2])


def test_restatement_never_writes_the_layout_tokens():
    # A model that prefers an [IMG] or image token (here: forced at every step) still restates in words; before,
    # the stray [IMG] token reached the next forward and broke the [IMG]-run check mid-story.
    model, tok = tiny_story_model(grounding="restate", max_restate_tokens=4)
    layout = [model.config.image_token_id, *model.config.img_token_ids]
    with torch.no_grad():  # the tied embedding rows of the layout tokens dominate every logit
        model.get_input_embeddings().weight[layout] *= 1e3
    context = StoryContext(model, StoryGPTVProcessor(tok))
    caps, embeds = tiny_story_frames(tok, 2)
    context.append_frame(embeds[0], caps[0])
    reading = context.read_next_frame(caps[1])
    assert reading.restated_ids[0] and not set(reading.restated_ids[0]) & set(layout)


def test_pipeline_grounds_with_the_restatement_and_keeps_it_in_the_context(cast, monkeypatch):
    pipe = StoryGPTVPipeline(
        **tiny_storygptv_components(
            grounding="restate", grounding_characters=CAST, grounding_settings=SETTINGS
        )
    )
    pipe.set_progress_bar_config(disable=True)
    processor = pipe.story_processor
    said = iter(["Ava and Bo stand in the forest.", "Cleo waves in the lake."])
    monkeypatch.setattr(StoryContext, "_restate", lambda self, logits: processor.encode_caption(next(said)))
    out = pipe(["Ava and Bo stand in the forest.", "She waves."], characters=cast, num_inference_steps=1)
    assert out.captions == ["Ava and Bo stand in the forest.", "Cleo waves in the lake."]
    assert out.characters == [["Ava", "Bo"], ["Cleo"]] and out.settings == ["forest", "lake"]
    committed = [frame.caption_ids[0] for frame in out.story_context.frames]
    assert committed == [processor.encode_caption(c) for c in out.captions]  # the restated history


def test_grounding_head_learns_a_new_cast_and_keeps_the_known_one(tmp_path):
    # Fine-tuning a grounding model on a story folder with new characters: the head gains their rows, the
    # known rows predict exactly as before, and the grown head round-trips.
    model, _ = tiny_story_model(grounding_characters=CAST, grounding_settings=SETTINGS)
    states = torch.randn(2, model.config.num_img_tokens, model.get_input_embeddings().weight.shape[1])
    chars, settings = model.ground(states)
    added = model.extend_grounding_labels(["bo", "Nia", "Rex"], ["lake", "snow"])
    assert added == (["Nia", "Rex"], ["snow"])
    assert model.config.grounding_characters == [*CAST, "Nia", "Rex"]
    assert model.config.grounding_settings == [*SETTINGS, "snow"]
    new_chars, new_settings = model.ground(states)
    torch.testing.assert_close(new_chars[:, :3], chars)
    torch.testing.assert_close(new_settings[:, :2], settings)
    assert model.extend_grounding_labels(["Nia"], ["snow"]) == ([], [])
    model.save_pretrained(tmp_path)
    loaded = StoryGPTVForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.eval().ground(states)[0], model.eval().ground(states)[0])
    no_head, _ = tiny_story_model()
    with pytest.raises(ValueError, match="no grounding head"):
        no_head.extend_grounding_labels(["Nia"], [])


def test_the_models_context_window_is_the_pipelines_default(cast):
    components = tiny_storygptv_components()
    components["story_model"].config.context_window = 1
    pipe = StoryGPTVPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    captions = ["Ava is in the forest.", "She jumps.", "She sits."]
    out = pipe(captions, characters=cast, num_inference_steps=1, output_type="np")
    assert len(out.story_context.frames) == 1  # the model's window: only the last frame stays in context
    whole = pipe(captions, characters=cast, num_inference_steps=1, output_type="np", context_window=10)
    assert len(whole.story_context.frames) == 3
    with pytest.raises(ValueError, match="context_window"):
        StoryGPTVConfig(context_window=0)
