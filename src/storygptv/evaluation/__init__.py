"""Evaluation: Char-Acc / Char-F1 / BG-Acc, grounding (resolved characters vs labels), the SynthSV judge,
the caption metrics of story continuation (corpus BLEU-1..4 and CIDEr-D as coco-caption computes them), the
trainable character / background classifiers that judge generated frames of any dataset
(:mod:`storygptv.evaluation.classifier`: ``StoryFrameClassifier``, ``score_story_folder``) and FID under a
named protocol (:mod:`storygptv.evaluation.fid`).

The judge's calibration harness is :mod:`storygptv.evaluation.synthsv_calibration` (not imported here).
Char-Acc / Char-F1, BG-Acc, the grounding and the caption metrics are also Hugging Face ``evaluate`` modules
shipped in the package (:mod:`storygptv.evaluation.evaluate_modules`): ``load_metric("char_acc")`` loads one
offline. The classifiers and FID need torch: their names are imported on first use, so the judge and the
metrics stay light.
"""

import importlib
from typing import Any

from .captions import bleu_scores, cider_score, tokenize_caption
from .evaluate_modules import METRIC_NAMES, metric_path
from .grounding import grounding_metrics, score_story_grounding
from .metrics import background_accuracy, binarize, character_metrics
from .synthsv import (
    CharacterAppearance,
    JudgedFrame,
    SynthSVJudge,
    character_consistency,
    image_to_array,
    judge_frame,
    judge_frames,
    score_stories,
)

#: Names imported on first use, by module (they need torch and transformers; ``.run`` and ``.report`` are the
#: library of ``storygptv evaluate``).
_LAZY_MODULES = {
    ".classifier": (
        "StoryFrameClassifier",
        "StoryFrameClassifierConfig",
        "check_label_set",
        "classification_scores",
        "classifier_pixel_values",
        "score_frames",
        "score_story_folder",
        "story_folder_frames",
    ),
    ".fid": (
        "FID_PROTOCOLS",
        "FIDFrames",
        "FIDInceptionV3",
        "FIDResult",
        "compute_fid",
        "feature_statistics",
        "fid_features",
        "frechet_distance",
        "load_fid_inception",
        "select_fid_frames",
    ),
    ".run": (
        "GenerationSettings",
        "check_classifiers",
        "check_generation_settings",
        "evaluation_rows",
        "finished_stories",
        "generate_stories",
        "read_story_meta",
        "score_generated_stories",
    ),
    ".report": ("package_versions", "results_markdown", "write_results"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

__all__ = [
    "FID_PROTOCOLS",
    "METRIC_NAMES",
    "CharacterAppearance",
    "FIDFrames",
    "FIDInceptionV3",
    "FIDResult",
    "GenerationSettings",
    "JudgedFrame",
    "StoryFrameClassifier",
    "StoryFrameClassifierConfig",
    "SynthSVJudge",
    "background_accuracy",
    "binarize",
    "bleu_scores",
    "character_consistency",
    "character_metrics",
    "check_classifiers",
    "check_generation_settings",
    "check_label_set",
    "cider_score",
    "classification_scores",
    "classifier_pixel_values",
    "compute_fid",
    "evaluation_rows",
    "feature_statistics",
    "fid_features",
    "finished_stories",
    "frechet_distance",
    "generate_stories",
    "grounding_metrics",
    "image_to_array",
    "judge_frame",
    "judge_frames",
    "load_fid_inception",
    "load_metric",
    "metric_path",
    "package_versions",
    "read_story_meta",
    "results_markdown",
    "score_frames",
    "score_generated_stories",
    "score_stories",
    "score_story_folder",
    "score_story_grounding",
    "select_fid_frames",
    "story_folder_frames",
    "tokenize_caption",
    "write_results",
]


def __getattr__(name: str) -> Any:
    """Import the classifier and FID names on first use (``from storygptv.evaluation import compute_fid``)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_metric(name: str, **kwargs: Any) -> Any:
    """The package metric ``name`` (:data:`METRIC_NAMES`: ``"char_acc"``, ``"bg_acc"``, ``"grounding"``,
    ``"caption_bleu"``, ``"caption_cider"``) as an ``evaluate.EvaluationModule``: ``evaluate.load`` on its
    script inside the installed package, so nothing is downloaded. ``kwargs`` go to ``evaluate.load``
    (``keep_in_memory``, ``cache_dir``, ``num_process`` ...).

    Example:
        >>> char_acc = load_metric("char_acc", keep_in_memory=True)  # doctest: +SKIP
        >>> char_acc.compute(predictions=[[1, 0]], references=[[1, 0]])["char_acc"]  # doctest: +SKIP
        100.0
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
