"""The base class of the package's ``evaluate`` modules (imported by their scripts only).

A script subclasses :class:`PackageMetric` with three class attributes: ``input_feature`` (the ``datasets``
feature of one prediction and one reference), ``inputs_help`` (the usage text) and ``score`` (the package
function that computes the result), plus ``reference_feature`` where a reference differs from a prediction
(a caption scored against a list of reference captions); the class docstring is the metric's description.
A script refers to the base as ``base.PackageMetric``: ``evaluate.load`` takes the first ``evaluate`` module
class that a script's namespace holds, which must be the script's own class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import datasets
import evaluate

from . import CITATION

__all__ = ["PackageMetric"]


class PackageMetric(evaluate.Metric):
    """An ``evaluate.Metric`` whose info comes from class attributes and whose result from ``score``."""

    input_feature: ClassVar[Any]
    #: The feature of one reference when it is not ``input_feature``.
    reference_feature: ClassVar[Any] = None
    inputs_help: ClassVar[str] = ""
    score: ClassVar[Callable[..., dict[str, Any]]]

    def _info(self) -> evaluate.MetricInfo:
        feature = type(self).input_feature
        reference = type(self).reference_feature or feature
        return evaluate.MetricInfo(
            description=type(self).__doc__ or "",
            citation=CITATION,
            inputs_description=type(self).inputs_help,
            features=datasets.Features({"predictions": feature, "references": reference}),
            homepage="https://github.com/storygptv/storygptv",
            license="apache-2.0",
            reference_urls=["https://arxiv.org/abs/2312.02252"],
        )

    def _compute(self, predictions: Any, references: Any, **options: Any) -> dict[str, Any]:
        return type(self).score(predictions, references, **options)
