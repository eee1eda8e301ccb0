"""storygptv: StoryGPT-V (arXiv 2312.02252) for Hugging Face diffusers and transformers."""

__version__ = "0.1.0.dev0"

from .attention import (
    CharacterAttentionProcessor,
    CharacterAttentionStore,
    character_attention_loss,
    install_character_attention_processors,
)
from .characters import CharacterMention, find_character_mentions, find_character_tokens
from .models import CharacterFuser, FusedPromptOutput, encode_fused_prompt
from .pipelines import CharLDMPipeline, CharLDMPipelineOutput

__all__ = [
    "CharLDMPipeline",
    "CharLDMPipelineOutput",
    "CharacterAttentionProcessor",
    "CharacterAttentionStore",
    "CharacterFuser",
    "CharacterMention",
    "FusedPromptOutput",
    "character_attention_loss",
    "encode_fused_prompt",
    "find_character_mentions",
    "find_character_tokens",
    "install_character_attention_processors",
]
