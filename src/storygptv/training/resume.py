"""Resuming a run: which checkpoint (``latest`` with fallback over broken ones), with which settings, and
where the data order and the step counters continue.

- ``--resume_from_checkpoint latest`` takes the newest *complete* ``checkpoint-*`` of ``--output_dir``
  (:func:`~storygptv.training.checkpoints.checkpoint_problem`); newer broken ones are skipped with a
  warning; no checkpoint at all is a fresh run, so a restart loop can always pass ``latest``.
- A new run refuses a folder of an earlier run's checkpoints (a later ``latest`` would mix them) unless
  ``--overwrite_output_dir``, which deletes the checkpoints the run does not continue.
- A resume with other settings than the checkpoint recorded is refused (``--allow_changed_settings``).
- Determinism: the batch of micro-step ``i`` is a pure function of ``(seed, i, rank)``
  (:mod:`storygptv.training.data`), so a run killed and resumed ends with the weights of an
  uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .checkpoints import (
    SETTINGS_KEY,
    TRAINING_STATE_FILE,
    checkpoint_problem,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    read_training_state,
)
from .checks import TrainingSetupError

__all__ = ["check_resume_settings", "find_resume_checkpoint", "resume_training"]

logger = logging.getLogger(__name__)


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
    recorded = state.get(SETTINGS_KEY)
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


def _latest_checkpoint(output_dir: str, overwrite: bool) -> Path | None:
    path, broken = _newest_complete(Path(output_dir))
    if path is None and not broken:
        logger.info("No checkpoint in %s: starting a new training run.", output_dir)
    if path is not None or not broken:
        return path
    if overwrite:
        warnings.warn(
            f"No complete checkpoint in {output_dir!r} ({'; '.join(broken)}): starting a new run "
            "(--overwrite_output_dir).",
            stacklevel=3,
        )
        return None
    raise TrainingSetupError(
        f"--resume_from_checkpoint latest: no checkpoint in {output_dir!r} is complete "
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


def _refuse_used_output_dir(output_dir: str, resumed: Path | None, overwrite: bool) -> None:
    """A new run must not write into a folder of another run's checkpoints unless ``overwrite``
    (:func:`resume_training` then deletes them). A resumed run next to newer complete checkpoints is
    warned: ``latest`` takes them until this run writes past them."""
    if overwrite:
        return
    existing = list_checkpoints(output_dir)
    if resumed is None and existing:
        raise TrainingSetupError(
            f"--output_dir {output_dir!r} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in existing)}). Pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to delete them and start again, or another --output_dir."
        )
    if resumed is not None:
        step = int(read_training_state(resumed).get("global_step", checkpoint_step(resumed)))
        newer = [p for p in existing if checkpoint_step(p) > step and checkpoint_problem(p) is None]
        if newer:
            warnings.warn(
                f"--output_dir {output_dir!r} holds checkpoints newer than {str(resumed)!r} "
                f"({', '.join(p.name for p in newer)}); `--resume_from_checkpoint latest` takes them until this "
                "run replaces them. Pass --overwrite_output_dir to delete them.",
                stacklevel=3,
            )


def find_resume_checkpoint(
    resume_from: str | None,
    output_dir: str,
    settings: Mapping[str, Any],
    *,
    overwrite: bool = False,
    allow_changed_settings: bool = False,
) -> str | None:
    """The checkpoint to resume from, or ``None`` for a fresh run. Call it before any long work.

    Args:
        resume_from: ``--resume_from_checkpoint``. ``None``: a fresh run, refused when ``output_dir``
            already holds checkpoints unless ``overwrite``. ``"latest"``: the newest complete
            ``checkpoint-*`` of ``output_dir`` (``None`` with a log line when there is none; an error when
            every one is broken, unless ``overwrite``). A path: a checkpoint folder, or a folder holding
            ``checkpoint-*`` (the newest complete one); a path that does not exist, is incomplete or holds
            no checkpoint raises ``TrainingSetupError``.
        output_dir: ``--output_dir``.
        settings: the run's settings (:func:`storygptv.training.arguments.run_settings`); they must equal
            the checkpoint's unless ``allow_changed_settings`` (``--allow_changed_settings``).
        overwrite: ``--overwrite_output_dir``.
    """
    path = None
    if resume_from == "latest":
        path = _latest_checkpoint(output_dir, overwrite)
    elif resume_from:
        path = _given_checkpoint(resume_from)
    _refuse_used_output_dir(output_dir, path, overwrite)
    if path is None:
        return None
    check_resume_settings(path, read_training_state(path), settings, allow_changed_settings)
    return str(path)


def _remove_overwritten(accelerator: Any, output_dir: str, resumed_step: int | None) -> None:
    """The main process deletes the checkpoints this run does not continue (all of them for a new run; the
    newer ones for a resumed run), so ``latest`` can never take them."""
    if accelerator.is_main_process:
        for path in list_checkpoints(output_dir):
            if resumed_step is None or checkpoint_step(path) > resumed_step:
                logger.info("--overwrite_output_dir: removing %s", path)
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def resume_training(
    accelerator: Any,
    resume_path: str | os.PathLike | None,
    sampler: Any,
    *,
    output_dir: str,
    gradient_accumulation_steps: int,
    overwrite: bool = False,
    log: Callable[[str], Any] | None = None,
) -> int:
    """Load ``resume_path`` (from :func:`find_resume_checkpoint`; ``None``: a fresh run) and return the
    optimizer step to continue from.

    The data order (``sampler.start_batch`` of a
    :class:`~storygptv.training.data.ResumableBatchSampler`) and accelerate's micro-step counter
    (``accelerator.step``, which decides the synchronising micro-steps) continue from micro-step
    ``global_step * gradient_accumulation_steps``. With ``overwrite`` (``--overwrite_output_dir``) the
    checkpoints of ``output_dir`` the run does not continue are deleted first. ``log`` (default
    ``accelerator.print``) receives the "Resumed from ..." line.
    """
    global_step = 0
    if resume_path:
        global_step = int(load_checkpoint(accelerator, resume_path)["global_step"])
        (log or accelerator.print)(f"Resumed from {resume_path} at step {global_step}.")
    if overwrite:
        _remove_overwritten(accelerator, output_dir, global_step if resume_path else None)
    start_micro = global_step * gradient_accumulation_steps
    accelerator.step = start_micro
    sampler.start_batch = start_micro
    return global_step
