#!/usr/bin/env python
"""Precompute the stage-2 (LLM alignment) data of StoryGPT-V with a trained Char-LDM.

For every frame of every story this computes, with the frozen Char-LDM of ``--pretrained_model_name_or_path``:

- ``target_conditioning``: the alignment target, i.e. the Char-LDM conditioning (``77 x d``) of the frame's
  **original, non-referential** caption with the fixed reference image of each named character fused in
  (``--target_type fused``, the paper's Emb_fuse), or the plain CLIP text embedding of that caption
  (``--target_type text``, the Emb_text ablation). With ``--name_background`` the caption also states the
  frame's setting when it leaves it implicit ("Bo is waving." -> "Bo is waving in the lake."), so the story
  model learns to carry the setting over from earlier frames as it carries the names (used for SynthSV);
- ``image_embeds``: the CLIP embedding of the ground-truth frame that the story LLM reads, computed with
  :func:`storygptv.pipelines.pipeline_storygptv.encode_story_images` (the very function the pipeline uses at
  inference);
- ``caption_conditioning``: the Char-LDM conditioning of the frame's **referential** caption as written (names
  fused where it states them): the anchor of a caption-anchored mapper (``mapper_queries="caption"``);
- ``target_token_roles``: per conditioning row of the target, 1 at a fused character token, 2 at the setting
  word's last token, 0 elsewhere (for the identity-weighted L_align);
- ``background``: the frame's setting label (empty when the dataset has none), and ``characters``: its cast,
  the labels of the grounding head. ``precompute_config.json`` lists every character and setting met
  (``character_names``, ``setting_names``), the label sets a grounding head is built with.

The output folder holds ``shards/shard-XXXXX`` (``datasets.Dataset.save_to_disk``, one per
``--shard_size`` stories) and ``precompute_config.json``. Rows keep ``story_id``, ``captions``,
``referential_captions``, ``characters`` and (unless ``--no_store_images``) the ground-truth ``images`` used
by the L_img loss, i.e. exactly what :class:`storygptv.data.collators_story.StoryGPTVCollator` reads. A shard
is written atomically when complete; an interrupted run restarted with the same command skips the finished
shards, so no finished work is lost. :func:`load_precomputed_targets` reads the folder back.

Reference images: SynthSV uses :func:`storygptv.data.synthsv.reference_images` by default; FlintstonesSV and
PororoSV need ``--reference_images_dir`` (one ``<Name>.png`` / ``.jpg`` per character, e.g. ``Fred.png``,
``Mr Slate.png``).

Example::

    python training_scripts/precompute_targets.py \
        --pretrained_model_name_or_path out/char-ldm --dataset flintstones --data_dir data/flintstones \
        --reference_images_dir data/flintstones/references --output_dir out/flintstones-targets
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from storygptv import training_utils as tu
from storygptv.characters import locate_character_tokens
from storygptv.grounding import with_setting

logger = logging.getLogger("precompute_targets")

FORMAT_VERSION = 2
CONFIG_FILE = "precompute_config.json"
SHARDS_DIR = "shards"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Settings that must match between an interrupted run and its restart (they change the stored values).
_IDENTITY_KEYS = (
    "format_version",
    "pretrained_model_name_or_path",
    "dataset",
    "data_dir",
    "train_dataset_path",
    "split",
    "frames_per_story",
    "num_stories",
    "seed",
    "target_type",
    "shard_size",
    "storage_dtype",
    "store_images",
    "reference_images_dir",
    "max_characters",
    "name_background",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The trained Char-LDM pipeline (Hub id or folder with text_encoder, tokenizer, image_encoder, "
        "fuser, feature_extractor).",
    )
    parser.add_argument("--dataset", default="synthsv", choices=tu.DATASET_CHOICES)
    parser.add_argument("--data_dir", default=None, help="Folder of the release (FlintstonesSV / PororoSV).")
    parser.add_argument("--split", default="train", help="train, validation or test.")
    parser.add_argument("--frames_per_story", type=int, default=4)
    parser.add_argument("--num_stories", type=int, default=None, help="Only the first N stories.")
    parser.add_argument("--train_dataset_path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the dataset loader (frame choice).")
    parser.add_argument("--output_dir", required=True, help="Where the shards and the config go.")
    parser.add_argument(
        "--reference_images_dir",
        default=None,
        help="Folder of <Name>.png reference images, one per character (default for synthsv: the fixed "
        "SynthSV references).",
    )
    parser.add_argument(
        "--target_type",
        choices=("fused", "text"),
        default="fused",
        help="fused: Char-LDM fused embedding (paper, Emb_fuse); text: plain CLIP text embedding (Emb_text).",
    )
    parser.add_argument("--max_characters", type=int, default=None, help="Characters fused per caption.")
    parser.add_argument(
        "--name_background",
        action="store_true",
        help="Target the caption with its setting restored too: a caption that does not name the frame's "
        "background gets ' in the <background>' before its final period. Stories often leave the setting "
        "implicit after it is first named (SynthSV: 43%% of frames); with this flag the story model learns "
        "to carry it over from the earlier frames, as it does for the names. Needs a `background` column.",
    )
    parser.add_argument("--shard_size", type=int, default=256, help="Stories per shard (the unit of resume).")
    parser.add_argument("--batch_size", type=int, default=32, help="Frames per encoder batch.")
    parser.add_argument(
        "--storage_dtype",
        choices=("float32", "float16"),
        default="float32",
        help="float16 halves the disk use (77 x 768 floats per frame).",
    )
    parser.add_argument(
        "--no_store_images",
        dest="store_images",
        action="store_false",
        help="Do not copy the ground-truth frames (then train_storygptv cannot use L_img).",
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="Delete existing shards of other settings.")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1:
        parser.error("--shard_size and --batch_size must be >= 1.")
    return args


# ------------------------------------------------------------------------------------------ references
def load_reference_images(args: argparse.Namespace) -> dict[str, PIL.Image.Image]:
    """``{name: RGB image}``: ``--reference_images_dir`` files, or the SynthSV references."""
    if args.reference_images_dir:
        root = Path(args.reference_images_dir)
        if not root.is_dir():
            raise tu.TrainingSetupError(f"--reference_images_dir {str(root)!r} is not a folder.")
        refs = {
            p.stem: PIL.Image.open(p).convert("RGB")
            for p in sorted(root.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        }
        if not refs:
            raise tu.TrainingSetupError(
                f"--reference_images_dir {str(root)!r} holds no images; expected one <Name>.png per character."
            )
        return refs
    if args.dataset == "synthsv" and not args.train_dataset_path:
        from storygptv.data.synthsv import reference_images

        return reference_images()
    if args.target_type == "text":
        return {}
    raise tu.TrainingSetupError(
        f"--target_type fused on {args.train_dataset_path or args.dataset!r} needs --reference_images_dir: a "
        "folder with one <Name>.png reference image per character (only SynthSV has built-in references)."
    )


def story_cast(row: Mapping[str, Any], refs: Mapping[str, Any]) -> dict[str, Any]:
    """The reference images of the story's characters (all of ``refs`` when the row lists none)."""
    names: list[str] = []
    for frame in row.get("characters") or []:
        names.extend(n for n in frame or [] if n not in names)
    if not names:
        return dict(refs)
    lowered = {k.lower(): k for k in refs}
    return {lowered[n.lower()]: refs[lowered[n.lower()]] for n in names if n.lower() in lowered}


# ---------------------------------------------------------------------------------------------- I/O
def _features(vision_dim: int, seq_len: int, hidden: int, dtype: str, store_images: bool) -> Any:
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
        raise tu.TrainingSetupError(
            f"{str(root)!r} is not a precompute_targets.py output folder (no {CONFIG_FILE})."
        )
    config = json.loads(config_file.read_text())
    shards = [shard_path(root, i) for i in range(int(config["num_shards"]))]
    missing = [p.name for p in shards if not (p / "dataset_info.json").exists()]
    if missing and require_complete:
        raise tu.TrainingSetupError(
            f"{str(root)!r} is incomplete ({len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}): "
            "rerun precompute_targets.py with the same arguments to finish it."
        )
    parts = [datasets.load_from_disk(str(p)) for p in shards if p.name not in missing]
    if not parts:
        raise tu.TrainingSetupError(f"{str(root)!r} holds no finished shard.")
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    tensors = [
        c
        for c in ("image_embeds", "target_conditioning", "caption_conditioning", "target_token_roles")
        if c in data.column_names
    ]
    data.set_format("torch", columns=tensors, output_all_columns=True)
    data.info.description = json.dumps(config)
    return data


# --------------------------------------------------------------------------------------------- compute
class TargetEncoder:
    """Encodes frames with the frozen Char-LDM encoders (batched)."""

    def __init__(self, pipe: Any, target_type: str, max_characters: int | None, batch_size: int) -> None:
        self.pipe = pipe
        self.target_type = target_type
        self.max_characters = max_characters
        self.batch_size = batch_size

    @torch.no_grad()
    def targets(self, captions: Sequence[str], casts: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return self.encode(captions, casts)[0]

    @torch.no_grad()
    def encode(
        self, captions: Sequence[str], casts: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conditioning (N, L, d), character_token_indices (N, max_characters))`` of ``captions``."""
        out, indices = [], []
        for start in range(0, len(captions), self.batch_size):
            chunk = list(captions[start : start + self.batch_size])
            chunk_casts = list(casts[start : start + self.batch_size])
            encoded = self.pipe.encode_fused(
                chunk,
                chunk_casts if self.target_type == "fused" else None,
                max_characters=self.max_characters,
                device=self.pipe.text_encoder.device,
                warn=False,
            )
            embeds = encoded.prompt_embeds if self.target_type == "fused" else encoded.text_embeds
            out.append(embeds.float().cpu())
            indices.append(encoded.character_token_indices.cpu())
        return torch.cat(out), torch.cat(indices)

    def token_roles(
        self, captions: Sequence[str], character_token_indices: torch.Tensor, settings: Sequence[str]
    ) -> torch.Tensor:
        """(N, L) int8: 1 at each fused character token, 2 at the last token of the named setting, else 0."""
        tokenizer = self.pipe.tokenizer
        roles = torch.zeros(len(captions), int(tokenizer.model_max_length), dtype=torch.int8)
        for row, (caption, setting) in enumerate(zip(captions, settings)):
            if setting:
                for mention in locate_character_tokens(caption, [setting], tokenizer):
                    roles[row, mention.token_index] = 2
            for index in character_token_indices[row].tolist():
                if index >= 0:
                    roles[row, index] = 1
        return roles

    @torch.no_grad()
    def image_embeds(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        from storygptv.pipelines.pipeline_storygptv import encode_story_images

        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            embeds = encode_story_images(chunk, self.pipe.image_encoder, self.pipe.feature_extractor)
            out.append(embeds.float().cpu())
        return torch.cat(out)


def _row_frames(row: Mapping[str, Any], index: int) -> tuple[list[str], list[str], list[Any]]:
    captions = [str(c) for c in (row.get("captions") or [])]
    if not captions or not all(c.strip() for c in captions):
        raise tu.TrainingSetupError(
            f"Story {row.get('story_id', index)!r} has no (or empty) captions; every frame needs one."
        )
    referential = [str(c) for c in (row.get("referential_captions") or captions)]
    images = list(row.get("images") or [])
    if len(referential) != len(captions) or len(images) != len(captions):
        raise tu.TrainingSetupError(
            f"Story {row.get('story_id', index)!r}: {len(captions)} captions, {len(referential)} referential "
            f"captions and {len(images)} images; they must match."
        )
    if any(im is None for im in images):
        raise tu.TrainingSetupError(f"Story {row.get('story_id', index)!r} has frames without an image.")
    return captions, referential, images


def target_captions(row: Mapping[str, Any], captions: list[str], name_background: bool) -> list[str]:
    """The captions whose conditioning is the target: the originals, with the setting restored if asked."""
    if not name_background:
        return captions
    backgrounds = list(row.get("background") or [])
    if len(backgrounds) != len(captions) or not all(backgrounds):
        raise tu.TrainingSetupError(
            f"--name_background needs a `background` label for every frame; story "
            f"{row.get('story_id')!r} has {backgrounds!r}. Drop the flag for datasets without one."
        )
    return [with_setting(c, str(b)) for c, b in zip(captions, backgrounds)]


def frame_settings(row: Mapping[str, Any], num_frames: int) -> list[str]:
    """The setting label of each frame (``""`` where the dataset gives none)."""
    backgrounds = list(row.get("background") or [])
    if len(backgrounds) != num_frames:
        return [""] * num_frames
    return [str(b or "") for b in backgrounds]


def label_names(output_dir: Path, num_shards: int) -> tuple[list[str], list[str]]:
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


def compute_shard(
    stories: Any,
    indices: range,
    encoder: TargetEncoder,
    refs: Mapping[str, Any],
    features: Any,
    store_images: bool,
    name_background: bool = False,
) -> Any:
    """The dataset of one shard (stories ``indices``)."""
    import datasets

    rows = [stories[i] for i in indices]
    all_captions, all_referential, all_casts, all_images, all_settings = [], [], [], [], []
    sizes, parsed = [], []
    for i, row in zip(indices, rows):
        captions, referential, images = _row_frames(row, i)
        cast = story_cast(row, refs)
        all_captions += target_captions(row, captions, name_background)
        all_referential += referential
        all_casts += [cast] * len(captions)
        all_images += images
        all_settings += frame_settings(row, len(captions))
        sizes.append(len(captions))
        parsed.append((captions, referential, images))
    targets, character_tokens = encoder.encode(all_captions, all_casts)
    roles = encoder.token_roles(all_captions, character_tokens, all_settings)
    anchors = encoder.targets(all_referential, all_casts)
    image_embeds = encoder.image_embeds(all_images)
    dtype = np.float16 if features["image_embeds"].dtype == "float16" else np.float32
    columns: dict[str, list[Any]] = {name: [] for name in features}
    offset = 0
    for i, row, (captions, referential, images), n in zip(indices, rows, parsed, sizes):
        columns["story_id"].append(str(row.get("story_id", i)))
        columns["captions"].append(captions)
        columns["referential_captions"].append(referential)
        columns["characters"].append(
            [list(c or []) for c in (row.get("characters") or [[] for _ in captions])]
        )
        columns["background"].append(all_settings[offset : offset + n])
        columns["image_embeds"].append(image_embeds[offset : offset + n].numpy().astype(dtype))
        columns["target_conditioning"].append(targets[offset : offset + n].numpy().astype(dtype))
        columns["caption_conditioning"].append(anchors[offset : offset + n].numpy().astype(dtype))
        columns["target_token_roles"].append(roles[offset : offset + n].numpy())
        if store_images:
            columns["images"].append(images)
        offset += n
    return datasets.Dataset.from_dict(columns, features=features)


def main(argv: list[str] | None = None) -> Path:
    """Compute (or finish) the targets; returns the output folder."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from tqdm.auto import tqdm

    from storygptv import CharLDMPipeline

    # ---- every check that can fail, before the long work
    tu.check_dataset_args(args)
    tu.check_pipeline_folder(
        args.pretrained_model_name_or_path, required=("text_encoder", "tokenizer", "image_encoder", "fuser")
    )
    refs = load_reference_images(args)
    output_dir = Path(args.output_dir)
    stories = tu.load_train_stories(
        args, split=args.split, frames_per_story=args.frames_per_story, referential=True
    )
    if args.train_dataset_path and args.split != "train":
        logger.info(
            "--train_dataset_path is used as is (--split %s ignored unless it is a DatasetDict).", args.split
        )
    if "captions" not in stories.column_names:
        raise tu.TrainingSetupError(
            f"The stories have no `captions` column (columns: {stories.column_names})."
        )
    if args.name_background and "background" not in stories.column_names:
        raise tu.TrainingSetupError(
            f"--name_background needs a `background` column; the stories have {stories.column_names}."
        )
    if args.store_images and "images" not in stories.column_names:
        raise tu.TrainingSetupError(
            "The stories have no `images` column (pass --no_store_images to skip them)."
        )
    num_stories = len(stories)
    if num_stories == 0:
        raise tu.TrainingSetupError("The dataset holds no stories.")
    num_shards = -(-num_stories // args.shard_size)

    settings = {k: getattr(args, k, None) for k in _IDENTITY_KEYS if k != "format_version"}
    settings["format_version"] = FORMAT_VERSION
    settings["num_stories"] = num_stories
    config_file = output_dir / CONFIG_FILE
    if config_file.exists():
        old = json.loads(config_file.read_text())
        changed = sorted(k for k in _IDENTITY_KEYS if old.get(k) != settings.get(k))
        if changed:
            if not args.overwrite:
                raise tu.TrainingSetupError(
                    f"{str(output_dir)!r} holds targets computed with other settings ({', '.join(changed)} differ); "
                    "use another --output_dir, or --overwrite to delete them."
                )
            shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)
            config_file.unlink()

    pipe = CharLDMPipeline.from_pretrained(args.pretrained_model_name_or_path, unet=None, vae=None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device=device, dtype=getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    vision_dim = int(pipe.image_encoder.config.hidden_size)
    seq_len = int(pipe.tokenizer.model_max_length)
    hidden = int(pipe.text_encoder.config.hidden_size)
    features = _features(vision_dim, seq_len, hidden, args.storage_dtype, args.store_images)
    encoder = TargetEncoder(pipe, args.target_type, args.max_characters, args.batch_size)

    output_dir.mkdir(parents=True, exist_ok=True)
    config = {
        **settings,
        "num_shards": num_shards,
        "vision_embed_dim": vision_dim,
        "ldm_seq_len": seq_len,
        "ldm_hidden_size": hidden,
        "image_embeds": "storygptv.pipelines.pipeline_storygptv.encode_story_images (vision pooler_output)",
        "complete": False,
    }
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
        indices = range(index * args.shard_size, min(num_stories, (index + 1) * args.shard_size))
        shard = compute_shard(
            stories, indices, encoder, refs, features, args.store_images, args.name_background
        )
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shard.save_to_disk(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        timings.append((time.perf_counter() - started) / max(1, sum(1 for _ in indices)))
    config["complete"] = True
    config["character_names"], config["setting_names"] = label_names(output_dir, num_shards)
    if timings:
        config["seconds_per_story"] = float(np.mean(timings))
    config_file.write_text(json.dumps(config, indent=2))
    logger.info("Stage-2 targets of %d stories in %s", num_stories, output_dir)
    return output_dir


if __name__ == "__main__":
    main()
