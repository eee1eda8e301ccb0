"""Checks of saved weight files and pipeline folders, so that loading errors name the component and the file.

``DiffusionPipeline.from_pretrained`` on a damaged folder reports "no file named config.json in <root>" or
"Unable to load weights from checkpoint file for X at X": neither says which of the ten components is
broken. :func:`check_model_folder` checks a local folder before loading (``model_index.json``, each
component folder, its config and its weight files' safetensors headers), and :func:`load_checked` wraps
whatever still fails while loading (e.g. a config whose shapes do not match its weights) in a
:class:`ModelLoadingError` naming the component and its files.
"""

from __future__ import annotations

import importlib
import json
import os
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ModelLoadingError",
    "check_model_folder",
    "load_checked",
    "read_model_index",
    "safetensors_problem",
]

T = TypeVar("T")

#: Weight files of a component: safetensors (checked) or pickled ``.bin`` files (presence only).
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: Libraries whose classes may be imported to learn what a component is (importing runs module code).
_KNOWN_LIBRARIES = ("diffusers", "transformers", "storygptv")


class ModelLoadingError(OSError, ValueError):
    """A pipeline folder cannot be loaded; the message names the component and the file."""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete safetensors file (empty, truncated, bad header), or ``None``.

    ``safe_open`` reads only the header, and checks that the tensors it lists cover the file exactly, so
    a file cut short by a full disk or a killed copy is caught without reading the weights.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        return f"is not a complete safetensors file ({size} bytes; {error})"
    return None


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a local pipeline folder: a JSON object whose components are
    ``[library, class]`` pairs (``[null, null]`` for an absent optional one). Raises :class:`ModelLoadingError`."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadingError(
            f"{str(folder)!r} has no model_index.json: it is not a saved pipeline folder."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelLoadingError(f"{str(index_file)!r} is not valid JSON ({error}).") from error
    if not isinstance(index, dict):
        raise ModelLoadingError(
            f"{str(index_file)!r} holds a JSON {type(index).__name__}, not an object "
            '{"_class_name": ..., "<component>": ["<library>", "<class>"], ...}.'
        )
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and all(v is None or isinstance(v, str) for v in entry)
        ):
            raise ModelLoadingError(
                f"{str(index_file)!r} is malformed: component {name!r} is {entry!r}, not a "
                '["<library>", "<class>"] pair (or [null, null]).'
            )
    return index


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The stored components of an index: ``{name: (library, class)}`` (``[null, null]`` left out)."""
    return {
        name: (entry[0], entry[1])
        for name, entry in index.items()
        if not name.startswith("_") and entry[0] is not None and entry[1] is not None
    }


def _component_kind(library: str, class_name: str) -> str:
    """``"model"``, ``"scheduler"`` or ``"other"`` (tokenizers, processors, unknown classes)."""
    if library.split(".")[0] not in _KNOWN_LIBRARIES:
        return "other"
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return "other"
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel

    if not isinstance(cls, type):
        return "other"
    if issubclass(cls, ModelMixin | PreTrainedModel):
        return "model"
    return "scheduler" if issubclass(cls, SchedulerMixin) else "other"


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{path.name} is not valid JSON ({error})"
    return None if isinstance(value, dict) else f"{path.name} is not a JSON object"


def _shard_problems(folder: Path) -> list[str]:
    """Files named by sharded-weight indexes (``*.safetensors.index.json``) that are missing."""
    problems = []
    for index_file in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as error:
            problems.append(f"{index_file.name} is not a valid shard index ({error})")
            continue
        problems += [
            f"{shard} (listed in {index_file.name}) is missing"
            for shard in sorted(shards)
            if not (folder / shard).is_file()
        ]
    return problems


def _component_problems(folder: Path, library: str, class_name: str) -> list[str]:
    """What is wrong with one component folder (``[]`` when it looks loadable)."""
    kind = _component_kind(library, class_name)
    if not any(folder.iterdir()):
        return ["the folder is empty"]
    problems = []
    if kind == "model":
        problems.append(_json_problem(folder / "config.json"))
        if not _weight_files(folder):
            problems.append(f"it has no weight file (*{' or *'.join(_WEIGHT_SUFFIXES)})")
    elif kind == "scheduler":
        problems.append(_json_problem(folder / "scheduler_config.json"))
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            problems.append(f"{path.name} {problem}" if problem else None)
        elif path.stat().st_size == 0:
            problems.append(f"{path.name} is empty (0 bytes)")
    return [p for p in problems + _shard_problems(folder) if p]


def check_model_folder(folder: str | os.PathLike, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Check a local pipeline folder before loading it; returns its ``model_index.json``.

    Every component the index names (except those in ``skip``, e.g. passed to ``from_pretrained``) must
    have its folder; a model needs a JSON ``config.json`` and a weight file, a scheduler its
    ``scheduler_config.json``; every safetensors file must be complete. Raises :class:`ModelLoadingError`
    naming each broken component and file.
    """
    folder = Path(folder)
    index = read_model_index(folder)
    components = {k: v for k, v in _components(index).items() if k not in set(skip)}
    missing = sorted(name for name in components if not (folder / name).is_dir())
    if missing:
        raise ModelLoadingError(
            f"{str(folder)!r} lacks the component folder(s) {missing} named in model_index.json; save the "
            "pipeline again with save_pretrained, or pass those components to from_pretrained."
        )
    broken = []
    for name, (library, class_name) in sorted(components.items()):
        problems = _component_problems(folder / name, library, class_name)
        broken += [
            f"component {name!r} ({library}.{class_name}) in {str(folder / name)!r}: {p}" for p in problems
        ]
    if broken:
        raise ModelLoadingError(
            f"Cannot load the pipeline in {str(folder)!r}: "
            + "; ".join(broken)
            + ". Replace the damaged files "
            "with a complete copy (or save the component again with save_pretrained)."
        )
    return index


def _failing_component(error: BaseException, folder: Path, names: Iterable[str]) -> str | None:
    """The component being loaded when ``error`` was raised: the ``name`` of diffusers' ``load_sub_model``
    frame in the traceback, else a component whose folder the message names."""
    names = list(names)
    traceback: types.TracebackType | None = error.__traceback__
    found = None
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "load_sub_model" and frame.f_locals.get("name") in names:
            found = frame.f_locals["name"]
        traceback = traceback.tb_next
    if found is not None:
        return found
    text = str(error)
    return next((n for n in names if str(folder / n) in text or f"/{n}/" in text), None)


def _loading_error(error: Exception, folder: Path, index: dict[str, Any]) -> ModelLoadingError:
    components = _components(index)
    name = _failing_component(error, folder, components)
    first_line = (str(error).strip().splitlines() or [""])[0].rstrip(".")
    cause = f"{type(error).__name__}: {first_line}"
    if name is None:
        return ModelLoadingError(f"Cannot load the pipeline in {str(folder)!r} ({cause}).")
    library, class_name = components[name]
    part = folder / name
    files = ", ".join(p.name for p in sorted(part.iterdir()) if p.is_file()) if part.is_dir() else "none"
    hint = ""
    if any(word in str(error) for word in ("shape", "size mismatch", "ignore_mismatched_sizes")):
        config = part / "config.json"
        weights = ", ".join(str(p) for p in _weight_files(part)) if part.is_dir() else ""
        hint = f" The sizes in {str(config)!r} do not match the weights in {weights!r}; restore the config they were saved with."
    return ModelLoadingError(
        f"Cannot load component {name!r} ({library}.{class_name}) of the pipeline in {str(folder)!r} from "
        f"{str(part)!r} (files: {files}): {cause}.{hint}"
    )


def realign_cpu_tensors(module: Any) -> None:
    """Copy the CPU parameters and buffers of ``module`` that sit at addresses not 64-byte aligned.

    safetensors loading can leave CPU tensors at such addresses; CPU kernels then take other SIMD paths and round
    the last bit differently. Copying them makes a loaded model compute bit-identically to the saved one (ties
    are kept: the Parameter objects stay the same).
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def load_checked(load: Callable[..., T], source: Any, **kwargs: Any) -> T:
    """``load(source, **kwargs)`` (a ``from_pretrained``) with the local-folder check first and failures
    wrapped in a :class:`ModelLoadingError` naming the component. Hub ids are loaded as they are."""
    if not isinstance(source, str | os.PathLike) or not Path(source).is_dir():
        return load(source, **kwargs)
    folder = Path(source)
    index = check_model_folder(folder, skip=kwargs)
    try:
        return load(source, **kwargs)
    except ModelLoadingError:
        raise
    except Exception as error:  # whatever diffusers/transformers raise: name the component and its files
        raise _loading_error(error, folder, index) from error
