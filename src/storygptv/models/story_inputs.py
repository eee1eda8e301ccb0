"""Sequence layout of StoryGPT-V stage 2, shared by the model, the training collator and the pipeline.

A story sequence (method notes section 3.2) is::

    [BOS] Image: <v><v><v><v> Caption: c_0  Image: <v><v><v><v> Caption: c_1 ...  Caption: c_t Image: [IMG0]..[IMG7]
          '------------ history segment of frame 0 -------'                  '--------- target segment ---------'

A model that *restates* captions (``restate_captions``) writes, between the target caption and its ``[IMG]`` tokens,
the caption with the characters and setting it leaves open filled in, and its history holds those restated
captions::

    ... Caption: C_{t-1}  Caption: They are jumping. Means: Ava and Bo are jumping in the forest. Image: [IMG0]..[IMG7]

- ``<v>`` is the placeholder id ``image_token_id`` (``<|image|>``), ``num_visual_tokens`` (m) of them per image;
  the model scatters the projected CLIP embedding of that frame into these positions.
- Captions of the history and the target are the **referential** captions.
- ``[IMG0]..[IMG{R-1}]`` are appended as integer ids: the text ``"[IMG0]"`` is never tokenised (whitespace
  handling around added tokens differs between tokenizer versions).
- The three markers are tokenised once, separately from the captions (``"Image:"``, ``" Caption:"``,
  ``" Image:"``), and captions are tokenised as ``" " + caption``. Training and inference both build the sequence
  from these pieces, so they agree token for token whatever the tokenizer's merge rules.

Labels (``build_story_sequence``): cross-entropy on the caption-text tokens and on ``[IMG0]``; -100 on the BOS,
the visual placeholders, ``[IMG1..R-1]`` and (by default) the markers. ``label_scope="all"`` (default, like the
reference code, which labels the text of the whole interleaved sequence) labels every caption;
``label_scope="target"`` only the target caption. Too-long sequences lose their **oldest** frames (whole
history segments); a target caption that alone does not fit is truncated **before** the ``[IMG]`` ids are
appended, so they are always present.

Example:
    >>> from storygptv.testing.tokenizers import build_bpe_tokenizer
    >>> tok = build_bpe_tokenizer(style="causal_lm", extra_special_tokens=["<|image|>"] + [f"[IMG{i}]" for i in range(8)])
    >>> st = StoryTokens.from_tokenizer(tok)
    >>> seq = build_story_sequence(st, [encode_caption(tok, "Fred is in the yard.")],
    ...                            encode_caption(tok, "He talks to Wilma."))
    >>> seq.input_ids[-8:] == list(st.img_token_ids), seq.context_frames
    (True, [0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CAPTION_PREFIX",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER_TOKEN",
    "IMAGE_PREFIX",
    "RESTATE_PREFIX",
    "TARGET_SUFFIX",
    "Segment",
    "StorySequence",
    "StoryTokens",
    "add_story_special_tokens",
    "build_story_sequence",
    "build_story_sequence_from_text",
    "encode_caption",
    "history_segment",
    "img_token_strings",
    "target_segment",
]

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER_TOKEN = "<|image|>"
IMAGE_PREFIX = "Image:"
CAPTION_PREFIX = " Caption:"
TARGET_SUFFIX = " Image:"
RESTATE_PREFIX = " Means:"


def img_token_strings(num_img_tokens: int = 8) -> list[str]:
    """The ``[IMG]`` token strings ``["[IMG0]", ..., "[IMG{R-1}]"]``."""
    return [f"[IMG{i}]" for i in range(num_img_tokens)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_caption(tokenizer: Any, caption: str) -> list[int]:
    """Token ids of a caption as it appears in a story sequence (``" " + caption``, no special tokens)."""
    return _encode(tokenizer, " " + caption.strip())


def add_story_special_tokens(tokenizer: Any, num_img_tokens: int = 8) -> dict[str, Any]:
    """Add ``<|image|>`` and ``[IMG0]..[IMG{R-1}]`` as special tokens when missing (in place).

    Returns ``{"image_token_id": int, "img_token_ids": list[int], "num_added": int}``.
    """
    wanted = [IMAGE_PLACEHOLDER_TOKEN, *img_token_strings(num_img_tokens)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    num_added = 0
    if missing:
        num_added = tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    ids = tokenizer.convert_tokens_to_ids(wanted)
    return {"image_token_id": ids[0], "img_token_ids": list(ids[1:]), "num_added": num_added}


@dataclass(frozen=True)
class StoryTokens:
    """All token ids needed to lay out story sequences (no tokenizer needed once built).

    Build it with :meth:`from_tokenizer` (the tokenizer must already contain the special tokens, see
    :func:`add_story_special_tokens`) or :meth:`from_config` (a ``StoryGPTVConfig`` filled by
    ``StoryGPTVForConditionalGeneration.from_language_model`` or the tiny builders).
    """

    image_token_id: int
    img_token_ids: tuple[int, ...]
    num_visual_tokens: int
    image_prefix_ids: tuple[int, ...]
    caption_prefix_ids: tuple[int, ...]
    target_suffix_ids: tuple[int, ...]
    bos_token_id: int | None = None
    restate_prefix_ids: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, num_visual_tokens: int = 4, num_img_tokens: int = 8
    ) -> StoryTokens:
        vocab = tokenizer.get_vocab()
        wanted = [IMAGE_PLACEHOLDER_TOKEN, *img_token_strings(num_img_tokens)]
        missing = [t for t in wanted if t not in vocab]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the story special tokens {missing}; call `add_story_special_tokens` first."
            )
        ids = tokenizer.convert_tokens_to_ids(wanted)
        return cls(
            image_token_id=ids[0],
            img_token_ids=tuple(ids[1:]),
            num_visual_tokens=num_visual_tokens,
            image_prefix_ids=tuple(_encode(tokenizer, IMAGE_PREFIX)),
            caption_prefix_ids=tuple(_encode(tokenizer, CAPTION_PREFIX)),
            target_suffix_ids=tuple(_encode(tokenizer, TARGET_SUFFIX)),
            bos_token_id=tokenizer.bos_token_id,
            restate_prefix_ids=tuple(_encode(tokenizer, RESTATE_PREFIX)),
        )

    @classmethod
    def from_config(cls, config: Any) -> StoryTokens:
        missing = [
            name
            for name in (
                "image_token_id",
                "img_token_ids",
                "image_prefix_ids",
                "caption_prefix_ids",
                "target_suffix_ids",
            )
            if getattr(config, name, None) is None
        ]
        if missing:
            raise ValueError(
                f"The config lacks {missing}; build the model with `from_language_model(...)`, or pass the "
                "tokenizer through a processor (e.g. `StoryContext(model, StoryGPTVProcessor(tok))`) so the ids can be read from it."
            )
        return cls(
            image_token_id=config.image_token_id,
            img_token_ids=tuple(config.img_token_ids),
            num_visual_tokens=config.num_visual_tokens,
            image_prefix_ids=tuple(config.image_prefix_ids),
            caption_prefix_ids=tuple(config.caption_prefix_ids),
            target_suffix_ids=tuple(config.target_suffix_ids),
            bos_token_id=config.story_bos_token_id,
            restate_prefix_ids=tuple(getattr(config, "restate_prefix_ids", None) or ()),
        )

    def to_config_kwargs(self) -> dict[str, Any]:
        """The ``StoryGPTVConfig`` fields holding these ids."""
        return {
            "image_token_id": self.image_token_id,
            "img_token_ids": list(self.img_token_ids),
            "num_visual_tokens": self.num_visual_tokens,
            "num_img_tokens": len(self.img_token_ids),
            "image_prefix_ids": list(self.image_prefix_ids),
            "caption_prefix_ids": list(self.caption_prefix_ids),
            "target_suffix_ids": list(self.target_suffix_ids),
            "story_bos_token_id": self.bos_token_id,
            "restate_prefix_ids": list(self.restate_prefix_ids),
        }

    @property
    def bos_ids(self) -> list[int]:
        """``[bos]`` or ``[]``."""
        return [] if self.bos_token_id is None else [self.bos_token_id]

    def target_overhead(self) -> int:
        """Tokens of a target segment besides its caption (markers + R ``[IMG]`` ids)."""
        return len(self.caption_prefix_ids) + len(self.target_suffix_ids) + len(self.img_token_ids)

    def history_length(self, num_caption_tokens: int) -> int:
        """Length of a history segment with a caption of ``num_caption_tokens`` tokens."""
        return (
            len(self.image_prefix_ids)
            + self.num_visual_tokens
            + len(self.caption_prefix_ids)
            + num_caption_tokens
        )


@dataclass
class Segment:
    """A piece of a story sequence.

    Attributes:
        input_ids: the token ids.
        caption_mask: True where the token is caption text.
        marker_mask: True where the token belongs to a text marker (``"Image:"``, ``" Caption:"``, ``" Image:"``).
    """

    input_ids: list[int]
    caption_mask: list[bool]
    marker_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _as_ids(caption_ids: Sequence[int]) -> list[int]:
    if isinstance(caption_ids, str):
        raise TypeError(
            "Expected caption token ids, got a string; use `encode_caption(tokenizer, text)` first."
        )
    return [int(i) for i in caption_ids]


def history_segment(tokens: StoryTokens, caption_ids: Sequence[int]) -> Segment:
    """``"Image:" + m x <|image|> + " Caption:" + caption`` for one earlier frame (what ``append_frame`` commits)."""
    cap = _as_ids(caption_ids)
    ip, cp = list(tokens.image_prefix_ids), list(tokens.caption_prefix_ids)
    m = tokens.num_visual_tokens
    ids = ip + [tokens.image_token_id] * m + cp + cap
    caption_mask = [False] * (len(ip) + m + len(cp)) + [True] * len(cap)
    marker_mask = [True] * len(ip) + [False] * m + [True] * len(cp) + [False] * len(cap)
    return Segment(ids, caption_mask, marker_mask)


def restated_segment(tokens: StoryTokens, restated_ids: Sequence[int]) -> Segment:
    """``" Means:" + restated caption``: the target caption restated, between it and its ``[IMG]`` tokens."""
    if not tokens.restate_prefix_ids:
        raise ValueError(
            "These layout ids have no restate marker (`restate_prefix_ids`); the model does not restate."
        )
    rp, restated = list(tokens.restate_prefix_ids), _as_ids(restated_ids)
    return Segment(
        rp + restated, [False] * len(rp) + [True] * len(restated), [True] * len(rp) + [False] * len(restated)
    )


def target_segment(
    tokens: StoryTokens,
    caption_ids: Sequence[int],
    max_caption_tokens: int | None = None,
    restated_ids: Sequence[int] | None = None,
) -> Segment:
    """``" Caption:" + caption [+ " Means:" + restated] + " Image:" + [IMG0..R-1]`` for the frame to generate.

    ``max_caption_tokens`` truncates the caption (keeping its start) before the ``[IMG]`` ids are appended;
    ``restated_ids`` (a restating model) is the caption restated with its characters and setting filled in.
    """
    cap = _as_ids(caption_ids)
    if max_caption_tokens is not None:
        cap = cap[: max(0, max_caption_tokens)]
    cp, ts, img = list(tokens.caption_prefix_ids), list(tokens.target_suffix_ids), list(tokens.img_token_ids)
    restated = restated_segment(tokens, restated_ids) if restated_ids is not None else Segment([], [], [])
    ids = cp + cap + restated.input_ids + ts + img
    caption_mask = (
        [False] * len(cp) + [True] * len(cap) + restated.caption_mask + [False] * (len(ts) + len(img))
    )
    marker_mask = (
        [True] * len(cp) + [False] * len(cap) + restated.marker_mask + [True] * len(ts) + [False] * len(img)
    )
    return Segment(ids, caption_mask, marker_mask)


@dataclass
class StorySequence:
    """A full training / evaluation sequence.

    Attributes:
        input_ids: BOS + kept history segments + target segment.
        labels: CE labels (-100 where ignored), same length.
        context_frames: indices (into the given context list) of the history frames kept, oldest first; their
            image embeddings go, in this order, into the placeholders.
        target_caption_tokens: caption tokens of the target kept after truncation.
    """

    input_ids: list[int]
    labels: list[int]
    context_frames: list[int]
    target_caption_tokens: int

    @property
    def num_images(self) -> int:
        return len(self.context_frames)


def build_story_sequence(
    tokens: StoryTokens,
    context_caption_ids: Sequence[Sequence[int]],
    target_caption_ids: Sequence[int],
    *,
    max_length: int | None = 160,
    label_scope: Literal["all", "target"] = "all",
    label_markers: bool = False,
    target_restated_ids: Sequence[int] | None = None,
) -> StorySequence:
    """Lay out one training sequence with its labels.

    Args:
        tokens: the story token ids.
        context_caption_ids: caption ids (see :func:`encode_caption`) of the earlier frames, oldest first.
        target_caption_ids: caption ids of the target frame.
        max_length: maximum sequence length (160 in the paper); None for no limit. The oldest history frames
            are dropped first; the target caption is truncated only when it alone does not fit.
        label_scope: ``"all"`` labels every caption, ``"target"`` only the target caption ([IMG0] always).
        label_markers: also label the ``"Image:"`` / ``" Caption:"`` marker tokens.
        target_restated_ids: the target caption restated (a restating model; always labelled).
    """
    if label_scope not in ("all", "target"):
        raise ValueError(f"`label_scope` must be 'all' or 'target', got {label_scope!r}.")
    bos = tokens.bos_ids
    max_caption = None
    if max_length is not None:
        restated_length = (
            len(target_restated_ids) + len(tokens.restate_prefix_ids) if target_restated_ids else 0
        )
        room = max_length - len(bos) - tokens.target_overhead() - restated_length
        if room < 0:
            raise ValueError(
                f"`max_length` ({max_length}) is too small for a target segment: it needs at least "
                f"{len(bos) + tokens.target_overhead()} tokens (BOS + markers + {len(tokens.img_token_ids)} [IMG])."
            )
        max_caption = room
    target = target_segment(
        tokens, target_caption_ids, max_caption_tokens=max_caption, restated_ids=target_restated_ids
    )
    budget = None if max_length is None else max_length - len(bos) - len(target)

    kept: list[int] = []
    segments: list[Segment] = []
    used = 0
    for idx in range(len(context_caption_ids) - 1, -1, -1):
        seg = history_segment(tokens, context_caption_ids[idx])
        if budget is not None and used + len(seg) > budget:
            break
        used += len(seg)
        kept.append(idx)
        segments.append(seg)
    kept.reverse()
    segments.reverse()

    input_ids = list(bos)
    labels = [IGNORE_INDEX] * len(bos)
    for seg, is_target in [(s, False) for s in segments] + [(target, True)]:
        input_ids += seg.input_ids
        for tok, is_cap, is_marker in zip(seg.input_ids, seg.caption_mask, seg.marker_mask):
            labelled = (is_cap and (label_scope == "all" or is_target)) or (
                label_markers and is_marker and (label_scope == "all" or is_target)
            )
            labels.append(tok if labelled else IGNORE_INDEX)
    # [IMG0] is predicted; [IMG1..R-1] are forced, so they carry no label.
    img0_pos = len(input_ids) - len(tokens.img_token_ids)
    labels[img0_pos] = tokens.img_token_ids[0]
    n_cap = sum(target.caption_mask)
    return StorySequence(input_ids, labels, kept, n_cap)


def build_story_sequence_from_text(
    tokenizer: Any,
    tokens: StoryTokens,
    context_captions: Sequence[str],
    target_caption: str,
    **kwargs: Any,
) -> StorySequence:
    """:func:`build_story_sequence` from caption strings."""
    return build_story_sequence(
        tokens,
        [encode_caption(tokenizer, c) for c in context_captions],
        encode_caption(tokenizer, target_caption),
        **kwargs,
    )
