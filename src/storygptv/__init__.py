"""storygptv: StoryGPT-V (arXiv 2312.02252) for Hugging Face diffusers and transformers.

Importing the package registers ``StoryGPTVConfig`` / ``StoryGPTVForConditionalGeneration`` with the
transformers ``AutoConfig`` / ``AutoModel`` classes.
"""

from pathlib import Path

__version__ = "0.1.0.dev0"

#: The small StoryGPT-V trained on SynthSV that ships inside the package (a pipeline folder).
DEFAULT_MODEL = str(Path(__file__).with_name("default_model"))

from .attention import (  # noqa: E402
    CharacterAttentionProcessor,
    CharacterAttentionStore,
    character_attention_loss,
    install_character_attention_processors,
    uninstall_character_attention_processors,
)
from .characters import CharacterMention, find_character_mentions, find_character_tokens  # noqa: E402
from .data import load_story_dataset  # noqa: E402
from .grounding import ground_caption  # noqa: E402
from .loading import ModelLoadingError  # noqa: E402
from .models import (  # noqa: E402
    CharacterFuser,
    FusedPromptOutput,
    StoryGPTVConfig,
    StoryGPTVForConditionalGeneration,
    StoryGPTVOutput,
    StoryLDMMapper,
    encode_fused_prompt,
)
from .pipelines import (  # noqa: E402
    CharLDMPipeline,
    CharLDMPipelineOutput,
    StoryGPTVPipeline,
    StoryGPTVPipelineOutput,
    encode_story_images,
)
from .storyboard import make_storyboard  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "CharLDMPipeline",
    "CharLDMPipelineOutput",
    "CharacterAttentionProcessor",
    "CharacterAttentionStore",
    "CharacterFuser",
    "CharacterMention",
    "FusedPromptOutput",
    "ModelLoadingError",
    "StoryGPTVConfig",
    "StoryGPTVForConditionalGeneration",
    "StoryGPTVOutput",
    "StoryGPTVPipeline",
    "StoryGPTVPipelineOutput",
    "StoryLDMMapper",
    "character_attention_loss",
    "encode_fused_prompt",
    "encode_story_images",
    "find_character_mentions",
    "find_character_tokens",
    "ground_caption",
    "install_character_attention_processors",
    "uninstall_character_attention_processors",
    "load_story_dataset",
    "make_storyboard",
]
