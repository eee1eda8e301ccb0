"""Publishing a trained folder: local paths scrubbed from its configs, then uploaded to the Hub."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TRAINING_LEFTOVERS", "hub_repo_id", "push_folder_to_hub", "scrub_local_paths"]

#: What an upload leaves out of a training output folder: training state, logs, caches and debug files.
TRAINING_LEFTOVERS: tuple[str, ...] = ("checkpoint-*", "logs/*", "rank*.txt", "latent_cache.safetensors")


def hub_repo_id(hub_model_id: str | None, output_dir: str | os.PathLike) -> str:
    """The repo an output folder is pushed to: ``hub_model_id`` (``--hub_model_id``), else the folder's name."""
    return hub_model_id or Path(output_dir).resolve().name


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload storygptv model",
    ignore_patterns: Sequence[str] = TRAINING_LEFTOVERS,
) -> str:
    """``create_repo(exist_ok=True)`` + ``upload_folder`` of ``folder`` to ``repo_id`` with ``token``
    (``--hub_token``; default: the cached login) and ``private`` (``--hub_private``), leaving out
    ``ignore_patterns`` (default :data:`TRAINING_LEFTOVERS`); returns the commit URL."""
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
