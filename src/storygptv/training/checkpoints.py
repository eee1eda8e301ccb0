"""Checkpoints that never lose or mix work: written to a hidden folder, completed, renamed, then pruned.

A checkpoint is ``accelerator.save_state`` into ``output_dir/.partial-checkpoint-<step>``; then
``training_state.json`` is written last, recording ``global_step``, the script's extra state, the size of
every file and the run's settings (with their fingerprint); the folder is renamed ``checkpoint-<step>``
and only then are old checkpoints pruned (``checkpoints_total_limit``). A save that fails (a full disk, a
kill) leaves the earlier checkpoints as they were, and :func:`checkpoint_problem` tells a complete
checkpoint from a broken one (missing or truncated files, bad safetensors headers), so that
:mod:`storygptv.training.resume` can fall back to the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..loading import safetensors_problem
from .checks import TrainingSetupError

__all__ = [
    "PARTIAL_CHECKPOINT_PREFIX",
    "TRAINING_STATE_FILE",
    "checkpoint_problem",
    "checkpoint_step",
    "dump_rank_hash",
    "list_checkpoints",
    "load_checkpoint",
    "read_training_state",
    "save_checkpoint",
    "settings_fingerprint",
    "state_dict_hash",
]

logger = logging.getLogger(__name__)

#: File written by :func:`save_checkpoint` next to accelerate's state.
TRAINING_STATE_FILE = "training_state.json"

#: Prefix of the hidden folder a checkpoint is written into; it is renamed ``checkpoint-<step>`` once complete.
PARTIAL_CHECKPOINT_PREFIX = ".partial-checkpoint-"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Keys that save_checkpoint adds to training_state.json for itself (load_checkpoint leaves them out).
FILES_KEY, SETTINGS_KEY, FINGERPRINT_KEY = "checkpoint_files", "settings", "settings_fingerprint"
_RESERVED_KEYS = (FILES_KEY, SETTINGS_KEY, FINGERPRINT_KEY)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir`` (complete or not), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in the name of a ``checkpoint-<step>`` folder (-1 for any other name)."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else -1


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short SHA-256 of a run's settings (:func:`storygptv.training.arguments.run_settings`), recorded in
    every checkpoint with the settings themselves."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``training_state.json`` of checkpoint folder ``path`` as written (``{}`` when there is none)."""
    state_file = Path(path) / TRAINING_STATE_FILE
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
        state = read_training_state(path)
    except (OSError, ValueError) as error:
        return f"its {TRAINING_STATE_FILE} is unreadable ({error})"
    if not state:
        return f"it has no {TRAINING_STATE_FILE} (the save did not finish)"
    if not isinstance(state.get("global_step"), int):
        return f"its {TRAINING_STATE_FILE} records no global_step"
    if FILES_KEY not in state and any(path.glob("random_states_*.pkl")) and not _has_optimizer_state(path):
        return (
            "it has no optimizer state (optimizer*.bin)"  # an older version's checkpoint, without file list
        )
    for name, size in dict(state.get(FILES_KEY) or {}).items():
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
    state.update({FILES_KEY: files, SETTINGS_KEY: dict(settings)})
    state[FINGERPRINT_KEY] = settings_fingerprint(settings)
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
    older = [
        p for p in others if checkpoint_step(p) < checkpoint_step(keep) and checkpoint_problem(p) is None
    ]
    kept = older[len(older) - (limit - 1) :] if limit > 1 else []
    for path in others:
        if path not in kept:
            logger.info("Removing old checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    settings: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
    total_limit: int | None = None,
) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-{step}``; call it on *every* process.

    The state goes to a hidden partial folder first; ``training_state.json`` (``global_step``, ``extra``,
    the size of every file and the run's ``settings``) is written last, the folder is renamed into place,
    and only then does the main process prune the checkpoints beyond ``total_limit``
    (``--checkpoints_total_limit``; ``None`` keeps all). A save that fails (a full disk, a kill) leaves the
    earlier checkpoints as they were. Returns the folder.
    """
    root = Path(output_dir)
    final, partial = root / f"checkpoint-{step}", root / f"{PARTIAL_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": int(step), **dict(extra or {})}
        _finish_checkpoint(partial, state, settings)
        _move_into_place(partial, final)
        _prune_checkpoints(root, final, total_limit)
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
    state = read_training_state(path)
    if state:
        return {k: v for k, v in state.items() if k not in _RESERVED_KEYS}
    if checkpoint_step(path) < 0:
        raise TrainingSetupError(
            f"Cannot tell the step of checkpoint {str(path)!r} (no {TRAINING_STATE_FILE})."
        )
    return {"global_step": checkpoint_step(path)}


def state_dict_hash(module: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and exact values), for cross-rank/resume checks."""
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def dump_rank_hash(output_dir: str | os.PathLike, rank: int, module: torch.nn.Module) -> Path:
    """Write ``output_dir/rank{rank}.txt``, the :func:`state_dict_hash` of ``module``: the multi-process and
    resume tests compare these files (scripts call it with the hidden ``--debug_dump_rank_hash``)."""
    path = Path(output_dir) / f"rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(state_dict_hash(module) + "\n")
    return path
