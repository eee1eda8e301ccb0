"""Tiny random components for the whole StoryGPT-V pipeline."""

from __future__ import annotations

from typing import Any

from .char_ldm import TEXT_DIM, tiny_char_ldm_components
from .story_model import tiny_story_model

__all__ = ["tiny_storygptv_components"]


def tiny_storygptv_components(seed: int = 0, **story_model_kwargs: Any) -> dict[str, Any]:
    """Random components for ``StoryGPTVPipeline(**components)``: 32x32 images, fully offline.

    The Char-LDM part is :func:`~storygptv.testing.tiny_char_ldm_components`; the story model is a tiny
    OPT (2 layers, width 32, 4096 positions) whose mapper outputs the UNet's 32-wide conditioning and
    whose visual input is the tiny CLIP vision tower's 32-wide pooled output. ``story_model_kwargs``
    go to :func:`~storygptv.testing.story_model.tiny_story_model` (e.g. ``text_model_type="llama"``,
    ``max_context_tokens=200``).

    Example:
        >>> from storygptv import StoryGPTVPipeline
        >>> from storygptv.testing import tiny_storygptv_components
        >>> pipe = StoryGPTVPipeline(**tiny_storygptv_components())
        >>> pipe.set_progress_bar_config(disable=True)
        >>> len(pipe(["Ava is here.", "She waves."], num_inference_steps=1).images)
        2
    """
    components = tiny_char_ldm_components(seed)
    vision_width = components["image_encoder"].config.hidden_size
    story_model, story_tokenizer = tiny_story_model(
        seed=seed, vision_embed_dim=vision_width, ldm_hidden_size=TEXT_DIM, **story_model_kwargs
    )
    components["story_model"] = story_model.eval()
    components["story_tokenizer"] = story_tokenizer
    return components
