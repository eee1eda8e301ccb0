"""Your own stories as a folder: the frame images, a ``metadata.jsonl`` and a cast of reference images.

The layout follows the ``metadata.jsonl`` convention of the ``datasets`` ImageFolder (one JSON object per
image, ``file_name`` relative to the folder), with one object per **frame** and a few fields that make
frames into stories::

    my_stories/
        metadata.jsonl          one JSON object per frame (the fields below), UTF-8, one per line
        characters/Nia.png      one reference image per character: the file name is the character's name,
        characters/Mr_Slate.png underscores stand for spaces ("Mr Slate"); .png, .jpg, .jpeg, .webp, .bmp
        splits.json             optional: {"train": [story ids], "validation": [...], "test": [...]}
        frames/..., masks/...   the frame images (and label maps), in any sub-folders

Fields of a ``metadata.jsonl`` line (any other field is an error):

======================= ======== ======================================================================
field                   required value
======================= ======== ======================================================================
``file_name``           yes      the frame image, a path relative to the folder ("frames/picnic/0.png")
``story_id``            yes      the story the frame belongs to (a string or an integer)
``frame``               yes      the frame's position in its story (an integer; frames are ordered by
                                 it, gaps are allowed, a repeat within a story is an error)
``caption``             yes      the caption, naming its characters ("Nia and Rex are waving.")
``characters``          yes      the names of the characters shown (``[]`` for none); each needs a
                                 reference image in ``characters/`` (names are compared ignoring case)
``boxes``               no       one ``[x1, y1, x2, y2]`` box per character, in pixels of the frame
                                 (``null`` or ``[]`` for a character without a box); clipped to the frame
``mask``                no       a label map (relative path of a single-channel image, e.g. an "L" PNG):
                                 value ``i + 1`` where character ``i`` of ``characters`` is, 0 elsewhere
``background``          no       the frame's setting ("beach"); also a label of the grounding head
``referential_caption`` no       the caption as the story tells it, with pronouns ("They are waving."):
                                 the story model learns from it to resolve pronouns
======================= ======== ======================================================================

Rules the loader applies:

- Stories keep the order of ``splits.json`` (else of their first line in ``metadata.jsonl``); without
  ``splits.json`` every story is in ``"train"``. A story that ``splits.json`` does not list is not loaded
  (with a warning). ``"val"`` / ``"valid"`` are read as ``"validation"``.
- ``frames_per_story``: ``None`` keeps whole stories; a number keeps the first frames of longer stories.
- Masks: a frame's ``mask`` when given (resized with nearest neighbours to the frame); else its boxes
  filled in (refined with Segment Anything when ``sam_model`` is given); else empty. A frame with a
  mask but no ``boxes`` gets the boxes of its mask. Stage 1 cuts each character's reference crop from
  its own frame, so a character needs a box or a mask there to be fused (else its frame trains on the
  caption alone); stage 2 fuses the images of ``characters/``.
- ``character_labels``: multi-hot over the cast in file-name order of ``characters/``;
  ``background_labels``: one-hot over the sorted settings of the whole folder (``[]`` when no frame
  names one).
- Referential captions (:func:`folder_referential`, when a frame has no ``referential_caption``): the
  FlintstonesSV rules of :mod:`storygptv.data.referential` with unknown genders. A later frame whose
  character set equals the set of the frame before it (the anchor), with 2 or 3 characters, has
  "A and B" / "A, B and C" (any order) replaced by "They" ("Their" for a possessive); a single
  character stays named, since the folder does not say "she" or "he": write ``referential_caption``
  for those frames. A given ``referential_caption`` always wins; ``is_referential`` is then set when it
  differs from ``caption``.

Bad input is refused before anything is loaded, by :func:`read_story_folder`, with a
:class:`StoryFolderError` naming the file, the line and the field: invalid JSON, an unknown or missing
field, a value of the wrong type, a frame or mask file that is missing or not an image, a character
without a reference image, the same frame position twice in a story, a ``splits.json`` naming an
unknown story.

Example:
    >>> from pathlib import Path
    >>> folder = read_story_folder(Path(__file__).parents[3] / "examples" / "my_stories")  # doctest: +SKIP
    >>> list(folder.cast), folder.split_story_ids("validation")  # doctest: +SKIP
    (['Nia', 'Rex'], ['night_walk'])
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image

from ..characters import canonical_name, cast_file_stem, read_cast_folder
from ._common import SPLITS, multi_hot, normalize_split
from ._release import FrameRecord, assemble_row, build_story_dataset, finalize_frame, fingerprint_of
from .masks import boxes_from_label_map, resize_label_map
from .referential import flintstones_referential

__all__ = [
    "CAST_DIR",
    "FIELDS",
    "METADATA_FILE",
    "REQUIRED_FIELDS",
    "SPLITS_FILE",
    "FolderFrame",
    "StoryFolder",
    "StoryFolderError",
    "folder_referential",
    "load_story_folder",
    "read_story_folder",
]

METADATA_FILE = "metadata.jsonl"
SPLITS_FILE = "splits.json"
CAST_DIR = "characters"
#: The fields every line of ``metadata.jsonl`` must have.
REQUIRED_FIELDS: tuple[str, ...] = ("file_name", "story_id", "frame", "caption", "characters")
#: Every field a line may have.
FIELDS: tuple[str, ...] = (*REQUIRED_FIELDS, "boxes", "mask", "background", "referential_caption")
#: Image modes a label map may have (single channel).
_LABEL_MODES = ("1", "L", "P", "I", "I;16")


class StoryFolderError(ValueError):
    """A story folder that cannot be read; the message names the file, the line and the field."""


@dataclass(frozen=True)
class FolderFrame:
    """One checked line of ``metadata.jsonl`` (paths are absolute, character names the cast's)."""

    line: int
    file_name: str
    path: Path
    story_id: str
    frame: int
    caption: str
    characters: tuple[str, ...]
    boxes: tuple[tuple[float, ...], ...] | None = None
    mask: Path | None = None
    background: str = ""
    referential_caption: str | None = None


@dataclass
class StoryFolder:
    """A checked story folder (:func:`read_story_folder`): its cast, stories and splits.

    Attributes:
        root: the folder.
        cast: ``{character name: reference image path}`` in file-name order (the label order).
        stories: ``{story id: frames ordered by position}`` in the order of ``metadata.jsonl``.
        splits: ``{split: story ids}`` from ``splits.json`` (``None`` without the file: all "train").
        settings: every ``background`` named in the folder, sorted (the background label order).
    """

    root: Path
    cast: dict[str, Path]
    stories: dict[str, list[FolderFrame]]
    splits: dict[str, list[str]] | None = None
    settings: list[str] = field(default_factory=list)

    def split_story_ids(self, split: str = "train") -> list[str]:
        """The story ids of ``split`` (``"val"`` is accepted), in order."""
        split = normalize_split(split)
        if self.splits is None:
            if split == "train":
                return list(self.stories)
            raise StoryFolderError(
                f"{str(self.root)!r} has no {SPLITS_FILE}, so all its stories are 'train'; add {SPLITS_FILE} "
                f'(e.g. {{"train": [...], "{split}": [...]}}) to hold out {split!r} stories.'
            )
        if split not in self.splits:
            raise StoryFolderError(
                f"{str(self.root / SPLITS_FILE)!r} has no {split!r} list (it has {sorted(self.splits)})."
            )
        return list(self.splits[split])

    def files(self) -> list[Path]:
        """Every file the folder's stories are read from (for cache keys)."""
        paths = [self.root / METADATA_FILE, self.root / SPLITS_FILE, *self.cast.values()]
        for frames in self.stories.values():
            for frame in frames:
                paths.append(frame.path)
                if frame.mask is not None:
                    paths.append(frame.mask)
        return paths


# ------------------------------------------------------------------------------------------------ reading


class _Line:
    """Error messages of one line of ``metadata.jsonl``: ``<file>:<line>: field 'x': ...``."""

    def __init__(self, path: Path, number: int) -> None:
        self.path, self.number = path, number

    def error(self, message: str, field_name: str | None = None) -> StoryFolderError:
        where = f"{self.path}:{self.number}"
        return StoryFolderError(
            f"{where}: field {field_name!r}: {message}" if field_name else f"{where}: {message}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(entry: dict[str, Any], key: str, where: _Line, *, required: bool, empty_ok: bool) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {json.dumps(value)}.", key)
    if not empty_ok and not value.strip():
        raise where.error("is empty.", key)
    return value


def _relative_file(root: Path, entry: dict[str, Any], key: str, where: _Line) -> Path:
    """``root / entry[key]`` for a relative path inside ``root`` that names an existing file."""
    name = _text(entry, key, where, required=True, empty_ok=False)
    assert name is not None
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise where.error(f"{name!r} must be a path relative to the folder, inside it.", key)
    path = root / relative
    if not path.is_file():
        raise where.error(f"no such file {str(path)!r}.", key)
    return path


def _image_header(path: Path, where: _Line, key: str) -> tuple[tuple[int, int], str]:
    """``(size, mode)`` of an image file, read from its header only."""
    try:
        with PIL.Image.open(path) as image:
            return image.size, image.mode
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise where.error(f"{str(path)!r} is not a readable image ({error}).", key) from error


def _characters(
    entry: dict[str, Any], cast: dict[str, Path], where: _Line, cast_dir: Path
) -> tuple[str, ...]:
    value = entry["characters"]
    if not isinstance(value, list) or not all(isinstance(n, str) and n.strip() for n in value):
        raise where.error(f"expected a list of names, got {json.dumps(value)}.", "characters")
    names = []
    for label in value:
        name = canonical_name(label, cast)
        if name is None:
            raise where.error(
                f"{label!r} has no reference image in {str(cast_dir)!r} (cast: {', '.join(cast)}); add "
                f"{cast_dir.name}/{cast_file_stem(label)}.png.",
                "characters",
            )
        if name in names:
            raise where.error(f"{label!r} is listed twice.", "characters")
        names.append(name)
    return tuple(names)


def _boxes(entry: dict[str, Any], count: int, where: _Line) -> tuple[tuple[float, ...], ...] | None:
    value = entry.get("boxes")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count:
        raise where.error(
            f"expected a list of {count} boxes (one [x1, y1, x2, y2] per character, null for none), got "
            f"{json.dumps(value)}.",
            "boxes",
        )
    boxes = []
    for index, box in enumerate(value):
        if box is None or box == []:
            boxes.append(())
            continue
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise where.error(
                f"box {index} must be [x1, y1, x2, y2] in pixels, got {json.dumps(box)}.", "boxes"
            )
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 <= x1 or y2 <= y1:
            raise where.error(f"box {index} {json.dumps(box)} is empty (x2 <= x1 or y2 <= y1).", "boxes")
        boxes.append((x1, y1, x2, y2))
    return tuple(boxes)


def _parse_line(text: str, root: Path, cast: dict[str, Path], where: _Line) -> FolderFrame:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise where.error(f"invalid JSON ({error.msg} at column {error.colno}).") from error
    if not isinstance(entry, dict):
        raise where.error(f"expected a JSON object (one frame), got {type(entry).__name__}.")
    unknown = [k for k in entry if k not in FIELDS]
    if unknown:
        raise where.error(f"unknown field {unknown[0]!r}; the fields are {list(FIELDS)}.")
    missing = [k for k in REQUIRED_FIELDS if k not in entry]
    if missing:
        raise where.error(f"missing field {missing[0]!r}; every line needs {list(REQUIRED_FIELDS)}.")
    path = _relative_file(root, entry, "file_name", where)
    _image_header(path, where, "file_name")
    story_id = entry["story_id"]
    if not (_is_int(story_id) or isinstance(story_id, str) and story_id.strip()):
        raise where.error(
            f"expected a non-empty string or an integer, got {json.dumps(story_id)}.", "story_id"
        )
    if not _is_int(entry["frame"]):
        raise where.error(f"expected an integer, got {json.dumps(entry['frame'])}.", "frame")
    characters = _characters(entry, cast, where, root / CAST_DIR)
    mask = None
    if entry.get("mask") is not None:
        mask = _relative_file(root, entry, "mask", where)
        _, mode = _image_header(mask, where, "mask")
        if mode not in _LABEL_MODES:
            raise where.error(
                f"{str(mask)!r} is a {mode} image; a label map has one channel (mode L or P) with value i + 1 "
                "at character i.",
                "mask",
            )
    return FolderFrame(
        line=where.number,
        file_name=str(entry["file_name"]),
        path=path,
        story_id=str(story_id),
        frame=int(entry["frame"]),
        caption=str(_text(entry, "caption", where, required=True, empty_ok=False)),
        characters=characters,
        boxes=_boxes(entry, len(characters), where),
        mask=mask,
        background=(_text(entry, "background", where, required=False, empty_ok=True) or "").strip(),
        referential_caption=_text(entry, "referential_caption", where, required=False, empty_ok=False),
    )


def _read_splits(path: Path, stories: dict[str, list[FolderFrame]]) -> dict[str, list[str]] | None:
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoryFolderError(f"{path}: invalid JSON ({error}).") from error
    if not isinstance(raw, dict):
        raise StoryFolderError(f'{path}: expected an object {{"train": [story ids], ...}}.')
    splits: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for key, ids in raw.items():
        try:
            split = normalize_split(key)
        except ValueError:
            raise StoryFolderError(f"{path}: unknown split {key!r}; the splits are {list(SPLITS)}.") from None
        if split in splits:
            raise StoryFolderError(f"{path}: split {split!r} is given twice (as {key!r}).")
        if not isinstance(ids, list) or not all(_is_int(i) or isinstance(i, str) for i in ids):
            raise StoryFolderError(f"{path}: split {key!r} must be a list of story ids.")
        splits[split] = []
        for story_id in map(str, ids):
            if story_id not in stories:
                raise StoryFolderError(f"{path}: split {key!r} names story {story_id!r}, which no frame has.")
            if story_id in seen:
                raise StoryFolderError(
                    f"{path}: story {story_id!r} is in both {seen[story_id]!r} and {split!r}."
                )
            seen[story_id] = split
            splits[split].append(story_id)
    return splits


def read_story_folder(data_dir: str | Path) -> StoryFolder:
    """Read and check a story folder (the format of this module's docstring) without decoding any image.

    Every line of ``metadata.jsonl`` is checked, every frame and mask file must exist and have a readable
    image header, every character needs a reference image; the first problem raises.

    Raises:
        StoryFolderError: a bad folder; the message names the file, the line and the field.
    """
    if data_dir is None:
        raise StoryFolderError("A story folder needs `data_dir` (--data_dir), the folder of metadata.jsonl.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise StoryFolderError(f"Story folder {str(root)!r} does not exist.")
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        raise StoryFolderError(
            f"{str(root)!r} has no {METADATA_FILE}: a story folder holds one JSON object per frame there "
            f"(fields {list(FIELDS)}); see the README section 'Fine-tune on your own stories'."
        )
    cast_dir = root / CAST_DIR
    if not cast_dir.is_dir():
        raise StoryFolderError(
            f"{str(root)!r} has no {CAST_DIR}/ folder: add one reference image per character, named after it "
            "(Nia.png, Mr_Slate.png)."
        )
    try:
        cast = read_cast_folder(cast_dir)
    except ValueError as error:
        raise StoryFolderError(str(error)) from error

    stories: dict[str, list[FolderFrame]] = {}
    positions: dict[tuple[str, int], int] = {}
    with open(metadata, encoding="utf-8") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as error:
            raise StoryFolderError(f"{metadata}: not UTF-8 text ({error}).") from error
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = _Line(metadata, number)
        frame = _parse_line(text, root, cast, where)
        key = (frame.story_id, frame.frame)
        if key in positions:
            raise where.error(
                f"story {frame.story_id!r} already has frame {frame.frame} (line {positions[key]}).", "frame"
            )
        positions[key] = number
        stories.setdefault(frame.story_id, []).append(frame)
    if not stories:
        raise StoryFolderError(f"{metadata} holds no frame.")
    for frames in stories.values():
        frames.sort(key=lambda f: f.frame)
    settings = sorted({f.background for frames in stories.values() for f in frames if f.background})
    splits = _read_splits(root / SPLITS_FILE, stories)
    return StoryFolder(root=root, cast=cast, stories=stories, splits=splits, settings=settings)


# ------------------------------------------------------------------------------------------------ loading


def folder_referential(
    captions: Sequence[str], character_sets: Sequence[Sequence[str]]
) -> tuple[list[str], list[bool]]:
    """Referential captions of one story of a folder, with unknown genders (see the module docstring).

    The FlintstonesSV fixed rules (:func:`storygptv.data.referential.flintstones_referential`) for any
    cast: a repeated set of 2 or 3 characters becomes "They"; a single character stays named.

    Example:
        >>> folder_referential(
        ...     ["Nia and Rex wave.", "Rex and Nia jump.", "Nia sits.", "Nia laughs."],
        ...     [["Nia", "Rex"], ["Rex", "Nia"], ["Nia"], ["Nia"]],
        ... )
        (['Nia and Rex wave.', 'They jump.', 'Nia sits.', 'Nia laughs.'], [False, True, False, False])
    """
    out, flags = flintstones_referential(captions, character_sets)
    for index, names in enumerate(character_sets):
        if len({n.lower() for n in names}) == 1:  # the rules' "she"/"he" needs a gender the folder lacks
            out[index], flags[index] = captions[index], False
    return out, flags


def _frame_record(
    frame: FolderFrame, metadata: Path, cast_order: Sequence[str], settings: Sequence[str]
) -> FrameRecord:
    """Decode one frame (and its mask) into a record of the common schema."""
    where = _Line(metadata, frame.line)
    key = "file_name"
    try:
        with PIL.Image.open(frame.path) as raw:
            image = raw.convert("RGB")
        label_map = None
        if frame.mask is not None:
            key = "mask"
            with PIL.Image.open(frame.mask) as raw:
                label_map = np.asarray(raw).astype(np.int64)
    except OSError as error:
        raise where.error(f"cannot decode the image ({error}).", key) from error
    boxes = [list(b) for b in frame.boxes] if frame.boxes is not None else [[] for _ in frame.characters]
    if label_map is not None:
        top = int(label_map.max(initial=0))
        if top > len(frame.characters):
            raise where.error(
                f"{str(frame.mask)!r} has label {top}, but the frame lists {len(frame.characters)} "
                "character(s) (label i + 1 marks character i).",
                "mask",
            )
        label_map = resize_label_map(label_map.astype(np.uint8), image.height, image.width)
        if frame.boxes is None:
            boxes = boxes_from_label_map(label_map, len(frame.characters))
    return FrameRecord(
        frame_id=frame.file_name,
        image=image,
        caption=frame.caption,
        characters=list(frame.characters),
        referential_set=list(frame.characters),
        boxes=boxes,
        label_map=label_map,
        character_labels=multi_hot(frame.characters, cast_order),
        background=frame.background,
        background_labels=multi_hot([frame.background], settings) if settings else [],
    )


def _referential(frames: list[FolderFrame], captions: list[str]) -> tuple[list[str], list[bool]]:
    """The story's referential captions: the given ones, the generic rule elsewhere."""
    out, flags = folder_referential(captions, [f.characters for f in frames])
    for index, frame in enumerate(frames):
        if frame.referential_caption is not None:
            out[index] = frame.referential_caption
            flags[index] = frame.referential_caption != frame.caption
    return out, flags


def load_story_folder(
    data_dir: str | Path,
    split: str = "train",
    *,
    frames_per_story: int | None = None,
    num_stories: int | None = None,
    referential: bool = True,
    sam_model: Any = None,
    sam_processor: Any = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a split of a story folder in the common story schema (one row per story).

    Args:
        data_dir: the folder (the format of this module's docstring).
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``; without ``splits.json`` every
            story is ``"train"``.
        frames_per_story: keep the first frames of longer stories (``None``: whole stories).
        num_stories: keep only the first stories of the split.
        referential: fill ``referential_captions`` (the given ones, else :func:`folder_referential`);
            otherwise they equal ``captions``.
        sam_model, sam_processor: refine box masks with Segment Anything (frames without a ``mask``).
        streaming: return an ``IterableDataset`` that reads the frames lazily.
        cache_dir: where ``datasets`` writes the Arrow cache (its default when ``None``).

    Raises:
        StoryFolderError: a bad folder (checked first by :func:`read_story_folder`), or an unknown split.
    """
    if frames_per_story is not None and int(frames_per_story) < 1:
        raise ValueError(f"frames_per_story must be >= 1 or None (whole stories), got {frames_per_story}.")
    folder = read_story_folder(data_dir)
    split = normalize_split(split)
    ids = folder.split_story_ids(split)
    if folder.splits is not None and split == "train":
        listed = {i for split_ids in folder.splits.values() for i in split_ids}
        unlisted = [i for i in folder.stories if i not in listed]
        if unlisted:
            warnings.warn(
                f"{len(unlisted)} stor{'y' if len(unlisted) == 1 else 'ies'} of {str(folder.root)!r} "
                f"({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''}) are in no split of "
                f"{SPLITS_FILE} and are not loaded.",
                stacklevel=2,
            )
    if num_stories is not None:
        ids = ids[: int(num_stories)]
    stories = [folder.stories[i][:frames_per_story] for i in ids]
    cast_order = list(folder.cast)
    metadata = folder.root / METADATA_FILE

    def generate() -> Iterator[dict[str, Any]]:
        for story_id, frames in zip(ids, stories):
            records = [_frame_record(f, metadata, cast_order, folder.settings) for f in frames]
            captions = [r.caption for r in records]
            if referential:
                ref_captions, flags = _referential(frames, captions)
            else:
                ref_captions, flags = list(captions), [False] * len(captions)
            finalised = [finalize_frame(r, sam_model, sam_processor) for r in records]
            yield assemble_row(story_id, finalised, records, ref_captions, flags)

    fingerprint = fingerprint_of(
        {
            "name": "folder",
            "root": str(folder.root.resolve()),
            "split": split,
            "frames_per_story": frames_per_story,
            "num_stories": num_stories,
            "referential": referential,
        },
        folder.files(),
        uncacheable=sam_model is not None,
    )
    return build_story_dataset(generate, fingerprint, streaming=streaming, cache_dir=cache_dir, split=split)
