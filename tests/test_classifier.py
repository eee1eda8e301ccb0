"""The trainable frame classifiers: ``training_scripts/train_classifier.py`` and ``storygptv.evaluation.classifier``.

Everything runs on tiny ResNets at 16-32 px on a handful of SynthSV stories (a few seconds each, CPU, offline).
The scoring path is checked end to end with a classifier whose weights are set by hand to read uniform frames
exactly (a real ResNet, no stub), so a perfect judge must give 100 through the folder layout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import ResNetConfig

from storygptv.cli import frame_file_name
from storygptv.data import dataset_label_names
from storygptv.evaluation import (
    StoryFrameClassifier,
    StoryFrameClassifierConfig,
    classification_scores,
    classifier_pixel_values,
    score_frames,
    score_story_folder,
)
from storygptv.training.checks import TrainingSetupError

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = '{"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}'


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "_script_train_classifier", ROOT / "training_scripts" / "train_classifier.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(out: Path, *extra: str, backbone: bool = True) -> list[str]:
    """A tiny run: 4 SynthSV stories (16 frames), 32 px, 4 steps per epoch, a checkpoint every step."""
    return [
        "--dataset", "synthsv", "--num_stories", "4", "--output_dir", str(out), "--resolution", "32",
        *(["--backbone_config", TINY_BACKBONE] if backbone else []), "--train_batch_size", "4",
        "--learning_rate", "1e-2", "--num_train_epochs", "3", "--checkpointing_steps", "1", "--eval_batch_size", "8",
        "--report_to", "none", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ script
def test_script_trains_exports_and_keeps_the_best_evaluation(script, tmp_path):
    out = tmp_path / "chars"
    result = script.main(_args(out, "--random_flip"))
    assert result["global_step"] == 12  # 16 frames / 4 per batch = 4 steps per epoch, 3 epochs
    history = result["history"]
    assert [h["step"] for h in history] == [4, 8, 12]  # one evaluation per epoch
    best_acc = max(h["char_acc"] for h in history)
    first_best = next(h for h in history if h["char_acc"] == best_acc)
    assert result["best"] == first_best  # the best exact match; a tie keeps the earlier evaluation
    assert json.loads((out / "validation.json").read_text())["best"] == first_best
    # The export holds the best evaluation's weights: those checkpointed at its step.
    exported = load_file(out / "model.safetensors")
    at_best = load_file(out / f"checkpoint-{first_best['step']}" / "model.safetensors")
    assert exported.keys() == at_best.keys()
    assert all(torch.equal(exported[k], at_best[k]) for k in exported)

    classifier = StoryFrameClassifier.from_pretrained(out)
    assert classifier.config.label_names == list(dataset_label_names("synthsv"))
    assert classifier.config.task == "characters" and classifier.config.image_size == 32
    assert classifier.config.id2label[0] == "Ava" and classifier.config.dataset == "SynthSV"
    frames = [np.zeros((64, 64, 3), dtype=np.uint8), PIL.Image.new("RGB", (80, 64), (200, 30, 40))]
    assert classifier.predict(frames).shape == (2, 8)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "StoryFrameClassifier.from_pretrained" in card
    assert "| best step |" in card and "Ava, Bo, Cleo" in card


def test_background_classifier_on_synthsv(script, tmp_path):
    result = script.main(_args(tmp_path / "bg", "--task", "background", "--num_train_epochs", "1"))
    assert set(result["best"]) == {"step", "bg_acc", "bg_f1", "loss"}
    classifier = StoryFrameClassifier.from_pretrained(tmp_path / "bg")
    assert classifier.config.task == "background"
    assert classifier.config.label_names == list(dataset_label_names("synthsv", "background"))


def test_a_pretrained_image_model_from_a_folder(script, tmp_path):
    """``--backbone_name_or_path`` takes any transformers image model: here a ConvNeXt saved to a folder."""
    from transformers import ConvNextConfig, ConvNextModel

    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(
        tmp_path / "cnx"
    )
    args = _args(tmp_path / "out", "--backbone_name_or_path", str(tmp_path / "cnx"), "--num_train_epochs", "1",
                 backbone=False)  # fmt: skip
    script.main(args)
    classifier = StoryFrameClassifier.from_pretrained(tmp_path / "out")
    assert classifier.config.vision_config.model_type == "convnext" and classifier.config.feature_size == 16
    assert str(tmp_path / "cnx") in (tmp_path / "out" / "README.md").read_text()


def test_resume_gives_the_same_classifier(script, tmp_path):
    straight = script.main(_args(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        script.main(_args(tmp_path / "b", "--debug_interrupt_at_step", "6"))  # after the first evaluation
    resumed = script.main(_args(tmp_path / "b", "--resume_from_checkpoint", "latest"))
    assert resumed["history"] == straight["history"] and resumed["best"] == straight["best"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Training further from the exported classifier: same labels, its own image model and size.
    more = script.main(
        _args(tmp_path / "c", "--pretrained_model_name_or_path", str(tmp_path / "a"), "--num_train_epochs", "1",
              "--validation_steps", "2", backbone=False)
    )  # fmt: skip
    assert [h["step"] for h in more["history"]] == [2, 4]


def test_best_evaluation_keeps_the_better_epoch(script):
    model = torch.nn.Linear(2, 1)
    tracker = script.BestEvaluation("char_acc")
    for step, acc in [(1, 50.0), (2, 80.0), (3, 60.0), (4, 80.0)]:  # worse later, then a tie
        with torch.no_grad():
            model.weight.fill_(step)
        tracker.update(step, {"char_acc": acc}, model)
    assert tracker.best == {"step": 2, "char_acc": 80.0}  # the tie at step 4 keeps the earlier epoch
    assert torch.equal(tracker.weights["weight"], torch.full((1, 2), 2.0))
    assert [h["step"] for h in tracker.history] == [1, 2, 3, 4]
    restored = script.BestEvaluation("char_acc")
    restored.load_state_dict(tracker.state_dict())  # what a checkpoint carries
    assert restored.best == tracker.best and torch.equal(
        restored.weights["weight"], tracker.weights["weight"]
    )


def test_flintstones_background_classifier_and_its_scores(script, tmp_path):
    """The release path: 323 unnamed background labels (labels_bg.pkl), trained, then scoring a story folder."""
    from storygptv import load_story_dataset
    from tests.fixtures.story_releases import write_flintstones_storygptv

    release = tmp_path / "flintstones"
    write_flintstones_storygptv(release)
    out = tmp_path / "bg"
    args = ["--dataset", "flintstones", "--data_dir", str(release), "--task", "background", "--output_dir", str(out),
            "--resolution", "16", "--backbone_config", TINY_BACKBONE, "--train_batch_size", "4",
            "--num_train_epochs", "2", "--report_to", "none"]  # fmt: skip
    assert [h["step"] for h in script.main(args)["history"]] == [1, 2]
    names = dataset_label_names("flintstones", "background", release)
    assert len(names) == 323 and names[0] == "background_000"
    classifier = StoryFrameClassifier.from_pretrained(out)
    assert classifier.config.label_names == list(names)
    # The test stories, "generated" as their own frames, scored by the background classifier.
    stories = load_story_dataset("flintstones", release, split="test", cache_dir=str(tmp_path / "cache"))
    for story in stories:
        for index, image in enumerate(story["images"]):
            path = tmp_path / "generated" / story["story_id"] / frame_file_name(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    scores = score_story_folder(
        tmp_path / "generated", stories, background_classifier=classifier, background_names=names
    )
    assert scores["num_background_frames"] == 8 and 0.0 <= scores["bg_acc"] <= 100.0


def test_setup_errors_come_first(script, tmp_path):
    with pytest.raises(TrainingSetupError, match="8 entries, but there are 2 label names"):
        script.main(_args(tmp_path / "a", "--label_names", "Ava", "Bo"))
    with pytest.raises(TrainingSetupError, match="with a `model_type`"):
        script.main(_args(tmp_path / "b", "--backbone_config", "{}"))  # the last value wins
    with pytest.raises(TrainingSetupError, match="--backbone_config"):
        script.main(_args(tmp_path / "b", "--backbone_config", '{"model_type": "no-such-model"}'))
    with pytest.raises(SystemExit):  # a classifier folder brings its own image model
        script.main(_args(tmp_path / "c", "--pretrained_model_name_or_path", str(tmp_path)))
    assert not (tmp_path / "b").exists()


def test_a_classifier_for_other_labels_is_refused_before_training(script, tmp_path):
    other = _classifier(["Ava", "Bo", "Zed"])
    other.save_pretrained(tmp_path / "other")
    args = _args(tmp_path / "out", "--pretrained_model_name_or_path", str(tmp_path / "other"), backbone=False)
    with pytest.raises(TrainingSetupError, match=r"only the classifier has: \['Zed'\]"):
        script.main(args)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ pieces
def _classifier(names: list[str], task: str = "characters", image_size: int = 16) -> StoryFrameClassifier:
    vision = ResNetConfig(num_channels=3, embedding_size=3, hidden_sizes=[3], depths=[1], layer_type="basic")
    config = StoryFrameClassifierConfig(
        vision_config=vision, label_names=names, task=task, image_size=image_size
    )
    return StoryFrameClassifier(config)


def _colour_reader(names: list[str], task: str = "characters") -> StoryFrameClassifier:
    """A 3-label classifier that reads uniform frames exactly: label c is on when colour channel c is 255.

    Its real ResNet is set by hand: the stem convolution copies the centre pixel's channels, every other
    convolution is zero (so each residual block is the identity), every BatchNorm is the identity; the pooled
    feature c is then relu((x_c / 255 - mean_c) / std_c): 0 for a channel at 0, about 2 for one at 255.
    """
    model = _classifier(names, task)
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, running mean 0, running var 1
        stem = model.backbone.embedder.embedder.convolution
        for c in range(3):
            stem.weight[c, c, 3, 3] = 1.0
        model.classifier.weight.copy_(torch.eye(3) * 4.0)
        model.classifier.bias.fill_(-4.0)
    return model.eval()


def _uniform(bits: list[int], size: int = 24) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (size, size), tuple(255 * b for b in bits))


STORIES = [
    {
        "story_id": "s0",
        "character_labels": [[1, 0, 1], [0, 0, 0], [0, 1, 0]],
        "background_labels": [[1, 0, 0]] * 3,
    },
    {
        "story_id": "s1",
        "character_labels": [[1, 1, 1], [0, 1, 1]],
        "background_labels": [[0, 0, 1], [0, 1, 0]],
    },
]
NAMES = ["Ava", "Bo", "Cleo"]
SETTINGS = ["forest", "beach", "night"]


def _write_story_folder(root: Path, key: str = "character_labels") -> Path:
    for story in STORIES:
        for index, bits in enumerate(story[key]):
            path = root / story["story_id"] / frame_file_name(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            _uniform(bits).save(path)
    return root


def test_a_perfect_classifier_scores_100_through_the_story_folder(tmp_path):
    folder = _write_story_folder(tmp_path / "chars")
    scores = score_story_folder(folder, STORIES, classifier=_colour_reader(NAMES), character_names=NAMES)
    assert scores == {"char_acc": 100.0, "char_f1": 100.0, "num_frames": 5}
    # One frame drawn with the wrong cast: 4 of 5 frames right, 1 false positive among 8 true positives.
    _uniform([1, 1, 0]).save(folder / "s0" / frame_file_name(2))
    scores = score_story_folder(folder, STORIES, classifier=_colour_reader(NAMES), character_names=NAMES)
    assert scores["char_acc"] == 80.0 and scores["char_f1"] == pytest.approx(100 * 2 * 8 / (2 * 8 + 1))
    # Backgrounds: the same reader as a background classifier over three settings.
    bg_folder = _write_story_folder(tmp_path / "bg", "background_labels")
    bg = score_story_folder(
        bg_folder,
        STORIES,
        background_classifier=_colour_reader(SETTINGS, "background"),
        background_names=SETTINGS,
    )
    assert bg == {"bg_acc": 100.0, "bg_f1": 100.0, "num_background_frames": 5}


def test_a_classifier_for_another_label_set_is_refused_before_any_image(tmp_path):
    empty = tmp_path / "generated"  # no frame at all: the label check must come first
    empty.mkdir()
    with pytest.raises(ValueError) as error:
        score_story_folder(
            empty, STORIES, classifier=_colour_reader(["Ava", "Bo", "Zed"]), character_names=NAMES
        )
    message = str(error.value)
    assert str(empty) in message and "['Zed']" in message and "['Cleo']" in message
    with pytest.raises(ValueError, match="another order"):
        score_story_folder(
            empty, STORIES, classifier=_colour_reader(["Bo", "Ava", "Cleo"]), character_names=NAMES
        )
    with pytest.raises(ValueError, match="predicts characters, but it was given as the background"):
        score_story_folder(
            empty, STORIES, background_classifier=_colour_reader(NAMES), background_names=NAMES
        )


def test_a_missing_frame_names_the_story_and_the_frame(tmp_path):
    folder = _write_story_folder(tmp_path / "generated")
    (folder / "s1" / frame_file_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match=r"story 's1' has no frame 2 .*frame_002\.png.*1 of 5 frames"):
        score_story_folder(folder, STORIES, classifier=_colour_reader(NAMES), character_names=NAMES)


def test_score_frames_and_the_metric_plumbing():
    images = [_uniform(bits) for story in STORIES for bits in story["character_labels"]]
    labels = [bits for story in STORIES for bits in story["character_labels"]]
    scores = score_frames(
        images, classifier=_colour_reader(NAMES), character_labels=labels, character_names=NAMES
    )
    assert scores["char_acc"] == 100.0
    # Known probabilities: round(sigmoid) per label, whole-vector exact match, micro F1.
    truth = np.array([[1, 0], [0, 0], [1, 1]])
    probs = np.array([[0.9, 0.2], [0.1, 0.4], [0.8, 0.3]])
    assert classification_scores("characters", probs, truth) == {
        "char_acc": pytest.approx(200 / 3),
        "char_f1": pytest.approx(100 * 2 * 2 / (2 * 2 + 1)),
        "num_frames": 3,
    }
    # A background frame predicted with no label is wrong (the judge has no "none" class).
    bg = classification_scores("background", np.array([[0.1, 0.2], [0.1, 0.9]]), np.array([[1, 0], [0, 1]]))
    assert bg["bg_acc"] == 50.0


def test_preprocessing_resizes_the_shorter_side_then_crops_the_centre(tmp_path):
    # A 40x20 image: left half red, right half blue. Resized to 32x16 and centre-cropped to 16x16, it keeps
    # columns 8..23 of the resized image: half red, half blue.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:, 2] = 255
    pixels = classifier_pixel_values([array], 16, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels[0, 0, :, :7], torch.ones(16, 7)) and torch.allclose(
        pixels[0, 2, :, 9:], torch.ones(16, 7)
    )
    # Paths, PIL images, float tensors in [0, 1] (channels first) read alike; ImageNet statistics by default.
    PIL.Image.fromarray(array).save(tmp_path / "frame.png")
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    same = classifier_pixel_values([tmp_path / "frame.png", PIL.Image.fromarray(array), tensor], 16)
    assert torch.allclose(same[0], same[1]) and torch.allclose(same[0], same[2], atol=1e-6)
    assert same[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_config_checks_and_dataset_label_names(tmp_path):
    with pytest.raises(ValueError, match="label_names"):
        StoryFrameClassifierConfig(label_names=[])
    with pytest.raises(ValueError, match="distinct"):
        StoryFrameClassifierConfig(label_names=["Ava", "Ava"])
    config = StoryFrameClassifierConfig(label_names=["Ava", "Bo"])
    assert config.num_labels == 2 and config.label2id == {"Ava": 0, "Bo": 1} and config.image_size == 299
    assert config.problem_type == "multi_label_classification"
    assert dataset_label_names("PororoSV")[:3] == ("Pororo", "Loopy", "Crong")
    assert dataset_label_names("flintstones")[-1] == "Mr Slate"
    with pytest.raises(ValueError, match="PororoSV has no background labels"):
        dataset_label_names("pororo", "background")
    assert dataset_label_names("folder", data_dir=ROOT / "examples" / "my_stories") == ("Nia", "Rex")
