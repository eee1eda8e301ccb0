"""BG-Acc as an ``evaluate`` metric: ``storygptv.evaluation.load_metric("bg_acc")``.

Example:
    >>> from storygptv.evaluation import load_metric
    >>> load_metric("bg_acc").compute(predictions=["beach", None], references=["beach", "snow"])  # doctest: +SKIP
    {'bg_acc': 50.0}
"""

import datasets

from storygptv.evaluation.evaluate_modules import base
from storygptv.evaluation.metrics import background_accuracy


def bg_acc(predictions, references):
    """``{"bg_acc": BG-Acc}`` of per-frame setting names."""
    return {"bg_acc": background_accuracy(predictions, references)}


class BgAcc(base.PackageMetric):
    """BG-Acc of StoryGPT-V: the percentage of frames whose setting is predicted exactly; a missing prediction
    (None) is wrong (storygptv.evaluation.background_accuracy)."""

    input_feature = datasets.Value("string")
    inputs_help = """
Args:
    predictions: per frame, the predicted setting name (None: no prediction).
    references: per frame, the true setting name.
Returns:
    bg_acc (percent).
"""
    score = staticmethod(bg_acc)
