"""The cast of a run: the reference images a training script fuses, and the ``characters/`` it exports.

A cast folder holds one image per character, named after it. Underscores in file names stand for spaces,
as at inference (the CLI's ``--characters`` folder): ``Mr_Slate.png`` and ``Mr Slate.png`` are both
"Mr Slate", so the name matches the dataset's character labels and captions. The references of a run are
``--reference_images_dir``, else the dataset's own: SynthSV's built-in images, or the ``characters/`` of a
story folder (``--dataset folder``). Every exported pipeline folder carries them in ``characters/``
(:func:`write_cast`), where the CLI finds the cast of a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import PIL.Image

from ..characters import CAST_IMAGE_SUFFIXES, cast_file_stem, load_character_image, read_cast_folder
from .checks import TrainingSetupError

__all__ = ["CAST_FOLDER", "pipeline_cast", "read_cast_images", "training_references", "write_cast"]

#: The subfolder of a pipeline folder (and of a story folder) that holds its cast.
CAST_FOLDER = "characters"


def read_cast_images(
    folder: str | os.PathLike, option: str = "--reference_images_dir"
) -> dict[str, PIL.Image.Image]:
    """``{name: RGB image}`` of a cast folder (the rule of :func:`storygptv.characters.read_cast_folder`:
    ``Mr_Slate.png`` is "Mr Slate"); ``option`` names the command-line option in errors, raised as
    ``TrainingSetupError`` for a missing folder, one without images, or an image that cannot be read."""
    try:
        return {name: load_character_image(path, name) for name, path in read_cast_folder(folder).items()}
    except (NotADirectoryError, ValueError, TypeError) as error:
        raise TrainingSetupError(f"{option} {str(folder)!r}: {error}") from error


def training_references(
    reference_images_dir: str | None,
    dataset: str,
    train_dataset_path: str | None = None,
    *,
    data_dir: str | None = None,
    required: bool = True,
    option: str = "--reference_images_dir",
) -> dict[str, PIL.Image.Image]:
    """The reference images of a run: ``reference_images_dir`` when given, else the dataset's own (without a
    custom ``train_dataset_path``): SynthSV's fixed references, or ``<data_dir>/characters`` for
    ``dataset == "folder"``; else ``{}`` when not ``required``.

    Raises ``TrainingSetupError`` when references are ``required`` and the dataset has no built-in ones.
    """
    if reference_images_dir:
        return read_cast_images(reference_images_dir, option)
    if dataset == "synthsv" and not train_dataset_path:
        from ..data.synthsv import reference_images

        return reference_images()
    if dataset == "folder" and data_dir and not train_dataset_path:
        return read_cast_images(Path(data_dir) / CAST_FOLDER, "--data_dir")
    if not required:
        return {}
    raise TrainingSetupError(
        f"{train_dataset_path or dataset!r} has no built-in reference images: pass {option}, a folder with one "
        "<Name>.png reference image per character (SynthSV and story folders have their own)."
    )


def pipeline_cast(name_or_path: str | os.PathLike | None) -> dict[str, PIL.Image.Image]:
    """The cast a local pipeline folder carries in ``characters/`` (``{}`` for a Hub id or a folder without)."""
    folder = Path(name_or_path) / CAST_FOLDER if name_or_path else None
    if folder is None or not folder.is_dir():
        return {}
    return read_cast_images(folder, f"the cast of {str(name_or_path)!r}:")


def write_cast(output_dir: str | os.PathLike, references: Mapping[str, PIL.Image.Image]) -> Path | None:
    """Write ``references`` as ``<output_dir>/characters/<cast_file_stem(name)>.png``: the cast an exported
    pipeline carries (read back with :func:`storygptv.characters.read_cast_folder`). Reference images of an
    earlier export in that folder are replaced. Returns the folder, or ``None`` when there is no reference."""
    if not references:
        return None
    folder = Path(output_dir) / CAST_FOLDER
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and path.suffix.lower() in CAST_IMAGE_SUFFIXES:
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in references.items():
        load_character_image(image, name).save(folder / f"{cast_file_stem(name)}.png")
    return folder
