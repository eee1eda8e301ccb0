"""The reference images a training script fuses: a cast folder, or SynthSV's built-in references.

A cast folder holds one image per character, named after it. Underscores in file names stand for spaces,
as at inference (the CLI's ``--characters`` folder): ``Mr_Slate.png`` and ``Mr Slate.png`` are both
"Mr Slate", so the name matches the dataset's character labels and captions.
"""

from __future__ import annotations

import os

import PIL.Image

from ..characters import load_character_image, read_cast_folder
from .checks import TrainingSetupError

__all__ = ["read_cast_images", "training_references"]


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
    required: bool = True,
    option: str = "--reference_images_dir",
) -> dict[str, PIL.Image.Image]:
    """The reference images of a run: ``reference_images_dir`` when given, else SynthSV's fixed references
    (``dataset == "synthsv"`` without a custom ``train_dataset_path``), else ``{}`` when not ``required``.

    Raises ``TrainingSetupError`` when references are ``required`` and the dataset has no built-in ones.
    """
    if reference_images_dir:
        return read_cast_images(reference_images_dir, option)
    if dataset == "synthsv" and not train_dataset_path:
        from ..data.synthsv import reference_images

        return reference_images()
    if not required:
        return {}
    raise TrainingSetupError(
        f"{train_dataset_path or dataset!r} has no built-in reference images: pass {option}, a folder with one "
        "<Name>.png reference image per character (only SynthSV has built-in references)."
    )
