"""Caption metrics (corpus BLEU-1..4, CIDEr-D): hand-computed values, closed forms, bad input, evaluate modules.

Every expected number below is worked out in the comments from the definitions (Papineni et al., 2002;
Vedantam et al., 2015, as coco-caption computes them), not read off the implementation.
"""

from __future__ import annotations

import math

import pytest

from storygptv.evaluation import bleu_scores, cider_score, tokenize_caption

# --- tokenization --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        # Each expected line is what coco-caption's Java PTB tokenizer + punctuation filter gave.
        ("Fred's in the well-known car, isn't he?", "fred 's in the well-known car is n't he"),
        ('Barney says "Hey Fred" (laughing).', "barney says hey fred -lrb- laughing -rrb-"),
        (
            "They can't find it -- it's 3.5 feet away... at 5 o'clock.",
            "they ca n't find it it 's 3.5 feet away at 5 o'clock",
        ),
        (
            "Mrs. Slate and Dr. Rock meet at 5 a.m. in St. Louis.",
            "mrs. slate and dr. rock meet at 5 a.m. in st. louis",
        ),
        ("It's 10:30, the U.S.A. team won 3-2!", "it 's 10:30 the u.s.a. team won 3-2"),
        ("Wilma & Betty: 50% off\u2014at the \u201cstore\u201d.", "wilma & betty 50 % off at the store"),
        ("The Flintstones' house is on fire!", "the flintstones house is on fire"),
    ],
)
def test_tokenizer_follows_coco_ptb_tokenization(text, tokens):
    assert tokenize_caption(text) == tokens.split()


# --- BLEU ----------------------------------------------------------------------------------------------


def test_bleu_clips_counts_at_the_reference():
    # Papineni et al.'s example: "the" occurs 7 times but at most twice in the reference, so p1 = 2/7;
    # c = 7 >= r = 6, no brevity penalty. No bigram "the the" in the reference: BLEU-2 = 0.
    out = bleu_scores(["the the the the the the the"], [["The cat is on the mat."]])
    assert out["bleu_1"] == pytest.approx(2 / 7)
    assert out["bleu_2"] == out["bleu_3"] == out["bleu_4"] == 0.0
    assert out["brevity_penalty"] == 1.0 and out["num_captions"] == 1


def test_bleu_clips_at_the_largest_count_in_any_one_reference():
    # "the the cat" against "the cat" / "the the dog": "the" may match twice (the second reference has two),
    # p1 = 3/3; bigrams "the the" (2nd ref) and "the cat" (1st ref) match, p2 = 2/2; the trigram does not.
    out = bleu_scores(["the the cat"], [["the cat", "the the dog"]])
    assert (out["bleu_1"], out["bleu_2"], out["bleu_3"]) == (pytest.approx(1.0), pytest.approx(1.0), 0.0)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    # "a cat on the mat" (c = 5) is a span of the 7-word reference, so every precision is 1. The closest
    # reference length is 7 (|7 - 5| = 2 < |2 - 5| = 3): BP = exp(1 - 7/5) = exp(-0.4). (The shortest
    # reference, 2 words, would give BP = 1.)
    out = bleu_scores(["a cat on the mat"], [["there is a cat on the mat", "a cat"]])
    for n in range(1, 5):
        assert out[f"bleu_{n}"] == pytest.approx(math.exp(-0.4))
    assert out["brevity_penalty"] == pytest.approx(math.exp(-0.4))
    assert out["length_ratio"] == pytest.approx(5 / 7)


def test_bleu_closest_reference_ties_go_to_the_shorter():
    # References of 6 and 4 words are both 1 away from c = 5: coco-caption takes 4, so BP = 1 and, the
    # prediction being a span of the 6-word reference, BLEU-1..4 = 1. Taking 6 would give exp(1 - 6/5).
    out = bleu_scores(["a cat on the mat"], [["is a cat on the mat", "the cat sat down"]])
    assert [out[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4)
    assert out["brevity_penalty"] == 1.0 and out["length_ratio"] == pytest.approx(5 / 4)


def test_bleu_is_a_corpus_score_not_a_mean_of_caption_scores():
    # Frame A "the cat" / "the cat": unigrams 2/2, bigrams 1/1. Frame B "a dog runs" / "the dog walks":
    # unigrams 1/3 ("dog"), bigrams 0/2, trigram 0/1. Summed: p1 = 3/5, p2 = 1/3, p3 = 0; c = r = 5.
    # (The mean of the two captions' BLEU-1 would be (1 + 1/3) / 2 = 2/3.)
    out = bleu_scores(["the cat", "a dog runs"], [["the cat"], ["the dog walks"]])
    assert out["bleu_1"] == pytest.approx(3 / 5)
    assert out["bleu_2"] == pytest.approx(math.sqrt(3 / 5 * 1 / 3))
    assert out["bleu_3"] == 0.0 and out["bleu_4"] == 0.0
    assert out["brevity_penalty"] == 1.0 and out["num_captions"] == 2


def test_bleu_of_identical_captions_is_one():
    captions = ["Fred drives the car to the quarry.", "Wilma and Betty talk in the kitchen"]
    # Case and punctuation are tokenized away; a reference may be given as a single string.
    out = bleu_scores(captions, [c.lower().rstrip(".") for c in captions])
    assert [out[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4)
    assert out["brevity_penalty"] == 1.0 and out["length_ratio"] == 1.0


def test_bleu_brevity_penalty_over_the_corpus_and_max_order():
    # c = 2 + 1 = 3 words against r = 3 + 3 = 6: BP = exp(1 - 6/3) = exp(-1); unigrams all match.
    out = bleu_scores(["fred runs", "dino"], [["fred runs fast"], ["dino barks loudly"]], max_order=2)
    assert set(out) == {"bleu_1", "bleu_2", "brevity_penalty", "length_ratio", "num_captions"}
    assert out["bleu_1"] == pytest.approx(math.exp(-1))
    # Bigrams: "fred runs" matches, and there is no other: p2 = 1/1.
    assert out["bleu_2"] == pytest.approx(math.exp(-1))


def test_bleu_tokenizer_can_be_replaced():
    # With whitespace splitting, "car." is not "car": 3 of 4 unigrams match.
    out = bleu_scores(["fred drives the car."], [["fred drives the car"]], tokenize=str.split)
    assert out["bleu_1"] == pytest.approx(3 / 4)


# --- CIDEr-D -------------------------------------------------------------------------------------------


def test_cider_of_identical_captions_has_a_closed_form():
    # When a prediction equals each of its references, the clipped cosine of every order that has a
    # non-zero tf-idf vector is 1 and the length penalty is 1, so a frame scores
    #     10 / 4 * #{n in 1..4 : some n-gram of the caption is missing from another frame's references},
    # i.e. 10 * min(len, 4) / 4 for captions whose words other frames do not all share. "the" occurs in
    # every frame (idf log 3 - log 3 = 0) but every caption has other words, so: 10, 5 and 7.5.
    captions = ["the red car stops", "the dog", "the bird sings"]
    expected = (10 + 5 + 7.5) / 3
    assert cider_score(captions, [[c] for c in captions]) == {
        "cider": pytest.approx(expected),
        "num_captions": 3,
    }
    # Five identical references per frame (as in the paper's five captions) give the same mean.
    assert cider_score(captions, [[c] * 5 for c in captions])["cider"] == pytest.approx(expected)


def test_cider_is_zero_without_informative_ngrams():
    # The same caption in every frame: every idf is log N - log N = 0.
    assert cider_score(["fred runs"] * 3, [["fred runs"]] * 3)["cider"] == 0.0
    # A corpus of one frame: log 1 = 0 as well.
    assert cider_score(["fred runs"], [["fred runs"]])["cider"] == 0.0


def test_cider_clips_the_prediction_weights():
    # Two frames, every n-gram in one frame's references only: df = 1, idf w = log 2 for all of them (an
    # n-gram in no reference, "a a", also counts df = 1).
    # Frame 1, "a a" vs "a b": unigrams g(c) = {a: 2w}, g(s) = {a: w, b: w}; clipped overlap
    # min(2w, w) * w = w^2 over |g(c)| |g(s)| = 2w * sqrt(2) w gives 1 / (2 sqrt 2); bigrams "a a" vs "a b"
    # share nothing; no trigram. Same length: 10 * (1 / (2 sqrt 2)) / 4.
    # Frame 2, "c d" vs "c d": orders 1 and 2 give 1: 10 * 2 / 4 = 5.
    out = cider_score(["a a", "c d"], [["a b"], ["c d"]])
    assert out["cider"] == pytest.approx((10 / (8 * math.sqrt(2)) + 5) / 2)


def test_cider_length_penalty_and_mean_over_references():
    # Frame 1, "a" vs "a b": unigram cosine w^2 / (w * sqrt(2) w) = 1 / sqrt 2, length difference -1, so
    # the penalty is exp(-1 / (2 * 6^2)): 10 * exp(-1/72) / (4 sqrt 2). Frame 2 as above: 5.
    out = cider_score(["a", "c d"], [["a b"], ["c d"]])
    assert out["cider"] == pytest.approx((10 * math.exp(-1 / 72) / (4 * math.sqrt(2)) + 5) / 2)
    # Frame 1 now has an identical reference (orders 1, 2: 10 * 2/4 = 5) and a disjoint one (0): the
    # frame scores their mean, 2.5; frame 2 scores 5.
    out = cider_score(["a b", "c d"], [["a b", "x y"], ["c d"]])
    assert out["cider"] == pytest.approx((2.5 + 5) / 2)
    # A wider penalty (sigma) only changes the first case.
    wide = cider_score(["a", "c d"], [["a b"], ["c d"]], sigma=1.0)["cider"]
    assert wide == pytest.approx((10 * math.exp(-1 / 2) / (4 * math.sqrt(2)) + 5) / 2)


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", [bleu_scores, cider_score])
def test_bad_input_names_the_argument(score):
    with pytest.raises(ValueError, match="predictions has 2 captions but references has 1"):
        score(["a b", "c d"], [["a b"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        score(["a b", "c d"], [["a b"], []])
    with pytest.raises(ValueError, match="predictions is empty"):
        score([], [])
    with pytest.raises(ValueError, match="predictions must be a list"):
        score("a b", ["a b"])
    with pytest.raises(ValueError, match=r"references\[0\]\[1\] must be a string"):
        score(["a b"], [["a b", None]])
    with pytest.raises(ValueError, match="max_order"):
        score(["a b"], [["a b"]], max_order=0)


def test_cider_rejects_a_non_positive_sigma():
    with pytest.raises(ValueError, match="sigma must be positive"):
        cider_score(["a b"], [["a b"]], sigma=0)


# --- evaluate modules ----------------------------------------------------------------------------------

PREDICTIONS = [
    "Fred is talking to Barney in the living room.",
    "Wilma and Betty are walking outside the house.",
    "Dino jumps on Fred.",
    "Barney's car is parked in front of the quarry.",
]
REFERENCES = [
    ["Fred talks to Barney in the living room.", "Fred and Barney are in the living room."],
    ["Wilma and Betty walk outside.", "Betty and Wilma are outside the house talking."],
    ["Dino is jumping on Fred in the yard.", "Dino licks Fred."],
    ["Barney drives his car to the quarry.", "A car is parked at the quarry."],
]


def test_caption_modules_load_offline_and_match_the_functions(offline):
    import evaluate

    from storygptv.evaluation import load_metric, metric_path

    bleu = load_metric("caption_bleu", keep_in_memory=True)
    assert bleu.name == "caption_bleu" and "closest" in bleu.description
    assert bleu.compute(predictions=PREDICTIONS, references=REFERENCES) == pytest.approx(
        bleu_scores(PREDICTIONS, REFERENCES)
    )
    # Options reach the function.
    assert bleu.compute(predictions=PREDICTIONS, references=REFERENCES, max_order=2) == pytest.approx(
        bleu_scores(PREDICTIONS, REFERENCES, max_order=2)
    )

    cider = evaluate.load(metric_path("caption_cider"), keep_in_memory=True)
    # Batches add up to one corpus: the idf (and BLEU's sums) cover every caption added before compute.
    cider.add_batch(predictions=PREDICTIONS[:2], references=REFERENCES[:2])
    cider.add_batch(predictions=PREDICTIONS[2:], references=REFERENCES[2:])
    assert cider.compute(sigma=3.0, tokenize=str.split) == pytest.approx(
        cider_score(PREDICTIONS, REFERENCES, sigma=3.0, tokenize=str.split)
    )
    assert (
        cider_score(PREDICTIONS, REFERENCES)["cider"] != cider_score(PREDICTIONS[:2], REFERENCES[:2])["cider"]
    )

    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        cider.compute(predictions=PREDICTIONS[:2], references=[REFERENCES[0], []])
