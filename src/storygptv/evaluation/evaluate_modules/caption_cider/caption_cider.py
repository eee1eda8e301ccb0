"""CIDEr-D of captions as an ``evaluate`` metric: ``storygptv.evaluation.load_metric("caption_cider")``.

Example:
    >>> from storygptv.evaluation import load_metric
    >>> captions = ["fred drives the car", "wilma is cooking", "barney laughs"]
    >>> load_metric("caption_cider").compute(predictions=captions, references=[[c] for c in captions])  # doctest: +SKIP
    {'cider': 7.5, 'num_captions': 3}
"""

import datasets

from storygptv.evaluation.captions import cider_score
from storygptv.evaluation.evaluate_modules import base


class CaptionCider(base.PackageMetric):
    """CIDEr-D of captions as coco-caption's Cider scorer (pycocoevalcap) computes it, the caption metric of
    StoryGPT-V's story continuation: tf-idf n-grams of orders 1..4 with document frequencies over the
    references of the scored corpus, clipping, a Gaussian length penalty (sigma 6), times 10
    (storygptv.evaluation.cider_score). The idf comes from everything added before ``compute``."""

    input_feature = datasets.Value("string")
    reference_feature = datasets.Sequence(datasets.Value("string"))
    inputs_help = """
Args:
    predictions: one caption per frame (e.g. the caption of each generated frame).
    references: per frame, a list of its reference captions (the paper uses 5 captions of the real frame).
    max_order: the highest n-gram order (default 4).
    sigma: the width of the Gaussian length penalty (default 6).
    tokenize: text to tokens (default storygptv.evaluation.tokenize_caption; str.split for pre-tokenized text).
Returns:
    cider (coco-caption's x10 scale) and num_captions.
"""
    score = staticmethod(cider_score)
