"""Models: the character fuser (stage 1), the LDM mapper and the story language model (stage 2)."""

from .configuration_storygptv import LOSS_WEIGHT_PRESETS, StoryGPTVConfig
from .fuser import CharacterFuser, FusedPromptOutput, encode_fused_prompt
from .grounding_head import StoryGroundingHead
from .mapper import StoryLDMMapper
from .modeling_storygptv import (
    NextFrameOutput,
    StoryGPTVForConditionalGeneration,
    StoryGPTVOutput,
    StoryGPTVPreTrainedModel,
)
from .processing_storygptv import StoryGPTVProcessor
from .story_context import StoryContext, StoryFrame, reference_conditioning
from .story_inputs import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER_TOKEN,
    StoryTokens,
    add_story_special_tokens,
    build_story_sequence,
    build_story_sequence_from_text,
    encode_caption,
    history_segment,
    img_token_strings,
    target_segment,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER_TOKEN",
    "LOSS_WEIGHT_PRESETS",
    "CharacterFuser",
    "FusedPromptOutput",
    "NextFrameOutput",
    "StoryFrame",
    "StoryGPTVConfig",
    "StoryGPTVForConditionalGeneration",
    "StoryGPTVOutput",
    "StoryGPTVPreTrainedModel",
    "StoryGPTVProcessor",
    "StoryGroundingHead",
    "StoryLDMMapper",
    "StoryContext",
    "StoryTokens",
    "add_story_special_tokens",
    "build_story_sequence",
    "build_story_sequence_from_text",
    "encode_caption",
    "encode_fused_prompt",
    "history_segment",
    "img_token_strings",
    "reference_conditioning",
    "target_segment",
]
