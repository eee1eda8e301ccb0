"""Read the pickles and object ``.npy`` arrays of the dataset releases without running code from them.

FlintstonesSV and PororoSV ship their indexes as pickles (``following_cache4.pkl``, ``labels.pkl``...)
and object arrays (``descriptions.npy``, ``train_seen_unseen_ids.npy``...). ``pickle.load`` and
``np.load(allow_pickle=True)`` call whatever a file names, so a ``__reduce__`` payload in a downloaded
release runs on the reader's machine. This module is the one home of the rule for those files: a
pickle may only build what these formats hold (dicts, lists, tuples, sets, strings, bytes, numbers,
``None``, numpy arrays, scalars and dtypes); any other global is refused *before* it is called, with
an error naming the file and the global.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["UnsafePickleError", "safe_load_dict", "safe_load_npy", "safe_load_pickle"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data file's pickle names a global outside the allowed data types (nothing from it ran)."""


_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float")
_BUILTINS += ("complex", "bool")
# numpy moved ``numpy.core`` to ``numpy._core`` in 2.0; files written by either name these functions.
_NUMPY_FUNCTIONS = {"multiarray": ("_reconstruct", "scalar"), "numeric": ("_frombuffer",)}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-0-2 pickles use to rebuild ``bytes``.

    Only the latin-1 codec that pickle itself uses is allowed (codec lookups import modules).
    """
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with the codec {encoding!r} is not allowed")
    return str(text).encode("latin1")


def _numpy_function(submodule: str, name: str) -> Callable[..., Any]:
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"numpy has no {submodule}.{name}")


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    """``{(module, name): getter}`` of every global a data pickle may name (resolved lazily)."""
    allowed: dict[tuple[str, str], Callable[[], Any]] = {
        ("builtins", name): (lambda name=name: getattr(builtins, name)) for name in _BUILTINS
    }
    allowed[("collections", "OrderedDict")] = lambda: collections.OrderedDict
    allowed[("collections", "defaultdict")] = lambda: collections.defaultdict
    allowed[("_codecs", "encode")] = lambda: _latin1_encode
    allowed[("numpy", "ndarray")] = lambda: np.ndarray
    allowed[("numpy", "dtype")] = lambda: np.dtype
    for submodule, names in _NUMPY_FUNCTIONS.items():
        for package in ("numpy._core", "numpy.core"):
            for name in names:
                allowed[(f"{package}.{submodule}", name)] = lambda submodule=submodule, name=name: (
                    _numpy_function(submodule, name)
                )
    return allowed


_ALLOWED = _allowed_globals()


class _DataUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` only returns the allowed data types."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles name ``__builtin__.set`` etc.; map them as pickle itself would.
        key = _compat_pickle.NAME_MAPPING.get((module, name))
        if key is None:
            key = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        getter = _ALLOWED.get(key)
        if getter is None:
            raise UnsafePickleError(f"it names the global {module}.{name}")
        return getter()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("it uses a persistent id")


def _refusal(path: Path, error: Exception) -> UnsafePickleError:
    return UnsafePickleError(
        f"Refusing to load {str(path)!r}: {error}. Data files may only hold dicts, lists, tuples, strings, "
        "bytes, numbers and numpy arrays; nothing from this file was run. Replace it with a copy from the "
        "official release."
    )


def _unpickle(handle: BinaryIO, path: Path, encoding: str) -> Any:
    try:
        return _DataUnpickler(handle, encoding=encoding).load()
    except UnsafePickleError as error:
        raise _refusal(path, error) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(
            f"{str(path)!r} is not a readable pickle ({type(error).__name__}: {error})."
        ) from error


def safe_load_pickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Load a ``.pkl`` data file with the restricted unpickler.

    ``encoding`` decodes Python 2 ``str`` objects (latin-1, as numpy recommends for old releases).

    Raises:
        UnsafePickleError: the pickle names something other than the allowed data types.
        ValueError: the file is not a readable pickle.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        return _unpickle(handle, path, encoding)


def _read_npy_header(handle: BinaryIO, path: Path) -> np.dtype:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            _, _, dtype = fmt.read_array_header_1_0(handle)
        elif version == (2, 0):
            _, _, dtype = fmt.read_array_header_2_0(handle)
        else:  # (3, 0): utf-8 field names; numpy has no public reader for it
            _, _, dtype = fmt._read_array_header(handle, version)
    except (ValueError, EOFError, SyntaxError) as error:
        raise ValueError(f"{str(path)!r} is not a readable .npy file ({error}).") from error
    return dtype


def safe_load_npy(path: str | Path, encoding: str = "latin1") -> np.ndarray:
    """Load a ``.npy`` file; an object array's pickled payload goes through the restricted unpickler.

    Arrays of plain dtypes are read by numpy with ``allow_pickle=False``.

    Raises:
        UnsafePickleError: the object array's pickle names something other than the allowed data types.
        ValueError: the file is not a readable ``.npy`` file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        dtype = _read_npy_header(handle, path)
        if not dtype.hasobject:
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        # numpy writes an object array as the pickle of the whole array right after the header.
        array = _unpickle(handle, path, encoding)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{str(path)!r} holds a {type(array).__name__} after its .npy header, not an array.")
    return array


def safe_load_dict(path: str | Path, layout: str | None = None) -> dict[Any, Any]:
    """A pickled dict from a ``.pkl`` file or a ``.npy`` file (a 0-d object array holding the dict).

    Args:
        path: the data file.
        layout: the expected release layout, named in the error when the file holds no dict.

    Raises:
        UnsafePickleError: the pickle names something other than the allowed data types.
        ValueError: the file is unreadable or holds something other than a dict.
    """
    path = Path(path)
    value = safe_load_npy(path) if path.suffix == ".npy" else safe_load_pickle(path)
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        value = value.item()
    if not isinstance(value, dict):
        expected = f" Expected layout: {layout}" if layout else ""
        raise ValueError(f"{str(path)!r} should hold a pickled dict, got {type(value).__name__}.{expected}")
    return value
