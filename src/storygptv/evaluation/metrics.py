"""Character and background metrics over multi-hot / one-hot label vectors.

These are the StoryGPT-V (and StoryDALL-E / AR-LDM) classification metrics, written for any label
set so they serve the SynthSV render-exact judge as well as Flintstones / Pororo character
classifiers:

* **Char-Acc**: percentage of frames whose *whole* character multi-hot vector is predicted exactly
  (frames without any character count: they are right when nothing is predicted).
* **Char-F1**: micro-averaged F1 over all (frame, character) decisions, in percent.
* **BG-Acc**: percentage of frames whose background is predicted exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["background_accuracy", "binarize", "character_metrics"]


def binarize(values: Any, threshold: float = 0.5) -> np.ndarray:
    """Turn multi-hot labels, probabilities or booleans into a boolean ``(N, C)`` array.

    Booleans are kept; numbers are positive when ``>= threshold`` (so 0/1 labels and probabilities
    both work). A 1-D input is one frame.
    """
    array = np.asarray(values)
    if array.dtype != bool:
        array = array.astype(np.float64) >= threshold
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"expected a (num_frames, num_classes) array, got shape {array.shape}")
    return array


def character_metrics(
    pred_multi_hot: Any, true_multi_hot: Any, threshold: float = 0.5, zero_division: float = 100.0
) -> dict[str, float]:
    """Char-Acc and micro Char-F1 of predicted vs true character multi-hot vectors.

    Args:
        pred_multi_hot: ``(N, C)`` predictions (0/1, bool, or scores compared with ``threshold``).
        true_multi_hot: ``(N, C)`` ground truth, same layout.
        threshold: positive-label threshold for non-boolean inputs.
        zero_division: Char-F1 when there are no positives at all in predictions and ground truth
            (``2TP + FP + FN == 0``): every decision is a correct negative, so 100 by default.

    Returns:
        ``{"char_acc": %, "char_f1": %, "precision": %, "recall": %, "num_frames": N}``; precision
        (recall) is ``zero_division`` when nothing is predicted (present).
    """
    pred = binarize(pred_multi_hot, threshold)
    true = binarize(true_multi_hot, threshold)
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: predictions {pred.shape} vs ground truth {true.shape}")
    if pred.shape[0] == 0:
        raise ValueError("no frames to score")
    exact = np.all(pred == true, axis=1)
    tp = float(np.sum(pred & true))
    fp = float(np.sum(pred & ~true))
    fn = float(np.sum(~pred & true))
    denominator = 2 * tp + fp + fn
    f1 = 100.0 * 2 * tp / denominator if denominator > 0 else float(zero_division)
    precision = 100.0 * tp / (tp + fp) if tp + fp > 0 else float(zero_division)
    recall = 100.0 * tp / (tp + fn) if tp + fn > 0 else float(zero_division)
    return {
        "char_acc": 100.0 * float(exact.mean()),
        "char_f1": f1,
        "precision": precision,
        "recall": recall,
        "num_frames": int(pred.shape[0]),
    }


def _as_label_rows(values: Any) -> list[Any]:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return [tuple(row.tolist()) for row in values]
    out = []
    for value in values:
        if isinstance(value, (np.ndarray, list, tuple)):
            out.append(tuple(np.asarray(value).tolist()))
        elif isinstance(value, np.generic):
            out.append(value.item())
        else:
            out.append(value)
    return out


def background_accuracy(pred: Sequence[Any] | np.ndarray, true: Sequence[Any] | np.ndarray) -> float:
    """BG-Acc: percentage of frames whose predicted background equals the true one.

    Args:
        pred: per-frame labels (names or indices; ``None`` = no prediction, always wrong) or an
            ``(N, B)`` one-hot array (an all-zero row is a missing prediction).
        true: ground truth in the same form as ``pred``.
    """
    pred_rows = _as_label_rows(pred)
    true_rows = _as_label_rows(true)
    if len(pred_rows) != len(true_rows):
        raise ValueError(f"length mismatch: {len(pred_rows)} predictions vs {len(true_rows)} labels")
    if not true_rows:
        raise ValueError("no frames to score")
    correct = 0
    for p, t in zip(pred_rows, true_rows):
        if p is None:
            continue
        if isinstance(p, tuple) and not any(p):
            continue
        correct += int(p == t)
    return 100.0 * correct / len(true_rows)
