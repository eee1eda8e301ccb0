"""The command line shared by every training script: the one module that knows the argparse namespace.

The options follow the diffusers training examples (``--pretrained_model_name_or_path``, ``--output_dir``,
``--checkpointing_steps``, ``--resume_from_checkpoint latest``, ``--push_to_hub`` ...). The library functions
of :mod:`storygptv.training` take explicit values; a script unpacks ``args`` where it calls them. The only
functions here that read a namespace are the parser's own and :func:`run_settings`, which turns the options
that determine a run's result into the settings a checkpoint records.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checks import DATASET_CHOICES

__all__ = [
    "DATASET_HELP",
    "DATASET_OPTIONS_HELP",
    "DATA_DIR_HELP",
    "SETTINGS_KEYS",
    "TRAIN_DATASET_PATH_HELP",
    "add_common_args",
    "frames_per_story_default",
    "json_object",
    "run_settings",
    "training_arg_parser",
]

#: Options whose values determine a run's result; resuming with other values is refused
#: (``--allow_changed_settings`` overrides). Scripts add their own with ``run_settings(args, extra)``.
SETTINGS_KEYS: tuple[str, ...] = (
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "dataset",
    "data_dir",
    "num_stories",
    "train_dataset_path",
    "dataset_options",
    "pretrained_model_name_or_path",
)
_PATH_SETTINGS = ("data_dir", "train_dataset_path", "pretrained_model_name_or_path")


#: Help of the data options, shared with the scripts that build their own parser (precompute_targets.py).
DATASET_HELP = (
    "Training data: flintstones or pororo (a downloaded release in --data_dir), synthsv (generated), or folder "
    "(your own stories in --data_dir: frames, metadata.jsonl and characters/; see the README section 'Fine-tune on your own stories')."
)
DATASET_OPTIONS_HELP = (
    "Extra options of the dataset loader as a JSON object, e.g. '{\"four_character_rate\": 0.7}' (SynthSV's "
    "four-character variant; storygptv.data.load_story_dataset lists each dataset's options)."
)
DATA_DIR_HELP = "The release folder (flintstones, pororo) or your story folder (folder); synthsv needs none."
TRAIN_DATASET_PATH_HELP = (
    "Instead of --dataset: a datasets `save_to_disk` folder (a Dataset, or a DatasetDict whose split is used) "
    "of stories in the package's story schema (storygptv.data.STORY_COLUMNS, e.g. a saved "
    "load_story_dataset(...)). Reference images then come from --reference_images_dir."
)


def json_object(text: str) -> dict[str, Any]:
    """An option holding a JSON object (``--dataset_options``, ``--story_config_overrides``): the argparse
    ``type`` that parses it, with a clear error otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ('{{\"name\": value, ...}}'), got {text!r}")
    return value


def frames_per_story_default(dataset: str, frames_per_story: int | None) -> int | None:
    """``--frames_per_story`` of a run: the given value, else 4 (the story length of the releases and SynthSV),
    or ``None`` (whole stories) for ``--dataset folder``."""
    if frames_per_story is not None:
        return frames_per_story
    return None if dataset == "folder" else 4


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options shared by every training script (diffusers-examples names) to ``parser``.

    Scripts change defaults with ``parser.set_defaults(...)`` after this call. Adds:
    ``--pretrained_model_name_or_path``, ``--dataset``, ``--data_dir``, ``--num_stories``,
    ``--train_dataset_path`` (a ``datasets.save_to_disk`` folder of stories), ``--output_dir``,
    ``--train_batch_size``, ``--gradient_accumulation_steps``, ``--learning_rate``, ``--adam_*``,
    ``--lr_scheduler``, ``--lr_warmup_steps``, ``--lr_step_size``, ``--lr_step_gamma``, ``--max_train_steps``,
    ``--mixed_precision``,
    ``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint``,
    ``--overwrite_output_dir``, ``--allow_changed_settings``, ``--seed``,
    ``--report_to``, ``--logging_dir``, ``--tracker_project_name``, ``--push_to_hub``,
    ``--hub_model_id``, ``--hub_token``, ``--hub_private``, ``--dataloader_num_workers``,
    ``--max_grad_norm``, ``--logging_steps``, and the hidden ``--debug_dump_rank_hash`` /
    ``--debug_interrupt_at_step`` (the multi-process and resume tests).
    """
    g = parser.add_argument_group("common training options")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or local folder of the model to start from.",
    )
    g.add_argument("--dataset", type=str, default="synthsv", choices=DATASET_CHOICES, help=DATASET_HELP)
    g.add_argument("--data_dir", type=str, default=None, help=DATA_DIR_HELP)
    g.add_argument("--num_stories", type=int, default=None, help="Use only the first N stories of the split.")
    g.add_argument("--train_dataset_path", type=str, default=None, help=TRAIN_DATASET_PATH_HELP)
    g.add_argument(
        "--dataset_options",
        type=json_object,
        default={},
        help=DATASET_OPTIONS_HELP,
    )
    g.add_argument("--output_dir", type=str, default="outputs/run", help="Checkpoints, logs, final model.")
    g.add_argument("--train_batch_size", type=int, default=32, help="Batch size per device.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='diffusers scheduler: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
        '"constant_with_warmup"; or "warmup_step" (linear warm-up, then x --lr_step_gamma every '
        "--lr_step_size optimizer steps). All count optimizer steps (storygptv.training.loop).",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps.")
    g.add_argument(
        "--lr_step_size", type=int, default=10_000, help="warmup_step: optimizer steps between LR drops."
    )
    g.add_argument("--lr_step_gamma", type=float, default=0.1, help="warmup_step: factor of each LR drop.")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Optimizer steps in total.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the state every N optimizer steps (and after the last one).",
    )
    g.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most N checkpoints (oldest pruned).",
    )
    g.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder, or "latest" (the newest complete checkpoint-* in --output_dir; a fresh run '
        "when there is none).",
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds checkpoints of an earlier run (they are deleted).",
    )
    g.add_argument(
        "--allow_changed_settings",
        action="store_true",
        help="Resume although seed, batch size, accumulation, learning rate, data or model differ from the "
        "checkpoint's.",
    )
    g.add_argument("--seed", type=int, default=0, help="Seeds data order, noise and augmentation.")
    g.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='"tensorboard" (default), "wandb", "all" or "none".',
    )
    g.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    g.add_argument("--tracker_project_name", type=str, default=None)
    g.add_argument("--logging_steps", type=int, default=1, help="Log the loss every N optimizer steps.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the final folder to the Hub.")
    g.add_argument(
        "--hub_model_id", type=str, default=None, help="Repo id (default: the output folder name)."
    )
    g.add_argument("--hub_token", type=str, default=None, help="Token (default: the cached login).")
    g.add_argument("--hub_private", action="store_true", help="Create the repo as private.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--debug_dump_rank_hash", action="store_true", help=argparse.SUPPRESS)
    # Stop with KeyboardInterrupt right after this optimizer step (and its checkpoint), like a killed run.
    g.add_argument("--debug_interrupt_at_step", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def training_arg_parser(doc: str, *, allow_abbrev: bool = True, **defaults: Any) -> argparse.ArgumentParser:
    """A script's parser: described by the first paragraph of ``doc`` (its module docstring), with the
    :func:`add_common_args` options and the script's own ``defaults`` for them (``parser.set_defaults``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=allow_abbrev)
    add_common_args(parser)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def run_settings(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings that determine a run's result: the :data:`SETTINGS_KEYS` of ``args``, plus ``extra``.

    Existing local paths are made absolute (the same folder named from another working directory is the
    same setting), and values are JSON-normalised so that they compare equal to the ones read back from
    a checkpoint. A script adds its own keys with ``extra`` (e.g. ``{"resolution": args.resolution}``) and
    passes the result to :func:`~storygptv.training.checkpoints.find_resume_checkpoint` and
    :func:`~storygptv.training.checkpoints.save_checkpoint`.
    """
    settings = {key: getattr(args, key, None) for key in SETTINGS_KEYS}
    for key in _PATH_SETTINGS:
        value = settings[key]
        if value and Path(str(value)).expanduser().exists():
            settings[key] = str(Path(str(value)).expanduser().resolve())
    settings.update(extra or {})
    return json.loads(json.dumps(settings, sort_keys=True, default=str))
