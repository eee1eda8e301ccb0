"""Caption metrics of story continuation: corpus BLEU-1..4 and CIDEr-D, as coco-caption defines them.

StoryGPT-V captions each generated frame (BLIP-2) and scores the captions with the coco-caption scorers
(pycocoevalcap): BLEU-1..4 against the ground-truth text, CIDEr against five captions of the ground-truth
frame (``method-notes.md`` §7.4; the paper reports BLEU-4 0.5037 and CIDEr 1.6718 on FlintstonesSV). This
module computes the same two definitions in plain Python, offline and without Java, so our numbers are
comparable with the paper's:

* :func:`bleu_scores`: **corpus** BLEU (Papineni et al., 2002). Clipped n-gram matches and n-gram counts
  are summed over the whole corpus before dividing (not averaged per caption); BLEU-k is the geometric mean
  of the precisions of orders 1..k times one brevity penalty ``exp(1 - r / c)`` when ``c < r``, where ``c``
  is the total prediction length and ``r`` sums, per prediction, the length of its *closest* reference
  (ties go to the shorter one): coco-caption's ``"closest"`` option.
* :func:`cider_score`: **CIDEr-D** (Vedantam et al., 2015), the variant coco-caption's ``Cider`` scorer
  computes: tf-idf vectors of the n-grams of orders 1..4 with the document frequency taken over the
  references of the evaluated corpus, candidate n-gram weights clipped at the reference's, a Gaussian
  length penalty of ``sigma`` 6, the mean over orders and references, times 10.

Both score in coco-caption's units, as the paper reports them: BLEU in ``[0, 1]``, CIDEr on the ×10 scale
(not percent, unlike the package's other metrics). Both need a corpus: BLEU sums over it and CIDEr's idf
comes from it, so a metric over many captions is not the mean of per-caption metrics.

**Tokenization.** coco-caption tokenizes with the Stanford PTB tokenizer, which needs Java.
:func:`tokenize_caption` reproduces what it does to captions in Python (lower case, PTB clitics and
abbreviations, coco-caption's punctuation dropped; its docstring lists what it keeps). Pass
``tokenize=str.split`` for text that is already PTB-tokenized, or any other callable.

**Where the numbers can differ from pycocoevalcap.** The scorers agree to about 1e-11 on the same tokens
(checked against pycocoevalcap 1.2's BLEU and CIDEr scorers on hand-written and random corpora), except
when a corpus has *no* matching n-gram of some order (or no n-gram of that order at all): we follow the
published definition (a zero precision makes the geometric mean 0), while coco-caption adds epsilons
(``1e-15`` over ``1e-9``) that leave a small positive value (at most about 6e-4, BLEU-4's
``(1e-15) ** (1/4)``). Real corpora have matches of every order. The tokens can differ where
:func:`tokenize_caption` and PTB part ways (rare in captions).

Example:
    >>> predictions = ["Fred is talking to Barney in the living room."]
    >>> bleu = bleu_scores(predictions, [["Fred talks to Barney in the living room."]])
    >>> round(bleu["bleu_1"], 4), round(bleu["bleu_4"], 4)
    (0.7778, 0.6105)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["bleu_scores", "cider_score", "tokenize_caption"]

#: A caption tokenizer: text in, tokens out.
Tokenizer = Callable[[str], Sequence[str]]

NGram = tuple[str, ...]

# Typographic marks PTB reads as their ASCII forms, and brackets, which PTB writes as -LRB- ... : coco-caption
# lower-cases those and then misses them in its upper-case punctuation list, so they stay tokens.
_NORMALIZE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": " ... ",
        "(": " -lrb- ",
        ")": " -rrb- ",
        "[": " -lsb- ",
        "]": " -rsb- ",
        "{": " -lcb- ",
        "}": " -rcb- ",
    }
)
# PTB splits these clitics off the word before them ("fred's" -> fred 's, "isn't" -> is n't).
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"-[lr][rsc]b-"  # a bracket, as above
    r"|n't|'(?:s|re|ve|ll|d|m)\b"  # a split-off clitic
    r"|\b(?:mr|mrs|ms|dr|st|jr|sr)\.|(?:[^\W\d_]\.){2,}"  # PTB keeps the period of titles and "u.s."
    # a word: "well-known", "o'clock", "and/or", "3.5", "1,000", "10:30"
    r"|\w+(?:(?:[-'./@]|[,:](?=\d))\w+)*"
    # any other symbol ("&", "%", "$", "+"): coco-caption drops only . ? ! , : ; - and quotes
    r"|[^\w\s.?!,:;'\"`-]"
)


def tokenize_caption(text: str) -> list[str]:
    """Lower-case ``text`` and split it into tokens as coco-caption's PTB tokenization does, in Python.

    coco-caption runs the Stanford PTB tokenizer (Java) and then drops the tokens ``. ? ! , : ; - -- ...``
    and quotes. This keeps the PTB behaviour that matters for captions: clitics split off (``fred 's``,
    ``is n't``), words joined by inner hyphens, apostrophes or periods kept whole (``well-known``,
    ``o'clock``, ``3.5``), titles and acronyms with their period (``mr.``, ``u.s.``), brackets as
    ``-lrb-`` / ``-rrb-`` (coco-caption keeps those by accident), other symbols (``&``, ``%``) as tokens.
    It is not the full PTB grammar (PTB splits ``rock 'n' roll``; its abbreviation list is longer).

    Example:
        >>> tokenize_caption("Fred's in the well-known car (with Mr. Slate), isn't he?")
        ['fred', "'s", 'in', 'the', 'well-known', 'car', '-lrb-', 'with', 'mr.', 'slate', '-rrb-', 'is', "n't", 'he']
    """
    return _TOKEN.findall(_CLITIC.sub(r" \1", text.lower().translate(_NORMALIZE)))


def _ngram_counts(tokens: Sequence[str], max_order: int) -> Counter[NGram]:
    """How often each n-gram of order 1..max_order occurs in ``tokens``."""
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1)
    )


def _tokenized_corpus(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenize: Tokenizer | None,
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Check the corpus (one non-empty list of reference captions per prediction) and tokenize it.

    A reference given as one string is a list of one reference (the usual case for BLEU against the
    ground-truth text).
    """
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, str):
            raise ValueError(f"{name} must be a list with one entry per caption, not a single string.")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions has {len(predictions)} captions but references has {len(references)} entries; "
            "give one list of reference captions per predicted caption."
        )
    if len(predictions) == 0:
        raise ValueError("predictions is empty: there are no captions to score.")
    tokenize = tokenize or tokenize_caption
    hypotheses, reference_sets = [], []
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(
                f"references[{i}] is empty: every predicted caption needs at least one reference."
            )
        for name, text in [(f"predictions[{i}]", prediction)] + [
            (f"references[{i}][{j}]", ref) for j, ref in enumerate(refs)
        ]:
            if not isinstance(text, str):
                raise ValueError(f"{name} must be a string, got {type(text).__name__}.")
        hypotheses.append(list(tokenize(prediction)))
        reference_sets.append([list(tokenize(ref)) for ref in refs])
    return hypotheses, reference_sets


def bleu_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    max_order: int = 4,
    tokenize: Tokenizer | None = None,
) -> dict[str, float]:
    """Corpus BLEU-1..``max_order`` of captions against their references, as coco-caption computes it.

    Per order n, ``p_n`` = (clipped n-gram matches summed over the corpus) / (prediction n-grams summed over
    the corpus), where a prediction n-gram matches at most as often as it occurs in any single reference.
    ``BLEU-k = BP * exp(mean(log p_1 .. log p_k))`` (0 when some ``p_n`` is 0), with the brevity penalty
    ``BP = exp(1 - r / c)`` if ``c < r`` else 1: ``c`` the total prediction length and ``r`` the sum over
    predictions of the length of the reference closest in length to it (the shorter one on a tie),
    coco-caption's ``"closest"`` effective reference length (Papineni et al., 2002).

    Args:
        predictions: one caption per frame (e.g. the caption of each generated frame).
        references: per frame, its reference captions (a list of strings, or one string).
        max_order: the highest n-gram order (4 for BLEU-1..4).
        tokenize: text to tokens; :func:`tokenize_caption` by default, ``str.split`` for pre-tokenized text.

    Returns:
        ``{"bleu_1", ..., "bleu_<max_order>"}`` in ``[0, 1]``, ``"brevity_penalty"``, ``"length_ratio"``
        (``c / r``) and ``"num_captions"``.

    Raises:
        ValueError: ``predictions`` and ``references`` differ in length or are empty, a reference list is
            empty, or a caption is not a string.

    Example:
        >>> bleu_scores(["the cat is on the mat"], [["the cat is on the mat", "a cat sits there"]])["bleu_4"]
        1.0
        >>> round(bleu_scores(["the cat"], ["the cat is on the mat"])["brevity_penalty"], 4)  # exp(1 - 6/2)
        0.1353
    """
    if max_order < 1:
        raise ValueError(f"max_order must be at least 1, got {max_order}.")
    hypotheses, reference_sets = _tokenized_corpus(predictions, references, tokenize)
    matches = [0] * max_order
    totals = [0] * max_order
    hypothesis_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, reference_sets):
        # Clip each n-gram at its largest count in any one reference (Counter's | keeps the maximum).
        max_reference_counts: Counter[NGram] = Counter()
        for ref in refs:
            max_reference_counts |= _ngram_counts(ref, max_order)
        for ngram, count in _ngram_counts(hypothesis, max_order).items():
            matches[len(ngram) - 1] += min(count, max_reference_counts[ngram])
        for n in range(1, max_order + 1):
            totals[n - 1] += max(0, len(hypothesis) - n + 1)
        hypothesis_length += len(hypothesis)
        reference_length += min((abs(len(ref) - len(hypothesis)), len(ref)) for ref in refs)[1]

    if hypothesis_length >= reference_length:
        brevity_penalty = 1.0
    else:  # also covers an all-empty prediction corpus, whose BLEU is 0 anyway
        brevity_penalty = math.exp(1.0 - reference_length / hypothesis_length) if hypothesis_length else 0.0
    result: dict[str, float] = {}
    log_precision_sum = 0.0
    for n in range(1, max_order + 1):
        # A zero precision (no match, or no n-gram of this order) zeroes this order and every higher one.
        log_precision_sum += math.log(matches[n - 1] / totals[n - 1]) if matches[n - 1] else -math.inf
        result[f"bleu_{n}"] = brevity_penalty * math.exp(log_precision_sum / n)
    result["brevity_penalty"] = brevity_penalty
    result["length_ratio"] = hypothesis_length / reference_length if reference_length else math.inf
    result["num_captions"] = len(hypotheses)
    return result


def cider_score(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    max_order: int = 4,
    sigma: float = 6.0,
    tokenize: Tokenizer | None = None,
) -> dict[str, float]:
    """CIDEr-D of predicted captions against their references over a corpus, as coco-caption computes it.

    Over a corpus of N frames, an n-gram's weight in a caption is its count times its idf,
    ``log(N) - log(max(1, df))``, where ``df`` is the number of frames whose references contain it (an
    n-gram no reference has counts as ``df = 1``). For each frame, with ``g_n`` the weight vectors of order
    n of the prediction ``c`` and of each of its ``m`` references ``s_j`` (Vedantam et al., 2015)::

        CIDEr-D(c, S) = 10 / m * sum_j exp(-(len(c) - len(s_j))**2 / (2 * sigma**2))
                        * mean_n  sum_g min(g_n(c), g_n(s_j)) * g_n(s_j) / (|g_n(c)| * |g_n(s_j)|)

    (an order whose vector is all zero adds 0); the corpus score is the mean over frames. Lengths are in
    tokens.

    Args:
        predictions: one caption per frame (e.g. the caption of each generated frame).
        references: per frame, its reference captions (the paper uses 5 captions of the ground-truth frame).
        max_order: the highest n-gram order (4 in CIDEr-D).
        sigma: the width of the Gaussian length penalty (6 in CIDEr-D).
        tokenize: text to tokens; :func:`tokenize_caption` by default, ``str.split`` for pre-tokenized text.

    Returns:
        ``{"cider": mean CIDEr-D, "num_captions": N}``. The idf comes from this corpus, so score all frames
        in one call; a corpus of one frame scores 0 (every idf is ``log 1``).

    Raises:
        ValueError: ``predictions`` and ``references`` differ in length or are empty, a reference list is
            empty, a caption is not a string, or ``max_order`` / ``sigma`` is not positive.

    Example:
        >>> captions = ["fred drives the car", "wilma is cooking", "barney laughs"]
        >>> cider_score(captions, [[c] for c in captions])["cider"]  # 10 per 4-gram caption, 7.5 and 5 below
        7.5
    """
    if max_order < 1:
        raise ValueError(f"max_order must be at least 1, got {max_order}.")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    hypotheses, reference_sets = _tokenized_corpus(predictions, references, tokenize)
    hypothesis_counts = [_ngram_counts(h, max_order) for h in hypotheses]
    reference_counts = [[_ngram_counts(r, max_order) for r in refs] for refs in reference_sets]

    # 1. Document frequency: in how many frames' references each n-gram occurs (once per frame).
    document_frequency: Counter[NGram] = Counter()
    for counts in reference_counts:
        document_frequency.update(set().union(*counts))
    log_num_frames = math.log(len(hypotheses))

    # 2. tf-idf vectors per order, with their norms.
    def weights(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float]]:
        vectors: list[dict[NGram, float]] = [{} for _ in range(max_order)]
        for ngram, count in counts.items():
            idf = log_num_frames - math.log(max(1, document_frequency[ngram]))
            vectors[len(ngram) - 1][ngram] = count * idf
        return vectors, [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]

    # 3. Per frame: clipped cosine per order, mean over orders, length penalty, mean over references.
    frame_scores = []
    for hypothesis, counts, refs, ref_counts in zip(
        hypotheses, hypothesis_counts, reference_sets, reference_counts
    ):
        hyp_vectors, hyp_norms = weights(counts)
        total = 0.0
        for ref, ref_count in zip(refs, ref_counts):
            ref_vectors, ref_norms = weights(ref_count)
            similarity = 0.0
            for n in range(max_order):
                if hyp_norms[n] == 0.0 or ref_norms[n] == 0.0:
                    continue
                # Clipping the prediction's weight at the reference's is what the "-D" adds against
                # gaming by repeating a rewarded n-gram.
                overlap = sum(
                    min(weight, ref_vectors[n].get(ngram, 0.0)) * ref_vectors[n].get(ngram, 0.0)
                    for ngram, weight in hyp_vectors[n].items()
                )
                similarity += overlap / (hyp_norms[n] * ref_norms[n])
            delta = len(hypothesis) - len(ref)
            total += math.exp(-(delta**2) / (2.0 * sigma**2)) * similarity / max_order
        frame_scores.append(10.0 * total / len(refs))
    return {"cider": sum(frame_scores) / len(frame_scores), "num_captions": len(frame_scores)}
