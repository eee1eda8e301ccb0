"""The stage-2 targets folder: its format, the resumable computation that writes it, and reading it back.

A targets folder holds ``shards/shard-XXXXX`` (``datasets.Dataset.save_to_disk``, one per ``shard_size``
stories) and ``precompute_config.json`` (the settings it was computed with, its sizes, and the label sets
``character_names`` / ``setting_names`` of a grounding head). Rows keep ``story_id``, ``captions``,
``referential_captions``, ``characters``, ``background``, the encodings of
:mod:`storygptv.training.target_encoding` and (``store_images``) the ground-truth ``images`` of L_img:
exactly what :class:`storygptv.data.collators_story.StoryGPTVCollator` reads.

:func:`compute_targets` writes each shard atomically when complete; a computation interrupted and started
again with the same settings skips the finished shards, so no finished work is lost, and one with other
settings is refused (``overwrite`` deletes the old shards). :func:`load_precomputed_targets` reads the
folder back. ``training_scripts/precompute_targets.py`` is the command line; ``train_storygptv.py``
calls :func:`compute_targets` itself when it is given no ``--targets_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import TrainingSetupError, check_pipeline_folder
from .target_encoding import TargetEncoder, compute_shard

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "SOURCE_KEYS",
    "compute_targets",
    "label_names",
    "load_precomputed_targets",
    "shard_path",
    "target_features",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CONFIG_FILE = "precompute_config.json"
SHARDS_DIR = "shards"
#: What the stories were loaded from (``source`` of :func:`compute_targets`); part of a folder's identity.
SOURCE_KEYS: tuple[str, ...] = (
    "dataset",
    "data_dir",
    "train_dataset_path",
    "dataset_options",
    "split",
    "frames_per_story",
    "seed",
    "reference_images_dir",
)
# Settings that must match between an interrupted computation and its restart (they change the values).
_IDENTITY_KEYS = (
    "format_version",
    "pretrained_model_name_or_path",
    *SOURCE_KEYS,
    "num_stories",
    "target_type",
    "shard_size",
    "storage_dtype",
    "store_images",
    "max_characters",
    "name_background",
)
# Encoders a target computation needs (the UNet and the VAE are not loaded).
_ENCODERS = ("text_encoder", "tokenizer", "image_encoder", "fuser")


def target_features(vision_dim: int, seq_len: int, hidden: int, dtype: str, store_images: bool) -> Any:
    """The ``datasets.Features`` of a shard: encodings of ``dtype`` (``"float32"`` / ``"float16"``) for a
    vision width ``vision_dim`` and ``seq_len x hidden`` conditionings; ``images`` with ``store_images``."""
    import datasets

    features = {
        "story_id": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
        "referential_captions": datasets.List(datasets.Value("string")),
        "characters": datasets.List(datasets.List(datasets.Value("string"))),
        "background": datasets.List(datasets.Value("string")),
        "image_embeds": datasets.Array2D(shape=(None, vision_dim), dtype=dtype),
        "target_conditioning": datasets.Array3D(shape=(None, seq_len, hidden), dtype=dtype),
        "caption_conditioning": datasets.Array3D(shape=(None, seq_len, hidden), dtype=dtype),
        "target_token_roles": datasets.Array2D(shape=(None, seq_len), dtype="int8"),
    }
    if store_images:
        features["images"] = datasets.List(datasets.Image())
    return datasets.Features(features)


def shard_path(output_dir: str | os.PathLike, index: int) -> Path:
    """The folder of shard ``index`` of a targets folder."""
    return Path(output_dir) / SHARDS_DIR / f"shard-{index:05d}"


def load_precomputed_targets(path: str | os.PathLike, require_complete: bool = True) -> Any:
    """The precomputed stage-2 dataset of ``path`` (shards concatenated in order), torch-formatted.

    ``image_embeds`` (n, D) and ``target_conditioning`` (n, 77, d) come back as tensors, the other columns
    as Python objects (``images`` as PIL images). Raises ``TrainingSetupError`` when the folder is not a
    precompute output or (``require_complete``) when the run that wrote it did not finish.
    """
    import datasets

    root = Path(path)
    config_file = root / CONFIG_FILE
    if not config_file.exists():
        raise TrainingSetupError(
            f"{str(root)!r} is not a precompute_targets.py output folder (no {CONFIG_FILE})."
        )
    config = json.loads(config_file.read_text())
    shards = [shard_path(root, i) for i in range(int(config["num_shards"]))]
    missing = [p.name for p in shards if not (p / "dataset_info.json").exists()]
    if missing and require_complete:
        raise TrainingSetupError(
            f"{str(root)!r} is incomplete ({len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}): "
            "rerun precompute_targets.py with the same arguments to finish it."
        )
    parts = [datasets.load_from_disk(str(p)) for p in shards if p.name not in missing]
    if not parts:
        raise TrainingSetupError(f"{str(root)!r} holds no finished shard.")
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    tensors = [
        c
        for c in ("image_embeds", "target_conditioning", "caption_conditioning", "target_token_roles")
        if c in data.column_names
    ]
    data.set_format("torch", columns=tensors, output_all_columns=True)
    data.info.description = json.dumps(config)
    return data


def label_names(output_dir: str | os.PathLike, num_shards: int) -> tuple[list[str], list[str]]:
    """Every character and every setting of the finished shards, sorted: the grounding label sets."""
    import datasets

    characters: set[str] = set()
    settings: set[str] = set()
    for index in range(num_shards):
        shard = datasets.load_from_disk(str(shard_path(output_dir, index)))
        for frames in shard["characters"]:
            characters.update(name for frame in frames for name in frame)
        for frames in shard["background"]:
            settings.update(s for s in frames if s)
    return sorted(characters), sorted(settings)


def _check_stories(stories: Any, name_background: bool, store_images: bool) -> None:
    columns = list(stories.column_names)
    if "captions" not in columns:
        raise TrainingSetupError(f"The stories have no `captions` column (columns: {columns}).")
    if name_background and "background" not in columns:
        raise TrainingSetupError(
            f"--name_background needs a `background` column; the stories have {columns}."
        )
    if store_images and "images" not in columns:
        raise TrainingSetupError("The stories have no `images` column (pass --no_store_images to skip them).")
    if len(stories) == 0:
        raise TrainingSetupError("The dataset holds no stories.")


def _claim_folder(output_dir: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse a folder of targets computed with other settings, unless ``overwrite`` (then delete them)."""
    config_file = output_dir / CONFIG_FILE
    if not config_file.exists():
        return
    old = json.loads(config_file.read_text())
    changed = sorted(k for k in _IDENTITY_KEYS if old.get(k) != settings.get(k))
    if not changed:
        return
    if not overwrite:
        raise TrainingSetupError(
            f"{str(output_dir)!r} holds targets computed with other settings ({', '.join(changed)} differ); "
            "use another --output_dir, or --overwrite to delete them."
        )
    shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)
    config_file.unlink()


def compute_targets(
    pretrained_model_name_or_path: str,
    stories: Any,
    output_dir: str | os.PathLike,
    *,
    references: Mapping[str, Any],
    source: Mapping[str, Any],
    target_type: str = "fused",
    max_characters: int | None = None,
    name_background: bool = False,
    store_images: bool = True,
    shard_size: int = 256,
    batch_size: int = 32,
    storage_dtype: str = "float32",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Compute (or finish) the stage-2 targets of ``stories`` into ``output_dir``; returns the folder.

    Args:
        pretrained_model_name_or_path: the trained Char-LDM (its encoders are loaded, not its UNet / VAE).
        stories: the story rows (``captions``, ``referential_captions``, ``images``, ``characters``,
            ``background``), e.g. :func:`storygptv.training.data.load_train_stories`.
        output_dir: the targets folder.
        references: ``{name: image}`` fused for ``target_type="fused"``
            (:func:`storygptv.training.references.training_references`).
        source: what the stories were loaded from, the keys of :data:`SOURCE_KEYS` (a missing key is
            ``None``); recorded, and compared when an interrupted computation is resumed.
        target_type: ``"fused"`` (Emb_fuse, the paper) or ``"text"`` (Emb_text).
        max_characters: characters fused per caption (``None``: the fuser's limit).
        name_background: restore an implicit setting in the target caption (needs ``background`` labels).
        store_images: keep the ground-truth frames (L_img needs them).
        shard_size: stories per shard (the unit of resume); batch_size: frames per encoder batch.
        storage_dtype: ``"float32"`` or ``"float16"`` (half the disk).
        device, dtype: where and in which dtype the encoders run (default: CUDA when available).
        overwrite: delete targets of other settings found in ``output_dir`` instead of refusing.
    """
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"`source` keys must be among {list(SOURCE_KEYS)}, got unknown {unknown}.")
    if shard_size < 1 or batch_size < 1:
        raise TrainingSetupError("--shard_size and --batch_size must be >= 1.")
    check_pipeline_folder(pretrained_model_name_or_path, required=_ENCODERS)
    _check_stories(stories, name_background, store_images)
    output_dir = Path(output_dir)
    num_stories = len(stories)
    num_shards = -(-num_stories // shard_size)
    settings = {key: source.get(key) for key in SOURCE_KEYS} | {
        "format_version": FORMAT_VERSION,
        "pretrained_model_name_or_path": pretrained_model_name_or_path,
        "num_stories": num_stories,
        "target_type": target_type,
        "shard_size": shard_size,
        "storage_dtype": storage_dtype,
        "store_images": store_images,
        "max_characters": max_characters,
        "name_background": name_background,
    }
    _claim_folder(output_dir, settings, overwrite)

    from tqdm.auto import tqdm

    from ..pipelines.pipeline_char_ldm import CharLDMPipeline

    pipe = CharLDMPipeline.from_pretrained(pretrained_model_name_or_path, unet=None, vae=None)
    pipe.to(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    vision_dim = int(pipe.image_encoder.config.hidden_size)
    seq_len = int(pipe.tokenizer.model_max_length)
    hidden = int(pipe.text_encoder.config.hidden_size)
    features = target_features(vision_dim, seq_len, hidden, storage_dtype, store_images)
    encoder = TargetEncoder(pipe, target_type, max_characters, batch_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = settings | {
        "num_shards": num_shards,
        "vision_embed_dim": vision_dim,
        "ldm_seq_len": seq_len,
        "ldm_hidden_size": hidden,
        "image_embeds": "storygptv.pipelines.pipeline_storygptv.encode_story_images (vision pooler_output)",
        "complete": False,
    }
    config_file = output_dir / CONFIG_FILE
    config_file.write_text(json.dumps(config, indent=2))

    done = [i for i in range(num_shards) if (shard_path(output_dir, i) / "dataset_info.json").exists()]
    if done:
        logger.info("Skipping %d finished shard(s) of %d.", len(done), num_shards)
    timings = []
    for index in tqdm(range(num_shards), desc="Shards"):
        final = shard_path(output_dir, index)
        if (final / "dataset_info.json").exists():
            continue
        started = time.perf_counter()
        indices = range(index * shard_size, min(num_stories, (index + 1) * shard_size))
        shard = compute_shard(stories, indices, encoder, references, features, store_images, name_background)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shard.save_to_disk(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        timings.append((time.perf_counter() - started) / max(1, len(indices)))
    config["complete"] = True
    config["character_names"], config["setting_names"] = label_names(output_dir, num_shards)
    if timings:
        config["seconds_per_story"] = float(np.mean(timings))
    config_file.write_text(json.dumps(config, indent=2))
    logger.info("Stage-2 targets of %d stories in %s", num_stories, output_dir)
    return output_dir
