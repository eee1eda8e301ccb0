"""Evaluation: Char-Acc / Char-F1 / BG-Acc, grounding (resolved characters vs labels), the SynthSV judge.

The judge's calibration harness is :mod:`storygptv.evaluation.synthsv_calibration` (not imported here).
"""

from .grounding import grounding_metrics, score_story_grounding
from .metrics import background_accuracy, binarize, character_metrics
from .synthsv import JudgedFrame, SynthSVJudge, image_to_array, judge_frame, judge_frames, score_stories

__all__ = [
    "JudgedFrame",
    "SynthSVJudge",
    "background_accuracy",
    "binarize",
    "character_metrics",
    "grounding_metrics",
    "image_to_array",
    "judge_frame",
    "judge_frames",
    "score_stories",
    "score_story_grounding",
]
