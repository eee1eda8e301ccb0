"""The reference images a training script fuses: a cast folder, or SynthSV's built-in references.

A cast folder holds one image per character, named after it. Underscores in file names stand for spaces,
as at inference (the CLI's ``--characters`` folder): ``Mr_Slate.png`` and ``Mr Slate.png`` are both
"Mr Slate", so the name matches the dataset's character labels and captions.
"""

from __future__ import annotations

import os
from pathlib import Path

import PIL.Image

from .checks import TrainingSetupError

__all__ = ["IMAGE_SUFFIXES", "read_cast_folder", "training_references"]

#: File types read from a cast folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_cast_folder(
    folder: str | os.PathLike, option: str = "--reference_images_dir"
) -> dict[str, PIL.Image.Image]:
    """``{name: RGB image}`` of the images in ``folder`` (``Mr_Slate.png`` is "Mr Slate"); ``option`` names
    the command-line option in errors. Raises ``TrainingSetupError`` for a missing or image-less folder."""
    root = Path(folder)
    if not root.is_dir():
        raise TrainingSetupError(f"{option} {str(root)!r} is not a folder.")
    refs = {
        p.stem.replace("_", " "): PIL.Image.open(p).convert("RGB")
        for p in sorted(root.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    }
    if not refs:
        raise TrainingSetupError(
            f"{option} {str(root)!r} holds no images; expected one <Name>.png per character (e.g. Fred.png, "
            "Mr_Slate.png)."
        )
    return refs


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
        return read_cast_folder(reference_images_dir, option)
    if dataset == "synthsv" and not train_dataset_path:
        from ..data.synthsv import reference_images

        return reference_images()
    if not required:
        return {}
    raise TrainingSetupError(
        f"{train_dataset_path or dataset!r} has no built-in reference images: pass {option}, a folder with one "
        "<Name>.png reference image per character (only SynthSV has built-in references)."
    )
