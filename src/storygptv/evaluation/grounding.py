"""Grounding metrics: how well the characters a model resolved for each frame match the labels.

A story model that resolves pronouns reports, per frame, the characters it drew (``StoryGPTVPipeline``'s
``output.characters``). These metrics compare such sets with the characters the datasets label per frame
(the ``characters`` column of every loader in :mod:`storygptv.data`: FlintstonesSV, PororoSV, SynthSV). They
need text and labels only, no classifier and no weights, so pronoun resolution can be scored on the real
benchmarks by anyone who has the data.

- **precision / recall / F1**: micro-averaged over all (frame, character) decisions, in percent: TP are
  labelled characters that were resolved, FP resolved ones that are not labelled, FN labelled ones missed.
- **exact**: percentage of frames whose resolved set equals the labelled set (empty sets included).

Names are compared ignoring case and surrounding spaces ("mr slate" == "Mr Slate").

Example:
    >>> grounding_metrics([["Ava", "Bo"], ["Cleo"]], [["Bo", "Ava"], ["Cleo", "Fay"]])["exact"]
    50.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["grounding_metrics", "score_story_grounding"]


def _name_set(names: Iterable[str] | None) -> set[str]:
    return {str(n).strip().lower() for n in names or [] if str(n).strip()}


def grounding_metrics(
    predicted: Sequence[Iterable[str]], reference: Sequence[Iterable[str]], zero_division: float = 100.0
) -> dict[str, float]:
    """Micro precision / recall / F1 and exact-match rate of per-frame character sets, in percent.

    Args:
        predicted: per frame, the resolved character names.
        reference: per frame, the labelled character names (same number of frames).
        zero_division: the value of a ratio whose denominator is 0 (nothing predicted, nothing labelled).

    Returns:
        ``{"precision", "recall", "f1", "exact", "num_frames"}``.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"Got {len(predicted)} predicted frames but {len(reference)} labelled frames.")
    if not predicted:
        raise ValueError("No frames to score.")
    tp = fp = fn = exact = 0
    for pred, true in zip(predicted, reference):
        p, t = _name_set(pred), _name_set(true)
        tp += len(p & t)
        fp += len(p - t)
        fn += len(t - p)
        exact += p == t
    precision = 100.0 * tp / (tp + fp) if tp + fp else zero_division
    recall = 100.0 * tp / (tp + fn) if tp + fn else zero_division
    f1 = 100.0 * 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else zero_division
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "exact": 100.0 * exact / len(predicted),
        "num_frames": float(len(predicted)),
    }


def score_story_grounding(
    stories: Iterable[Mapping[str, Any]],
    predicted: Sequence[Sequence[Iterable[str]]],
    frames: str = "all",
) -> dict[str, float]:
    """Grounding metrics of per-story predictions against a story dataset's ``characters`` labels.

    Args:
        stories: rows of a :func:`storygptv.data.load_story_dataset` dataset (or any mappings with
            ``characters`` and, for ``frames="referential"``, ``is_referential``).
        predicted: per story, per frame, the resolved names (e.g. each story's ``output.characters``).
        frames: ``"all"`` frames, or only the ``"referential"`` ones (whose caption uses a pronoun), or the
            ``"named"`` ones (the others).

    Example:
        >>> rows = [{"characters": [["Fred"], ["Fred"]], "is_referential": [False, True]}]
        >>> score_story_grounding(rows, [[["Fred"], []]], frames="referential")["recall"]
        0.0
    """
    if frames not in ("all", "referential", "named"):
        raise ValueError(f"`frames` must be 'all', 'referential' or 'named', got {frames!r}.")
    pred_frames: list[Iterable[str]] = []
    true_frames: list[Iterable[str]] = []
    rows = list(stories)
    if len(rows) != len(predicted):
        raise ValueError(f"Got predictions for {len(predicted)} stories but {len(rows)} stories.")
    for index, (row, story_pred) in enumerate(zip(rows, predicted)):
        labels = row.get("characters")
        if labels is None:
            raise KeyError(f"Story {index} has no `characters` column to score against.")
        if len(labels) != len(story_pred):
            raise ValueError(
                f"Story {index} has {len(labels)} labelled frames but {len(story_pred)} predicted frames."
            )
        flags = row.get("is_referential") or [False] * len(labels)
        if frames != "all" and len(flags) != len(labels):
            raise ValueError(f"Story {index}: `is_referential` does not cover its {len(labels)} frames.")
        for pred, true, referential in zip(story_pred, labels, flags):
            if frames == "all" or (frames == "referential") == bool(referential):
                pred_frames.append(pred)
                true_frames.append(true)
    return grounding_metrics(pred_frames, true_frames)
