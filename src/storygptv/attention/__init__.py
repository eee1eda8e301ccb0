"""Attention processors: cross-attention capture for the Char-LDM localisation loss."""

from . import processors
from .processors import *  # noqa: F403

__all__ = list(processors.__all__)
