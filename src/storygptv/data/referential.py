"""Referential ("-ref") captions: character names replaced by pronouns, computed deterministically.

No "-ref" release of FlintstonesSV or PororoSV exists: Make-A-Story (arXiv 2211.13319) and StoryGPT-V
substitute pronouns when they load a story. This module implements those rules as pure functions on
a story's list of captions (plus, for FlintstonesSV, each frame's character set), so that "-ref" test
sets can be regenerated exactly and the rules can be unit-tested. The functions return the new
captions and one ``ref_flag`` per frame (``True`` when the frame's names were replaced by a pronoun).

FlintstonesSV (character sets from the annotations, lower-case names):

- The anchor is frame 1's character set. For each later frame whose set equals the anchor:

  * 2 characters: ``"A and B"`` or ``"B and A"`` becomes ``They``;
  * 3 characters: ``"A, B and C"`` becomes ``They``;
  * 1 character: the name becomes ``She`` or ``He`` (every occurrence);
  * the anchor stays. Otherwise the anchor becomes this frame's set and nothing is replaced.

- Our default (``compat=None``) fixes the public code's issues: the gender of single characters is
  honoured (the public stage-2 loader and Make-A-Story compare a list with a string, so every single
  character became "He"); sets are compared as sets; the 3-character pattern matches in any order
  (and with an Oxford comma); empty sets never replace anything; names match as whole words with
  each word capitalised ("Mr Slate", also "Mr. Slate"); the pronoun is capitalised only at the start
  of a sentence, and a possessive ("Fred's") becomes "His" / "Her" / "Their". A single character
  whose gender is unknown (not in the gender lists) is left as it is. Subject and object forms are
  not distinguished ("he", never "him").
- ``compat="make-a-story"`` reproduces Make-A-Story: ordered-list comparison, ``str.capitalize()``
  name forms ("Mr slate"), plain substring replacement, every single character "He", and the
  3-character pattern in anchor order only. ``compat="storygptv"`` is the same but compares sorted
  lists (StoryGPT-V's stage-2 loader). In both compat modes an empty set, which makes the public code
  index an empty list, simply replaces nothing.
- Sets of 4 or more characters are never replaced (in every mode).
- ``ref_flag`` is ``True`` when the frame matched the anchor, a replacement happened and none of the
  set's names remains in the caption.

PororoSV (string heuristics, no character sets):

- The main name of a caption is found by substring search over the 18 names (the 9 names,
  capitalised then lower-case, in :data:`PORORO_NAMES` order); the **list order wins**, not the text
  order, and a caption of several sentences is searched in its last sentence only.
- Frame 1: the anchor is its main name (or none); the reference caption is frame 1's caption.
- Later frames: (1) *They*: take the common character prefix of the caption and the reference
  caption; if it starts with at least 2 name-like words (a name, or a word containing a comma or
  "and"), that run of words becomes ``They``. (2) *She/He*: if the (updated) caption's main name
  equals the anchor, every occurrence becomes ``She`` (Petty, Loopy) or ``He`` (everyone else),
  ``ref_flag`` is set and the reference caption becomes this frame's caption. (3) Otherwise the
  anchor becomes the new main name (possibly none).
- Our default replaces whole words only, keeps only complete words in the *They* run and drops
  trailing connectors from it ("Pororo and" is not a run of two names), applies the same pronoun
  casing / possessive rules as FlintstonesSV, replaces every occurrence of the run (as
  StoryGPT-V's evaluation loader does) and compares the main name with the anchor ignoring case
  ("loopy" continues "Loopy"). ``compat="storygptv"`` replaces only the first occurrence of
  the run, as its stage-2 loader does, with raw substring replacement. ``compat="make-a-story"`` has
  no *They* step at all (it is StoryGPT-V's addition). ``ref_flag`` is set by *They* and *She/He*
  replacements in the default mode, by *She/He* only in the compat modes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "COMPAT_MODES",
    "FLINTSTONES_FEMALE",
    "FLINTSTONES_MALE",
    "PORORO_CHARACTERS",
    "PORORO_FEMALE",
    "PORORO_MALE",
    "PORORO_NAMES",
    "flintstones_referential",
    "normalize_compat",
    "pororo_main_name",
    "pororo_referential",
]

#: Accepted values of ``compat`` (``None`` is our fixed default).
COMPAT_MODES: tuple[str, ...] = ("make-a-story", "storygptv")

FLINTSTONES_FEMALE: tuple[str, ...] = ("wilma", "betty", "pebbles")
FLINTSTONES_MALE: tuple[str, ...] = ("fred", "barney", "mr slate", "dino")

#: The 9 PororoSV characters (also the label order of the release's ``labels.npy``).
PORORO_CHARACTERS: tuple[str, ...] = (
    "Pororo",
    "Loopy",
    "Crong",
    "Eddy",
    "Poby",
    "Petty",
    "Tongtong",
    "Rody",
    "Harry",
)
PORORO_FEMALE: tuple[str, ...] = ("Petty", "Loopy")
PORORO_MALE: tuple[str, ...] = tuple(n for n in PORORO_CHARACTERS if n not in PORORO_FEMALE)
#: The 18 searched names, in search-priority order: capitalised, then lower-case.
PORORO_NAMES: tuple[str, ...] = PORORO_CHARACTERS + tuple(n.lower() for n in PORORO_CHARACTERS)

_SENTENCE_END = re.compile(r"[.!?]\s*$")


def normalize_compat(compat: str | None) -> str | None:
    """Validate a ``compat`` value and return its canonical spelling (``None`` for our default)."""
    if compat is None:
        return None
    key = str(compat).strip().lower().replace("_", "-")
    aliases = {"make-a-story": "make-a-story", "makeastory": "make-a-story", "storygptv": "storygptv"}
    aliases["storygpt-v"] = "storygptv"
    if key not in aliases:
        raise ValueError(
            f"Unknown referential compat mode {compat!r}; valid values: None, {list(COMPAT_MODES)}."
        )
    return aliases[key]


# ----------------------------------------------------------------------------------------------
# Shared helpers of the default (fixed) mode
# ----------------------------------------------------------------------------------------------


def _at_sentence_start(text: str, index: int) -> bool:
    before = text[:index].rstrip()
    return not before or bool(_SENTENCE_END.search(before)) or before.endswith(('"', "("))


def _word_pattern(name: str, *, ignore_case: bool = False) -> str:
    """Regex body for a (multi-word) name: words title-cased, "Mr" may carry a dot."""
    parts = []
    for word in name.split():
        if ignore_case:
            body = re.escape(word)
        else:
            body = re.escape(word[:1].upper() + word[1:])
        if word.lower() in ("mr", "mrs", "ms", "dr"):
            body += r"\.?"
        parts.append(body)
    return r"\s+".join(parts)


def _pronoun_sub(text: str, pattern: str, pronoun: str, possessive: str, flags: int = 0) -> tuple[str, int]:
    """Replace whole-word matches of ``pattern`` (and a trailing possessive) by a cased pronoun."""
    regex = re.compile(rf"(?<!\w){pattern}(?P<poss>['’]s\b)?(?!\w)", flags)
    out: list[str] = []
    last = 0
    count = 0
    for match in regex.finditer(text):
        word = possessive if match.group("poss") else pronoun
        if not _at_sentence_start(text, match.start()):
            word = word.lower()
        out.append(text[last : match.start()])
        out.append(word)
        last = match.end()
        count += 1
    out.append(text[last:])
    return "".join(out), count


def _names_remain(text: str, names: Iterable[str]) -> bool:
    for name in names:
        if re.search(rf"(?<!\w){_word_pattern(name, ignore_case=True)}(?!\w)", text, re.IGNORECASE):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# FlintstonesSV
# ----------------------------------------------------------------------------------------------


def _flintstones_gender(name: str) -> str | None:
    key = " ".join(name.lower().replace(".", "").split())
    if key in FLINTSTONES_FEMALE:
        return "She"
    if key in FLINTSTONES_MALE:
        return "He"
    return None


def _join_names_pattern(names: Sequence[str]) -> str:
    """Regex for "A and B" or "A, B and C" (optional Oxford comma) with whole words."""
    bodies = [_word_pattern(n) for n in names]
    if len(bodies) == 2:
        return rf"{bodies[0]}\s+and\s+{bodies[1]}"
    head = r",\s*".join(bodies[:-1])
    return rf"{head},?\s+and\s+{bodies[-1]}"


def _flintstones_fixed(caption: str, chars: list[str]) -> tuple[str, bool]:
    if len(chars) == 1:
        pronoun = _flintstones_gender(chars[0])
        if pronoun is None:
            return caption, False
        possessive = "Her" if pronoun == "She" else "His"
        new, count = _pronoun_sub(caption, _word_pattern(chars[0]), pronoun, possessive)
        return new, count > 0
    if len(chars) in (2, 3):
        from itertools import permutations

        total = 0
        new = caption
        for order in permutations(chars):
            new, count = _pronoun_sub(new, _join_names_pattern(order), "They", "Their")
            total += count
        return new, total > 0
    return caption, False


def _flintstones_compat(caption: str, anchor: list[str]) -> tuple[str, bool]:
    names = [n.capitalize() for n in anchor]
    new = caption
    if len(names) == 1:
        new = caption.replace(names[0], "He")  # the public code's gender test is always false
    elif len(names) == 2:
        new = caption.replace(f"{names[0]} and {names[1]}", "They").replace(
            f"{names[1]} and {names[0]}", "They"
        )
    elif len(names) == 3:
        new = caption.replace(f"{names[0]}, {names[1]} and {names[2]}", "They")
    return new, new != caption


def flintstones_referential(
    captions: Sequence[str],
    character_sets: Sequence[Sequence[str]],
    compat: str | None = None,
) -> tuple[list[str], list[bool]]:
    """Referential captions of one FlintstonesSV story.

    Args:
        captions: the frames' original captions.
        character_sets: per frame, the character names of the annotations (``entityLabel``); case is
            ignored, order matters only for ``compat="make-a-story"`` and the compat 3-character
            pattern.
        compat: ``None`` (our fixed rules), ``"make-a-story"`` or ``"storygptv"``; see the module
            docstring.

    Returns:
        ``(referential_captions, ref_flags)``, one entry per frame.

    Example:
        >>> flintstones_referential(["Wilma is here.", "Wilma waves."], [["wilma"], ["wilma"]])
        (['Wilma is here.', 'She waves.'], [False, True])
    """
    if len(captions) != len(character_sets):
        raise ValueError(
            f"Got {len(captions)} captions but {len(character_sets)} character sets; pass one set per frame."
        )
    compat = normalize_compat(compat)
    sets = [[" ".join(str(c).strip().lower().split()) for c in chars] for chars in character_sets]
    out = [captions[0]] if captions else []
    flags = [False] if captions else []
    anchor: list[str] = sets[0] if sets else []
    for caption, chars in zip(captions[1:], sets[1:]):
        if compat == "make-a-story":
            same = chars == anchor
        elif compat == "storygptv":
            same = sorted(chars) == sorted(anchor)
        else:
            same = set(chars) == set(anchor)
        if not same:
            anchor = chars
            out.append(caption)
            flags.append(False)
            continue
        if not chars:
            out.append(caption)
            flags.append(False)
            continue
        if compat is None:
            unique = list(dict.fromkeys(chars))
            new, replaced = _flintstones_fixed(caption, unique)
        else:
            new, replaced = _flintstones_compat(caption, anchor)
        out.append(new)
        flags.append(bool(replaced) and not _names_remain(new, chars))
    return out, flags


# ----------------------------------------------------------------------------------------------
# PororoSV
# ----------------------------------------------------------------------------------------------


def _last_sentence(caption: str) -> str:
    parts = [p for p in re.split(r"(?<=[.!?])\s+", caption.strip()) if p.strip()]
    return parts[-1] if parts else caption


def pororo_main_name(caption: str, names: Sequence[str] = PORORO_NAMES) -> str | None:
    """The main character name of a PororoSV caption (substring search, list order wins).

    A caption of several sentences is searched in its last sentence only.

    Example:
        >>> pororo_main_name("Crong and Pororo play.")
        'Pororo'
    """
    text = _last_sentence(caption)
    for name in names:
        if name in text:
            return name
    return None


def _pororo_gender(name: str) -> str:
    return "She" if name.capitalize() in PORORO_FEMALE else "He"


def _is_name_like(word: str) -> bool:
    bare = word.strip(".,;:!?\"'()")
    return bare in PORORO_NAMES or "," in word or "and" in word


def _they_run(prefix: str, fixed: bool) -> str | None:
    """The leading run of name-like words of ``prefix`` when it has at least 2 of them."""
    if fixed:
        # Only words that are complete inside the common prefix (followed by whitespace).
        words = prefix.split()
        if words and not prefix[-1:].isspace():
            words = words[:-1]
    else:
        words = prefix.split()
    run: list[str] = []
    for word in words:
        if not _is_name_like(word):
            break
        run.append(word)
    if fixed:
        # Drop trailing connectors ("and", "Pororo,"): the run must end on a name.
        while run and run[-1].strip(".,;:!?\"'()") not in PORORO_NAMES:
            run.pop()
        if len(run) >= 2:
            run[-1] = run[-1].rstrip(",;:")
    if len(run) < 2:
        return None
    # Re-extract the exact substring (keeps the original spacing).
    pattern = r"\s+".join(re.escape(w) for w in run)
    match = re.match(rf"\s*({pattern})", prefix)
    return match.group(1) if match else None


def pororo_referential(
    captions: Sequence[str],
    compat: str | None = None,
    names: Sequence[str] = PORORO_NAMES,
) -> tuple[list[str], list[bool]]:
    """Referential captions of one PororoSV story (string heuristics, see the module docstring).

    Args:
        captions: the frames' original captions (one chosen caption per frame).
        compat: ``None`` (ours), ``"storygptv"`` or ``"make-a-story"``.
        names: the searched names in priority order (default :data:`PORORO_NAMES`).

    Returns:
        ``(referential_captions, ref_flags)``, one entry per frame.

    Example:
        >>> pororo_referential(["Pororo is skiing.", "Pororo falls down."])
        (['Pororo is skiing.', 'He falls down.'], [False, True])
    """
    compat = normalize_compat(compat)
    fixed = compat is None
    if not captions:
        return [], []
    out = [captions[0]]
    flags = [False]
    anchor = pororo_main_name(captions[0], names)
    reference = captions[0]
    for caption in captions[1:]:
        text = caption
        flag = False
        # 1. They (StoryGPT-V only).
        if compat != "make-a-story":
            prefix = os.path.commonprefix([reference, text])
            run = _they_run(prefix, fixed)
            if run is not None:
                if fixed:
                    text, count = _pronoun_sub(text, re.escape(run), "They", "Their")
                    flag = count > 0
                else:
                    text = text.replace(run, "They", 1)
        # 2. She / He.
        main = pororo_main_name(text, names)
        if fixed:
            same = main is not None and anchor is not None and main.lower() == anchor.lower()
        else:
            same = main is not None and main == anchor
        if same:
            assert main is not None
            pronoun = _pororo_gender(main)
            if fixed:
                possessive = "Her" if pronoun == "She" else "His"
                text, _ = _pronoun_sub(text, re.escape(main.capitalize()), pronoun, possessive, re.IGNORECASE)
            else:
                text = text.replace(main, pronoun)
            flag = True
            reference = caption
        else:
            # 3. New anchor.
            anchor = main
        out.append(text)
        flags.append(flag)
    return out, flags
