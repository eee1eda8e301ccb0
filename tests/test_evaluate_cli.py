"""``storygptv evaluate``: one command from a model to a Table 1 row, resumable, bad input refused first.

Everything is tiny and offline: a tiny StoryGPT-V pipeline (32 px, 1 denoising step), SynthSV stories
(generated, no download), tiny ResNet classifiers saved to folders, and a 1/16-width FID Inception (the
command's loader is swapped for one that reads that width; the real loader is what refuses a file of the wrong
shape).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import ResNetConfig

from storygptv import load_story_dataset
from storygptv.cli import frame_file_name, main
from storygptv.data import dataset_label_names
from storygptv.evaluation import (
    StoryFrameClassifier,
    StoryFrameClassifierConfig,
    evaluation_rows,
    score_stories,
    score_story_folder,
    score_story_grounding,
)
from storygptv.evaluation import fid as fid_module
from storygptv.evaluation.fid import FID_PROTOCOLS, FIDInceptionV3
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline
from storygptv.testing.storygptv import tiny_storygptv_components

TINY = 1 / 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    StoryGPTVPipeline(**tiny_storygptv_components()).save_pretrained(folder)
    return folder


def _save_classifier(folder, names, task="characters"):
    torch.manual_seed(0)
    vision = ResNetConfig(num_channels=3, embedding_size=3, hidden_sizes=[3], depths=[1], layer_type="basic")
    config = StoryFrameClassifierConfig(
        vision_config=vision, label_names=list(names), task=task, image_size=16
    )
    StoryFrameClassifier(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "characters": _save_classifier(root / "chars", dataset_label_names("synthsv")),
        "background": _save_classifier(
            root / "bg", dataset_label_names("synthsv", "background"), "background"
        ),
        "flintstones": _save_classifier(root / "flint", dataset_label_names("flintstones")),
    }


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception_tiny.pth"
    torch.save(FIDInceptionV3(width_multiplier=TINY).state_dict(), path)
    return path


@pytest.fixture
def tiny_inception_loader(monkeypatch):
    """The command's FID Inception loader, reading the 1/16-width network of the test file."""
    monkeypatch.setattr(
        fid_module,
        "load_fid_inception",
        functools.partial(fid_module.load_fid_inception, width_multiplier=TINY),
    )


@pytest.fixture
def draw_counter(monkeypatch):
    """Count the stories the pipeline draws (one pipeline call per story)."""
    calls = []
    original = StoryGPTVPipeline.__call__

    def counting(self, captions, *args, **kwargs):
        calls.append(list(captions))
        return original(self, captions, *args, **kwargs)

    monkeypatch.setattr(StoryGPTVPipeline, "__call__", counting)
    return calls


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the errors must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was reported")

    monkeypatch.setattr(StoryGPTVPipeline, "from_pretrained", boom)


def _evaluate(out, *extra, model=None, stories=2):
    args = ["evaluate", "--dataset", "synthsv", "--out", str(out), "--stories", str(stories), "--steps", "1"]
    return main(args + (["--model", str(model)] if model else []) + [str(e) for e in extra])


def _rows(count):
    return evaluation_rows(load_story_dataset("synthsv", split="test", num_stories=count))


# ------------------------------------------------------------------------------------------------ the table
def test_evaluate_writes_every_metric_the_protocol_seeds_and_versions(
    tmp_path, model_dir, classifiers, inception_file, tiny_inception_loader, capsys
):
    out = tmp_path / "eval"
    classifier_args = ["--classifier", classifiers["characters"], classifiers["background"]]
    extra = ["--inception", inception_file, "--fid_real_stories", "3", "--seed", "5", *classifier_args]
    assert _evaluate(out, *extra, model=model_dir) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "synthsv" and results["split"] == "test" and results["num_stories"] == 2
    assert results["model"] == str(model_dir) and results["seeds"] == [5, 6]
    assert results["generation"]["steps"] == 1 and results["generation"]["guidance_scale"] == 5.0
    assert set(results["versions"]) == {"storygptv", "torch", "transformers", "diffusers"}
    fid = results["fid"]
    assert fid["fid_protocol"] == "clean" and not fid["skipped"]
    assert fid["num_generated_frames"] == 8 and fid["num_real_frames"] == 12  # 3 real stories of 4 frames
    metrics = results["metrics"]
    # The numbers are those of the library's scorers on the frames written to the story folder.
    rows, stories_dir = _rows(2), out / "stories"
    frames = [
        [PIL.Image.open(stories_dir / r["story_id"] / frame_file_name(i)) for i in range(4)] for r in rows
    ]
    judged = score_stories(frames, rows)
    assert metrics["judge_char_acc"] == judged["char_acc"] and metrics["judge_bg_acc"] == judged["bg_acc"]
    by_classifier = score_story_folder(
        stories_dir,
        rows,
        classifier=StoryFrameClassifier.from_pretrained(classifiers["characters"]),
        character_names=dataset_label_names("synthsv"),
    )
    assert metrics["char_acc"] == by_classifier["char_acc"] and metrics["char_f1"] == by_classifier["char_f1"]
    resolved = [
        json.loads((stories_dir / r["story_id"] / "story.json").read_text())["characters"] for r in rows
    ]
    assert metrics["grounding_f1"] == score_story_grounding(rows, resolved)["f1"]
    assert {"bg_acc", "bg_f1", "fid", "judge_char_f1", "grounding_exact"} <= set(metrics)
    assert metrics["fid"] == fid["fid"] >= 0
    seeds = [json.loads((stories_dir / r["story_id"] / "story.json").read_text())["seed"] for r in rows]
    assert seeds == [5, 6]
    table = (out / "results.md").read_text()
    assert "| Char-Acc ↑ | Char-F1 ↑ | BG-Acc ↑ | BG-F1 ↑ | FID ↓ | Judge Char-Acc ↑" in table
    assert f"| {metrics['char_acc']:.2f} | {metrics['char_f1']:.2f} |" in table
    assert "FID protocol: `clean`" in table and "not comparable" in table
    assert table in capsys.readouterr().out


def test_without_inception_fid_is_skipped_and_said_so(tmp_path, model_dir):
    out = tmp_path / "eval"
    _evaluate(out, model=model_dir, stories=1)
    results = json.loads((out / "results.json").read_text())
    assert results["fid"]["skipped"] and "--inception" in results["fid"]["reason"]
    assert "fid" not in results["metrics"] and "char_acc" not in results["metrics"]  # no classifier given
    assert "FID skipped" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ resume
def test_an_interrupted_evaluation_draws_only_the_unfinished_stories(
    tmp_path, model_dir, draw_counter, monkeypatch
):
    out = tmp_path / "eval"
    _evaluate(out, model=model_dir, stories=2)
    assert len(draw_counter) == 2
    stories_dir, rows = out / "stories", _rows(3)
    first = stories_dir / rows[0]["story_id"]
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    # Interrupted while drawing story 2: its story.json was not written yet.
    (stories_dir / rows[1]["story_id"] / "story.json").unlink()
    draw_counter.clear()
    _evaluate(out, model=model_dir, stories=3)
    assert draw_counter == [rows[1]["referential_captions"], rows[2]["referential_captions"]]
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # story 1 untouched
    assert json.loads((out / "results.json").read_text())["stories_drawn_by_this_run"] == 2

    # Everything finished: a third run loads no model and draws nothing, and gives the same numbers.
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded although every story was finished")

    before = json.loads((out / "results.json").read_text())["metrics"]
    monkeypatch.setattr(StoryGPTVPipeline, "from_pretrained", boom)
    _evaluate(out, model=model_dir, stories=3)
    assert json.loads((out / "results.json").read_text())["metrics"] == before
    # The stories read back without a model (--generated_dir) give the same numbers too.
    _evaluate(tmp_path / "read_back", "--generated_dir", stories_dir, stories=3)
    read_back = json.loads((tmp_path / "read_back" / "results.json").read_text())
    assert (
        read_back["metrics"] == before and read_back["seeds"] == [0, 1, 2] and read_back["generation"] is None
    )


# ------------------------------------------------------------------------------------------------ bad input
def _fails(capsys, *args, **kwargs):
    with pytest.raises(SystemExit) as error:
        _evaluate(*args, **kwargs)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_input_is_one_line_before_anything_is_drawn(
    tmp_path, model_dir, classifiers, inception_file, no_model_load, capsys
):
    out = tmp_path / "eval"
    # A classifier trained on another label set.
    message = _fails(capsys, out, "--classifier", classifiers["flintstones"], model=model_dir)
    assert "--classifier" in message and str(classifiers["flintstones"]) in message
    assert "labels only the classifier has: ['Wilma', 'Fred'" in message
    message = _fails(capsys, out, "--classifier", tmp_path / "nowhere", model=model_dir)
    assert "--classifier" in message and "nowhere" in message and "config.json" in message
    # Inception weights of the wrong shape (a 1/16-width file for the full network).
    message = _fails(capsys, out, "--inception", inception_file, model=model_dir)
    assert "--inception" in message and str(inception_file) in message and "has shape" in message
    # An unknown protocol.
    message = _fails(capsys, out, "--fid_protocol", "tf", model=model_dir)
    assert "--fid_protocol 'tf'" in message and all(p in message for p in FID_PROTOCOLS)
    # A story folder with a missing frame (read without a model).
    generated = tmp_path / "generated"
    for row in _rows(2):
        for index in range(4):
            path = generated / row["story_id"] / frame_file_name(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    missing = generated / _rows(2)[1]["story_id"] / frame_file_name(2)
    missing.unlink()
    message = _fails(capsys, out, "--generated_dir", generated)
    assert "--generated_dir" in message and str(missing) in message
    # The same folder with --model: its frames were drawn elsewhere, and drawing would overwrite them.
    message = _fails(capsys, out, "--generated_dir", generated, model=model_dir)
    assert "--generated_dir" in message and "no generation.json" in message
    # No model and no stories; a flintstones run without a classifier.
    assert "--model" in _fails(capsys, out)
    with pytest.raises(SystemExit, match="--classifier is required on flintstones"):
        main(["evaluate", "--dataset", "flintstones", "--out", str(out), "--model", str(model_dir)])
    assert not (out / "stories").exists() and not (out / "results.json").exists()


def test_other_settings_and_too_few_stories_for_the_paper_protocol_are_refused_first(
    tmp_path, model_dir, inception_file, tiny_inception_loader, monkeypatch
):
    out = tmp_path / "eval"
    _evaluate(out, model=model_dir, stories=1)

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was reported")

    monkeypatch.setattr(StoryGPTVPipeline, "from_pretrained", boom)
    with pytest.raises(SystemExit, match=r"--generated_dir: .*other settings \(steps: 1 there, 2 now\)"):
        _evaluate(out, "--steps", "2", model=model_dir, stories=1)
    with pytest.raises(SystemExit, match=r"--fid_protocol storygptv .*16 stories; --stories 2 leaves none"):
        _evaluate(out, "--inception", inception_file, "--fid_protocol", "storygptv", model=model_dir)


def test_help_names_every_fid_protocol(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(protocol in text for protocol in FID_PROTOCOLS)
    assert "--classifier" in text and "--generated_dir" in text


# ------------------------------------------------------------------------------------------------ PororoSV
def test_pororo_has_no_background_columns_and_refuses_a_background_classifier(tmp_path, model_dir):
    from tests.fixtures.story_releases import write_pororo

    data_dir = tmp_path / "pororo"
    write_pororo(data_dir)
    chars = _save_classifier(tmp_path / "chars", dataset_label_names("pororo"))
    background = _save_classifier(tmp_path / "bg", ["a", "b"], "background")
    out = tmp_path / "eval"
    common = [
        "evaluate",
        "--dataset",
        "pororo",
        "--data_dir",
        str(data_dir),
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    common += ["--out", str(out), "--model", str(model_dir), "--steps", "1"]
    with pytest.raises(
        SystemExit, match=r"--classifier: .*bg' is a background classifier, but PororoSV has no"
    ):
        main(common + ["--classifier", str(chars), str(background)])
    assert main(common + ["--classifier", str(chars)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (
        results["num_stories"] == 1
        and "char_acc" in results["metrics"]
        and "bg_acc" not in results["metrics"]
    )
    story_id = _pororo_story_id(out)
    assert "/" in story_id
    assert (out / "stories" / story_id / frame_file_name(0)).is_file()  # a story id with '/' is a sub-folder
    assert "| Model | Char-Acc ↑ | Char-F1 ↑ | FID ↓ |" in (out / "results.md").read_text()


def _pororo_story_id(out):
    (story_json,) = (out / "stories").rglob("story.json")
    return json.loads(story_json.read_text())["story_id"]


# -------------------------------------------------------------------------------------------- FlintstonesSV
def test_flintstones_scores_characters_and_backgrounds(tmp_path, model_dir):
    from tests.fixtures.story_releases import write_flintstones_storygptv

    data_dir = tmp_path / "flintstones"
    write_flintstones_storygptv(data_dir)
    chars = _save_classifier(tmp_path / "chars", dataset_label_names("flintstones"))
    background = _save_classifier(
        tmp_path / "bg", dataset_label_names("flintstones", "background", data_dir), "background"
    )
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--dataset",
        "flintstones",
        "--data_dir",
        str(data_dir),
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    args += ["--out", str(out), "--model", str(model_dir), "--steps", "1", "--stories", "1"]
    assert main(args + ["--classifier", str(chars), str(background)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"char_acc", "char_f1", "bg_acc", "bg_f1"} <= set(results["metrics"])
    assert "judge_char_acc" not in results["metrics"]  # the render-exact judge is SynthSV's only
    table = (out / "results.md").read_text()
    assert "## FlintstonesSV (test split, 1 story, 4 frames)" in table and "| BG-F1 ↑ | FID ↓ |" in table
