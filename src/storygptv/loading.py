"""Checks of saved weight files and model folders, so that loading errors name the component and the file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["safetensors_problem"]


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
