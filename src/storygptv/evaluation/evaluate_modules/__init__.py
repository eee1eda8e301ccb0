"""The package's metrics as Hugging Face ``evaluate`` modules, loadable offline from the installed package.

Each sub-folder is an ``evaluate`` module script (``<name>/<name>.py``, an ``evaluate.Metric``), as on the
Hub, that calls the package's own implementation:

================= ====================================================== ==========================================
name              computes                                               implementation
================= ====================================================== ==========================================
``char_acc``      Char-Acc, Char-F1, precision, recall (multi-hot rows)  :func:`storygptv.evaluation.character_metrics`
``bg_acc``        BG-Acc (one setting name per frame)                    :func:`storygptv.evaluation.background_accuracy`
``grounding``     precision, recall, F1, exact (names per frame)         :func:`storygptv.evaluation.grounding_metrics`
``caption_bleu``  corpus BLEU-1..4 (a caption vs reference captions)     :func:`storygptv.evaluation.bleu_scores`
``caption_cider`` CIDEr-D (a caption vs reference captions, a corpus)    :func:`storygptv.evaluation.cider_score`
================= ====================================================== ==========================================

The caption metrics are coco-caption's (pycocoevalcap) definitions, computed in Python; they are named
``caption_*`` because the Hub's ``bleu`` computes BLEU differently (see :mod:`storygptv.evaluation.captions`).

Load one with :func:`storygptv.evaluation.load_metric` (``evaluate.load`` on the script's path; nothing is
downloaded). The scripts share their base class, :class:`storygptv.evaluation.evaluate_modules.base.PackageMetric`
(imported only by them: ``evaluate`` is not imported with the package).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["CITATION", "METRIC_NAMES", "metric_path"]

#: The ``evaluate`` modules of the package.
METRIC_NAMES: tuple[str, ...] = ("char_acc", "bg_acc", "grounding", "caption_bleu", "caption_cider")

CITATION = """\
@inproceedings{shen2025storygptv,
  title     = {StoryGPT-V: Large Language Models as Consistent Story Visualizers},
  author    = {Shen, Xiaoqian and Elhoseiny, Mohamed},
  booktitle = {CVPR},
  year      = {2025}
}
"""


def metric_path(name: str) -> str:
    """The folder of the ``evaluate`` module ``name`` inside the installed package (what ``evaluate.load`` takes).

    Raises:
        ValueError: an unknown name (the message lists :data:`METRIC_NAMES`).
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown storygptv metric {name!r}; available: {list(METRIC_NAMES)}.")
    return str(Path(str(files(__name__))) / name)
