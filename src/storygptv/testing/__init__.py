"""Tiny, random, fully offline components for every pipeline of the package.

The tests, the examples and users' own tests share these builders: they need no download and run in
well under a second on a CPU. Weights are random, so images are noise; shapes, dtypes, the data flow
and the save/load formats are those of the real models.
"""

from .char_ldm import tiny_char_ldm_components, tiny_unet, tiny_vae
from .story_model import tiny_story_model, tiny_story_model_config, tiny_story_tokenizer, tiny_text_config
from .storygptv import tiny_storygptv_components
from .tokenizers import DEFAULT_CORPUS, build_bpe_tokenizer

__all__ = [
    "DEFAULT_CORPUS",
    "build_bpe_tokenizer",
    "tiny_char_ldm_components",
    "tiny_story_model",
    "tiny_story_model_config",
    "tiny_story_tokenizer",
    "tiny_storygptv_components",
    "tiny_text_config",
    "tiny_unet",
    "tiny_vae",
]
