"""The ``accelerate`` side of a training run: the ``Accelerator``, its trackers, logging and weight dtypes."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["init_trackers", "make_accelerator", "setup_logging", "weight_dtype_for"]


def setup_logging() -> None:
    """The log format of the training scripts (INFO level), set at the start of ``main``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def make_accelerator(
    output_dir: str,
    *,
    logging_dir: str = "logs",
    report_to: str | None = "tensorboard",
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    train_batch_size: int | None = None,
    kwargs_handlers: Sequence[Any] | None = None,
) -> Any:
    """An ``accelerate.Accelerator`` for a run writing into ``output_dir``.

    Args:
        output_dir: the run's folder (``--output_dir``); trackers log into ``output_dir/logging_dir``.
        logging_dir: ``--logging_dir``, relative to ``output_dir``.
        report_to: ``--report_to``; ``"none"`` (or ``None``) disables trackers, so no tensorboard is needed.
        gradient_accumulation_steps: micro-steps per optimizer step (``accelerator.accumulate``).
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``None`` (accelerate's configuration).
        train_batch_size: the per-process batch; DeepSpeed is told it, because the scripts build their
            own (resumable) data loaders instead of handing them to ``accelerator.prepare``.
        kwargs_handlers: accelerate handlers. DDP runs with ``find_unused_parameters=True`` unless one of
            them says otherwise (some conditioning modes leave the fuser unused in a batch).

    Launched as several processes (``WORLD_SIZE > 1``) on a machine without GPUs, the processes run on CPU
    with gloo (accelerate only does that with ``cpu=True``; ``configs/cpu_2proc.yaml`` relies on it).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    trackers = None if str(report_to).lower() in ("none", "", "null") else report_to
    project = ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, logging_dir))
    handlers = list(kwargs_handlers) if kwargs_handlers is not None else []
    if not any(isinstance(h, DistributedDataParallelKwargs) for h in handlers):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=distributed and not _has_accelerator(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=trackers,
        project_config=project,
        kwargs_handlers=handlers,
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and train_batch_size is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train_batch_size
    return accelerator


def _has_accelerator() -> bool:
    backend = getattr(torch, "accelerator", None)
    if backend is not None and hasattr(backend, "is_available"):
        return bool(backend.is_available())
    return torch.cuda.is_available()


def init_trackers(accelerator: Any, project_name: str, config: Mapping[str, Any]) -> None:
    """Start the trackers (if any) on the main process under ``project_name``.

    ``config`` (e.g. ``vars(args)``) is recorded with its scalar values only, and never a value whose name
    mentions a token (``--hub_token``).
    """
    if accelerator.is_main_process and accelerator.log_with:
        scalars = {
            k: v for k, v in config.items() if isinstance(v, int | float | str | bool) and "token" not in k
        }
        accelerator.init_trackers(project_name, config=scalars)


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The dtype of the frozen weights under ``mixed_precision`` (``"fp16"``, ``"bf16"``; else float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
