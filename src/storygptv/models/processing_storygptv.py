"""The story processor: the LLM tokenizer plus the sequence layout of StoryGPT-V stage 2.

As ``LlavaProcessor`` owns the text layout of Llava, :class:`StoryGPTVProcessor` owns how a story becomes token
ids (the layout itself is plain data and functions in :mod:`storygptv.models.story_inputs`): the training
collator, the pipeline and :class:`~storygptv.models.story_context.StoryContext` all lay out stories through it,
so training and inference agree token for token. The model itself never tokenizes.

Example:
    >>> from storygptv.testing.story_model import tiny_story_tokenizer
    >>> processor = StoryGPTVProcessor(tiny_story_tokenizer())
    >>> seq = processor.build_sequence(["Fred is in the yard."], "He talks to Wilma.")
    >>> seq.input_ids[-8:] == list(processor.tokens.img_token_ids), seq.context_frames
    (True, [0])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from transformers import ProcessorMixin

from .story_inputs import (
    Segment,
    StorySequence,
    StoryTokens,
    add_story_special_tokens,
    build_story_sequence,
    encode_caption,
    history_segment,
    target_segment,
)

__all__ = ["StoryGPTVProcessor"]


class StoryGPTVProcessor(ProcessorMixin):
    """Tokenizer + story layout of the stage-2 model.

    Args:
        tokenizer: the LLM tokenizer. ``<|image|>`` and ``[IMG0]..[IMG{R-1}]`` are added when missing (in
            place, see :func:`~storygptv.models.story_inputs.add_story_special_tokens`); resize the LLM
            embeddings afterwards if the vocabulary grew.
        num_visual_tokens: m, LLM tokens per earlier frame (4 in the paper).
        num_img_tokens: R, the ``[IMG]`` tokens of the frame to generate (8 in the paper).
    """

    def __init__(
        self, tokenizer: Any = None, num_visual_tokens: int = 4, num_img_tokens: int = 8, **kwargs: Any
    ):
        if num_visual_tokens < 1 or num_img_tokens < 1:
            raise ValueError(
                f"`num_visual_tokens` ({num_visual_tokens}) and `num_img_tokens` ({num_img_tokens}) must be >= 1."
            )
        self.num_visual_tokens = num_visual_tokens
        self.num_img_tokens = num_img_tokens
        if tokenizer is not None:
            add_story_special_tokens(tokenizer, num_img_tokens)
        super().__init__(tokenizer, **kwargs)

    @classmethod
    def from_story_model_config(cls, tokenizer: Any, config: Any) -> StoryGPTVProcessor:
        """The processor matching a ``StoryGPTVConfig`` (its m and R)."""
        return cls(
            tokenizer, num_visual_tokens=config.num_visual_tokens, num_img_tokens=config.num_img_tokens
        )

    @cached_property
    def tokens(self) -> StoryTokens:
        """Every layout id (``<|image|>``, ``[IMG]``, the markers, BOS) read once from the tokenizer."""
        return StoryTokens.from_tokenizer(self.tokenizer, self.num_visual_tokens, self.num_img_tokens)

    def encode_caption(self, caption: str) -> list[int]:
        """Token ids of a caption as it appears in a story (``" " + caption``, no special tokens)."""
        return encode_caption(self.tokenizer, caption)

    def caption_ids(self, caption: str | Sequence[int]) -> list[int]:
        """``caption`` as token ids: text is encoded, ids are passed through."""
        return self.encode_caption(caption) if isinstance(caption, str) else [int(i) for i in caption]

    def history_segment(self, caption: str | Sequence[int]) -> Segment:
        """``"Image:" + m x <|image|> + " Caption:" + caption`` of an earlier frame."""
        return history_segment(self.tokens, self.caption_ids(caption))

    def target_segment(self, caption: str | Sequence[int], max_caption_tokens: int | None = None) -> Segment:
        """``" Caption:" + caption + " Image:" + [IMG0..R-1]`` of the frame to generate."""
        return target_segment(self.tokens, self.caption_ids(caption), max_caption_tokens)

    def build_sequence(
        self,
        context_captions: Sequence[str | Sequence[int]],
        target_caption: str | Sequence[int],
        *,
        max_length: int | None = 160,
        label_scope: Literal["all", "target"] = "all",
        label_markers: bool = False,
        target_restated: str | Sequence[int] | None = None,
    ) -> StorySequence:
        """A training / reference sequence with its labels (see
        :func:`~storygptv.models.story_inputs.build_story_sequence`); captions as text or ids.
        ``target_restated``: the target caption restated (a restating model)."""
        return build_story_sequence(
            self.tokens,
            [self.caption_ids(c) for c in context_captions],
            self.caption_ids(target_caption),
            max_length=max_length,
            label_scope=label_scope,
            label_markers=label_markers,
            target_restated_ids=None if target_restated is None else self.caption_ids(target_restated),
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated caption ids (a restatement), stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def decode_caption(self, ids: Sequence[int]) -> str:
        """Text of a caption the model wrote, as captions are written: stripped, and without the space that
        word-level BPE decoders put before punctuation (``"She is standing ."`` -> ``"She is standing."``)."""
        return re.sub(r"\s+([.,!?;:])", r"\1", self.decode(ids))
