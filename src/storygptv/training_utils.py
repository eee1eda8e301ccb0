"""Shared helpers for the training scripts of ``storygptv`` (``training_scripts/*.py``).

The command-line interface follows the diffusers training examples (``--pretrained_model_name_or_path``,
``--output_dir``, ``--checkpointing_steps``, ``--resume_from_checkpoint latest``, ``--push_to_hub`` ...)
and every check that can fail runs *before* any long work.

Stable API (imported by the stage-1 and stage-2 scripts):

- :func:`add_common_args`, :func:`training_arg_parser`, :func:`check_dataset_args`,
  :func:`check_pipeline_folder`, :func:`setup_logging`;
- :func:`make_accelerator`, :func:`init_trackers`, :func:`weight_dtype_for`;
- :func:`make_optimizer`, :func:`make_lr_scheduler`, :func:`prepare_training`, :func:`optimizer_step`;
- :func:`find_resume_checkpoint`, :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`resume_training`, :func:`end_of_step_checkpoint`, :func:`checkpoint_problem`,
  :func:`run_settings`, :func:`settings_fingerprint`, :func:`check_resume_settings`;
- :func:`make_batch_sampler`, :func:`make_train_dataloader`, :func:`next_batch`,
  :func:`seed_micro_step`, :func:`progress_bar`, :func:`add_running`, :func:`end_optimizer_step`,
  :func:`log_running_means`
  (the pieces of the training loops);
- :class:`ResumableBatchSampler`, :func:`derive_seed`, :func:`step_generator`, :func:`seeded_collate`,
  :class:`IndexedBatchDataset` (deterministic data order, noise and augmentation that a resumed run
  reproduces exactly);
- :func:`load_train_stories` (``--dataset`` / ``--data_dir`` / hidden ``--train_dataset_path``);
- :func:`make_ema` (diffusers ``EMAModel``);
- :func:`write_model_card`, :func:`card_dataset_name`, :func:`push_folder_to_hub`,
  :func:`push_output_to_hub`;
- :func:`state_dict_hash`, :func:`dump_rank_hash` (for cross-rank and resume checks);
- :func:`training_result`, :func:`finish_training` (the end of a stage-1 run).

Checkpoint contract: a checkpoint is written to a hidden folder, completed (``training_state.json``
last, with the size of every file and the run's settings) and renamed into place before old ones are
pruned; ``latest`` takes the newest complete one; a new run refuses a folder of an earlier run's
checkpoints (``--overwrite_output_dir``); a resume with other settings is refused
(``--allow_changed_settings``).

Determinism contract: the batch of micro-step ``i`` (data order, collator randomness, noise and
timesteps) is a pure function of ``(seed, i, rank)``, so a run killed and restarted with
``--resume_from_checkpoint latest`` ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loading import safetensors_problem

__all__ = [
    "DATASET_CHOICES",
    "IndexedBatchDataset",
    "ResumableBatchSampler",
    "SETTINGS_KEYS",
    "TrainingSetupError",
    "add_common_args",
    "add_running",
    "card_dataset_name",
    "check_dataset_args",
    "check_pipeline_folder",
    "check_resume_settings",
    "checkpoint_problem",
    "derive_seed",
    "dump_rank_hash",
    "end_optimizer_step",
    "end_of_step_checkpoint",
    "find_resume_checkpoint",
    "finish_training",
    "init_trackers",
    "list_checkpoints",
    "load_checkpoint",
    "load_train_stories",
    "log_running_means",
    "make_accelerator",
    "make_batch_sampler",
    "make_ema",
    "make_lr_scheduler",
    "make_optimizer",
    "make_train_dataloader",
    "next_batch",
    "optimizer_step",
    "prepare_training",
    "progress_bar",
    "push_folder_to_hub",
    "push_output_to_hub",
    "resume_training",
    "run_settings",
    "save_checkpoint",
    "seed_micro_step",
    "seeded_collate",
    "settings_fingerprint",
    "setup_logging",
    "state_dict_hash",
    "step_generator",
    "training_arg_parser",
    "training_result",
    "weight_dtype_for",
    "write_model_card",
]

logger = logging.getLogger(__name__)

#: Values of ``--dataset``.
DATASET_CHOICES: tuple[str, ...] = ("flintstones", "pororo", "synthsv")

#: File written by :func:`save_checkpoint` next to accelerate's state.
TRAINING_STATE_FILE = "training_state.json"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainingSetupError(ValueError):
    """A user error found before training starts (bad dataset folder, model folder, resume path...)."""


# ----------------------------------------------------------------------------------------------- CLI
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options shared by every training script (diffusers-examples names) to ``parser``.

    Scripts change defaults with ``parser.set_defaults(...)`` after this call. Adds:
    ``--pretrained_model_name_or_path``, ``--dataset``, ``--data_dir``, ``--num_stories``,
    ``--train_dataset_path`` (hidden: a ``datasets.save_to_disk`` folder of stories), ``--output_dir``,
    ``--train_batch_size``, ``--gradient_accumulation_steps``, ``--learning_rate``, ``--adam_*``,
    ``--lr_scheduler``, ``--lr_warmup_steps``, ``--max_train_steps``, ``--mixed_precision``,
    ``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint``,
    ``--overwrite_output_dir``, ``--allow_changed_settings``, ``--seed``,
    ``--report_to``, ``--logging_dir``, ``--tracker_project_name``, ``--push_to_hub``,
    ``--hub_model_id``, ``--hub_token``, ``--hub_private``, ``--dataloader_num_workers``,
    ``--max_grad_norm``, ``--logging_steps``, ``--debug_dump_rank_hash`` (hidden).
    """
    g = parser.add_argument_group("common training options")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or local folder of the model to start from.",
    )
    g.add_argument("--dataset", type=str, default="synthsv", choices=DATASET_CHOICES, help="Training data.")
    g.add_argument(
        "--data_dir",
        type=str,
        default=None,
        help="Folder of the downloaded release (FlintstonesSV / PororoSV); SynthSV is generated.",
    )
    g.add_argument("--num_stories", type=int, default=None, help="Use only the first N stories of the split.")
    g.add_argument("--train_dataset_path", type=str, default=None, help=argparse.SUPPRESS)
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
        '"constant_with_warmup".',
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps (honoured).")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Optimizer steps in total.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save the state every N steps.")
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
    return parser


def training_arg_parser(doc: str, *, allow_abbrev: bool = True, **defaults: Any) -> argparse.ArgumentParser:
    """A script's parser: described by the first paragraph of ``doc`` (its module docstring), with the
    :func:`add_common_args` options and the script's own ``defaults`` for them (``parser.set_defaults``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=allow_abbrev)
    add_common_args(parser)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def setup_logging() -> None:
    """The log format of the training scripts (INFO level), set at the start of ``main``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


# ------------------------------------------------------------------------------------------ checks
def check_dataset_args(args: argparse.Namespace) -> None:
    """Fail fast (``TrainingSetupError``) on an unknown dataset or a data folder in the wrong layout.

    Only file names are checked (cheap). ``--train_dataset_path`` (a ``save_to_disk`` folder) bypasses
    the release checks.
    """
    path = getattr(args, "train_dataset_path", None)
    if path:
        root = Path(path)
        if not (root / "dataset_info.json").exists() and not (root / "dataset_dict.json").exists():
            raise TrainingSetupError(
                f"--train_dataset_path {str(root)!r} is not a `datasets.Dataset.save_to_disk` folder "
                "(no dataset_info.json)."
            )
        return
    name = str(getattr(args, "dataset", "") or "").lower()
    if name not in DATASET_CHOICES:
        raise TrainingSetupError(f"Unknown dataset {args.dataset!r}; valid: {list(DATASET_CHOICES)}.")
    if name == "synthsv":
        return
    if not args.data_dir:
        raise TrainingSetupError(
            f"--dataset {name} needs --data_dir: the folder of its downloaded release (nothing is downloaded)."
        )
    root = Path(args.data_dir)
    if not root.is_dir():
        raise TrainingSetupError(f"--data_dir {str(root)!r} does not exist.")
    if name == "flintstones":
        from .data.flintstones import detect_layout

        try:
            detect_layout(root)
        except FileNotFoundError as error:
            raise TrainingSetupError(str(error)) from error
        return
    from .data.pororo import LAYOUT, STORYGPTV_LAYOUT

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


# ------------------------------------------------------------------------------------- accelerate
def make_accelerator(args: argparse.Namespace, kwargs_handlers: Sequence[Any] | None = None) -> Any:
    """An ``accelerate.Accelerator`` from the common options.

    ``--report_to none`` disables trackers (no tensorboard needed); the logging dir is
    ``output_dir/logging_dir``. DDP runs with ``find_unused_parameters=True`` unless ``kwargs_handlers``
    says otherwise (some conditioning modes leave the fuser unused in a batch). Launched as several
    processes (``WORLD_SIZE > 1``) on a machine without GPUs, the processes run on CPU with gloo.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    report_to = None if str(args.report_to).lower() in ("none", "", "null") else args.report_to
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    handlers = list(kwargs_handlers) if kwargs_handlers is not None else []
    if not any(isinstance(h, DistributedDataParallelKwargs) for h in handlers):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # `accelerate launch --multi_gpu` / `torchrun` on a machine without GPUs: run the processes on
    # CPU with gloo (accelerate only does that with cpu=True).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=distributed and not _has_accelerator(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
        kwargs_handlers=handlers,
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        # The scripts build their own (resumable) data loaders, so DeepSpeed learns the batch size here.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    return accelerator


def _has_accelerator() -> bool:
    backend = getattr(torch, "accelerator", None)
    if backend is not None and hasattr(backend, "is_available"):
        return bool(backend.is_available())
    return torch.cuda.is_available()


def init_trackers(accelerator: Any, args: argparse.Namespace, default_project: str) -> None:
    """Start the trackers (if any) with the run's scalar hyper-parameters as config."""
    if accelerator.is_main_process and accelerator.log_with:
        config = {
            k: v
            for k, v in vars(args).items()
            if isinstance(v, int | float | str | bool) and "token" not in k
        }
        accelerator.init_trackers(args.tracker_project_name or default_project, config=config)


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The dtype of the frozen weights under ``mixed_precision`` (``"fp16"``, ``"bf16"``; else float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


# ------------------------------------------------------------------------------- optimizer, schedule
def make_optimizer(params: Iterable[Any], args: argparse.Namespace) -> torch.optim.AdamW:
    """``AdamW`` over ``params`` (tensors or parameter groups) with the ``--learning_rate`` and
    ``--adam_*`` options (groups that set their own ``weight_decay`` keep it)."""
    return torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(args: argparse.Namespace, optimizer: Any, num_processes: int = 1) -> Any:
    """The diffusers schedule ``--lr_scheduler`` with ``--lr_warmup_steps`` and ``--max_train_steps``.

    ``num_processes``: pass ``accelerator.num_processes`` for a scheduler given to
    ``accelerator.prepare`` (which steps it once per process and optimizer step); keep 1 for a scheduler
    stepped once per optimizer step (:func:`prepare_training`).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


def prepare_training(
    accelerator: Any, model: Any, optimizer: Any, lr_scheduler: Any, ema: Any = None
) -> tuple[Any, Any]:
    """``accelerator.prepare(model, optimizer)``; the scheduler (stepped by the script once per optimizer
    step) and the EMA (moved to the device) are registered for checkpointing. Returns ``(model, optimizer)``."""
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    return model, optimizer


def optimizer_step(
    accelerator: Any,
    loss: torch.Tensor,
    optimizer: Any,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float | None,
    lr_scheduler: Any = None,
) -> None:
    """Inside ``accelerator.accumulate``: backward, clip to ``max_grad_norm`` on synchronising micro-steps
    (no clipping when it is 0 or ``None``), optimizer step, ``lr_scheduler`` step (a prepared one), zero grads."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ checkpoints
#: Prefix of the hidden folder a checkpoint is written into; it is renamed ``checkpoint-<step>`` once complete.
PARTIAL_CHECKPOINT_PREFIX = ".partial-checkpoint-"

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
    "pretrained_model_name_or_path",
)
_PATH_SETTINGS = ("data_dir", "train_dataset_path", "pretrained_model_name_or_path")

# Keys that save_checkpoint adds to training_state.json for itself (load_checkpoint leaves them out).
_FILES_KEY, _SETTINGS_KEY, _FINGERPRINT_KEY = "checkpoint_files", "settings", "settings_fingerprint"
_RESERVED_KEYS = (_FILES_KEY, _SETTINGS_KEY, _FINGERPRINT_KEY)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir`` (complete or not), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def _step_of(path: Path) -> int:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def run_settings(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings that determine a run's result: the :data:`SETTINGS_KEYS` of ``args``, plus ``extra``.

    Existing local paths are made absolute (the same folder named from another working directory is the
    same setting), and values are JSON-normalised so that they compare equal to the ones read back from
    a checkpoint. A script adds its own keys with ``extra`` (e.g. ``{"resolution": args.resolution}``) and
    passes the result to :func:`find_resume_checkpoint`, :func:`resume_training` and :func:`save_checkpoint`.
    """
    settings = {key: getattr(args, key, None) for key in SETTINGS_KEYS}
    for key in _PATH_SETTINGS:
        value = settings[key]
        if value and Path(str(value)).expanduser().exists():
            settings[key] = str(Path(str(value)).expanduser().resolve())
    settings.update(extra or {})
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short SHA-256 of a :func:`run_settings` dict (recorded in every checkpoint with the dict itself)."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume_settings(
    path: str | os.PathLike,
    state: Mapping[str, Any],
    settings: Mapping[str, Any],
    allow_changed: bool = False,
) -> None:
    """Refuse (``TrainingSetupError``) to resume checkpoint ``path`` (its training ``state``) with ``settings``
    that differ from those it recorded, listing each difference; with ``allow_changed`` only warn.

    Keys recorded on one side only are not compared (a checkpoint of an older version records fewer).
    """
    recorded = state.get(_SETTINGS_KEY)
    if not isinstance(recorded, Mapping):
        logger.info("Checkpoint %s records no settings (an older version wrote it): not compared.", path)
        return
    changes = [
        f"{key}: {recorded[key]!r} in the checkpoint, {settings[key]!r} now"
        for key in sorted(set(recorded) & set(settings))
        if recorded[key] != settings[key]
    ]
    if not changes:
        return
    if allow_changed:
        warnings.warn(
            f"Resuming from {str(path)!r} with changed settings ({'; '.join(changes)}) because of "
            "--allow_changed_settings: the result will differ from an uninterrupted run.",
            stacklevel=3,
        )
        return
    raise TrainingSetupError(
        f"Checkpoint {str(path)!r} was written with other settings: {'; '.join(changes)}. Resume with the "
        "same settings, start a new run in another --output_dir, or pass --allow_changed_settings to "
        "continue with the new ones."
    )


def _read_state(path: Path) -> dict[str, Any]:
    state_file = path / TRAINING_STATE_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from, or ``None`` when it is complete.

    Complete: ``training_state.json`` (written last) is readable and records ``global_step``; every file
    it lists has its recorded size (a missing optimizer state or a truncated file is caught; a checkpoint
    of an older version, without that list, needs an optimizer state); every safetensors file has a valid
    header that covers the file.
    """
    path = Path(path)
    try:
        state = _read_state(path)
    except (OSError, ValueError) as error:
        return f"its {TRAINING_STATE_FILE} is unreadable ({error})"
    if not state:
        return f"it has no {TRAINING_STATE_FILE} (the save did not finish)"
    if not isinstance(state.get("global_step"), int):
        return f"its {TRAINING_STATE_FILE} records no global_step"
    if _FILES_KEY not in state and any(path.glob("random_states_*.pkl")) and not _has_optimizer_state(path):
        return (
            "it has no optimizer state (optimizer*.bin)"  # an older version's checkpoint, without file list
        )
    for name, size in dict(state.get(_FILES_KEY) or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes instead of {size} (truncated or replaced)"
    for file in sorted(path.rglob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return f"{file.relative_to(path).as_posix()} {problem}"
    return None


def _has_optimizer_state(path: Path) -> bool:
    """Whether an accelerate state folder holds optimizer state (plain, FSDP ``optimizer_0`` or DeepSpeed)."""
    return any(path.glob("optimizer*")) or any(path.rglob("*optim_states*"))


def _newest_complete(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest complete ``checkpoint-*`` of ``folder`` and a line for each newer, broken one."""
    broken = []
    for path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            if broken:
                warnings.warn(
                    f"Skipping broken checkpoints ({'; '.join(broken)}); resuming from {str(path)!r}.",
                    stacklevel=4,
                )
            return path, broken
        broken.append(f"{path.name}: {problem}")
    return None, broken


def _overwrite(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "overwrite_output_dir", False))


def _latest_checkpoint(args: argparse.Namespace) -> Path | None:
    path, broken = _newest_complete(Path(args.output_dir))
    if path is None and not broken:
        logger.info("No checkpoint in %s: starting a new training run.", args.output_dir)
    if path is not None or not broken:
        return path
    if _overwrite(args):
        warnings.warn(
            f"No complete checkpoint in {args.output_dir!r} ({'; '.join(broken)}): starting a new run "
            "(--overwrite_output_dir).",
            stacklevel=3,
        )
        return None
    raise TrainingSetupError(
        f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir!r} is complete "
        f"({'; '.join(broken)}). Pass --overwrite_output_dir to delete them and start again, or resume from "
        "a good copy with --resume_from_checkpoint PATH."
    )


def _given_checkpoint(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise TrainingSetupError(f"--resume_from_checkpoint {value!r} does not exist.")
    if (path / TRAINING_STATE_FILE).exists():
        problem = checkpoint_problem(path)
        if problem:
            raise TrainingSetupError(
                f"--resume_from_checkpoint {value!r} is not a complete checkpoint: {problem}. Resume from an "
                "earlier checkpoint."
            )
        return path
    if any(path.glob("random_states_*.pkl")):  # accelerate's own state: the step comes from the name
        return path
    found, broken = _newest_complete(path)
    if found is not None:
        return found
    raise TrainingSetupError(
        f"--resume_from_checkpoint {value!r} holds no checkpoint (expected accelerate state files and "
        f"{TRAINING_STATE_FILE}, or checkpoint-<step> subfolders)"
        + (f"; incomplete: {'; '.join(broken)}." if broken else ".")
    )


def _refuse_used_output_dir(args: argparse.Namespace, resumed: Path | None) -> None:
    """A new run must not write into a folder of another run's checkpoints (a later ``latest`` would mix
    them) unless ``--overwrite_output_dir`` (:func:`resume_training` then deletes them). A resumed run next
    to newer complete checkpoints is warned: ``latest`` takes them until this run writes past them."""
    if _overwrite(args):
        return
    existing = list_checkpoints(args.output_dir)
    if resumed is None and existing:
        raise TrainingSetupError(
            f"--output_dir {args.output_dir!r} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in existing)}). Pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to delete them and start again, or another --output_dir."
        )
    if resumed is not None:
        step = int(_read_state(resumed).get("global_step", _step_of(resumed)))
        newer = [p for p in existing if _step_of(p) > step and checkpoint_problem(p) is None]
        if newer:
            warnings.warn(
                f"--output_dir {args.output_dir!r} holds checkpoints newer than {str(resumed)!r} "
                f"({', '.join(p.name for p in newer)}); `--resume_from_checkpoint latest` takes them until this "
                "run replaces them. Pass --overwrite_output_dir to delete them.",
                stacklevel=3,
            )


def find_resume_checkpoint(args: argparse.Namespace, settings: Mapping[str, Any] | None = None) -> str | None:
    """The checkpoint to resume from, or ``None`` for a fresh run. Call it before any long work.

    - ``--resume_from_checkpoint`` unset: ``None``; refused when ``--output_dir`` already holds
      checkpoints, unless ``--overwrite_output_dir``.
    - ``latest``: the newest *complete* ``checkpoint-*`` of ``--output_dir`` (:func:`checkpoint_problem`);
      newer broken ones are skipped with a warning. ``None`` with a log line when there is none, so a
      restart loop can always pass ``latest``; an error when every one is broken.
    - a path: a checkpoint folder, or a folder holding ``checkpoint-*`` (the newest complete one). A path
      that does not exist, is incomplete or holds no checkpoint raises ``TrainingSetupError``.

    The checkpoint's recorded settings must equal ``settings`` (default :func:`run_settings` of ``args``)
    unless ``--allow_changed_settings``.
    """
    value = getattr(args, "resume_from_checkpoint", None)
    path = None
    if value == "latest":
        path = _latest_checkpoint(args)
    elif value:
        path = _given_checkpoint(value)
    _refuse_used_output_dir(args, path)
    if path is None:
        return None
    current = settings if settings is not None else run_settings(args)
    check_resume_settings(path, _read_state(path), current, getattr(args, "allow_changed_settings", False))
    return str(path)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk, so that a rename never outlives the data it names."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some platforms cannot fsync folders
        pass
    finally:
        os.close(fd)


def _finish_checkpoint(folder: Path, state: dict[str, Any], settings: Mapping[str, Any]) -> None:
    """Record every file's size and the settings in ``training_state.json``, written last and durably."""
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }
    for name in files:
        _fsync(folder / name)
    state.update({_FILES_KEY: files, _SETTINGS_KEY: dict(settings)})
    state[_FINGERPRINT_KEY] = settings_fingerprint(settings)
    state_file = folder / TRAINING_STATE_FILE
    state_file.write_text(json.dumps(state, indent=2))
    _fsync(state_file)
    _fsync(folder)


def _move_into_place(partial: Path, final: Path) -> None:
    """Rename the finished ``partial`` folder to ``final``; an earlier folder of that step goes only then."""
    if final.exists():  # an earlier save of this step (found broken and resumed past): replaced now
        old = partial.with_name(partial.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync(final.parent)


def _prune_checkpoints(root: Path, keep: Path, limit: int | None) -> None:
    """Delete partial folders of killed saves and, with ``limit``, all but ``keep`` and the newest
    ``limit - 1`` complete checkpoints older than it."""
    for stale in root.glob(f"{PARTIAL_CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if limit is None or limit <= 0:
        return
    others = [p for p in list_checkpoints(root) if p != keep]
    older = [p for p in others if _step_of(p) < _step_of(keep) and checkpoint_problem(p) is None]
    kept = older[len(older) - (limit - 1) :] if limit > 1 else []
    for path in others:
        if path not in kept:
            logger.info("Removing old checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Any,
    args: argparse.Namespace,
    step: int,
    extra: Mapping[str, Any] | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-{step}``; call it on *every* process.

    The state goes to a hidden partial folder first; ``training_state.json`` (``global_step``, ``extra``,
    the size of every file and the run's ``settings``, default :func:`run_settings`) is written last, the
    folder is renamed into place, and only then does the main process prune checkpoints beyond
    ``--checkpoints_total_limit``. A save that fails (a full disk, a kill) leaves the earlier checkpoints
    as they were. Returns the folder.
    """
    root = Path(args.output_dir)
    final, partial = root / f"checkpoint-{step}", root / f"{PARTIAL_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": int(step), **dict(extra or {})}
        _finish_checkpoint(partial, state, settings if settings is not None else run_settings(args))
        _move_into_place(partial, final)
        _prune_checkpoints(root, final, getattr(args, "checkpoints_total_limit", None))
    accelerator.wait_for_everyone()
    return str(final)


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``accelerator.load_state(path)``; returns the training state (``global_step`` and the saved ``extra``).

    A state that fails to load raises ``TrainingSetupError`` naming the checkpoint.
    """
    path = Path(path)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # any failure inside accelerate/torch: name the checkpoint and the way out
        raise TrainingSetupError(
            f"Checkpoint {str(path)!r} could not be loaded ({type(error).__name__}: {error}). Move it out of "
            "the output folder to resume from the previous one."
        ) from error
    state = _read_state(path)
    if state:
        return {k: v for k, v in state.items() if k not in _RESERVED_KEYS}
    if _step_of(path) < 0:
        raise TrainingSetupError(
            f"Cannot tell the step of checkpoint {str(path)!r} (no {TRAINING_STATE_FILE})."
        )
    return {"global_step": _step_of(path)}


def _remove_overwritten(accelerator: Any, args: argparse.Namespace, resumed_step: int | None) -> None:
    """With ``--overwrite_output_dir``, the main process deletes the checkpoints this run does not continue
    (all of them for a new run; the newer ones for a resumed run), so ``latest`` can never take them."""
    if not _overwrite(args):
        return
    if accelerator.is_main_process:
        for path in list_checkpoints(args.output_dir):
            if resumed_step is None or _step_of(path) > resumed_step:
                logger.info("--overwrite_output_dir: removing %s", path)
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def resume_training(
    accelerator: Any,
    args: argparse.Namespace,
    resume_path: str | os.PathLike | None,
    sampler: ResumableBatchSampler,
    log: Any = None,
) -> int:
    """Load ``resume_path`` (from :func:`find_resume_checkpoint`; ``None``: a fresh run) and return the
    optimizer step to continue from.

    The data order and accelerate's micro-step counter continue from micro-step
    ``global_step * --gradient_accumulation_steps`` (``sampler.start_batch``, ``accelerator.step``).
    With ``--overwrite_output_dir`` the checkpoints the run does not continue are deleted first.
    ``log`` (default ``accelerator.print``) receives the "Resumed from ..." line.
    """
    global_step = 0
    if resume_path:
        global_step = int(load_checkpoint(accelerator, resume_path)["global_step"])
        (log or accelerator.print)(f"Resumed from {resume_path} at step {global_step}.")
    _remove_overwritten(accelerator, args, global_step if resume_path else None)
    start_micro = global_step * args.gradient_accumulation_steps
    accelerator.step = start_micro
    sampler.start_batch = start_micro
    return global_step


def end_of_step_checkpoint(
    accelerator: Any,
    args: argparse.Namespace,
    global_step: int,
    *,
    at_end: bool = False,
    extra: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """After optimizer step ``global_step``: :func:`save_checkpoint` every ``--checkpointing_steps`` (and at
    ``--max_train_steps`` with ``at_end``), recording ``settings`` (default :func:`run_settings`); then stop
    with ``KeyboardInterrupt`` at the hidden ``--debug_interrupt_at_step`` (scripts that have it), like a
    killed run."""
    if global_step % args.checkpointing_steps == 0 or (at_end and global_step == args.max_train_steps):
        # `settings` is passed only when given, so a stand-in for save_checkpoint (tests) may omit it.
        own = {"settings": settings} if settings is not None else {}
        save_checkpoint(accelerator, args, global_step, extra=extra, **own)
    stop_at = getattr(args, "debug_interrupt_at_step", None)
    if stop_at and global_step == stop_at:
        raise KeyboardInterrupt(f"--debug_interrupt_at_step {global_step}")


# ------------------------------------------------------------------------------------ determinism
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(*parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``parts``.

    Use ``step_generator(seed, "noise", micro_step, rank)`` for the noise and timesteps of a micro-step,
    so a resumed run draws the same values without checkpointing generator states.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless, seeded batch sampler: yields ``(batch_index, indices)`` for this rank.

    Epoch ``e`` is a permutation of the examples seeded by ``(seed, e)``. Each global batch holds
    ``batch_size * num_replicas`` indices; rank ``r`` takes its contiguous slice. Incomplete tail
    batches are dropped (every rank gets the same number of batches). ``start_batch`` skips already
    consumed batches without loading them (``resume``).

    Use with :class:`IndexedBatchDataset` and :func:`seeded_collate` (``DataLoader(batch_sampler=...)``).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
    ) -> None:
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.start_batch = int(start_batch)
        self.batches_per_epoch = self.num_examples // (self.batch_size * self.num_replicas)
        if self.batches_per_epoch < 1:
            raise TrainingSetupError(
                f"The dataset has {self.num_examples} examples: fewer than one global batch "
                f"({self.batch_size} x {self.num_replicas} processes). Lower --train_batch_size or add data."
            )

    def epoch_of(self, batch_index: int) -> int:
        """The epoch that batch ``batch_index`` belongs to."""
        return batch_index // self.batches_per_epoch

    def indices(self, batch_index: int) -> list[int]:
        """This rank's example indices of global batch ``batch_index``."""
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        order = torch.randperm(self.num_examples, generator=generator)
        size = self.batch_size * self.num_replicas
        start = within * size + self.rank * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch_index = self.start_batch
        while True:
            yield [(batch_index, i) for i in self.indices(batch_index)]
            batch_index += 1

    def __len__(self) -> int:  # endless; report one epoch for progress displays
        return self.batches_per_epoch


class IndexedBatchDataset(torch.utils.data.Dataset):
    """Wrap a map-style dataset so that ``ds[(batch_index, i)]`` returns ``(batch_index, ds[i])``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        batch_index, index = key
        return batch_index, self.dataset[int(index)]


class seeded_collate:  # noqa: N801 - used like a function
    """``collate_fn`` that reseeds a numpy-``Generator``-based collator per batch.

    The items are ``(batch_index, example)`` pairs (:class:`IndexedBatchDataset`); the collator's
    randomness for the batch is seeded with ``derive_seed(seed, "collate", batch_index, rank)``, the
    same in any DataLoader worker and after a resume. Collators with a ``reseed(seed)`` method are
    reseeded through it; otherwise (``storygptv.data.CharLDMCollator``) the collator's numpy generator
    (``_rng``) is replaced. The batch dict gains ``batch_index`` (int).
    """

    def __init__(self, collator: Any, seed: int, rank: int = 0) -> None:
        self.collator = collator
        self.seed = int(seed)
        self.rank = int(rank)

    def __call__(self, items: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        batch_index = int(items[0][0])
        batch_seed = derive_seed(self.seed, "collate", batch_index, self.rank)
        collator = self.collator  # reseeded in place: its one-time warnings stay one-time
        if hasattr(collator, "reseed"):
            collator.reseed(batch_seed)
        else:
            info = torch.utils.data.get_worker_info()
            collator.seed = batch_seed
            collator._rng = np.random.default_rng(batch_seed)
            collator._rng_worker = info.id if info is not None else None
        batch = dict(collator([example for _, example in items]))
        batch["batch_index"] = batch_index
        return batch


# ------------------------------------------------------------------------------------------- data
def load_train_stories(args: argparse.Namespace, split: str = "train", **kwargs: Any) -> Any:
    """The training stories (one row per story) from ``--dataset/--data_dir`` or ``--train_dataset_path``.

    ``kwargs`` go to :func:`storygptv.data.load_story_dataset` (``frames_per_story``, ``referential``...).
    """
    if getattr(args, "train_dataset_path", None):
        import datasets

        data = datasets.load_from_disk(args.train_dataset_path)
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        if args.num_stories is not None:
            data = data.select(range(min(len(data), args.num_stories)))
        return data
    from .data import load_story_dataset

    if getattr(args, "num_stories", None) is not None:
        kwargs.setdefault("num_stories", args.num_stories)
    return load_story_dataset(args.dataset, data_dir=args.data_dir, split=split, seed=args.seed, **kwargs)


def make_batch_sampler(
    num_examples: int, args: argparse.Namespace, accelerator: Any
) -> ResumableBatchSampler:
    """This process's :class:`ResumableBatchSampler` (``--train_batch_size``, ``--seed``) over ``num_examples``;
    raises ``TrainingSetupError`` when the data holds less than one global batch."""
    return ResumableBatchSampler(
        num_examples,
        args.train_batch_size,
        seed=args.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )


def make_train_dataloader(
    dataset: Any, sampler: ResumableBatchSampler, collator: Any, args: argparse.Namespace
) -> torch.utils.data.DataLoader:
    """The deterministic training loader: ``dataset`` batched by ``sampler`` and collated by ``collator``
    reseeded per batch (:class:`IndexedBatchDataset`, :func:`seeded_collate`)."""
    return torch.utils.data.DataLoader(
        IndexedBatchDataset(dataset),
        batch_sampler=sampler,
        collate_fn=seeded_collate(collator, args.seed, sampler.rank),
        num_workers=args.dataloader_num_workers,
    )


# ------------------------------------------------------------------------------------ training loop
def progress_bar(accelerator: Any, args: argparse.Namespace, initial: int = 0) -> Any:
    """The ``tqdm`` bar over ``--max_train_steps`` optimizer steps (shown on the local main process)."""
    from tqdm.auto import tqdm

    return tqdm(
        range(args.max_train_steps),
        initial=initial,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )


def next_batch(data_iter: Iterator[dict[str, Any]], micro: int) -> dict[str, Any]:
    """The next batch of a :func:`make_train_dataloader` loader, checked to be micro-step ``micro``'s."""
    batch = next(data_iter)
    if batch["batch_index"] != micro:
        raise RuntimeError(f"Data order broke: batch {batch['batch_index']} at micro-step {micro}.")
    return batch


def seed_micro_step(args: argparse.Namespace, stream: str, micro: int, rank: int) -> torch.Generator:
    """Seed micro-step ``micro``: torch's global generator (dropout...) from ``(seed, "torch", micro, rank)``;
    returns the :func:`step_generator` of ``(seed, stream, micro, rank)`` for its noise and timesteps."""
    generator = step_generator(args.seed, stream, micro, rank)
    torch.manual_seed(derive_seed(args.seed, "torch", micro, rank))
    return generator


def add_running(
    running: dict[str, float], values: Mapping[str, torch.Tensor], accumulation_steps: int
) -> None:
    """Add a micro-step's losses (``values``), divided by ``accumulation_steps``, to the step's ``running`` sums."""
    for key, value in values.items():
        running[key] = running.get(key, 0.0) + float(value.detach()) / accumulation_steps


def end_optimizer_step(
    lr_scheduler: Any,
    ema: Any,
    params: Iterable[torch.nn.Parameter],
    progress: Any,
    step_times: list[float],
    tick: float,
) -> float:
    """After a synchronising micro-step (one optimizer step done): step the scheduler (one not given to
    ``accelerator.prepare``) and the EMA, append the step's wall time since ``tick`` (data loading
    included) to ``step_times`` and advance ``progress``. Returns the new ``tick``."""
    lr_scheduler.step()
    if ema is not None:
        ema.step(params)
    now = time.perf_counter()
    step_times.append(now - tick)
    progress.update(1)
    return now


def log_running_means(
    accelerator: Any, running: Mapping[str, float], lr_scheduler: Any, step_time: float, global_step: int
) -> dict[str, float]:
    """Average the step's ``running`` sums over the processes, add ``lr`` and ``step_time_s``, log them at
    ``global_step`` and return them."""
    keys = sorted(running)
    totals = accelerator.reduce(torch.tensor([running[k] for k in keys], device=accelerator.device), "mean")
    logs = {k: float(v) for k, v in zip(keys, totals.tolist())}
    logs |= {"lr": lr_scheduler.get_last_lr()[0], "step_time_s": step_time}
    accelerator.log(logs, step=global_step)
    return logs


# -------------------------------------------------------------------------------------------- EMA
def make_ema(parameters: Iterable[torch.nn.Parameter], decay: float = 0.999, **kwargs: Any) -> Any:
    """A diffusers ``EMAModel`` over ``parameters`` (register it with ``accelerator.register_for_checkpointing``).

    ``ema.step(params)`` after each optimizer step; ``ema.copy_to(params)`` before the final export.
    """
    from diffusers.training_utils import EMAModel

    return EMAModel(list(parameters), decay=decay, **kwargs)


def state_dict_hash(module: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and exact values), for cross-rank/resume checks."""
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def dump_rank_hash(args: argparse.Namespace, rank: int, module: torch.nn.Module) -> None:
    """With the hidden ``--debug_dump_rank_hash``: write ``output_dir/rank{rank}.txt``, the
    :func:`state_dict_hash` of ``module`` (the multi-process tests compare the ranks' files)."""
    if args.debug_dump_rank_hash:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / f"rank{rank}.txt").write_text(state_dict_hash(module) + "\n")


# --------------------------------------------------------------------------------------- end of run
def training_result(
    args: argparse.Namespace, global_step: int, logs: Mapping[str, float], step_times: Sequence[float]
) -> dict[str, Any]:
    """The dict a stage-1 ``main`` returns: ``output_dir``, ``global_step``, the last ``logs`` and the
    mean step time of this session (``None`` when it ran no step)."""
    return {
        "output_dir": args.output_dir,
        "global_step": global_step,
        "logs": logs,
        "mean_step_time_s": (sum(step_times) / len(step_times)) if step_times else None,
    }


def finish_training(accelerator: Any, args: argparse.Namespace, result: Mapping[str, Any]) -> None:
    """Wait for every process, end the trackers and print the summary line of a :func:`training_result`."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if result["mean_step_time_s"] is not None:
        accelerator.print(
            f"Done: {result['global_step']} steps, mean {result['mean_step_time_s']:.3f} s/step this session; "
            f"final model in {args.output_dir}."
        )


# ------------------------------------------------------------------------------------- model cards
def _template_text(template_name: str) -> str:
    name = template_name if template_name.endswith(".md") else f"{template_name}.md"
    resource = importlib.resources.files("storygptv").joinpath("hub_cards", name)
    if not resource.is_file():
        available = sorted(
            p.name
            for p in importlib.resources.files("storygptv").joinpath("hub_cards").iterdir()
            if p.name.endswith(".md")
        )
        raise TrainingSetupError(f"Unknown model-card template {template_name!r}; available: {available}.")
    return resource.read_text(encoding="utf-8")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def write_model_card(
    folder: str | os.PathLike,
    template_name: str,
    *,
    repo_id: str | None = None,
    base_model: str | Sequence[str] | None = None,
    dataset: str | Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    pipeline_tag: str | None = "text-to-image",
    **fields: Any,
) -> Any:
    """Write ``folder/README.md`` from the package template ``storygptv/hub_cards/<template_name>.md``.

    Metadata: ``library_name: diffusers``, ``pipeline_tag`` (text-to-image), ``tags`` (storygptv,
    story-visualization, diffusers + ``tags``), ``license``, ``inference: false``, ``base_model``,
    ``datasets``. The template receives ``repo_id``, ``model_name``, ``base_model``, ``dataset``,
    ``hyperparameters`` (a markdown table), ``metrics`` (a markdown table), and ``fields``. Returns the
    ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_models = [base_model] if isinstance(base_model, str) else list(base_model or [])
    # Only Hub ids are valid `base_model` metadata; local folders go into the text only.
    hub_bases = [b for b in base_models if b and not Path(b).exists() and re.match(r"^[\w.-]+/[\w.-]+$", b)]
    datasets_ = [dataset] if isinstance(dataset, str) else list(dataset or [])
    all_tags = ["storygptv", "story-visualization", "diffusers"]
    all_tags += [t for t in tags if t not in all_tags]
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=all_tags,
        base_model=hub_bases or None,
        datasets=[d for d in datasets_ if "/" in d] or None,
        inference=False,
    )
    hp_rows = "\n".join(f"| `{k}` | {_format_value(v)} |" for k, v in (hyperparameters or {}).items())
    metric_rows = "\n".join(f"| {k} | {_format_value(v)} |" for k, v in (metrics or {}).items())
    model_name = repo_id or fields.pop("model_name", None) or folder.name
    card = ModelCard.from_template(
        data,
        template_str=_template_text(template_name),
        repo_id=repo_id or model_name,
        model_name=model_name,
        base_model=", ".join(base_models) or "(trained from scratch)",
        dataset=", ".join(datasets_) or "(unspecified)",
        hyperparameters=("| option | value |\n|---|---|\n" + hp_rows) if hp_rows else "(none recorded)",
        metrics=("| metric | value |\n|---|---|\n" + metric_rows) if metric_rows else "(not evaluated)",
        **fields,
    )
    card.save(str(folder / "README.md"))
    return card


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload storygptv model",
    ignore_patterns: Sequence[str] = ("checkpoint-*", "logs/*", "step_*", "epoch_*", "rank*.txt"),
) -> str:
    """``create_repo(exist_ok=True)`` + ``upload_folder`` (checkpoints and logs left out); returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
    )
    return str(getattr(info, "commit_url", info))


def _is_local_path(value: str) -> bool:
    return bool(value) and (os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value))


def _without_local_paths(value: Any) -> tuple[Any, bool]:
    if isinstance(value, dict):
        changed = False
        out = {}
        for key, item in value.items():
            if key in ("_name_or_path", "name_or_path") and isinstance(item, str) and _is_local_path(item):
                changed = True
                continue
            out[key], sub = _without_local_paths(item)
            changed |= sub
        return out, changed
    if isinstance(value, list):
        items = [_without_local_paths(item) for item in value]
        return [item for item, _ in items], any(sub for _, sub in items)
    return value, False


def scrub_local_paths(folder: str | os.PathLike) -> list[Path]:
    """Remove ``_name_or_path`` entries that name a folder of the training machine from an exported model.

    diffusers and transformers record where each component was loaded from; in a folder meant for the Hub
    (or a package) that is a path of the training machine, meaningless elsewhere. Hub ids are kept.
    Checkpoint folders are left alone. Returns the JSON files that changed.
    """
    changed = []
    for path in sorted(Path(folder).rglob("*.json")):
        if any(part.startswith("checkpoint-") for part in path.relative_to(folder).parts):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        clean, dirty = _without_local_paths(data)
        if dirty:
            path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            changed.append(path)
    return changed


def card_dataset_name(args: argparse.Namespace) -> str:
    """The training data as model cards name it: ``--dataset``, marked when ``--train_dataset_path`` gave a
    custom copy."""
    return args.dataset if not args.train_dataset_path else f"{args.dataset} (custom copy)"


def push_output_to_hub(args: argparse.Namespace) -> str:
    """:func:`push_folder_to_hub` of ``--output_dir`` to ``--hub_model_id`` (default: the folder's name),
    with ``--hub_token`` and ``--hub_private``; returns the commit URL."""
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    return push_folder_to_hub(args.output_dir, repo_id, args.hub_token, args.hub_private or None)
