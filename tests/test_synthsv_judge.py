"""SynthSV render-exact judge and the generic Char-Acc / Char-F1 / BG-Acc metrics."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ImageFilter

from storygptv.data.synthsv import (
    BACKGROUNDS,
    CHARACTER_COLORS,
    CHARACTERS,
    SynthFrame,
    load_synthsv,
    render_frame,
    sample_story,
)
from storygptv.evaluation.metrics import background_accuracy, character_metrics
from storygptv.evaluation.synthsv import (
    JudgedFrame,
    SynthSVJudge,
    character_consistency,
    image_to_array,
    judge_frame,
    judge_frames,
    score_stories,
)
from storygptv.evaluation.synthsv_calibration import noise_image, random_frames

# ------------------------------------------------------------------------------------------ metrics


def test_character_metrics_hand_computed():
    pred = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 0]])
    true = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]])
    # exact rows: 1 and 2 -> 2 / 4; TP = 1 + 2 = 3, FP = 1 + 1 = 2, FN = 1
    out = character_metrics(pred, true)
    assert out["char_acc"] == pytest.approx(50.0)
    assert out["char_f1"] == pytest.approx(100 * 6 / (6 + 2 + 1))
    assert out["precision"] == pytest.approx(60.0)
    assert out["recall"] == pytest.approx(75.0)
    assert out["num_frames"] == 4


def test_character_metrics_edge_cases():
    empty = np.zeros((3, 8), dtype=np.int8)
    assert character_metrics(empty, empty) == {
        "char_acc": 100.0,
        "char_f1": 100.0,
        "precision": 100.0,
        "recall": 100.0,
        "num_frames": 3,
    }
    assert character_metrics(empty, empty, zero_division=0.0)["char_f1"] == 0.0
    ones = np.ones((2, 8), dtype=np.int8)
    out = character_metrics(empty[:2], ones)
    assert out["char_acc"] == 0.0 and out["char_f1"] == 0.0 and out["recall"] == 0.0
    # probabilities are thresholded at 0.5; a single vector is one frame
    assert character_metrics([0.9, 0.2], [1, 0])["char_acc"] == 100.0
    with pytest.raises(ValueError):
        character_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        character_metrics(np.zeros((0, 3)), np.zeros((0, 3)))


def test_background_accuracy():
    assert background_accuracy(["forest", "lake", None], ["forest", "cave", "snow"]) == pytest.approx(100 / 3)
    assert background_accuracy([0, 2, 2, 1], np.array([0, 2, 1, 1])) == pytest.approx(75.0)
    one_hot_true = np.eye(4, dtype=np.int8)[[0, 1, 2]]
    one_hot_pred = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    assert background_accuracy(one_hot_pred, one_hot_true) == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        background_accuracy(["a"], ["a", "b"])


# --------------------------------------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def frames_and_images():
    frames = random_frames(120, seed=7)
    return frames, [render_frame(f)[0] for f in frames]


def _exact_rate(judge, frames, images):
    hits = 0
    for frame, image in zip(frames, images):
        judged = judge.judge_frame(image)
        hits += judged.characters == tuple(c for c in CHARACTERS if c in frame.characters) and (
            judged.background == frame.background
        )
    return hits / len(frames)


def _noisy(image: PIL.Image.Image, std: float, rng: np.random.Generator) -> PIL.Image.Image:
    array = np.asarray(image, dtype=np.float32) + rng.normal(0, std, (image.height, image.width, 3))
    return PIL.Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="RGB")


def test_judge_exact_on_clean_renders(frames_and_images):
    frames, images = frames_and_images
    assert _exact_rate(SynthSVJudge(), frames, images) == 1.0


def test_judge_every_character_pose_background():
    judge = SynthSVJudge()
    for name in CHARACTERS:
        for action in ("standing", "jumping", "sitting"):
            for background in BACKGROUNDS:
                frame = SynthFrame((name,), (1,), action, background)
                judged = judge.judge_frame(render_frame(frame)[0])
                assert judged == JudgedFrame((name,), background, judged.pixel_counts), (
                    name,
                    action,
                    background,
                )


def test_judge_blur_and_noise(frames_and_images):
    frames, images = frames_and_images
    rng = np.random.default_rng(0)
    judge = SynthSVJudge()
    blurred = [im.filter(ImageFilter.GaussianBlur(radius=1)) for im in images]
    assert _exact_rate(judge, frames, blurred) >= 0.98
    noisy = [_noisy(im, 20.0, rng) for im in images]
    assert _exact_rate(judge, frames, noisy) >= 0.98
    both = [_noisy(im, 15.0, rng) for im in blurred]
    assert _exact_rate(judge, frames, both) >= 0.97


def test_judge_noise_images_show_nothing():
    rng = np.random.default_rng(1)
    judge = SynthSVJudge()
    for kind in ("uniform", "gaussian", "blurred"):
        judged = [judge.judge_frame(noise_image(kind, rng)) for _ in range(25)]
        assert sum(bool(j.characters) for j in judged) <= 1, kind
        assert sum(j.background is not None for j in judged) <= 1, kind
    flat = judge.judge_frame(PIL.Image.new("RGB", (64, 64), (128, 128, 128)))
    assert flat.characters == () and flat.background is None


def test_judge_input_forms(frames_and_images):
    frames, images = frames_and_images
    frame, image = frames[0], images[0]
    expected = judge_frame(image)
    assert expected.characters == tuple(c for c in CHARACTERS if c in frame.characters)
    array = np.array(image)
    chw = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    for form in (array, array.astype(np.float32) / 255.0, chw, chw * 2 - 1, torch.from_numpy(array)):
        assert judge_frame(form).characters == expected.characters
        assert judge_frame(form).background == expected.background
    for size, resample in ((128, PIL.Image.NEAREST), (256, PIL.Image.BICUBIC), (256, PIL.Image.BILINEAR)):
        up = image.resize((size, size), resample=resample)
        assert judge_frame(up).characters == expected.characters
        assert judge_frame(up).background == expected.background
    assert np.array_equal(image_to_array(image.resize((256, 256), PIL.Image.NEAREST)), array)
    batch = torch.stack([chw, chw])
    assert [j.characters for j in judge_frames(batch)] == [expected.characters] * 2


def test_score_stories():
    stories = [sample_story(i, "test", 4) for i in range(6)]
    generated = [[render_frame(f)[0] for f in story.frames] for story in stories]
    perfect = score_stories(generated, stories)
    assert perfect == {"char_acc": 100.0, "char_f1": 100.0, "bg_acc": 100.0, "num_frames": 24}
    # dataset rows work as references too
    rows = [load_synthsv("test", num_stories=6)[i] for i in range(6)]
    assert score_stories([row["images"] for row in rows], rows) == perfect
    # blank grey frames: no character, no background
    blank = [[PIL.Image.new("RGB", (64, 64), (128, 128, 128))] * 4 for _ in stories]
    empty = score_stories(blank, stories)
    assert empty["char_acc"] == 0.0 and empty["char_f1"] == 0.0 and empty["bg_acc"] == 0.0
    # shifting the generated stories by one gives partial scores computed by the metrics
    shifted = score_stories(generated[1:] + generated[:1], stories)
    assert 0.0 <= shifted["char_acc"] < 100.0 and shifted["bg_acc"] < 100.0
    with pytest.raises(ValueError):
        score_stories(generated[:2], stories)


def _story_frames(index: int) -> list[np.ndarray]:
    return [np.asarray(render_frame(f)[0]) for f in sample_story(index, split="test").frames]


def test_consistency_of_exact_renders_is_near_perfect():
    result = character_consistency([_story_frames(i) for i in range(20)])
    assert result["color_drift"] == 0.0
    assert result["silhouette_iou"] > 97 and result["sprite_iou"] > 97
    assert result["characters"] > 0 and result["appearances"] >= result["characters"] * 2


def test_consistency_drops_when_a_character_changes_colour_or_shape():
    frame = SynthFrame(("Ava",), (1,), "standing", "forest")
    image = np.asarray(render_frame(frame)[0]).copy()
    x0, y0, x1, y1 = frame.boxes[0]
    exact = character_consistency([[image, image]])
    assert exact["color_drift"] == 0.0 and exact["silhouette_iou"] == 100.0

    recoloured = image.copy()
    sprite = (recoloured == CHARACTER_COLORS["Ava"]).all(-1)
    recoloured[sprite] = (200, 40, 60)  # still Ava to the judge, a shifted red
    drifted = character_consistency([[image, recoloured]])
    assert drifted["color_drift"] == pytest.approx(np.linalg.norm(np.subtract((230, 30, 40), (200, 40, 60))))

    plus = image.copy()
    plus[y0:y1, x0:x1] = plus[y0, x0]  # the box's sky / ground corner colour
    plus[y0 + 6 : y1 - 6, x0:x1] = CHARACTER_COLORS["Ava"]  # a plus sign, not a circle
    plus[y0:y1, x0 + 6 : x1 - 6] = CHARACTER_COLORS["Ava"]
    deformed = character_consistency([[image, plus]])
    assert deformed["silhouette_iou"] < 70 and deformed["sprite_iou"] < exact["sprite_iou"] - 15


def test_consistency_needs_two_appearances():
    frame = SynthFrame(("Bo",), (0,), "jumping", "night")
    empty = SynthFrame((), (), "standing", "night")
    result = character_consistency([[render_frame(frame)[0], render_frame(empty)[0]]])
    assert result["characters"] == 0 and result["appearances"] == 1
    assert np.isnan(result["silhouette_iou"]) and np.isnan(result["color_drift"])
    assert result["sprite_iou"] > 97
