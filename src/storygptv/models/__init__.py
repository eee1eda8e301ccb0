"""Models: the character fuser (stage 1), the LDM mapper and the story language model (stage 2)."""

from .fuser import CharacterFuser, FusedPromptOutput, encode_fused_prompt

__all__ = ["CharacterFuser", "FusedPromptOutput", "encode_fused_prompt"]
