"""Character names: in captions, in the token sequence, in annotation labels and in cast folders.

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

Two more naming rules live here, so that every reader applies the same ones:
:func:`canonical_name` (which character a dataset's annotation label stands for) and
:func:`read_cast_folder` (a folder of reference images named after their characters). The
reference-image loaders of :mod:`storygptv.reference_images` are re-exported.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from .reference_images import MAX_REFERENCE_PIXELS, load_character_image, normalize_characters

__all__ = [
    "CAST_IMAGE_SUFFIXES",
    "MAX_REFERENCE_PIXELS",
    "CharacterMention",
    "canonical_name",
    "cast_file_stem",
    "find_character_mentions",
    "find_character_tokens",
    "load_cast",
    "load_character_image",
    "locate_character_tokens",
    "normalize_characters",
    "read_cast_folder",
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


# ------------------------------------------------------------------------------------------- labels


def _name_key(text: str) -> str:
    """What two spellings of a name share: lower case, no possessive, dots and underscores as spaces."""
    key = re.sub(r"['’]s$", "", str(text).strip().lower())
    return " ".join(key.replace(".", " ").replace("_", " ").split())


def canonical_name(label: str, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The name of ``names`` that an annotation label stands for, or ``None`` (another person, a word).

    A label stands for a name when both have the same key: lower case, a trailing possessive ("'s" or
    "’s") dropped, dots and underscores read as spaces, runs of spaces folded. So "fred's",
    "Mr. Slate" and "mr_slate" stand for "Fred" and "Mr Slate". ``aliases`` maps further keys to names
    (``{"slate": "Mr Slate"}``). This compares whole labels; to find names inside a caption, use
    :func:`find_character_mentions`.

    Example:
        >>> canonical_name("Mr. Slate's", ["Fred", "Mr Slate"]), canonical_name("woman", ["Fred"])
        ('Mr Slate', None)
        >>> canonical_name("slate", ["Fred", "Mr Slate"], aliases={"slate": "Mr Slate"})
        'Mr Slate'
    """
    key = _name_key(label)
    for name in names:
        if _name_key(name) == key:
            return name
    return (aliases or {}).get(key)


# ------------------------------------------------------------------------------------------- cast folders

#: Suffixes of the reference images in a cast folder (compared ignoring case).
CAST_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cast_file_stem(name: str) -> str:
    """The file name (without suffix) of ``name``'s reference image in a cast folder: spaces become underscores.

    Example:
        >>> cast_file_stem("Mr Slate")
        'Mr_Slate'
    """
    return "_".join(name.split())


def read_cast_folder(folder: str | Path) -> dict[str, Path]:
    """``{character name: image path}`` of the reference images in a cast folder, in file-name order.

    The rule wherever a folder of reference images is read (the CLI's ``--characters``, a pipeline's
    ``characters/`` folder, training references): the file name is the character name, and underscores
    stand for spaces, so ``Mr_Slate.png`` is "Mr Slate" (the inverse of :func:`cast_file_stem`). Images
    are the files whose suffix is in :data:`CAST_IMAGE_SUFFIXES`; hidden files and other files are
    ignored. The images are not opened (see :func:`load_character_image`).

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
        ValueError: the folder holds no image, or two images name the same character.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for file in ("Fred.png", "Mr_Slate.JPG", "notes.txt"):
        ...     _ = (folder / file).write_bytes(b"")
        >>> {name: path.name for name, path in read_cast_folder(folder).items()}
        {'Fred': 'Fred.png', 'Mr Slate': 'Mr_Slate.JPG'}
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{str(folder)!r} is not a folder; pass a folder of reference images named after their "
            "characters (Fred.png, Mr_Slate.png)."
        )
    cast: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in CAST_IMAGE_SUFFIXES or not path.is_file():
            continue
        name = " ".join(path.stem.replace("_", " ").split())
        if name in cast:
            raise ValueError(
                f"{str(folder)!r} holds two images of {name!r} ({cast[name].name} and {path.name}); keep one."
            )
        cast[name] = path
    if not cast:
        raise ValueError(
            f"{str(folder)!r} holds no image ({', '.join(CAST_IMAGE_SUFFIXES)}); name each reference image "
            "after its character, e.g. Fred.png or Mr_Slate.png."
        )
    return cast


def load_cast(pretrained_model_name_or_path: str | Path, **hub_kwargs: Any) -> dict[str, PIL.Image.Image]:
    """``{name: RGB image}`` of the reference images a pipeline ships in its ``characters/`` folder.

    ``pretrained_model_name_or_path`` is a pipeline folder or a Hub repo id (only ``characters/*`` is
    downloaded; ``hub_kwargs`` such as ``revision``, ``token``, ``cache_dir`` or ``local_files_only`` go to
    ``huggingface_hub.snapshot_download``, which also serves a repo from the local cache when offline).

    Example:
        >>> import storygptv
        >>> sorted(load_cast(storygptv.DEFAULT_MODEL))[:3]
        ['Ava', 'Bo', 'Cleo']
    """
    folder = Path(pretrained_model_name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                str(pretrained_model_name_or_path), allow_patterns=["characters/*"], **hub_kwargs
            )
        )
    cast = folder / "characters"
    if not cast.is_dir():
        raise FileNotFoundError(
            f"{str(pretrained_model_name_or_path)!r} ships no characters/ folder of reference images; pass your own "
            "`characters={name: image}`."
        )
    return {name: load_character_image(path, name) for name, path in read_cast_folder(cast).items()}
