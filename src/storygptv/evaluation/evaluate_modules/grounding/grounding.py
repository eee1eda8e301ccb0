"""Grounding metrics as an ``evaluate`` metric: ``storygptv.evaluation.load_metric("grounding")``.

Example:
    >>> from storygptv.evaluation import load_metric
    >>> load_metric("grounding").compute(predictions=[["Nia"], []], references=[["nia"], ["Rex"]])  # doctest: +SKIP
    {'precision': 100.0, 'recall': 50.0, 'f1': 66.66..., 'exact': 50.0, 'num_frames': 2.0}
"""

import datasets

from storygptv.evaluation.evaluate_modules import base
from storygptv.evaluation.grounding import grounding_metrics


class Grounding(base.PackageMetric):
    """How well the characters a story model resolved for each frame (a pipeline output's ``characters``)
    match the labelled ones: micro precision / recall / F1 and the exact-match rate, names compared ignoring
    case (storygptv.evaluation.grounding_metrics)."""

    input_feature = datasets.Sequence(datasets.Value("string"))
    inputs_help = """
Args:
    predictions: per frame, the resolved character names.
    references: per frame, the labelled character names.
    zero_division: the value of a ratio with nothing to count (default 100).
Returns:
    precision, recall, f1, exact (percent) and num_frames.
"""
    score = staticmethod(grounding_metrics)
