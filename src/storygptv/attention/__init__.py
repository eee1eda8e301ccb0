"""Attention processors: cross-attention capture for the Char-LDM localisation loss, and DreamStory's masked
mutual self- / cross-attention (MMSA / MMCA) for consistent characters."""

from . import mutual, processors
from .mutual import *  # noqa: F403
from .processors import *  # noqa: F403

__all__ = list(processors.__all__) + list(mutual.__all__)
