"""Diffusers pipelines: Char-LDM (stage 1) and the StoryGPT-V story pipeline.

Importing this package also makes both classes attributes of the ``diffusers`` module, so that
``DiffusionPipeline.from_pretrained(folder_or_repo)`` (which looks the ``_class_name`` of ``model_index.json`` up
there) returns them.
"""

import diffusers as _diffusers

from .pipeline_char_ldm import CharLDMPipeline, CharLDMPipelineOutput
from .pipeline_storygptv import StoryGPTVPipeline, StoryGPTVPipelineOutput, encode_story_images

__all__ = [
    "CharLDMPipeline",
    "CharLDMPipelineOutput",
    "StoryGPTVPipeline",
    "StoryGPTVPipelineOutput",
    "encode_story_images",
]

for _pipeline in (CharLDMPipeline, StoryGPTVPipeline):
    setattr(_diffusers, _pipeline.__name__, _pipeline)
