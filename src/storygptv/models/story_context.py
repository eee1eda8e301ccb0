"""The running story of StoryGPT-V stage 2: committed frames, the LLM's KV cache, the window and the budget.

:class:`~storygptv.models.modeling_storygptv.StoryGPTVForConditionalGeneration` is a plain model (like Llava): it
maps a laid-out sequence to conditioning and holds no story. A :class:`StoryContext` is the caller's policy around
it, in the spirit of nanoGPT's ``generate`` loop cropping its context: it lays out each frame with the
:class:`~storygptv.models.processing_storygptv.StoryGPTVProcessor` (or the layout ids of the model's config), runs
only the new tokens on top of the cached ones, and decides what stays in the context::

    context = StoryContext(model, processor)
    for caption, image in story:
        conditioning = context.next_frame_conditioning(caption)   # the frame to draw; not committed
        image = ldm(conditioning) ...
        context.append_frame(clip_image_embeds(image), caption)   # commits "Image: <v>*m Caption: c"

Policy:

- **Window** (``context_window=k``, the local causal window of Causal-Story): only the last k frames stay; the
  cache is re-encoded from them when the window slides (k frames at most, whatever the story length).
- **Token budget** (``config.context_token_budget``): when the context would outgrow it, a block of the oldest
  frames is dropped at once, down to half the budget, and the cache rebuilt once for that block; the first
  overflow of a story warns. A story that outgrows the budget so costs one rebuild per half-budget of frames.
- A caption too long for the budget is truncated (with a warning) before the ``[IMG]`` ids.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ..characters import find_character_mentions
from .modeling_storygptv import NextFrameOutput, StoryGPTVForConditionalGeneration
from .story_inputs import StoryTokens, history_segment, target_segment

__all__ = ["StoryContext", "StoryFrame", "reference_conditioning"]


def _caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that points at the first frame outside this module (the caller);
    the wrappers of ``torch.no_grad`` decorators do not count."""
    frame, level = inspect.currentframe(), 0
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.endswith("_contextlib.py")
    ):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class StoryFrame:
    """A committed frame kept in the context (for cache rebuilds).

    Attributes:
        caption_ids: caption token ids per batch element (equal lengths).
        image_embeds: (B, vision_embed_dim) CLIP image embeddings of the frame.
        index: position of the frame in the story (0-based).
    """

    caption_ids: list[list[int]]
    image_embeds: torch.Tensor
    index: int

    def num_tokens(self, tokens: StoryTokens) -> int:
        return tokens.history_length(len(self.caption_ids[0]))


class StoryContext:
    """The story so far, as the story model reads it; create one per story.

    Args:
        model: the story model.
        processor: a :class:`~storygptv.models.processing_storygptv.StoryGPTVProcessor`; needed to pass captions
            as text, or when the model's config lacks the layout ids.
        batch_size: stories run in parallel (their captions must tokenize to equal lengths).
        context_window: keep only the last k committed frames (None: the whole story, up to the token budget).

    Attributes:
        frames: the committed frames currently in the context, oldest first.
        cache / cache_length: the ``DynamicCache`` over BOS + ``frames`` and its length in tokens.
        num_frames_committed, num_frames_dropped, num_rebuilds: counters of the story.
        llm_tokens_total: tokens the LLM processed for this story (all calls, rebuilds included).
        llm_tokens_per_frame: tokens processed for each committed frame (its commit, plus every call since the
            previous commit); last_call_tokens: those of the latest call.
        budget_warned: whether the token-budget warning was given (once per story).

    Example:
        >>> from storygptv.models.processing_storygptv import StoryGPTVProcessor
        >>> from storygptv.testing.story_model import tiny_story_model
        >>> model, tok = tiny_story_model()
        >>> context = StoryContext(model, StoryGPTVProcessor.from_story_model_config(tok, model.config))
        >>> context.next_frame_conditioning("Fred is in the yard.").shape
        torch.Size([1, 77, 32])
        >>> context.append_frame(torch.randn(1, 32), "Fred is in the yard.")
        >>> context.num_frames_committed
        1
    """

    def __init__(
        self,
        model: StoryGPTVForConditionalGeneration,
        processor: Any = None,
        batch_size: int = 1,
        context_window: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if context_window is not None and (isinstance(context_window, bool) or context_window < 0):
            raise ValueError(f"`context_window` must be None or an integer >= 0, got {context_window!r}.")
        self.model, self.processor = model, processor
        self.batch_size, self.context_window = batch_size, context_window
        try:
            self.tokens = StoryTokens.from_config(model.config)
        except ValueError:
            if processor is None:
                raise
            self.tokens = processor.tokens
        self.frames: list[StoryFrame] = []
        self.cache: DynamicCache | None = None
        self.cache_length = 0
        self.num_frames_committed = self.num_frames_dropped = self.num_rebuilds = 0
        self.llm_tokens_total = self.last_call_tokens = 0
        self.llm_tokens_per_frame: list[int] = []
        self.budget_warned = False
        self._pending_tokens = 0

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def read_next_frame(self, caption: Any, restated: Any = None) -> NextFrameOutput:
        """Run ``" Caption: c Image:" + [IMG0..R-1]`` on top of the context (not committed).

        Returns the ``[IMG]`` hidden states and input embeddings, and the grounding logits of a model with a
        grounding head, so a caller can resolve the frame's characters before it builds the mapper's anchor.
        A restating model (``config.grounding == "restate"``) first writes ``" Means: <the caption restated>"``
        (greedy, up to the first full stop or ``max_restate_tokens``), which comes back as ``restated_ids`` /
        ``restated_captions``; ``restated`` gives the restatement instead (text or ids: teacher forcing).

        Args:
            caption: text (with a processor) or token ids: a list of ints (batch 1, or shared by the batch), a
                list of lists or a (B, L) tensor.
            restated: for a restating model, its restatement of ``caption`` to use instead of generating one.
        """
        before = self.llm_tokens_total
        captions = self._caption_batch(caption)
        restates = bool(getattr(self.model.config, "restates_captions", False))
        if restates and self.batch_size != 1:
            raise ValueError("A restating story model reads one story at a time (`batch_size=1`).")
        given = self._caption_batch(restated)[0] if restated is not None else None
        extra = len(self.tokens.restate_prefix_ids) + self.model.config.max_restate_tokens if restates else 0
        budget = self.model.config.context_token_budget
        if budget is not None:
            room = budget - len(self.tokens.bos_ids) - self.tokens.target_overhead() - extra
            if room < 0:
                raise ValueError(f"The LLM budget of {budget} tokens cannot hold a target segment.")
            if len(captions[0]) > room:
                warnings.warn(
                    f"Caption of {len(captions[0])} tokens truncated to {room} to fit the LLM budget of {budget}.",
                    stacklevel=_caller_stacklevel(),
                )
                captions = [c[:room] for c in captions]
        segments = [target_segment(self.tokens, c) for c in captions]
        self._ensure_started()
        self._fit_budget(len(segments[0]) + extra, "target segment")
        committed = self.cache_length
        restated_ids = None
        if restates:
            # " Caption: c Means:", the restatement (generated or given), then " Image: [IMG0..R-1]".
            split = len(self.tokens.caption_prefix_ids) + len(captions[0])
            prefix = [*segments[0].input_ids[:split], *self.tokens.restate_prefix_ids]
            head = self._run(torch.tensor([prefix]), None, logits=True)
            restated_ids = given if given is not None else self._restate(head.logits[:, -1])
            if given is not None and given:
                self._run(torch.tensor([given]), None)
            out = self._run(torch.tensor([segments[0].input_ids[split:]]), None)
        else:
            out = self._run(torch.tensor([s.input_ids for s in segments]), None)
        self.cache.crop(committed - self.cache_length)
        self.cache_length = committed
        self.last_call_tokens = self.llm_tokens_total - before
        decoded = None
        if restated_ids is not None and self.processor is not None:
            decoded = [self.processor.decode(restated_ids)]
        return NextFrameOutput(
            img_hidden_states=out.img_hidden_states,
            img_input_embeds=out.img_input_embeds,
            character_logits=out.character_logits,
            setting_logits=out.setting_logits,
            restated_ids=None if restated_ids is None else [restated_ids],
            restated_captions=decoded,
        )

    def _restate(self, first_logits: torch.Tensor) -> list[int]:
        """Greedy restatement on top of the cache, from the logits after ``" Means:"``: up to the first token
        that ends a sentence (or before the end-of-text token), at most ``max_restate_tokens``; every token is
        run into the cache once (the caller crops it)."""
        if self.processor is None:
            raise ValueError(
                "A restating story model needs a processor to read its restatements: `StoryContext(model, processor)`."
            )
        eos = getattr(self.processor.tokenizer, "eos_token_id", None)
        # The layout's own tokens (image placeholder, [IMG] run) are never words of a caption.
        config = self.model.config
        layout = torch.tensor([config.image_token_id, *config.img_token_ids])
        ids: list[int] = []
        logits = first_logits
        while len(ids) < self.model.config.max_restate_tokens:
            logits = logits.index_fill(-1, layout.to(logits.device), float("-inf"))
            token = int(logits[0].argmax())
            if token == eos:
                break
            ids.append(token)
            logits = self._run(torch.tensor([[token]]), None, logits=True).logits[:, -1]
            if self.processor.decode([token]).endswith((".", "!", "?")):
                break
        return ids

    @torch.no_grad()
    def write_caption(
        self,
        max_new_tokens: int = 40,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        once: Sequence[str] = (),
        never: Sequence[str] = (),
        constraint: Callable[[str], bool] | None = None,
    ) -> list[int]:
        """The caption of the next frame, written by the story LLM from the story so far (not committed).

        Runs ``" Caption:"`` on top of the context and decodes until a token that ends a sentence, the
        end-of-text token, the start of a layout marker (``"Image:"`` / ``" Caption:"``, which is cut off) or
        ``max_new_tokens``. The image placeholder, the ``[IMG]`` tokens and BOS are never written. The cache
        is cropped back afterwards, so the context is unchanged.

        Args:
            max_new_tokens: the longest caption, in tokens.
            temperature: 0 (default) decodes greedily; a positive value samples from the softened logits.
            generator: the random generator of sampling.
            once: names written at most once per caption (the cast: "Fay and Fay" cannot be written). Once a name
                is in the caption, the first token of the name (alone, and after a space) is banned. This is exact
                for a word-level tokenizer (SynthSV's); with sub-word tokens it also bans other words that start
                with the same piece.
            never: names never written (characters the story does not have), banned the same way, except a first
                token that also starts a name in ``once``.
            constraint: ``constraint(text) -> bool``, whether a caption may start with ``text`` (e.g. a grammar's
                :func:`~storygptv.data.synthsv.caption_prefix_validator`). Each step takes the likeliest token
                (or samples among the tokens) that keeps it True; when no token does, the caption ends there.

        Returns:
            The caption's token ids (decode them with ``processor.decode``).

        Example:
            >>> from storygptv.models.processing_storygptv import StoryGPTVProcessor
            >>> from storygptv.testing.story_model import tiny_story_model
            >>> model, tok = tiny_story_model()
            >>> context = StoryContext(model, StoryGPTVProcessor.from_story_model_config(tok, model.config))
            >>> context.append_frame(torch.randn(1, 32), "Fred is in the yard.")
            >>> length = context.cache_length
            >>> ids = context.write_caption(max_new_tokens=5)
            >>> len(ids) <= 5, context.cache_length == length  # the context is unchanged
            (True, True)
        """
        if self.batch_size != 1:
            raise ValueError("Captions are written for one story at a time (`batch_size=1`).")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens!r}.")
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0: greedy), got {temperature!r}.")
        if (once or never or constraint) and self.processor is None:
            raise ValueError(
                "`once` / `never` / `constraint` need the context's processor (its tokenizer) to read the caption."
            )
        prefix = list(self.tokens.caption_prefix_ids)
        self._ensure_started()
        self._fit_budget(len(prefix) + max_new_tokens, "written caption")
        before, committed = self.llm_tokens_total, self.cache_length
        logits = self._run(torch.tensor([prefix]), None, logits=True).logits[:, -1]
        banned = [self.tokens.image_token_id, *self.tokens.img_token_ids, *self.tokens.bos_ids]
        tokenizer = getattr(self.processor, "tokenizer", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config.text_config, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is not None and pad != eos:
            banned.append(pad)
        markers = [
            list(m)
            for m in (
                self.tokens.image_prefix_ids,
                self.tokens.target_suffix_ids,
                self.tokens.caption_prefix_ids,
            )
            if m
        ]
        # each name's first tokens, tokenized once for the whole caption
        once_starts = {name: self._name_start_ids(name) for name in once}
        # a stranger's first token that also starts a cast member's name stays allowed
        cast_starts = {t for starts in once_starts.values() for t in starts}
        banned += [t for name in never for t in self._name_start_ids(name) if t not in cast_starts]
        ids: list[int] = []
        while len(ids) < max_new_tokens:
            scores = logits[0].float().clone()
            scores[[i for i in banned if i < scores.shape[0]]] = float("-inf")
            if once_starts and ids:
                used = find_character_mentions(self.processor.decode(ids), list(once_starts))
                starts = [t for mention in used for t in once_starts[mention.name]]
                scores[[i for i in starts if i < scores.shape[0]]] = float("-inf")
            if constraint is not None:
                scores = self._constrain(scores, ids, constraint, eos, first_only=temperature == 0)
                if not torch.isfinite(scores).any():
                    break  # nothing the constraint allows: the caption ends here
            if temperature > 0:
                probs = torch.softmax(scores / temperature, -1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            else:
                token = int(scores.argmax())
            if token == eos:
                break
            ids.append(token)
            marker = next((m for m in markers if ids[-len(m) :] == m), None)
            if marker is not None:  # the model moved on to the next segment
                del ids[-len(marker) :]
                break
            if self.processor is not None and self.processor.decode(ids).endswith((".", "!", "?")):
                break
            if len(ids) < max_new_tokens:
                logits = self._run(torch.tensor([[token]]), None, logits=True).logits[:, -1]
        self.cache.crop(committed - self.cache_length)
        self.cache_length = committed
        self.last_call_tokens = self.llm_tokens_total - before
        return ids

    def _constrain(
        self,
        scores: torch.Tensor,
        ids: list[int],
        constraint: Callable[[str], bool],
        eos: int | None,
        first_only: bool,
    ) -> torch.Tensor:
        """``scores`` with every token that would break ``constraint``, write nothing, or end the text set to ``-inf``.

        Tokens are tried from the likeliest down; ``first_only`` (greedy decoding) stops at the first allowed one,
        so a large vocabulary costs little. Sampling tries every token.
        """
        allowed = torch.full_like(scores, float("-inf"))
        before = self.processor.decode_caption(ids).strip()
        for token in scores.argsort(descending=True).tolist():
            if not torch.isfinite(scores[token]):
                break
            text = self.processor.decode_caption([*ids, token]).strip()
            # a token that writes nothing (an unused or special id) does not move the caption on
            if token != eos and text != before and constraint(text):
                allowed[token] = scores[token]
                if first_only:
                    break
        return allowed

    def _name_start_ids(self, name: str) -> list[int]:
        """The first token of ``name`` at the start of a text and after a space."""
        tokenizer = self.processor.tokenizer
        return [
            ids[0]
            for ids in (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (name, " " + name))
            if ids
        ]

    @torch.no_grad()
    def next_frame_conditioning(
        self, caption: Any, caption_conditioning: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, ldm_seq_len, ldm_hidden_size) conditioning of the next frame (:meth:`read_next_frame` + the mapper).

        ``caption_conditioning`` is the anchor of a caption-anchored mapper (the caption's Char-LDM encoding).
        """
        reading = self.read_next_frame(caption)
        return self.model.map_img_tokens(
            reading.img_hidden_states, reading.img_input_embeds, caption_conditioning
        )

    @torch.no_grad()
    def append_frame(self, image_embeds: torch.Tensor, caption: Any) -> None:
        """Commit ``"Image:" + m visual tokens + " Caption: c"`` of a finished frame.

        Args:
            image_embeds: (B, vision_embed_dim) CLIP embeddings of the frame's (generated) images ((D,) for B = 1).
            caption: as in :meth:`read_next_frame` (the same caption).
        """
        captions = self._caption_batch(caption)
        if image_embeds.ndim == 1:
            image_embeds = image_embeds.unsqueeze(0)
        expected = (self.batch_size, self.model.config.vision_embed_dim)
        if tuple(image_embeds.shape) != expected:
            raise ValueError(f"`image_embeds` must have shape {expected}, got {tuple(image_embeds.shape)}.")
        frame = StoryFrame(captions, image_embeds.detach(), self.num_frames_committed)
        before = self.llm_tokens_total
        self._ensure_started()
        self.num_frames_committed += 1
        if self.context_window is not None and len(self.frames) >= self.context_window:
            # The window slides: re-encode the retained frames (k of them at most, whatever the story length).
            frames = [*self.frames, frame]
            keep = frames[len(frames) - self.context_window :] if self.context_window > 0 else []
            self.num_frames_dropped += len(frames) - len(keep)
            self.frames = self._trim_to_budget(keep, 0, "context window")
            self._rebuild()
        else:
            self._fit_budget(frame.num_tokens(self.tokens), "frame")
            self.frames.append(frame)
            ids = torch.tensor([history_segment(self.tokens, c).input_ids for c in captions])
            self._run(ids, image_embeds)
        self.last_call_tokens = self.llm_tokens_total - before
        self.llm_tokens_per_frame.append(self._pending_tokens)
        self._pending_tokens = 0

    # ------------------------------------------------------------------ internals
    def _caption_batch(self, caption: Any) -> list[list[int]]:
        """Normalise captions to ``batch_size`` lists of ids of equal length."""
        if isinstance(caption, torch.Tensor):
            caption = caption.tolist()
            if caption and not isinstance(caption[0], list):
                caption = [caption]
        if isinstance(caption, str) or (
            isinstance(caption, Sequence) and caption and isinstance(caption[0], str)
        ):
            if self.processor is None:
                raise ValueError("Captions given as text need a processor: `StoryContext(model, processor)`.")
            texts = [caption] if isinstance(caption, str) else list(caption)
            caption = [self.processor.encode_caption(t) for t in texts]
        elif not caption or not isinstance(caption[0], Sequence):
            caption = [list(caption)]
        batch = [[int(i) for i in ids] for ids in caption]
        if len(batch) == 1 and self.batch_size > 1:
            batch = batch * self.batch_size
        if len(batch) != self.batch_size:
            raise ValueError(
                f"Got captions for {len(batch)} stories but the context has batch_size {self.batch_size}."
            )
        if len({len(ids) for ids in batch}) != 1:
            raise ValueError(
                f"Batched captions must have equal token lengths, got {sorted(len(ids) for ids in batch)}."
            )
        return batch

    def _run(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, logits: bool = False) -> Any:
        """Run ``input_ids`` (B, L) on top of the cache and grow it; returns the model output (with the LM
        logits when ``logits``)."""
        device = self.model.get_input_embeddings().weight.device
        length = input_ids.shape[1]
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config.text_config)
        positions = torch.arange(self.cache_length, self.cache_length + length, device=device)
        out = self.model(
            input_ids=input_ids.to(device),
            image_embeds=image_embeds,
            position_ids=positions.unsqueeze(0).expand(input_ids.shape[0], -1),
            cache=self.cache,
            use_cache=True,
            compute_logits=logits,
        )
        self.cache = out.cache
        self.cache_length += length
        self.llm_tokens_total += length
        self._pending_tokens += length
        return out

    def _rebuild(self) -> None:
        """Re-encode BOS + the retained frames from scratch (after the window slid or frames were dropped)."""
        self.cache, self.cache_length = None, 0
        rows = [list(self.tokens.bos_ids) for _ in range(self.batch_size)]
        for frame in self.frames:
            for b in range(self.batch_size):
                rows[b] += history_segment(self.tokens, frame.caption_ids[b]).input_ids
        self.num_rebuilds += 1
        if rows[0]:
            embeds = (
                torch.stack([f.image_embeds for f in self.frames], 1).flatten(0, 1) if self.frames else None
            )
            self._run(torch.tensor(rows), embeds)  # embeds (B * n_frames, D) in placeholder (row-major) order

    def _ensure_started(self) -> None:
        if self.cache is None and self.cache_length == 0 and self.tokens.bos_ids and not self.frames:
            self._run(torch.tensor([self.tokens.bos_ids] * self.batch_size), None)

    def _trim_to_budget(self, frames: list[StoryFrame], extra_tokens: int, what: str) -> list[StoryFrame]:
        """The newest of ``frames`` that fit the token budget with BOS and ``extra_tokens`` (see the module doc)."""
        budget = self.model.config.context_token_budget
        total = len(self.tokens.bos_ids) + sum(f.num_tokens(self.tokens) for f in frames)
        if budget is None or total + extra_tokens <= budget:
            return frames
        kept = list(frames)
        while kept and total + extra_tokens > budget // 2:
            total -= kept.pop(0).num_tokens(self.tokens)
        if total + extra_tokens > budget:
            raise ValueError(
                f"The {what} ({extra_tokens} tokens) does not fit the LLM budget of {budget} tokens even with an "
                "empty context."
            )
        dropped = len(frames) - len(kept)
        if not self.budget_warned:
            warnings.warn(
                f"Story context exceeds the LLM budget of {budget} tokens (max_context_tokens): dropping the "
                f"{dropped} oldest frame(s) and rebuilding the cache ({len(kept)} frame(s) kept). From now on, "
                "each time the context fills up the oldest frames are dropped down to half the budget (no "
                "further warning; see `num_frames_dropped`).",
                stacklevel=_caller_stacklevel(),
            )
            self.budget_warned = True
        self.num_frames_dropped += dropped
        return kept

    def _fit_budget(self, extra_tokens: int, what: str) -> None:
        kept = self._trim_to_budget(self.frames, extra_tokens, what)
        if len(kept) != len(self.frames):
            self.frames = kept
            self._rebuild()


@torch.no_grad()
def reference_conditioning(
    model: StoryGPTVForConditionalGeneration,
    context_caption_ids: Sequence[Sequence[int]],
    context_image_embeds: torch.Tensor | None,
    target_caption_ids: Sequence[int],
    caption_conditioning: torch.Tensor | None = None,
    target_restated_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """The conditioning of one full forward pass over the whole story (batch 1, no cache).

    The reference that :class:`StoryContext` must equal: ``context_image_embeds`` is (n_frames, vision_embed_dim),
    ``caption_conditioning`` the anchor of a caption-anchored mapper and ``target_restated_ids`` the
    restatement of a restating model.
    """
    tokens = StoryTokens.from_config(model.config)
    ids = list(tokens.bos_ids)
    for caption in context_caption_ids:
        ids += history_segment(tokens, caption).input_ids
    ids += target_segment(tokens, target_caption_ids, restated_ids=target_restated_ids).input_ids
    device = model.get_input_embeddings().weight.device
    out = model(
        input_ids=torch.tensor([ids], device=device),
        image_embeds=context_image_embeds,
        caption_conditioning=caption_conditioning,
        use_cache=False,
        compute_logits=False,
    )
    return out.conditioning
