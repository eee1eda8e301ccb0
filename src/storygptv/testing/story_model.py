"""Tiny, random, offline StoryGPT-V stage-2 models for tests and examples.

Example:
    >>> from storygptv.testing.story_model import tiny_story_model
    >>> model, tokenizer = tiny_story_model(seed=0)
    >>> model.config.text_config.model_type, model.config.num_img_tokens
    ('opt', 8)
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.configuration_storygptv import StoryGPTVConfig
from ..models.modeling_storygptv import StoryGPTVForConditionalGeneration
from ..models.story_inputs import IMAGE_PLACEHOLDER_TOKEN, StoryTokens, encode_caption, img_token_strings
from .tokenizers import build_bpe_tokenizer

__all__ = [
    "tiny_story_frames",
    "tiny_story_model",
    "tiny_story_model_config",
    "tiny_story_tokenizer",
    "tiny_text_config",
]


def tiny_story_tokenizer(num_img_tokens: int = 8) -> Any:
    """The offline causal-LM BPE tokenizer with ``<|image|>`` and ``[IMG0]..[IMG{R-1}]`` added."""
    return build_bpe_tokenizer(
        style="causal_lm",
        model_max_length=4096,
        extra_special_tokens=[IMAGE_PLACEHOLDER_TOKEN, *img_token_strings(num_img_tokens)],
    )


def tiny_text_config(
    text_model_type: str = "opt", vocab_size: int = 176, special_ids: dict[str, int] | None = None
) -> dict[str, Any]:
    """A 2-layer, 32-wide causal-LM config dict (``"opt"``, ``"llama"`` (untied head) or ``"gpt2"``)."""
    ids = special_ids or {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    tables = {
        "opt": dict(hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=4096, dropout=0.0, attention_dropout=0.0),
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=4096, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0),
    }  # fmt: skip
    if text_model_type in tables:
        return {"model_type": text_model_type, "vocab_size": vocab_size, **tables[text_model_type], **ids}
    raise ValueError(f"`text_model_type` must be 'opt', 'llama' or 'gpt2', got {text_model_type!r}.")


#: The tiny mapper and sizes of :func:`tiny_story_model_config` (override any of them).
TINY_STORY_DEFAULTS: dict[str, Any] = {
    "vision_embed_dim": 32, "mapper_hidden_size": 32, "mapper_num_heads": 2, "mapper_num_encoder_layers": 1,
    "mapper_num_decoder_layers": 1, "mapper_ffn_dim": 64, "ldm_seq_len": 77, "ldm_hidden_size": 32,
    "lora_rank": 0, "lora_alpha": 8.0,
}  # fmt: skip


def tiny_story_model_config(
    tokenizer: Any = None,
    text_model_type: str = "opt",
    num_visual_tokens: int = 4,
    num_img_tokens: int = 8,
    **overrides: Any,
) -> StoryGPTVConfig:
    """A :class:`StoryGPTVConfig` with a tiny LLM and a tiny mapper (:data:`TINY_STORY_DEFAULTS`: d_model 32,
    2 heads, 1+1 layers, ff 64, 32-wide vision and conditioning).

    The layout ids are read from ``tokenizer`` (default: :func:`tiny_story_tokenizer`); ``overrides`` are
    ``StoryGPTVConfig`` fields.
    """
    tokenizer = tokenizer if tokenizer is not None else tiny_story_tokenizer(num_img_tokens)
    tokens = StoryTokens.from_tokenizer(
        tokenizer, num_visual_tokens=num_visual_tokens, num_img_tokens=num_img_tokens
    )
    # Room above the added tokens: transformers' resize tests clamp token ids to `vocab_size - 16`.
    vocab = ((len(tokenizer) + 16 + 7) // 8) * 8
    special = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    kwargs: dict[str, Any] = {
        "text_config": tiny_text_config(text_model_type, vocab, special),
        **TINY_STORY_DEFAULTS,
        **tokens.to_config_kwargs(),
        **overrides,
    }
    if kwargs["lora_rank"] and text_model_type == "gpt2":
        kwargs.setdefault("lora_target_modules", ["c_attn"])
    return StoryGPTVConfig(**kwargs)


def tiny_story_model(
    seed: int = 0,
    vision_embed_dim: int = 32,
    ldm_hidden_size: int = 32,
    text_model_type: str = "opt",
    lora_rank: int = 0,
    **config_overrides: Any,
) -> tuple[StoryGPTVForConditionalGeneration, Any]:
    """Build ``(model, tokenizer)``: a deterministic (for ``seed``) tiny StoryGPT-V model in eval mode.

    ``config_overrides`` go to :func:`tiny_story_model_config` (e.g. ``ldm_seq_len=16``,
    ``max_context_tokens=200``, ``align_loss="l2"``).
    """
    tokenizer = tiny_story_tokenizer(config_overrides.get("num_img_tokens", 8))
    config = tiny_story_model_config(
        tokenizer,
        text_model_type=text_model_type,
        vision_embed_dim=vision_embed_dim,
        ldm_hidden_size=ldm_hidden_size,
        lora_rank=lora_rank,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = StoryGPTVForConditionalGeneration(config)
    if lora_rank:
        # peft starts lora_B at zero (an identity adapter); give it values so tests see a real effect.
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval(), tokenizer


def tiny_story_frames(
    tokenizer: Any, num_frames: int, seed: int = 0, dim: int = 32
) -> tuple[list[list[int]], torch.Tensor]:
    """``(caption ids, (num_frames, dim) image embeddings)`` of a made-up story, for story-context tests."""
    g = torch.Generator().manual_seed(seed)
    words = ["Fred", "Wilma", "Barney", "Betty"]
    captions = [f"{words[i % 4]} is in the yard {i % 10}." for i in range(num_frames)]
    return [encode_caption(tokenizer, c) for c in captions], torch.randn(num_frames, dim, generator=g)
