"""Corpus BLEU-1..4 of captions as an ``evaluate`` metric: ``storygptv.evaluation.load_metric("caption_bleu")``.

Example:
    >>> from storygptv.evaluation import load_metric
    >>> bleu = load_metric("caption_bleu")  # doctest: +SKIP
    >>> bleu.compute(predictions=["Fred drives the car."], references=[["fred drives the car"]])  # doctest: +SKIP
    {'bleu_1': 1.0, 'bleu_2': 1.0, 'bleu_3': 1.0, 'bleu_4': 1.0, 'brevity_penalty': 1.0, 'length_ratio': 1.0, 'num_captions': 1}
"""

import datasets

from storygptv.evaluation.captions import bleu_scores
from storygptv.evaluation.evaluate_modules import base


class CaptionBleu(base.PackageMetric):
    """Corpus BLEU-1..4 of captions as coco-caption (pycocoevalcap) computes it, the caption metric of
    StoryGPT-V's story continuation: clipped n-gram matches summed over the corpus, one brevity penalty
    against the closest reference length ("closest"), coco-caption's PTB-style tokenization done in Python
    (storygptv.evaluation.bleu_scores). Not the Hub's ``bleu``, which takes the shortest reference length
    and another tokenizer."""

    input_feature = datasets.Value("string")
    reference_feature = datasets.Sequence(datasets.Value("string"))
    inputs_help = """
Args:
    predictions: one caption per frame (e.g. the caption of each generated frame).
    references: per frame, a list of its reference captions (e.g. [ground-truth text]).
    max_order: the highest n-gram order (default 4).
    tokenize: text to tokens (default storygptv.evaluation.tokenize_caption; str.split for pre-tokenized text).
Returns:
    bleu_1 .. bleu_4 in [0, 1], brevity_penalty, length_ratio and num_captions.
"""
    score = staticmethod(bleu_scores)
