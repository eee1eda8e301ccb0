"""The package's metrics as ``evaluate`` modules: loaded offline from the installed package, same numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from storygptv.evaluation import (
    METRIC_NAMES,
    background_accuracy,
    character_metrics,
    grounding_metrics,
    load_metric,
    metric_path,
)


def test_metrics_load_offline_and_match_the_package(offline):
    pred = [[1, 0, 1], [0, 1, 0], [0.7, 0.2, 0.0]]
    true = [[1, 0, 1], [1, 1, 0], [1, 0, 0]]
    char_acc = load_metric("char_acc", keep_in_memory=True)
    assert char_acc.name == "char_acc" and "Char-Acc" in char_acc.description
    assert char_acc.compute(predictions=pred, references=true) == pytest.approx(character_metrics(pred, true))
    strict = char_acc.compute(predictions=pred, references=true, threshold=0.8)
    assert strict == pytest.approx(character_metrics(pred, true, threshold=0.8))

    bg_acc = load_metric("bg_acc", keep_in_memory=True)
    settings, truth = ["beach", None, "snow"], ["beach", "snow", "night"]
    assert bg_acc.compute(predictions=settings, references=truth) == {
        "bg_acc": pytest.approx(background_accuracy(settings, truth))
    }

    grounding = load_metric("grounding", keep_in_memory=True)
    resolved, labelled = [["Nia"], [], ["Rex", "Nia"]], [["nia"], ["Rex"], ["Nia", "Rex"]]
    # Batches add up, as with any evaluate metric.
    grounding.add_batch(predictions=resolved[:2], references=labelled[:2])
    grounding.add_batch(predictions=resolved[2:], references=labelled[2:])
    assert grounding.compute() == pytest.approx(grounding_metrics(resolved, labelled))


def test_module_scripts_ship_in_the_package():
    from setuptools import find_packages

    src = Path(__file__).resolve().parents[1] / "src"
    packages = set(find_packages(str(src)))  # pyproject: [tool.setuptools.packages.find] where = ["src"]
    for name in METRIC_NAMES:
        script = Path(metric_path(name)) / f"{name}.py"
        assert script.is_file(), script
        assert f"storygptv.evaluation.evaluate_modules.{name}" in packages
    with pytest.raises(
        ValueError,
        match="available: \\['char_acc', 'bg_acc', 'grounding', 'caption_bleu', 'caption_cider'\\]",
    ):
        metric_path("fid")
