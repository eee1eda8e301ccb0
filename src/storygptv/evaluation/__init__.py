"""Evaluation: Char-Acc / Char-F1 / BG-Acc, grounding (resolved characters vs labels), the SynthSV judge, and
the trainable character / background classifiers that judge generated frames of any dataset
(:mod:`storygptv.evaluation.classifier`: ``StoryFrameClassifier``, ``score_story_folder``; imported on first
use, so the judge and the metrics need no torch).

The judge's calibration harness is :mod:`storygptv.evaluation.synthsv_calibration` (not imported here).
Char-Acc / Char-F1, BG-Acc and the grounding metrics are also Hugging Face ``evaluate`` modules shipped in
the package (:mod:`storygptv.evaluation.evaluate_modules`): ``load_metric("char_acc")`` loads one offline.
"""

from typing import Any

from .evaluate_modules import METRIC_NAMES, metric_path
from .grounding import grounding_metrics, score_story_grounding
from .metrics import background_accuracy, binarize, character_metrics
from .synthsv import JudgedFrame, SynthSVJudge, image_to_array, judge_frame, judge_frames, score_stories

#: The classifier's public names, imported from :mod:`.classifier` on first use (it needs torch and transformers).
_LAZY_CLASSIFIER = (
    "StoryFrameClassifier",
    "StoryFrameClassifierConfig",
    "check_label_set",
    "classification_scores",
    "classifier_pixel_values",
    "score_frames",
    "score_story_folder",
    "story_folder_frames",
)

__all__ = [
    "METRIC_NAMES",
    "JudgedFrame",
    "StoryFrameClassifier",
    "StoryFrameClassifierConfig",
    "SynthSVJudge",
    "background_accuracy",
    "binarize",
    "character_metrics",
    "check_label_set",
    "classification_scores",
    "classifier_pixel_values",
    "grounding_metrics",
    "image_to_array",
    "judge_frame",
    "judge_frames",
    "load_metric",
    "metric_path",
    "score_frames",
    "score_stories",
    "score_story_folder",
    "score_story_grounding",
    "story_folder_frames",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSIFIER:
        from . import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_metric(name: str, **kwargs: Any) -> Any:
    """The package metric ``name`` (:data:`METRIC_NAMES`: ``"char_acc"``, ``"bg_acc"``, ``"grounding"``) as
    an ``evaluate.EvaluationModule``: ``evaluate.load`` on its script inside the installed package, so nothing
    is downloaded. ``kwargs`` go to ``evaluate.load`` (``keep_in_memory``, ``cache_dir``, ``num_process`` ...).

    Example:
        >>> char_acc = load_metric("char_acc", keep_in_memory=True)  # doctest: +SKIP
        >>> char_acc.compute(predictions=[[1, 0]], references=[[1, 0]])["char_acc"]  # doctest: +SKIP
        100.0
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
