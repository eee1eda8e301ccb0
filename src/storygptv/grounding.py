"""Grounded captions: a referential caption with the characters and setting it leaves open put back in.

A story caption such as "They are jumping." leaves its cast to the story context, and "Bo is waving." its
setting. Once a model has resolved them (the story model's grounding head, or the dataset's labels), these
functions write them back into the caption, so that Char-LDM can fuse each resolved character's reference
image at its name, exactly as for a caption that named it:

    >>> ground_caption("They are jumping.", ["Ava", "Bo"], setting="forest", settings=["forest", "lake"])
    'Ava and Bo are jumping in the forest.'

Rules (the inverse of the referential rules of :mod:`storygptv.data.referential`):

- Only what the caption leaves open is filled in: names the caption states stay as written, and a caption
  that names a known setting keeps it (explicit text wins over context).
- Subject pronouns (he, she, they) become the names, possessives (his, her, their) become ``"<names>'s"``;
  words are matched whole and ignoring case. A singular pronoun takes the first (most probable) character
  the caption does not name; a plural one the characters it does not name, or the whole set when fewer than
  two are left (see :func:`restore_characters`), joined as ``A``, ``A and B``, ``A, B and C``. A plural
  pronoun resolved to one character makes the verb after it singular ("are" -> "is", "were" -> "was",
  "have" -> "has").
- A caption without such pronouns keeps its characters; one with no open character (nothing left to
  resolve) is unchanged.
- The setting is added as ``" in the <setting>"`` before the final punctuation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .characters import find_character_mentions

__all__ = [
    "PLURAL_PRONOUNS",
    "POSSESSIVE_PRONOUNS",
    "SUBJECT_PRONOUNS",
    "ground_caption",
    "join_names",
    "named_setting",
    "restore_characters",
    "with_setting",
]

SUBJECT_PRONOUNS: tuple[str, ...] = ("he", "she", "they")
POSSESSIVE_PRONOUNS: tuple[str, ...] = ("his", "her", "their")
PLURAL_PRONOUNS: tuple[str, ...] = ("they", "their")
_PRONOUN = re.compile(r"(?<![\w'])(he|she|they|his|her|their)(?![\w'])", flags=re.IGNORECASE)
_SINGULAR_VERB = {"are": "is", "were": "was", "have": "has"}
_VERB_AFTER = re.compile(r"(\s+)(are|were|have)(?!\w)", flags=re.IGNORECASE)


def join_names(names: Sequence[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B and C"``.

    >>> join_names(["Ava", "Bo", "Cleo"])
    'Ava, Bo and Cleo'
    """
    names = list(names)
    if not names:
        raise ValueError("`names` is empty; there is nothing to join.")
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def restore_characters(caption: str, characters: Sequence[str]) -> str:
    """``caption`` with its pronouns replaced by the resolved ``characters``.

    A singular pronoun takes the first character that the caption does not already name (it is left as it is
    when there is none). A plural pronoun takes the characters the caption does not name when there are at
    least two of them, else the whole resolved set ("They argue about Fred's car." with Fred and Barney is
    "Fred and Barney argue about Fred's car.", as the referential rules wrote it).

    Args:
        caption: a caption, possibly referential ("She is laughing.").
        characters: the characters the frame shows, most probable first (e.g. the grounding head's output).

    >>> restore_characters("She waves at Bo.", ["Bo", "Cleo"])
    'Cleo waves at Bo.'
    >>> restore_characters("They are sitting. Their day is long.", ["Ava"])
    "Ava is sitting. Ava's day is long."
    """
    characters = list(dict.fromkeys(characters))
    open_characters = [name for name in characters if not find_character_mentions(caption, [name])]
    plural = open_characters if len(open_characters) >= 2 or len(characters) < 2 else characters
    pieces: list[str] = []
    cursor = 0
    for match in _PRONOUN.finditer(caption):
        word = match.group(1).lower()
        names = plural if word in PLURAL_PRONOUNS else open_characters[:1]
        if not names:
            continue
        pieces.append(caption[cursor : match.start()])
        pieces.append(join_names(names) + ("'s" if word in POSSESSIVE_PRONOUNS else ""))
        cursor = match.end()
        if word == "they" and len(names) == 1:
            verb = _VERB_AFTER.match(caption, cursor)
            if verb is not None:
                singular = _SINGULAR_VERB[verb.group(2).lower()]
                if verb.group(2)[0].isupper():
                    singular = singular.capitalize()
                pieces.append(verb.group(1) + singular)
                cursor = verb.end()
    pieces.append(caption[cursor:])
    return "".join(pieces)


def named_setting(caption: str, settings: Iterable[str]) -> str | None:
    """The first of ``settings`` that ``caption`` names (whole words, ignoring case), or None.

    >>> named_setting("Bo is waving in the lake.", ["forest", "lake"])
    'lake'
    """
    mentions = find_character_mentions(caption, settings)
    return mentions[0].name if mentions else None


def with_setting(caption: str, setting: str) -> str:
    """``caption`` with ``" in the <setting>"`` before its final punctuation, unless it already names it.

    >>> with_setting("Bo and Ava are waving.", "lake")
    'Bo and Ava are waving in the lake.'
    >>> with_setting("Bo is talking in the lake.", "lake")
    'Bo is talking in the lake.'
    """
    setting = setting.strip().lower()
    if not setting or named_setting(caption, [setting]) is not None:
        return caption
    body = caption.rstrip()
    end = body[-1] if body and body[-1] in ".!?" else ""
    return f"{body[: len(body) - len(end)]} in the {setting}{end or '.'}"


def ground_caption(
    caption: str,
    characters: Sequence[str] = (),
    setting: str | None = None,
    settings: Iterable[str] | None = None,
) -> str:
    """Fill in what ``caption`` leaves open: its pronouns (:func:`restore_characters`) and its setting.

    Args:
        caption: the frame's caption as the story gives it.
        characters: the frame's characters, most probable first.
        setting: the frame's setting, added when the caption names none of ``settings`` (or, when
            ``settings`` is None, does not name ``setting`` itself).
        settings: every setting the model knows; a caption naming any of them keeps its own.
    """
    grounded = restore_characters(caption, characters)
    if setting:
        known = list(settings) if settings is not None else [setting]
        if named_setting(grounded, known) is None:
            grounded = with_setting(grounded, setting)
    return grounded
