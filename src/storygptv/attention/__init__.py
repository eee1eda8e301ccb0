"""Attention processors: cross-attention capture for the Char-LDM localisation loss."""

from .processors import (
    DEFAULT_CAPTURE_BLOCKS,
    CharacterAttentionProcessor,
    CharacterAttentionStore,
    character_attention_loss,
    install_character_attention_processors,
)

__all__ = [
    "DEFAULT_CAPTURE_BLOCKS",
    "CharacterAttentionProcessor",
    "CharacterAttentionStore",
    "character_attention_loss",
    "install_character_attention_processors",
]
