"""storygptv: StoryGPT-V (arXiv 2312.02252) for Hugging Face diffusers and transformers.

The package is lazy, as transformers is: ``import storygptv`` imports none of torch, diffusers, transformers or
datasets; each public name is imported on first use (``from storygptv import StoryGPTVPipeline``). So the command
line starts in a fraction of a second.

Two registrations happen as soon as the library they concern is imported (now, or later in the program):

- with **transformers**: ``StoryGPTVConfig`` / ``StoryGPTVForConditionalGeneration`` join ``AutoConfig`` /
  ``AutoModel`` (and ``StoryGPTVProcessor`` joins ``AutoProcessor``);
- with **diffusers**: ``CharLDMPipeline`` and ``StoryGPTVPipeline`` become attributes of the ``diffusers``
  module, so that ``DiffusionPipeline.from_pretrained(folder_or_repo)`` returns our pipeline classes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: The small StoryGPT-V trained on SynthSV that ships inside the package (a pipeline folder).
DEFAULT_MODEL = str(Path(__file__).with_name("default_model"))

#: Public name -> submodule that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "CharacterAttentionProcessor": "attention",
    "CharacterAttentionStore": "attention",
    "character_attention_loss": "attention",
    "install_character_attention_processors": "attention",
    "uninstall_character_attention_processors": "attention",
    "MutualAttentionState": "attention",
    "install_mutual_attention_processors": "attention",
    "uninstall_mutual_attention_processors": "attention",
    "CharacterMention": "characters",
    "find_character_mentions": "characters",
    "find_character_tokens": "characters",
    "DirectorError": "director",
    "StoryDirector": "director",
    "StoryScript": "director",
    "load_cast": "characters",
    "load_story_dataset": "data",
    "ground_caption": "grounding",
    "ModelLoadingError": "loading",
    "CharacterFuser": "models",
    "FusedPromptOutput": "models",
    "StoryContext": "models",
    "StoryGPTVConfig": "models",
    "StoryGPTVForConditionalGeneration": "models",
    "StoryGPTVOutput": "models",
    "StoryGPTVProcessor": "models",
    "StoryLDMMapper": "models",
    "encode_fused_prompt": "models",
    "CharLDMPipeline": "pipelines",
    "CharLDMPipelineOutput": "pipelines",
    "StoryGPTVPipeline": "pipelines",
    "StoryGPTVPipelineOutput": "pipelines",
    "encode_story_images": "pipelines",
    "make_storyboard": "storyboard",
}

__all__ = [
    "DEFAULT_MODEL",
    "CharLDMPipeline",
    "CharLDMPipelineOutput",
    "CharacterAttentionProcessor",
    "CharacterAttentionStore",
    "CharacterFuser",
    "CharacterMention",
    "DirectorError",
    "FusedPromptOutput",
    "ModelLoadingError",
    "MutualAttentionState",
    "StoryContext",
    "StoryDirector",
    "StoryGPTVConfig",
    "StoryGPTVForConditionalGeneration",
    "StoryGPTVOutput",
    "StoryGPTVPipeline",
    "StoryGPTVPipelineOutput",
    "StoryGPTVProcessor",
    "StoryLDMMapper",
    "StoryScript",
    "character_attention_loss",
    "encode_fused_prompt",
    "encode_story_images",
    "find_character_mentions",
    "find_character_tokens",
    "ground_caption",
    "install_character_attention_processors",
    "install_mutual_attention_processors",
    "load_cast",
    "load_story_dataset",
    "make_storyboard",
    "uninstall_character_attention_processors",
    "uninstall_mutual_attention_processors",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .attention import (
        CharacterAttentionProcessor,
        CharacterAttentionStore,
        MutualAttentionState,
        character_attention_loss,
        install_character_attention_processors,
        install_mutual_attention_processors,
        uninstall_character_attention_processors,
        uninstall_mutual_attention_processors,
    )
    from .characters import CharacterMention, find_character_mentions, find_character_tokens, load_cast
    from .data import load_story_dataset
    from .director import DirectorError, StoryDirector, StoryScript
    from .grounding import ground_caption
    from .loading import ModelLoadingError
    from .models import (
        CharacterFuser,
        FusedPromptOutput,
        StoryContext,
        StoryGPTVConfig,
        StoryGPTVForConditionalGeneration,
        StoryGPTVOutput,
        StoryGPTVProcessor,
        StoryLDMMapper,
        encode_fused_prompt,
    )
    from .pipelines import (
        CharLDMPipeline,
        CharLDMPipelineOutput,
        StoryGPTVPipeline,
        StoryGPTVPipelineOutput,
        encode_story_images,
    )
    from .storyboard import make_storyboard


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# --------------------------------------------------------------------------------------------------
# Registrations with transformers and diffusers, when (or as soon as) they are imported
# --------------------------------------------------------------------------------------------------
def _importing_ours() -> bool:
    """Whether one of our modules is being imported right now (then it brought the library in itself)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith(f"{__name__}.")
    )


def _register_with_transformers() -> None:
    # `models` registers the Auto classes when it is imported; if one of our modules is importing now, it is
    # `models` (or it imports it) and the registration follows by itself.
    if not _importing_ours():
        importlib.import_module(".models", __name__)


_DIFFUSERS_NAMES = ("CharLDMPipeline", "StoryGPTVPipeline")


def _register_with_diffusers() -> None:
    """Let the ``diffusers`` module resolve our pipeline names, importing them on first use.

    diffusers looks the ``_class_name`` of a ``model_index.json`` up as an attribute of its top-level module. That
    module gets a subclass whose ``__getattr__`` also knows our pipelines, so nothing of ours is imported now
    (diffusers may be coming in through one of our own modules); ``pipelines`` also sets them when imported.
    """
    module = sys.modules["diffusers"]
    base = type(module)
    if getattr(base, "_storygptv", False):
        return

    class DiffusersWithStoryGPTV(base):
        _storygptv = True

        def __getattr__(self, name: str) -> Any:
            if name in _DIFFUSERS_NAMES:
                return getattr(importlib.import_module(".pipelines", __name__), name)
            return super().__getattr__(name)

    module.__class__ = DiffusersWithStoryGPTV


_AFTER_IMPORT: dict[str, Callable[[], None]] = {
    "transformers": _register_with_transformers,
    "diffusers": _register_with_diffusers,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration once a library's top-level module has finished importing (a post-import hook)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        hook = _AFTER_IMPORT.get(fullname)
        if hook is None:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders (and never recurse)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _AFTER_IMPORT.pop(fullname, None)
            hook()

        spec.loader.exec_module = exec_then_register
        return spec


for _library in list(_AFTER_IMPORT):
    if _library in sys.modules:
        _AFTER_IMPORT.pop(_library)()
if _AFTER_IMPORT:
    sys.meta_path.insert(0, _AfterImport())
