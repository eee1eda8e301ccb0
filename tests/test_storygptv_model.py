"""StoryGPT-V stage-2 model: config, forward losses, trainable rows, KV-cached story API, save/load, LoRA, Hub."""

import os
from unittest import mock

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from storygptv.data.collators_story import StoryGPTVCollator
from storygptv.models.configuration_storygptv import StoryGPTVConfig
from storygptv.models.mapper import StoryLDMMapper
from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration, StoryGPTVOutput
from storygptv.models.story_context import StoryContext
from storygptv.models.story_inputs import encode_caption
from storygptv.testing.story_model import tiny_story_frames, tiny_story_model, tiny_text_config
from storygptv.testing.tokenizers import build_bpe_tokenizer

CAPTIONS = [
    "Fred and Wilma are in the kitchen.",
    "He is in the yard.",
    "He talks to Barney.",
    "She is laughing.",
]


def story_batch(model, tok, n_rows=2, seed=0, target_frame=-1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    rows = []
    for r in range(n_rows):
        n = 4 - r
        rows.append(
            {
                "captions": CAPTIONS[:n],
                "image_embeds": torch.randn(n, cfg.vision_embed_dim, generator=g),
                "target_conditioning": torch.randn(n, cfg.ldm_seq_len, cfg.ldm_hidden_size, generator=g),
            }
        )
    return StoryGPTVCollator(tok, cfg, target_frame=target_frame)(rows)


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "target_frame"}


# ----------------------------------------------------------------------------- config


def test_config_defaults_presets_and_round_trip(tmp_path):
    cfg = StoryGPTVConfig()
    assert cfg.text_config.model_type == "opt"
    assert (cfg.vision_embed_dim, cfg.num_visual_tokens, cfg.num_img_tokens) == (1024, 4, 8)
    assert (cfg.mapper_hidden_size, cfg.mapper_num_heads, cfg.mapper_ffn_dim, cfg.ldm_seq_len) == (
        512,
        4,
        2048,
        77,
    )
    assert (cfg.mapper_num_encoder_layers, cfg.mapper_num_decoder_layers, cfg.ldm_hidden_size) == (4, 4, 768)
    assert cfg.mapper_norm_first and cfg.mapper_dropout == 0.0
    assert cfg.loss_weights == {"gen": 1.0, "align": 1.0} and cfg.align_loss == "mse"
    assert StoryGPTVConfig(loss_weights="reference_v1").loss_weights == {"gen": 0.5, "align": 1.0}
    assert StoryGPTVConfig(loss_weights="reference_v2").loss_weights == {"gen": 0.5, "align": 0.0}
    assert StoryGPTVConfig(loss_weights={"align": 0.25}).loss_weights == {"gen": 1.0, "align": 0.25}
    with pytest.raises(ValueError, match="preset"):
        StoryGPTVConfig(loss_weights="nope")
    with pytest.raises(ValueError, match="num_img_tokens"):
        StoryGPTVConfig(img_token_ids=[1, 2, 3])
    assert cfg.context_token_budget == cfg.text_config.max_position_embeddings
    assert StoryGPTVConfig(max_context_tokens=100).context_token_budget == 100

    llama = StoryGPTVConfig(text_config=tiny_text_config("llama"), align_loss="l2", lora_rank=4)
    llama.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, StoryGPTVConfig)
    assert loaded.text_config.model_type == "llama" and not loaded.tie_word_embeddings
    drop = ("_name_or_path",)
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in llama.to_dict().items() if k not in drop
    }


def test_auto_model_and_safetensors_round_trip(tmp_path):
    model, tok = tiny_story_model()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is StoryGPTVForConditionalGeneration and not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # tie kept, freezing and the [IMG] row mask re-applied
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert loaded.get_input_embeddings().weight.requires_grad
    assert not loaded.language_model.model.decoder.layers[0].fc1.weight.requires_grad

    # identical conditioning through the cached API
    caption = encode_caption(tok, "He is in the yard.")
    conds = []
    for m in (model, loaded):
        state = StoryContext(m)
        state.append_frame(torch.ones(1, 32), encode_caption(tok, CAPTIONS[0]))
        conds.append(state.next_frame_conditioning(caption))
    torch.testing.assert_close(conds[0], conds[1], atol=0, rtol=0)


def test_mapper_shapes():
    mapper = StoryLDMMapper(
        in_dim=48,
        d_model=32,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=64,
        num_queries=77,
        out_dim=24,
    )
    assert mapper(torch.randn(3, 8, 48)).shape == (3, 77, 24)
    assert mapper.transformer.encoder.layers[0].norm_first and mapper.transformer.batch_first
    with pytest.raises(ValueError, match="48"):
        mapper(torch.randn(3, 8, 47))


def test_tiny_model_is_deterministic():
    a, _ = tiny_story_model(seed=1)
    b, _ = tiny_story_model(seed=1)
    c, _ = tiny_story_model(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["ldm_mapper.queries"], sc["ldm_mapper.queries"])


# ----------------------------------------------------------------------------- forward


def test_forward_losses_and_outputs():
    model, tok = tiny_story_model()
    batch = story_batch(model, tok)
    out = model(**model_inputs(batch))
    assert isinstance(out, StoryGPTVOutput)
    B, L = batch["input_ids"].shape
    assert out.logits.shape == (B, L, model.config.text_config.vocab_size)
    assert out.conditioning.shape == (B, 77, 32)
    assert out.img_hidden_states.shape == (B, 8, 32)
    # gen loss = shifted CE on the labels
    ce = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )
    torch.testing.assert_close(out.gen_loss, ce)
    mse = ((out.conditioning - batch["target_conditioning"]) ** 2).mean()
    torch.testing.assert_close(out.align_loss, mse)
    torch.testing.assert_close(out.loss, out.gen_loss + out.align_loss)

    model.config.align_loss = "l2"
    out_l2 = model(**model_inputs(batch))
    l2 = (out_l2.conditioning - batch["target_conditioning"]).norm(dim=-1).mean()
    torch.testing.assert_close(out_l2.align_loss, l2)

    model.config.loss_weights = StoryGPTVConfig(loss_weights="reference_v2").loss_weights
    out_v2 = model(**model_inputs(batch))
    torch.testing.assert_close(out_v2.loss, 0.5 * out_v2.gen_loss)
    assert out_v2.align_loss is not None  # logged, not added

    # without labels / targets: no loss, conditioning only
    plain = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        image_embeds=batch["image_embeds"],
    )
    assert plain.loss is None and plain.gen_loss is None and plain.conditioning is not None
    tup = model(**model_inputs(batch), return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out_v2.loss)


def test_right_padding_does_not_change_conditioning():
    model, tok = tiny_story_model()
    batch = story_batch(model, tok)
    out = model(**model_inputs(batch))
    # row 1 alone (no padding) gives the same conditioning as inside the padded batch
    n = int(batch["attention_mask"][1].sum())
    n_img0 = int((batch["input_ids"][0] == model.config.image_token_id).sum()) // 4
    single = model(input_ids=batch["input_ids"][1:, :n], image_embeds=batch["image_embeds"][n_img0:])
    torch.testing.assert_close(single.conditioning[0], out.conditioning[1], atol=1e-5, rtol=1e-5)


def test_placeholder_scatter_and_errors():
    model, tok = tiny_story_model()
    batch = story_batch(model, tok)
    embeds = model.embed_inputs(batch["input_ids"], batch["image_embeds"])
    mask = batch["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(embeds[mask], model.project_images(batch["image_embeds"]))
    expected = model.visual_projection(batch["image_embeds"]).view(-1, 4, 32)
    torch.testing.assert_close(embeds[mask].view(-1, 4, 32), expected)
    plain = model.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(embeds[~mask], plain[~mask])

    n_img = batch["image_embeds"].shape[0]
    with pytest.raises(
        ValueError, match=rf"Got {n_img - 1} image embeddings .* contain {4 * n_img} image placeholder"
    ):
        model(input_ids=batch["input_ids"], image_embeds=batch["image_embeds"][:-1])
    with pytest.raises(ValueError, match="no `image_embeds`"):
        model(input_ids=batch["input_ids"])
    broken = batch["input_ids"].clone()
    broken[0, broken[0] == model.config.img_token_ids[3]] = 5
    with pytest.raises(ValueError, match="exactly one run"):
        model(input_ids=broken, image_embeds=batch["image_embeds"])


@pytest.mark.parametrize("text_model_type", ["opt", "llama"])
def test_gradients_reach_only_trainable_parts(text_model_type):
    model, tok = tiny_story_model(text_model_type=text_model_type)
    model.train()
    out = model(**model_inputs(story_batch(model, tok)))
    out.loss.backward()
    img_ids = model.config.img_token_ids
    emb = model.get_input_embeddings().weight
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[img_ids] = False
    assert emb.grad[img_ids].abs().sum() > 0
    assert emb.grad[others].abs().sum() == 0
    head = model.get_output_embeddings().weight
    if text_model_type == "llama":
        assert model.has_untied_output_head and head.requires_grad
        assert head.grad[img_ids].abs().sum() > 0 and head.grad[others].abs().sum() == 0
    else:
        assert head is emb
    assert model.visual_projection.weight.grad.abs().sum() > 0
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.ldm_mapper.named_parameters()
        if "bias" not in n
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm_trainable = {n for n in trainable if n.startswith("language_model.")}
    assert llm_trainable == {
        n for n, p in model.language_model.named_parameters(prefix="language_model") if p is emb or p is head
    }
    for n, p in model.language_model.named_parameters():
        if p is not emb and p is not head:
            assert p.grad is None, n


def test_optimizer_step_changes_only_img_rows():
    model, tok = tiny_story_model(text_model_type="llama")
    model.train()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    before_emb, before_head = emb.detach().clone(), head.detach().clone()
    opt = torch.optim.AdamW(model.trainable_parameter_groups(weight_decay=0.1), lr=1e-2)
    batch = story_batch(model, tok)
    for _ in range(2):
        opt.zero_grad()
        model(**model_inputs(batch)).loss.backward()
        opt.step()
        model.renormalize_img_embeddings()
    ids = model.config.img_token_ids
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(emb[others], before_emb[others]) and torch.equal(head[others], before_head[others])
    assert not torch.equal(emb[ids], before_emb[ids]) and not torch.equal(head[ids], before_head[ids])


def test_freeze_toggle_and_renormalize():
    model, _ = tiny_story_model()
    model.freeze_language_model(False)
    assert all(p.requires_grad for p in model.language_model.parameters())
    model.freeze_language_model(True)
    ids = model.config.img_token_ids
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids] *= torch.arange(1, 9, dtype=emb.dtype).unsqueeze(-1) * 10
    frozen_before = emb[[0, 5, 10]].clone()
    model.renormalize_img_embeddings()
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[ids] = False
    target = emb[others].norm(dim=-1).mean()
    torch.testing.assert_close(emb[ids].norm(dim=-1), target.expand(8))
    assert torch.equal(emb[[0, 5, 10]], frozen_before)

    llama, _ = tiny_story_model(text_model_type="llama")
    head = llama.get_output_embeddings().weight
    with torch.no_grad():
        head[ids] *= 50
    llama.renormalize_img_embeddings(include_output_head=True)
    keep = torch.ones(head.shape[0], dtype=torch.bool)
    keep[ids] = False
    torch.testing.assert_close(head[ids].norm(dim=-1), head[keep].norm(dim=-1).mean().expand(8))


def test_generate_with_images():
    model, tok = tiny_story_model()
    batch = story_batch(model, tok, n_rows=1)
    ids = batch["input_ids"][:, :-8]  # prompt up to " Image:"
    out = model.generate(input_ids=ids, image_embeds=batch["image_embeds"], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


# ----------------------------------------------------------------------------- LoRA, from_language_model, Hub


def test_lora_round_trip(tmp_path):
    model, tok = tiny_story_model(lora_rank=4)
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if n in lora)
    assert not model.language_model.model.decoder.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    loaded = StoryGPTVForConditionalGeneration.from_pretrained(tmp_path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert lora <= set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n in lora)
    caps, embeds = tiny_story_frames(tok, 2)
    conds = []
    for m in (model, loaded):
        s = StoryContext(m)
        s.append_frame(embeds[0], caps[0])
        conds.append(s.next_frame_conditioning(caps[1]))
    torch.testing.assert_close(conds[0], conds[1], atol=0, rtol=0)
    # the adapters matter
    plain = StoryGPTVForConditionalGeneration(StoryGPTVConfig(**{**model.config.to_dict(), "lora_rank": 0}))
    assert not any("lora_" in n for n, _ in plain.named_parameters())


def test_from_language_model(tmp_path):
    tok = build_bpe_tokenizer(style="causal_lm")
    n_before = len(tok)
    text_cfg = AutoConfig.for_model(**tiny_text_config("opt", vocab_size=n_before))
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(text_cfg).eval()
    llm.save_pretrained(tmp_path / "llm")
    reference = {k: v.clone() for k, v in llm.state_dict().items()}

    model, tok2 = StoryGPTVForConditionalGeneration.from_language_model(
        str(tmp_path / "llm"),
        tok,
        config_overrides={
            "vision_embed_dim": 16,
            "mapper_hidden_size": 32,
            "mapper_num_heads": 2,
            "mapper_ffn_dim": 64,
            "ldm_hidden_size": 24,
        },
    )
    assert tok2 is tok and len(tok) == n_before + 9
    cfg = model.config
    assert cfg.img_token_ids == tok.convert_tokens_to_ids([f"[IMG{i}]" for i in range(8)])
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == cfg.text_config.vocab_size
    # pretrained rows untouched
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:n_before], reference["model.decoder.embed_tokens.weight"])
    fc1 = model.language_model.model.decoder.layers[1].fc1.weight
    torch.testing.assert_close(fc1, reference["model.decoder.layers.1.fc1.weight"])
    state = StoryContext(model)
    assert state.next_frame_conditioning(encode_caption(tok, "Fred.")).shape == (1, 77, 24)

    # also from an instance (no reload), with LoRA
    model2, _ = StoryGPTVForConditionalGeneration.from_language_model(
        llm,
        build_bpe_tokenizer(style="causal_lm"),
        config_overrides={
            "vision_embed_dim": 16,
            "lora_rank": 2,
            "mapper_hidden_size": 32,
            "mapper_num_heads": 2,
        },
    )
    assert any("lora_B" in n for n, _ in model2.named_parameters())
    base = model2.language_model.model.decoder.layers[1].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(base, reference["model.decoder.layers.1.self_attn.q_proj.weight"])


def test_push_to_hub_is_mocked(tmp_path):
    from huggingface_hub import HfApi

    model, _ = tiny_story_model()
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            uploaded[op.path_in_repo] = op
        return mock.MagicMock(commit_url="https://hub.invalid/commit")

    with (
        mock.patch.object(
            HfApi, "create_repo", return_value=mock.MagicMock(repo_id="user/tiny-storygptv")
        ) as cr,
        mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=fake_create_commit),
        mock.patch("transformers.utils.hub.create_and_tag_model_card") as card,
    ):
        card.return_value = mock.MagicMock()
        model.push_to_hub("user/tiny-storygptv", tags=["storygptv"])
    assert cr.called
    assert {"config.json", "model.safetensors"} <= set(uploaded)
    assert card.call_args.args[1] == ["storygptv"]
