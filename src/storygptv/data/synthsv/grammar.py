"""The SynthSV caption grammar read back: parse a caption, and check that its references make sense.

Captions are written by :func:`~storygptv.data.synthsv.spec.make_caption` and, for pronouns, by
:func:`~storygptv.data.synthsv.sampling.referential_captions`::

    caption  := subject " " verb " " action [" in the " background] "."
    subject  := NAME | NAME " and " NAME | NAME ", " NAME " and " NAME | "He" | "She" | "They"
              | NAME ", " NAME ", " NAME " and " NAME      (the four-character variant)
    verb     := "is" (one name, "He", "She") | "are" (several names, "They")

with distinct names from :data:`~storygptv.data.synthsv.spec.CHARACTERS`, ``action`` one of
:data:`~storygptv.data.synthsv.spec.ACTIONS` and ``background`` one of
:data:`~storygptv.data.synthsv.spec.BACKGROUNDS`. :func:`parse_caption` accepts exactly the strings this
grammar produces (so ``parse_caption(make_caption(...))`` always succeeds), and :func:`check_reference` tells
whether a parsed caption's subject refers to characters the story can mean: a pronoun must match the
previous frame's characters ("He" / "She": one character of that pronoun; "They": several), and names must
be known characters.

Example:
    >>> parse_caption("Ava and Bo are jumping in the forest.")
    ParsedCaption(subject='Ava and Bo', characters=('Ava', 'Bo'), pronoun=None, action='jumping', background='forest')
    >>> parse_caption("They is jumping.") is None  # "They" takes "are"
    True
    >>> check_reference(parse_caption("She is waving."), previous=("Ava",))
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import permutations

from .spec import ACTIONS, BACKGROUNDS, CHARACTERS, PRONOUNS, join_names

__all__ = [
    "PAST_TENSE",
    "ParsedCaption",
    "caption_prefix_validator",
    "check_reference",
    "parse_caption",
    "story_prose",
]

#: How :func:`story_prose` tells each action.
PAST_TENSE: dict[str, str] = {
    "standing": "stood",
    "jumping": "jumped",
    "sitting": "sat down",
    "talking": "talked",
    "laughing": "laughed",
    "waving": "waved",
}

_NAME = "|".join(CHARACTERS)
_CAPTION = re.compile(
    rf"^(?P<subject>(?:{_NAME})(?:, (?:{_NAME})){{0,2}}(?: and (?:{_NAME}))?|He|She|They) "
    rf"(?P<verb>is|are) (?P<action>{'|'.join(ACTIONS)})(?: in the (?P<background>{'|'.join(BACKGROUNDS)}))?\.$"
)


@dataclass(frozen=True)
class ParsedCaption:
    """A caption of the SynthSV grammar, taken apart.

    Attributes:
        subject: the subject as written (``"Ava and Bo"``, ``"She"``).
        characters: the names of the subject, in order (empty for a pronoun).
        pronoun: ``"he"``, ``"she"`` or ``"they"`` when the subject is a pronoun, else None.
        action: one of :data:`~storygptv.data.synthsv.spec.ACTIONS`.
        background: the background named, or None.
    """

    subject: str
    characters: tuple[str, ...]
    pronoun: str | None
    action: str
    background: str | None


def parse_caption(caption: str) -> ParsedCaption | None:
    """Parse ``caption`` with the SynthSV grammar (module doc); None when it is not a sentence of it.

    Surrounding whitespace is ignored; anything else must match exactly (case, punctuation, the verb's
    agreement with the subject, distinct names).

    Example:
        >>> parse_caption("Cleo, Dax and Eli are sitting.").characters
        ('Cleo', 'Dax', 'Eli')
        >>> parse_caption("Ava, Bo are sitting.") is None  # a list of three needs "and"
        True
    """
    if not isinstance(caption, str):
        raise TypeError(f"`caption` must be a string, got {type(caption).__name__}.")
    match = _CAPTION.match(caption.strip())
    if match is None:
        return None
    subject = match["subject"]
    if subject in ("He", "She", "They"):
        names: tuple[str, ...] = ()
        pronoun: str | None = subject.lower()
        plural = subject == "They"
    else:
        names = tuple(re.split(r", | and ", subject))
        if "," in subject and " and " not in subject:  # "A, B" or "A, B, C" without "and"
            return None
        if len(set(names)) != len(names):
            return None
        pronoun, plural = None, len(names) > 1
    if match["verb"] != ("are" if plural else "is"):
        return None
    return ParsedCaption(subject, names, pronoun, match["action"], match["background"])


def caption_prefix_validator(names: Iterable[str] = CHARACTERS) -> Callable[[str], bool]:
    """A test of whether a text can still become a caption of the grammar (module doc) naming only ``names``.

    ``validator(text)`` is True when ``text`` (leading white space ignored) is a caption or the start of one, so
    a decoder can keep a model inside the grammar token by token: ``continue_story(...,
    caption_constraint=caption_prefix_validator(cast))``. Subjects are one to three distinct ``names`` or a
    pronoun, with the verb that agrees.

    Example:
        >>> valid = caption_prefix_validator(["Ava", "Bo"])
        >>> valid("Ava and B"), valid("Ava and Bo are jump"), valid("Ava and Bo is"), valid("Ava and Ava")
        (True, True, False, False)
        >>> valid("Cleo"), valid("They are waving in the lake."), valid("They are waving in the lake. And")
        (False, True, False)
    """
    wanted = list(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in CHARACTERS]
    if unknown:
        raise ValueError(
            f"`names` {unknown} are not SynthSV characters; the grammar's names are {list(CHARACTERS)}."
        )
    names = [name for name in CHARACTERS if name in wanted]
    heads = [f"{pronoun} is " for pronoun in ("He", "She")] + ["They are "]
    for count in (1, 2, 3):
        heads += [
            f"{join_names(list(group))} {'is' if count == 1 else 'are'} "
            for group in permutations(names, count)
        ]
    actions = list(ACTIONS)
    endings = ["."] + [f" in the {background}." for background in BACKGROUNDS]

    def valid(text: str) -> bool:
        text = text.lstrip()
        for head in heads:
            if head.startswith(text):
                return True
            if not text.startswith(head):
                continue
            rest = text[len(head) :]
            for action in actions:
                if action.startswith(rest):
                    return True
                if rest.startswith(action) and any(e.startswith(rest[len(action) :]) for e in endings):
                    return True
        return False

    return valid


def check_reference(
    parsed: ParsedCaption, previous: Sequence[str], known: Iterable[str] = CHARACTERS
) -> bool:
    """Whether the subject of ``parsed`` refers to characters the story can mean.

    Args:
        parsed: a caption parsed with :func:`parse_caption`.
        previous: the characters of the previous frame (what a pronoun refers to).
        known: the characters names may come from (default: SynthSV's eight).

    Returns:
        For a pronoun: "They" needs several previous characters; "He" / "She" exactly one, whose pronoun it
        is. For names: every name is in ``known``.

    Example:
        >>> check_reference(parse_caption("He is jumping."), previous=("Ava",))  # Ava is "she"
        False
        >>> check_reference(parse_caption("They are jumping."), previous=("Ava", "Bo"))
        True
    """
    if parsed.pronoun is None:
        known = set(known)
        return all(name in known for name in parsed.characters)
    if parsed.pronoun == "they":
        return len(previous) > 1
    return len(previous) == 1 and PRONOUNS.get(previous[0]) == parsed.pronoun


def story_prose(captions: Sequence[str]) -> str:
    """A SynthSV story told as prose (past tense, one sentence per frame): the input of
    :class:`~storygptv.director.StoryDirector` in tests and benchmarks.

    Example:
        >>> story_prose(["Ava and Bo are standing in the forest.", "They are jumping.", "Bo is sitting."])
        'Ava and Bo stood in the forest. They jumped. Bo sat down.'
    """
    sentences = []
    for caption in captions:
        parsed = parse_caption(caption)
        if parsed is None:
            raise ValueError(f"{caption!r} is not a SynthSV caption (see `parse_caption`).")
        subject = join_names(parsed.characters) if parsed.pronoun is None else parsed.subject
        place = f" in the {parsed.background}" if parsed.background else ""
        sentences.append(f"{subject} {PAST_TENSE[parsed.action]}{place}.")
    return " ".join(sentences)
