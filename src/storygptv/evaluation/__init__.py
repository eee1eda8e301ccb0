"""Evaluation: Char-Acc / Char-F1 / BG-Acc and the render-exact SynthSV judge."""

from .metrics import background_accuracy, binarize, character_metrics
from .synthsv import JudgedFrame, SynthSVJudge, image_to_array, judge_frame, judge_frames, score_stories

__all__ = [
    "JudgedFrame",
    "SynthSVJudge",
    "background_accuracy",
    "binarize",
    "character_metrics",
    "image_to_array",
    "judge_frame",
    "judge_frames",
    "score_stories",
]
