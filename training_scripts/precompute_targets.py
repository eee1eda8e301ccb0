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
shards, so no finished work is lost. The computation is the library's
(:func:`storygptv.training.targets.compute_targets`); :func:`storygptv.training.targets.load_precomputed_targets`
reads the folder back.

Reference images: SynthSV uses :func:`storygptv.data.synthsv.reference_images` by default, a story folder
(``--dataset folder --data_dir DIR``, see the README) its ``DIR/characters``; FlintstonesSV, PororoSV
and ``--train_dataset_path`` need ``--reference_images_dir`` (one ``<Name>.png`` / ``.jpg`` per character,
e.g. ``Fred.png``, ``Mr_Slate.png``: underscores stand for spaces).

Example::

    python training_scripts/precompute_targets.py \
        --pretrained_model_name_or_path out/char-ldm --dataset flintstones --data_dir data/flintstones \
        --reference_images_dir data/flintstones/references --output_dir out/flintstones-targets
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from storygptv.training.accelerate_setup import setup_logging
from storygptv.training.arguments import (
    DATA_DIR_HELP,
    DATASET_HELP,
    DATASET_OPTIONS_HELP,
    TRAIN_DATASET_PATH_HELP,
    frames_per_story_default,
    json_object,
)
from storygptv.training.checks import DATASET_CHOICES, check_dataset
from storygptv.training.data import load_train_stories
from storygptv.training.references import training_references
from storygptv.training.targets import compute_targets

logger = logging.getLogger("precompute_targets")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The trained Char-LDM pipeline (Hub id or folder with text_encoder, tokenizer, image_encoder, "
        "fuser, feature_extractor).",
    )
    parser.add_argument("--dataset", default="synthsv", choices=DATASET_CHOICES, help=DATASET_HELP)
    parser.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument("--split", default="train", help="train, validation or test.")
    parser.add_argument(
        "--frames_per_story",
        type=int,
        default=None,
        help="Frames per story (default: 4; whole stories for --dataset folder, whose longer stories a number "
        "cuts to their first frames).",
    )
    parser.add_argument("--num_stories", type=int, default=None, help="Only the first N stories.")
    parser.add_argument("--train_dataset_path", default=None, help=TRAIN_DATASET_PATH_HELP)
    parser.add_argument("--dataset_options", type=json_object, default={}, help=DATASET_OPTIONS_HELP)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the dataset loader (frame choice).")
    parser.add_argument("--output_dir", required=True, help="Where the shards and the config go.")
    parser.add_argument(
        "--reference_images_dir",
        default=None,
        help="Folder of <Name>.png reference images, one per character (default: the fixed SynthSV references "
        "for synthsv, DIR/characters for --dataset folder --data_dir DIR).",
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
    args.frames_per_story = frames_per_story_default(args.dataset, args.frames_per_story)
    return args


def main(argv: list[str] | None = None) -> Path:
    """Compute (or finish) the targets; returns the output folder."""
    args = parse_args(argv)
    setup_logging()
    # Every check that can fail runs before the long work (compute_targets checks the model folder).
    check_dataset(args.dataset, args.data_dir, args.train_dataset_path)
    references = training_references(
        args.reference_images_dir,
        args.dataset,
        args.train_dataset_path,
        data_dir=args.data_dir,
        required=args.target_type == "fused",
    )
    stories = load_train_stories(
        args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        seed=args.seed,
        num_stories=args.num_stories,
        train_dataset_path=args.train_dataset_path,
        frames_per_story=args.frames_per_story,
        referential=True,
        **args.dataset_options,
    )
    if args.train_dataset_path and args.split != "train":
        logger.info(
            "--train_dataset_path is used as is (--split %s ignored unless it is a DatasetDict).", args.split
        )
    source_keys = ("dataset", "data_dir", "train_dataset_path", "split", "frames_per_story", "seed")
    return compute_targets(
        args.pretrained_model_name_or_path,
        stories,
        args.output_dir,
        references=references,
        source={k: getattr(args, k) for k in source_keys}
        | {
            "reference_images_dir": args.reference_images_dir,
            "dataset_options": args.dataset_options or None,
        },
        target_type=args.target_type,
        max_characters=args.max_characters,
        name_background=args.name_background,
        store_images=args.store_images,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        storage_dtype=args.storage_dtype,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
