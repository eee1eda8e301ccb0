"""Story datasets in one schema, referential captions, character masks and the stage-1 collator.

Every loader returns a ``datasets.Dataset`` (or ``IterableDataset`` with ``streaming=True``) with one
row per story and the columns of :data:`STORY_COLUMNS`:

- ``story_id`` (str), ``frame_ids`` (list of str);
- ``images``: list of RGB ``datasets.Image``;
- ``captions`` / ``referential_captions``: lists of str (names vs. pronouns);
- ``is_referential``: list of bool, the frame's names were replaced by a pronoun (``ref_flag``);
- ``characters``: per frame, the canonical names ("Fred", "Mr Slate");
- ``boxes``: per frame, per character ``[x1, y1, x2, y2]`` (float32, pixels of the stored image; ``[]``
  when unknown);
- ``segmentation``: list of "L" ``datasets.Image`` label maps (``1 + character index``, 0 elsewhere);
- ``character_labels``: per frame, the multi-hot (int8) vector in the dataset's label order;
- ``background`` (str per frame) and ``background_labels`` (int8 multi-hot per frame, or ``[]``).

``load_story_dataset("folder", data_dir=...)`` reads your own stories: frames, a ``metadata.jsonl`` (one
JSON object per frame) and a ``characters/`` folder of reference images (:mod:`storygptv.data.folder`).

The rules every loader shares have one home each: split names (:func:`normalize_split`), label
vectors (:func:`multi_hot`) and, for the release loaders, their options (:class:`ReleaseOptions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from ._common import STORY_COLUMNS, multi_hot, normalize_split, story_features

__all__ = [
    "DATASET_NAMES",
    "LABEL_KINDS",
    "STORY_COLUMNS",
    "ReleaseOptions",
    "StoryFolderError",
    "CharLDMCollator",
    "StoryGPTVCollator",
    "dataset_label_names",
    "load_flintstones",
    "load_pororo",
    "load_story_dataset",
    "load_story_folder",
    "load_synthsv",
    "multi_hot",
    "normalize_split",
    "read_story_folder",
    "story_features",
    "story_frames",
]

_LAZY = {
    "ReleaseOptions": "._release",
    "CharLDMCollator": ".collators",
    "StoryGPTVCollator": ".collators_story",
    "story_frames": ".frames",
    "load_flintstones": ".flintstones",
    "load_pororo": ".pororo",
    "load_story_folder": ".folder",
    "read_story_folder": ".folder",
    "StoryFolderError": ".folder",
    "load_synthsv": ".synthsv",
}


def __getattr__(name: str) -> Any:
    """Import the loaders and the collator on first use (``from storygptv.data import CharLDMCollator``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Names accepted by :func:`load_story_dataset`.
DATASET_NAMES: tuple[str, ...] = ("flintstones", "pororo", "synthsv", "folder")

_NAME_ALIASES = {"flintstonessv": "flintstones", "pororosv": "pororo"}


def _dataset_key(name: str) -> str:
    """The :data:`DATASET_NAMES` entry of a dataset name (any case, "FlintstonesSV", "pororo-sv")."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = _NAME_ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        built_in = [n for n in DATASET_NAMES if n != "folder"]
        raise ValueError(
            f"Unknown dataset {name!r}; valid names: {built_in}, or 'folder' for your own stories in `data_dir` "
            "(frames, metadata.jsonl and characters/)."
        )
    return key


#: Values of ``kind`` in :func:`dataset_label_names`.
LABEL_KINDS: tuple[str, ...] = ("characters", "background")


def dataset_label_names(
    name: str, kind: str = "characters", data_dir: str | Path | None = None
) -> tuple[str, ...]:
    """The names of a dataset's label vector, in its order: what ``character_labels`` (``kind="characters"``)
    or ``background_labels`` (``kind="background"``) of its rows index.

    ========================= ============================================= ==========================================
    dataset                   characters                                    background
    ========================= ============================================= ==========================================
    ``flintstones``           the 7 of :data:`~.flintstones.CHARACTERS`     ``background_000`` ... (the release's
                                                                            ``labels_bg.pkl`` stores unnamed vectors;
                                                                            its width is read from ``data_dir``)
    ``pororo``                the 9 of :data:`~.pororo.CHARACTERS`          none (``ValueError``)
    ``synthsv``               its 8 characters                              its 8 backgrounds
    ``folder``                the cast, in file-name order of               the settings the folder names, sorted
                              ``characters/``                               (``ValueError`` when it names none)
    ========================= ============================================= ==========================================

    Args:
        name: a dataset name as :func:`load_story_dataset` takes it.
        kind: ``"characters"`` or ``"background"``.
        data_dir: the release or story folder (needed for a folder, and for FlintstonesSV backgrounds).

    Example:
        >>> dataset_label_names("synthsv", "background")[:3]
        ('forest', 'beach', 'kitchen')
    """
    key = _dataset_key(name)
    if kind not in LABEL_KINDS:
        raise ValueError(f"Unknown label kind {kind!r}; valid kinds: {list(LABEL_KINDS)}.")
    if key == "folder":
        from .folder import read_story_folder

        folder = read_story_folder(data_dir)
        if kind == "characters":
            return tuple(folder.cast)
        if not folder.settings:
            raise ValueError(
                f"The story folder {str(data_dir)!r} names no `background`: it has no background labels."
            )
        return tuple(folder.settings)
    if key == "synthsv":
        from .synthsv import BACKGROUNDS, CHARACTERS

        return tuple(CHARACTERS if kind == "characters" else BACKGROUNDS)
    if key == "pororo":
        from .pororo import CHARACTERS

        if kind == "background":
            raise ValueError("PororoSV has no background labels (its rows have empty `background_labels`).")
        return tuple(CHARACTERS)
    from .flintstones import CHARACTERS, background_label_width

    if kind == "characters":
        return tuple(CHARACTERS)
    return tuple(f"background_{i:03d}" for i in range(background_label_width(data_dir)))


def load_story_dataset(
    name: str,
    data_dir: str | Path | None = None,
    split: str = "train",
    frames_per_story: int | None = None,
    referential: bool = True,
    referential_compat: str | None = None,
    seed: int = 0,
    frame_index: int | None = None,
    sam_model: Any = None,
    sam_processor: Any = None,
    streaming: bool = False,
    **kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a story-visualisation dataset in the common story schema (one row per story).

    Args:
        name: ``"flintstones"``, ``"pororo"``, ``"synthsv"`` or ``"folder"`` (case-insensitive;
            "FlintstonesSV" and "PororoSV" are accepted).
        data_dir: the folder of the downloaded release (FlintstonesSV, PororoSV), or your story folder
            (``"folder"``: frames, ``metadata.jsonl`` and ``characters/``, see :mod:`storygptv.data.folder`);
            SynthSV is generated and ignores it.
        split: ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``; a story folder without
            ``splits.json`` has only ``"train"``.
        frames_per_story: frames per story; ``None``: 4 for the releases and SynthSV, whole stories for a
            folder (a number keeps the first frames of its longer stories).
        referential: add pronoun-substituted captions (otherwise ``referential_captions`` equals
            ``captions``).
        referential_compat: ``None`` for our fixed rules, ``"make-a-story"`` (or ``"storygptv"``) to
            reproduce the public code (see :mod:`storygptv.data.referential`); releases only.
        seed: seeds every random choice (which frame of a clip, which caption); a folder has none.
        frame_index: use this frame of every clip instead of a seeded choice (releases only).
        sam_model: optional ``transformers.SamModel`` that turns box prompts into masks where the
            release has no masks.
        sam_processor: the matching ``transformers.SamProcessor``.
        streaming: return an ``IterableDataset`` that reads lazily.
        **kwargs: ``num_stories`` and ``cache_dir`` (all; SynthSV ignores ``cache_dir``), the other
            :class:`ReleaseOptions` (``bbox_resolution``) and the release's own options: ``layout``
            (FlintstonesSV and PororoSV; detected from the files by default) and ``caption_index``
            (PororoSV).

    Raises:
        ValueError: unknown dataset name or split (the message lists the valid ones), or no ``data_dir``
            for a release or a folder.
        StoryFolderError: (a ``ValueError``) a bad story folder; the message names the file, line and field.
        TypeError: an option the dataset does not take (the message lists the valid ones).
        FileNotFoundError: a release file is missing (the message names it and the expected layout).
    """
    key = _dataset_key(name)
    split = normalize_split(split)
    if key == "folder":
        from .folder import load_story_folder

        if referential_compat is not None or frame_index is not None:
            raise TypeError(
                "A story folder takes neither `referential_compat` nor `frame_index` (release options)."
            )
        return load_story_folder(
            data_dir,
            split,
            frames_per_story=frames_per_story,
            referential=referential,
            sam_model=sam_model,
            sam_processor=sam_processor,
            streaming=streaming,
            **kwargs,
        )
    if frames_per_story is None:
        frames_per_story = 4
    if key == "synthsv":
        from .synthsv import load_synthsv

        return load_synthsv(
            split=split,
            frames_per_story=frames_per_story,
            referential=referential,
            seed=seed,
            streaming=streaming,
            **kwargs,
        )
    common = {
        "split": split,
        "frames_per_story": frames_per_story,
        "referential": referential,
        "referential_compat": referential_compat,
        "seed": seed,
        "frame_index": frame_index,
        "sam_model": sam_model,
        "sam_processor": sam_processor,
        "streaming": streaming,
    }
    if key == "flintstones":
        from .flintstones import load_flintstones

        return load_flintstones(data_dir, **common, **kwargs)
    from .pororo import load_pororo

    return load_pororo(data_dir, **common, **kwargs)
