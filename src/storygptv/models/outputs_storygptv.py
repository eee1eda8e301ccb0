"""Outputs of the story model, and the key/value cache under the names of every supported transformers release."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

__all__ = ["NextFrameOutput", "StoryGPTVOutput", "cache_argument_name", "output_cache"]


def cache_argument_name(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its key/value cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes away in 5.40);
    earlier 5.x releases only know ``past_key_values``. Asking the signature supports both.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The key/value cache of a transformers model output, under its new (``cache``) or old name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@dataclass
class StoryGPTVOutput(ModelOutput):
    """Output of :meth:`StoryGPTVForConditionalGeneration.forward`.

    Attributes:
        loss: ``w_gen * gen_loss + w_align * align_loss + w_grounding * grounding_loss`` over the terms that could
            be computed (None if none).
        gen_loss: L_gen, shifted cross-entropy over the labelled tokens (captions and ``[IMG0]``).
        align_loss: L_align between ``conditioning`` and ``target_conditioning`` (``"mse"`` or ``"l2"``, weighted
            by ``target_token_roles`` when the config asks); reported even when its weight is 0.
        grounding_loss: BCE of the character logits + CE of the setting logits against the given labels.
        logits: (B, L, vocab) LM logits.
        conditioning: (B, ldm_seq_len, ldm_hidden_size) mapper output from the ``[IMG]`` tokens (None when the
            sequences hold no ``[IMG]`` tokens); a trainer can feed it to the frozen LDM for L_img.
        img_hidden_states: (B, R, embed_dim) last-layer hidden states at the ``[IMG]`` positions.
        img_input_embeds: (B, R, embed_dim) input embeddings at the ``[IMG]`` positions (the mapper reads the sum).
        character_logits: (B, len(grounding_characters)) from the grounding head, when the model has one.
        setting_logits: (B, len(grounding_settings)) from the grounding head, when it predicts settings.
        cache: the LLM key/value cache when ``use_cache`` (``past_key_values`` is a read-only alias).
        hidden_states / attentions: the LLM's, when requested.
    """

    loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None
    align_loss: torch.FloatTensor | None = None
    grounding_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    conditioning: torch.FloatTensor | None = None
    img_hidden_states: torch.FloatTensor | None = None
    img_input_embeds: torch.FloatTensor | None = None
    character_logits: torch.FloatTensor | None = None
    setting_logits: torch.FloatTensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    @property
    def past_key_values(self) -> Any:
        """The LLM cache under its pre-5.24 transformers name."""
        return self.cache


@dataclass
class NextFrameOutput(ModelOutput):
    """What the LLM reads for the next frame of a story (:meth:`~storygptv.models.story_context.StoryContext.read_next_frame`).

    Attributes:
        img_hidden_states: (B, R, embed_dim) last-layer hidden states at the ``[IMG]`` positions.
        img_input_embeds: (B, R, embed_dim) input embeddings of the ``[IMG]`` tokens (the mapper reads the sum).
        character_logits: (B, len(grounding_characters)) grounding logits, or None without a grounding head.
        setting_logits: (B, len(grounding_settings)) grounding logits, or None.
        restated_ids: for a restating model, the token ids of each story's restatement of the caption.
        restated_captions: their text (when the story context has a processor).
    """

    img_hidden_states: torch.FloatTensor | None = None
    img_input_embeds: torch.FloatTensor | None = None
    character_logits: torch.FloatTensor | None = None
    setting_logits: torch.FloatTensor | None = None
    restated_ids: list[list[int]] | None = None
    restated_captions: list[str] | None = None
