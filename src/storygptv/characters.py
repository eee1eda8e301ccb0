"""Character names in captions: where they are in the text and in the token sequence.

StoryGPT-V fuses each character's reference-image embedding into the text-encoder output at the
*last sub-token* of that character's name. This module finds those positions for any Hugging Face
tokenizer, using the tokenizer's character offsets rather than re-tokenising pieces of the string,
so that sub-word splits, byte-level BPE and lower-casing normalisers all work.

Matching rules (the public StoryGPT-V code matches lower-cased whitespace-split words, so
"Mr Slate", "Bamm Bamm" or "Fred," never match; ours fixes that):

- case-insensitive, on whole words: "Fred" matches "fred," and "Fred's" but not "Freddy";
- multi-word names match across any run of whitespace ("Mr  Slate");
- a possessive "'s" (or "’s") after the name is not part of the name: the fused token is the last
  sub-token of the name itself;
- a name mentioned several times is fused at its **first** mention only (one fused token per
  character, as in training);
- when two names overlap ("Bamm" and "Bamm Bamm"), the longer name wins;
- characters are ordered by their position in the caption and at most ``max_characters`` are kept.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = [
    "CharacterMention",
    "find_character_mentions",
    "find_character_tokens",
    "load_character_image",
    "locate_character_tokens",
    "normalize_characters",
    "warn_ignored_characters",
]


@dataclass(frozen=True)
class CharacterMention:
    """One character found in a caption.

    Attributes:
        name: the character name as given by the caller (a key of the ``characters`` dict).
        start: index of the first character of the mention in the caption.
        end: index one past the last character of the name (a possessive "'s" is excluded).
        token_index: position of the last sub-token of the name in the tokenised caption (including
            the BOS token), or ``None`` before token positions are resolved.
    """

    name: str
    start: int
    end: int
    token_index: int | None = None


def _name_pattern(name: str) -> re.Pattern[str]:
    words = name.split()
    if not words:
        raise ValueError(f"Character names must contain at least one non-space character, got {name!r}.")
    body = r"\s+".join(re.escape(word) for word in words)
    # Whole words: no word character (letter, digit, underscore) directly before or after.
    return re.compile(rf"(?<!\w){body}(?!\w)", flags=re.IGNORECASE)


def find_character_mentions(caption: str, names: Iterable[str]) -> list[CharacterMention]:
    """Find the first mention of each name in ``caption``, ordered by position in the caption.

    Names absent from the caption are simply not returned; see the module docstring for the rules.

    Example:
        >>> [m.name for m in find_character_mentions("Fred's dog sees Mr  Slate.", ["Mr Slate", "Fred"])]
        ['Fred', 'Mr Slate']
    """
    claimed: list[tuple[int, int]] = []
    mentions: list[CharacterMention] = []
    # Longer names first, so "Bamm Bamm" claims its span before "Bamm" could.
    for name in sorted(dict.fromkeys(names), key=lambda n: (-len(n.split()), -len(n))):
        for match in _name_pattern(name).finditer(caption):
            start, end = match.span()
            if any(start < c_end and end > c_start for c_start, c_end in claimed):
                continue
            claimed.append((start, end))
            mentions.append(CharacterMention(name=name, start=start, end=end))
            break
    return sorted(mentions, key=lambda m: m.start)


def _last_token_in_span(offsets: list[tuple[int, int]], start: int, end: int) -> int | None:
    """Index of the last token whose character span overlaps [start, end), ignoring special tokens."""
    last = None
    for index, (token_start, token_end) in enumerate(offsets):
        if token_end <= token_start:  # special tokens and padding have empty offsets
            continue
        if token_start < end and token_end > start:
            last = index
    return last


def locate_character_tokens(
    caption: str, names: Iterable[str], tokenizer: Any, max_length: int | None = None
) -> list[CharacterMention]:
    """Every character of ``names`` that ``caption`` mentions, with its fused token position.

    Like :func:`find_character_tokens` but without the ``max_characters`` cut and without warnings.
    A name whose tokens fall beyond ``max_length`` (default ``tokenizer.model_max_length``) after
    truncation is left out.
    """
    if max_length is None:
        max_length = tokenizer.model_max_length
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"Locating character names needs a fast tokenizer (with offset mappings), got "
            f"{type(tokenizer).__name__}; load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`."
        )
    encoding = tokenizer(caption, truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    resolved = []
    for mention in find_character_mentions(caption, names):
        token_index = _last_token_in_span(offsets, mention.start, mention.end)
        if token_index is not None:
            resolved.append(
                CharacterMention(mention.name, mention.start, mention.end, token_index=token_index)
            )
    return resolved


def warn_ignored_characters(
    caption: str,
    absent: list[str],
    dropped: list[str],
    max_characters: int,
    truncated: list[str] | None = None,
) -> None:
    """Warn about reference images that are not used for ``caption``.

    ``absent``: not named (or beyond the token limit, when the caller cannot tell); ``dropped``: beyond
    ``max_characters``; ``truncated``: named, but only after the text encoder's token limit.
    """
    if truncated:
        warnings.warn(
            f"Characters {truncated} are named in the caption {caption!r} only after the text encoder's token "
            "limit, so they are cut off and not fused; shorten the caption or name them earlier.",
            stacklevel=3,
        )
    if absent:
        warnings.warn(
            f"Characters {absent} are not named in the caption {caption!r} (or fall beyond its token "
            "limit); their reference images are ignored for it.",
            stacklevel=3,
        )
    if dropped:
        warnings.warn(
            f"The caption {caption!r} names more than max_characters={max_characters} characters; "
            f"{dropped} are not fused. Raise `max_characters` to keep them.",
            stacklevel=3,
        )


def find_character_tokens(
    caption: str,
    names: Iterable[str],
    tokenizer: Any,
    max_characters: int = 4,
    max_length: int | None = None,
    warn: bool = True,
) -> list[CharacterMention]:
    """Find, for each character named in ``caption``, the token to fuse its image embedding into.

    Args:
        caption: the caption text.
        names: candidate character names (typically the keys of the ``characters`` dict).
        tokenizer: a Hugging Face *fast* tokenizer (it must return offsets).
        max_characters: keep at most this many characters, in caption order.
        max_length: the tokenised length (defaults to ``tokenizer.model_max_length``); a name whose
            tokens fall beyond it after truncation is dropped.
        warn: warn about names that are absent from the caption or dropped by ``max_characters``.

    Returns:
        The kept mentions in caption order, each with ``token_index`` set to the position of the last
        sub-token of the name in ``tokenizer(caption, truncation=True, max_length=max_length)``.

    Example:
        >>> from storygptv.testing import build_bpe_tokenizer
        >>> mentions = find_character_tokens("Fred's pal Barney.", ["Barney", "Fred"], build_bpe_tokenizer())
        >>> [(m.name, m.token_index) for m in mentions]
        [('Fred', 1), ('Barney', 7)]
    """
    names = list(dict.fromkeys(names))
    resolved = locate_character_tokens(caption, names, tokenizer, max_length)
    kept, dropped = resolved[:max_characters], resolved[max_characters:]
    if warn:
        found = {m.name for m in resolved}
        absent = [name for name in names if name not in found]
        warn_ignored_characters(caption, absent, [m.name for m in dropped], max_characters)
    return kept


def load_character_image(image: Any, name: str = "character") -> PIL.Image.Image:
    """Turn a reference image given as a path, PIL image, array or tensor into an RGB PIL image.

    Accepted: a ``str`` / ``pathlib.Path`` to an image file, a ``PIL.Image.Image``, a ``numpy`` array
    (H, W) or (H, W, C) of ``uint8`` (0-255) or floats in [0, 1], or a ``torch.Tensor`` (C, H, W)
    with values in [0, 1].
    """
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            with PIL.Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(
                f"The reference image of {name!r} could not be read from {str(path)!r} ({error}). "
                "Pass the path of a readable image file (PNG, JPEG, ...) or a PIL image."
            ) from error
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"The reference image of {name!r} is a tensor of shape {tuple(image.shape)}; "
                "pass a (3, H, W) tensor with values in [0, 1]."
            )
        image = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(
                f"The reference image of {name!r} is an array of shape {array.shape}; "
                "pass an (H, W, 3) uint8 array."
            )
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(array).convert("RGB")
    raise TypeError(
        f"The reference image of {name!r} has type {type(image).__name__}; pass a PIL image, a file path, "
        "a (H, W, 3) uint8 numpy array or a (3, H, W) tensor in [0, 1]."
    )


def normalize_characters(
    characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None, batch_size: int
) -> list[dict[str, PIL.Image.Image]]:
    """Validate ``characters`` and return one ``{name: RGB image}`` dict per prompt.

    ``characters`` is ``None``, one dict shared by every prompt, or a list with one dict (or ``None``)
    per prompt.
    """
    if characters is None:
        return [{} for _ in range(batch_size)]
    if isinstance(characters, Mapping):
        shared = _load_mapping(characters)
        return [shared for _ in range(batch_size)]
    if isinstance(characters, list | tuple):
        if len(characters) != batch_size:
            raise ValueError(
                f"`characters` is a list of {len(characters)} dicts but there are {batch_size} prompts; "
                "pass one dict per prompt, or a single dict shared by all prompts."
            )
        return [_load_mapping(entry) if entry is not None else {} for entry in characters]
    raise TypeError(
        f"`characters` has type {type(characters).__name__}; pass a dict {{name: reference image}}, "
        "a list of such dicts (one per prompt), or None."
    )


def _load_mapping(characters: Mapping[str, Any]) -> dict[str, PIL.Image.Image]:
    if not isinstance(characters, Mapping):
        raise TypeError(
            f"Each entry of `characters` must be a dict {{name: reference image}}, got "
            f"{type(characters).__name__}."
        )
    loaded = {}
    for name, image in characters.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Character names must be non-empty strings, got {name!r} in `characters`.")
        loaded[name] = load_character_image(image, name=name)
    return loaded
