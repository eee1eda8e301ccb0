"""Diffusers pipelines: Char-LDM (stage 1) and the StoryGPT-V story pipeline."""

from .pipeline_char_ldm import CharLDMPipeline, CharLDMPipelineOutput
from .pipeline_storygptv import StoryGPTVPipeline, StoryGPTVPipelineOutput, encode_story_images

__all__ = [
    "CharLDMPipeline",
    "CharLDMPipelineOutput",
    "StoryGPTVPipeline",
    "StoryGPTVPipelineOutput",
    "encode_story_images",
]
