"""Counter-based random numbers of SynthSV: every draw is a pure function of where it is used.

Draw ``k`` of frame ``t`` of a candidate story is a SplitMix64 hash of ``(seed, split_id, index,
attempt, t, k)`` mapped to ``[0, 1)``. No generator state is carried from one story to the next, so
any story can be regenerated alone and a whole split can be drawn at once with vectorised numpy,
giving the very same numbers.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def story_keys(seed: int, split_id: int, indices: np.ndarray, attempts: np.ndarray) -> np.ndarray:
    """One 64-bit key per (seed, split, index, attempt) candidate story."""
    key = mix64(np.full(indices.shape, (seed * _GOLDEN + 1) & _MASK64, dtype=np.uint64))
    key = mix64(key + np.uint64(split_id))
    key = mix64(key + indices.astype(np.uint64))
    return mix64(key + attempts.astype(np.uint64))


def uniforms(keys: np.ndarray, frames: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in ``[0, 1)``: element-wise on broadcast (story key, frame, draw) arrays.

    Example:
        >>> keys = story_keys(0, 0, np.arange(2), np.zeros(2, dtype=np.int64))
        >>> u = uniforms(keys[:, None], np.zeros((1, 3), dtype=np.int64), np.arange(3)[None, :])
        >>> u.shape, bool(((u >= 0) & (u < 1)).all())
        ((2, 3), True)
        >>> bool((uniforms(keys[1:], np.array([0]), np.array([2])) == u[1, 2]).all())  # drawn alone: same
        True
    """
    counter = frames.astype(np.uint64) * np.uint64(1 << 24) + draws.astype(np.uint64)
    bits = mix64(mix64(keys + counter * np.uint64(_GOLDEN)) ^ keys)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
