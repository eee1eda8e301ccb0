"""Diffusers pipelines: Char-LDM (stage 1) and the StoryGPT-V story pipeline."""

from .pipeline_char_ldm import CharLDMPipeline, CharLDMPipelineOutput

__all__ = ["CharLDMPipeline", "CharLDMPipelineOutput"]
