"""Checks that run before any long work: the training data and the model folders a script starts from.

Every training script calls these first, so that a wrong path or a folder in the wrong layout fails in a
second with a message naming the option and the fix, not after minutes of model loading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DATASET_CHOICES", "TrainingSetupError", "check_dataset", "check_pipeline_folder"]

#: Values of ``--dataset``: the releases, SynthSV and your own story folder (:mod:`storygptv.data.folder`).
DATASET_CHOICES: tuple[str, ...] = ("flintstones", "pororo", "synthsv", "folder")


class TrainingSetupError(ValueError):
    """A user error found before training starts (bad dataset folder, model folder, resume path...)."""


def check_dataset(dataset: str, data_dir: str | None = None, train_dataset_path: str | None = None) -> None:
    """Fail fast (``TrainingSetupError``) on an unknown dataset or a data folder in the wrong layout.

    Only file names are checked for a release (cheap). A story folder (``--dataset folder``) is checked
    whole, without decoding its images: every line of its ``metadata.jsonl``, its frame and mask files and
    its cast (:func:`storygptv.data.folder.read_story_folder`). ``train_dataset_path`` (a ``datasets``
    ``save_to_disk`` folder) bypasses these checks; SynthSV needs no folder (it is generated).

    Args:
        dataset: ``--dataset``, one of :data:`DATASET_CHOICES`.
        data_dir: ``--data_dir``, the folder of the downloaded release (FlintstonesSV / PororoSV) or the
            story folder.
        train_dataset_path: ``--train_dataset_path``.
    """
    if train_dataset_path:
        root = Path(train_dataset_path)
        if not (root / "dataset_info.json").exists() and not (root / "dataset_dict.json").exists():
            raise TrainingSetupError(
                f"--train_dataset_path {str(root)!r} is not a `datasets.Dataset.save_to_disk` folder "
                "(no dataset_info.json)."
            )
        return
    name = str(dataset or "").lower()
    if name not in DATASET_CHOICES:
        raise TrainingSetupError(f"Unknown dataset {dataset!r}; valid: {list(DATASET_CHOICES)}.")
    if name == "synthsv":
        return
    if not data_dir:
        what = (
            "your story folder (metadata.jsonl, frames and characters/; see the README section 'Fine-tune on your own stories')"
            if name == "folder"
            else "the folder of its downloaded release (nothing is downloaded)"
        )
        raise TrainingSetupError(f"--dataset {name} needs --data_dir: {what}.")
    root = Path(data_dir)
    if not root.is_dir():
        raise TrainingSetupError(f"--data_dir {str(root)!r} does not exist.")
    if name == "folder":
        from ..data.folder import StoryFolderError, read_story_folder

        try:
            read_story_folder(root)
        except StoryFolderError as error:
            raise TrainingSetupError(f"--data_dir: {error}") from error
        return
    if name == "flintstones":
        from ..data.flintstones import detect_layout

        try:
            detect_layout(root)
        except FileNotFoundError as error:
            raise TrainingSetupError(str(error)) from error
        return
    from ..data.pororo import LAYOUT, STORYGPTV_LAYOUT

    storygptv = (root / "split.json").exists() and (root / "cleaned_annotations.json").exists()
    storygan = all((root / f).exists() for f in ("descriptions.npy", "following_cache4.npy"))
    if not (storygptv or storygan):
        raise TrainingSetupError(
            f"No PororoSV release found in {str(root)!r}. Expected one of the layouts: {LAYOUT} | "
            f"{STORYGPTV_LAYOUT}"
        )


def check_pipeline_folder(path: str | os.PathLike, required: Iterable[str] | None = None) -> dict[str, Any]:
    """Check a local diffusers pipeline folder before loading it; returns its ``model_index.json``.

    Every component named in ``model_index.json`` (and every name in ``required``) must have a
    subfolder, except components stored as ``[null, null]``. Raises ``TrainingSetupError`` naming
    the missing pieces. A path that is not a local folder (a Hub id) is not checked (returns ``{}``).
    """
    root = Path(path)
    if not root.is_dir():
        return {}
    index_path = root / "model_index.json"
    if not index_path.exists():
        raise TrainingSetupError(
            f"{str(root)!r} has no model_index.json: it is not a diffusers pipeline folder."
        )
    index = json.loads(index_path.read_text())
    names = {
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
    }
    missing = sorted(n for n in set(required or ()) | names if not (root / n).is_dir())
    not_indexed = sorted(n for n in set(required or ()) if n not in index or index[n][0] is None)
    if missing or not_indexed:
        raise TrainingSetupError(
            f"Pipeline folder {str(root)!r} is incomplete: missing subfolders {missing}"
            + (f", components absent from model_index.json {not_indexed}" if not_indexed else "")
            + "."
        )
    return index
