"""The README's guide "Fine-tune on your own stories", run as written on examples/my_stories.

The guide's ``python training_scripts/...`` and ``storygptv ...`` commands are read from its bash blocks and
run in-process (each script's ``main(argv)``) in a scratch copy of ``examples/``; its Python example is run
too. They fine-tune the embedded default model for a few steps (about 30 s on one CPU core).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import storygptv
from storygptv.characters import read_cast_folder
from storygptv.training.checks import TrainingSetupError
from storygptv.training.references import pipeline_cast, training_references, write_cast
from storygptv.training.stage2 import story_model_source

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPTS = ROOT / "training_scripts"


def _script(name: str):
    module_name = f"_guide_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def guide_text() -> str:
    """The README's section "Fine-tune on your own stories", up to the next level-2 heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Fine-tune on your own stories\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def guide_blocks(language: str) -> list[str]:
    """The fenced code blocks of the guide in ``language``."""
    return re.findall(rf"```{language}\n(.*?)```", guide_text(), flags=re.S)


def guide_commands() -> list[list[str]]:
    """The commands of the guide's bash blocks (continuation lines joined), ``$DEFAULT_MODEL`` filled in."""
    commands = []
    for block in guide_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip():
                continue
            if line.startswith("DEFAULT_MODEL="):
                assert "storygptv.DEFAULT_MODEL" in line
                continue
            argv = shlex.split(line)
            commands.append([storygptv.DEFAULT_MODEL if a == "$DEFAULT_MODEL" else a for a in argv])
    return commands


def run_command(argv: list[str]) -> None:
    if argv[:2] == ["python", argv[1]] and argv[1].startswith("training_scripts/"):
        _script(Path(argv[1]).stem).main(argv[2:])
    elif argv[0] == "storygptv":
        from storygptv.cli import main

        assert main(argv[1:]) == 0
    else:
        raise AssertionError(f"The guide has a command the test cannot run: {argv}")


@contextlib.contextmanager
def working_in(folder: Path):
    """Run in ``folder``, with the ``datasets`` cache (a story folder's Arrow files) inside it."""
    import datasets

    cache, cwd = datasets.config.HF_DATASETS_CACHE, os.getcwd()
    datasets.config.HF_DATASETS_CACHE = folder / "hf_datasets"
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)
        datasets.config.HF_DATASETS_CACHE = cache


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """Run every command of the guide, in order, in a scratch folder holding a copy of ``examples/``."""
    work = tmp_path_factory.mktemp("guide")
    shutil.copytree(ROOT / "examples" / "my_stories", work / "examples" / "my_stories")
    shutil.copy(ROOT / "examples" / "my_story.txt", work / "examples" / "my_story.txt")
    commands = guide_commands()
    scripts = [Path(c[1]).stem for c in commands if c[0] == "python"]
    assert scripts == [
        "train_char_ldm",
        "precompute_targets",
        "precompute_targets",
        "train_storygptv",
        "train_text_lm",
    ]
    with working_in(work):
        for argv in commands:
            run_command(argv)
    return work


def test_the_guide_fine_tunes_the_default_model_on_new_characters(guide):
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    out = guide / "out"
    # Stage 1 learned on the new names: the text encoder was trained (--train_text_encoder).
    default = load_file(Path(storygptv.DEFAULT_MODEL) / "text_encoder" / "model.safetensors")
    tuned = load_file(out / "my-char-ldm" / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(default[k], tuned[k]) for k in default)
    # The targets fused the folder's cast; stage 2 validated on the held-out story.
    config = json.loads((out / "my-targets" / "precompute_config.json").read_text())
    assert config["character_names"] == ["Nia", "Rex"] and config["num_stories"] == 2
    summary = json.loads((out / "my-storygptv" / "train_summary.json").read_text())
    assert summary["global_step"] == 20 and summary["best_validation"] is not None
    # Every exported pipeline folder carries its cast, and its card names the data.
    for name in ("my-char-ldm", "my-storygptv"):
        assert list(read_cast_folder(out / name / "characters")) == ["Nia", "Rex"]
        card = (out / name / "README.md").read_text()
        assert "my_stories (story folder)" in card and "custom copy" not in card
    pipe = StoryGPTVPipeline.from_pretrained(out / "my-storygptv")
    pipe.set_progress_bar_config(disable=True)
    cast = read_cast_folder(out / "my-storygptv" / "characters")
    story = pipe(
        ["Nia and Rex are standing in the beach.", "They are waving."],
        characters=cast,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert story.images.shape == (2, 64, 64, 3)
    # The CLI drew the story file with the model's cast.
    assert sorted(p.name for p in (out / "my-story").iterdir()) == [
        "frame_001.png",
        "frame_002.png",
        "storyboard.png",
    ]
    # The new LM's tokenizer was trained on the folder's captions.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "my-lm")
    assert tokenizer.unk_token_id not in tokenizer(" Nia and Rex are waving.")["input_ids"]


def test_the_guide_python_examples_run(guide, monkeypatch, capsys):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", guide / "evaluate_modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", guide / "evaluate_metrics")
    loading, drawing, scoring = guide_blocks("python")
    with working_in(guide):  # beside the copy of examples/ and the fine-tuned model
        namespace: dict = {}
        exec(compile(loading, "README.md", "exec"), namespace)
        assert list(namespace["held_out"]["story_id"]) == ["night_walk"]
        namespace = {}
        exec(compile(drawing, "README.md", "exec"), namespace)
        exec(compile(scoring, "README.md", "exec"), namespace)
    assert (guide / "they_are_waving.png").is_file()
    # night_walk: "Nia", "Nia and Rex", then "They". The named frames always report their names (3 of the 5
    # labels); "They" is resolved by the grounding head, whose rows for Nia and Rex had only the guide's 20
    # fine-tuning steps, so that frame may come out wrong (but only with Nia or Rex: pronouns resolve within
    # the cast the call gives).
    scores = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["recall"] >= 60.0 and scores["precision"] >= 50.0
    assert set(scores) >= {"precision", "recall", "f1", "exact"}


# ------------------------------------------------------------------------------------------ the library
def test_training_scripts_accept_and_explain_the_folder(capsys):
    for name in ("train_char_ldm", "precompute_targets", "train_text_lm", "train_storygptv", "train_vae"):
        with pytest.raises(SystemExit):
            _script(name).parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--train_dataset_path" in text and "save_to_disk" in text, name
        assert "folder" in text and "metadata.jsonl" in text, name


def test_a_bad_folder_stops_a_script_before_anything_is_written(tmp_path):
    folder = Path(shutil.copytree(ROOT / "examples" / "my_stories", tmp_path / "stories"))
    (folder / "characters" / "Rex.png").unlink()
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", storygptv.DEFAULT_MODEL, "--dataset", "folder",
        "--data_dir", str(folder), "--output_dir", str(out),
    ]  # fmt: skip
    for name in ("train_char_ldm", "precompute_targets", "train_text_lm"):
        with pytest.raises(TrainingSetupError, match=r"metadata.jsonl:1: field 'characters': 'Rex' has no"):
            _script(name).main(argv)
    assert not out.exists()


def test_cast_of_a_run(tmp_path):
    folder = ROOT / "examples" / "my_stories"
    refs = training_references(None, "folder", data_dir=str(folder))
    assert list(refs) == ["Nia", "Rex"] and refs["Nia"].mode == "RGB"
    assert training_references(None, "folder", str(tmp_path), data_dir=str(folder), required=False) == {}
    assert write_cast(tmp_path / "pipe", {}) is None
    write_cast(tmp_path / "pipe", {"Mr Slate": refs["Rex"], "Nia": refs["Nia"]})
    (tmp_path / "pipe" / "characters" / "Old.jpg").write_bytes(b"")
    write_cast(tmp_path / "pipe", {"Mr Slate": refs["Rex"], "Nia": refs["Nia"]})  # earlier images replaced
    assert sorted(p.name for p in (tmp_path / "pipe" / "characters").iterdir()) == ["Mr_Slate.png", "Nia.png"]
    assert list(pipeline_cast(tmp_path / "pipe")) == ["Mr Slate", "Nia"]
    assert pipeline_cast(tmp_path) == {} and pipeline_cast("user/repo") == {}


def test_story_model_subfolder_reads_as_its_pipeline():
    default = storygptv.DEFAULT_MODEL
    expected = (default, {"subfolder": "story_model", "tokenizer_subfolder": "story_tokenizer"})
    assert story_model_source(default) == expected
    assert story_model_source(str(Path(default) / "story_model")) == expected
