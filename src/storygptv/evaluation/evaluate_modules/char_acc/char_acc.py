"""Char-Acc and Char-F1 as an ``evaluate`` metric: ``storygptv.evaluation.load_metric("char_acc")``.

Example:
    >>> from storygptv.evaluation import load_metric
    >>> char_acc = load_metric("char_acc")  # doctest: +SKIP
    >>> char_acc.compute(predictions=[[1, 0, 1], [0, 1, 0]], references=[[1, 0, 1], [1, 1, 0]])  # doctest: +SKIP
    {'char_acc': 50.0, 'char_f1': 85.71..., 'precision': 100.0, 'recall': 75.0, 'num_frames': 2}
"""

import datasets

from storygptv.evaluation.evaluate_modules import base
from storygptv.evaluation.metrics import character_metrics


class CharAcc(base.PackageMetric):
    """Char-Acc and Char-F1 of StoryGPT-V (and StoryDALL-E, AR-LDM) over per-frame character vectors.

    Char-Acc is the percentage of frames whose whole multi-hot character vector is predicted exactly; Char-F1
    the micro F1 over all (frame, character) decisions (storygptv.evaluation.character_metrics).
    """

    input_feature = datasets.Sequence(datasets.Value("float32"))
    inputs_help = """
Args:
    predictions: per frame, the predicted character vector (0/1, booleans or scores).
    references: per frame, the true multi-hot character vector, in the same label order.
    threshold: a value counts as present when >= threshold (default 0.5).
    zero_division: the value of a ratio with nothing to count (default 100).
Returns:
    char_acc, char_f1, precision, recall (percent) and num_frames.
"""
    score = staticmethod(character_metrics)
