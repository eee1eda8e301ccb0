"""The training library outside checkpoints and the loop: arguments, checks, data order, cards, hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import storygptv.training as training
from storygptv import training_utils
from storygptv.training.arguments import add_common_args
from storygptv.training.checkpoints import state_dict_hash
from storygptv.training.checks import TrainingSetupError, check_dataset, check_pipeline_folder
from storygptv.training.data import (
    ResumableBatchSampler,
    derive_seed,
    make_train_dataloader,
    seeded_collate,
    step_generator,
)
from storygptv.training.hub import push_folder_to_hub, scrub_local_paths
from storygptv.training.model_cards import card_dataset_name, write_model_card
from storygptv.training.references import read_cast_images, training_references


def _args(tmp_path, *extra):
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args(["--output_dir", str(tmp_path / "out"), *extra])


def test_common_args_defaults(tmp_path):
    args = _args(tmp_path)
    assert args.dataset == "synthsv"
    assert args.report_to == "tensorboard"
    assert args.resume_from_checkpoint is None
    assert args.mixed_precision is None
    assert args.train_dataset_path is None
    with pytest.raises(SystemExit):
        _args(tmp_path, "--dataset", "mnist")


def test_batch_sampler_is_deterministic_and_resumable():
    full = ResumableBatchSampler(10, 2, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(12)]  # crosses an epoch boundary (5 batches / epoch)
    assert [b[0][0] for b in batches] == list(range(12))
    epoch0 = sorted(i for b in batches[:5] for _, i in b)
    assert epoch0 == list(range(10))
    assert [i for _, i in batches[5]] != [i for _, i in batches[0]] or [i for _, i in batches[6]] != [
        i for _, i in batches[1]
    ]
    resumed = iter(ResumableBatchSampler(10, 2, seed=3, start_batch=7))
    assert [next(resumed) for _ in range(5)] == batches[7:12]
    # Two ranks take disjoint halves of every global batch.
    r0 = ResumableBatchSampler(10, 2, seed=3, num_replicas=2, rank=0)
    r1 = ResumableBatchSampler(10, 2, seed=3, num_replicas=2, rank=1)
    assert not set(r0.indices(0)) & set(r1.indices(0))
    with pytest.raises(TrainingSetupError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, num_replicas=2)


class _RngCollator:
    """A collator drawing from its own numpy generator, reseeded through the public method."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def reseed(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames):
        return {"x": torch.tensor(self.rng.random(len(frames))), "n": len(frames)}


def test_seeded_collate_depends_only_on_batch_index():
    collate = seeded_collate(_RngCollator(), seed=1, rank=0)
    a = collate([(4, 0, "a"), (4, 1, "b")])
    b = collate([(5, 0, "a"), (5, 1, "b")])
    c = collate([(4, 0, "a"), (4, 1, "b")])
    assert a["batch_index"] == 4 and "example_index" not in a
    torch.testing.assert_close(a["x"], c["x"])
    assert not torch.equal(a["x"], b["x"])
    other_rank = seeded_collate(_RngCollator(), seed=1, rank=1)([(4, 0, "a"), (4, 1, "b")])
    assert not torch.equal(a["x"], other_rank["x"])
    indexed = seeded_collate(_RngCollator(), seed=1, with_example_index=True)([(4, 7, "a"), (4, 2, "b")])
    assert indexed["example_index"].tolist() == [7, 2]
    torch.testing.assert_close(indexed["x"], a["x"])


def test_collators_must_reseed_publicly():
    class NoReseed:
        def __call__(self, rows):
            return {}

    with pytest.raises(TypeError, match="reseed"):
        seeded_collate(NoReseed(), seed=0)


def test_loader_batches_carry_their_rows(tmp_path):
    sampler = ResumableBatchSampler(6, 2, seed=0, start_batch=4)
    loader = make_train_dataloader(list("abcdef"), sampler, _RngCollator(), seed=0, with_example_index=True)
    batch = next(iter(loader))
    assert batch["batch_index"] == 4 and batch["example_index"].tolist() == sampler.indices(4)


def test_step_generator_and_hash():
    g1, g2 = step_generator(0, "noise", 5, 0), step_generator(0, "noise", 5, 0)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert derive_seed(0, 1) != derive_seed(1, 0)
    a = torch.nn.Linear(2, 2)
    h = state_dict_hash(a)
    assert h == state_dict_hash(a.state_dict())
    with torch.no_grad():
        a.bias[0] += 1e-7
    assert state_dict_hash(a) != h


def test_check_dataset(tmp_path):
    check_dataset("synthsv")  # synthsv needs nothing
    with pytest.raises(TrainingSetupError, match="needs --data_dir"):
        check_dataset("flintstones")
    with pytest.raises(TrainingSetupError, match="does not exist"):
        check_dataset("pororo", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingSetupError, match="No FlintstonesSV release"):
        check_dataset("flintstones", str(empty))
    with pytest.raises(TrainingSetupError, match="No PororoSV release"):
        check_dataset("pororo", str(empty))
    (empty / "split.json").write_text("{}")
    check_dataset("flintstones", str(empty))
    with pytest.raises(TrainingSetupError, match="save_to_disk"):
        check_dataset("synthsv", train_dataset_path=str(empty))
    with pytest.raises(TrainingSetupError, match="Unknown dataset"):
        check_dataset("mnist")


def test_check_pipeline_folder(tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    with pytest.raises(TrainingSetupError, match="no model_index.json"):
        check_pipeline_folder(folder)
    index = {"_class_name": "CharLDMPipeline", "unet": ["diffusers", "X"], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TrainingSetupError, match=r"missing subfolders \['unet'\]"):
        check_pipeline_folder(folder)
    (folder / "unet").mkdir()
    assert check_pipeline_folder(folder)["unet"] == ["diffusers", "X"]
    with pytest.raises(TrainingSetupError, match="fuser"):
        check_pipeline_folder(folder, required=["unet", "fuser"])
    assert check_pipeline_folder("someone/some-model") == {}  # Hub ids are not checked locally


def test_write_model_card(tmp_path):
    card = write_model_card(
        tmp_path / "m",
        "char_ldm",
        repo_id="me/char-ldm-synthsv",
        base_model=["stable-diffusion-v1-5/stable-diffusion-v1-5", str(tmp_path)],
        dataset="synthsv",
        hyperparameters={"learning_rate": 1e-5, "attention_blocks": ["down_blocks.1", "up_blocks.1"]},
        metrics={"final loss": 0.12345678},
    )
    text = (tmp_path / "m" / "README.md").read_text()
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "apache-2.0"
    assert data["inference"] is False
    assert data["tags"][:3] == ["storygptv", "story-visualization", "diffusers"]
    assert data["base_model"] == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]  # local paths stay out
    assert "import storygptv" in text and 'DiffusionPipeline.from_pretrained("me/char-ldm-synthsv")' in text
    assert 'storygptv.load_cast("me/char-ldm-synthsv")' in text
    assert "| `learning_rate` | 1e-05 |" in text
    assert "down_blocks.1 up_blocks.1" in text
    assert "| final loss | 0.123457 |" in text
    story = write_model_card(tmp_path / "s", "storygptv", base_model="meta-llama/Llama-2-7b-hf")
    assert "a storygptv.StoryGPTVPipeline" in str(story)
    with pytest.raises(ValueError, match="available"):
        write_model_card(tmp_path / "x", "nope")


def test_every_exported_folder_gets_its_card_from_one_writer(tmp_path):
    """The story model alone and the text LM are transformers folders; their cards come from templates too."""
    lm = write_model_card(
        tmp_path / "lm", "text_lm", base_model=None, dataset=card_dataset_name("synthsv", "/data/copy")
    )
    data = lm.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "diffusers" not in data["tags"] and "copy (datasets save_to_disk folder)" in str(lm)
    assert "datasets" not in data  # a local folder is named in the text, never as Hub metadata
    assert "AutoModelForCausalLM.from_pretrained" in str(lm)
    story = write_model_card(
        tmp_path / "sm",
        "story_model",
        repo_id="me/story",
        base_model=["facebook/opt-125m"],
        char_ldm="me/ldm",
    )
    data = story.data.to_dict()
    assert data["library_name"] == "transformers" and "pipeline_tag" not in data
    assert 'CharLDMPipeline.from_pretrained("me/ldm")' in str(story)
    assert 'StoryGPTVForConditionalGeneration.from_pretrained("me/story")' in str(story)


def test_push_folder_to_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class _Repo:
        repo_id = "me/model"

    def fake_create_repo(repo_id, token=None, private=None, exist_ok=False):
        calls["create"] = (repo_id, token, private, exist_ok)
        return _Repo()

    def fake_upload_folder(**kwargs):
        calls["upload"] = kwargs
        return "https://hf.co/me/model/commit/1"

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    url = push_folder_to_hub(tmp_path, "model", token="t")
    assert url.endswith("/commit/1")
    assert calls["create"] == ("model", "t", None, True)
    assert calls["upload"]["repo_id"] == "me/model"
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]


def test_scrub_local_paths_keeps_hub_ids(tmp_path):
    folder = tmp_path / "export"
    (folder / "unet").mkdir(parents=True)
    (folder / "checkpoint-2").mkdir()
    local = {"_name_or_path": str(tmp_path / "runs" / "unet"), "layers": 2}
    nested = {
        "text_config": {"_name_or_path": "./runs/lm", "hidden": 8},
        "_name_or_path": "facebook/opt-125m",
    }
    (folder / "unet" / "config.json").write_text(json.dumps(local))
    (folder / "config.json").write_text(json.dumps(nested))
    (folder / "checkpoint-2" / "config.json").write_text(json.dumps(local))
    changed = scrub_local_paths(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in changed) == ["config.json", "unet/config.json"]
    assert json.loads((folder / "unet" / "config.json").read_text()) == {"layers": 2}
    assert json.loads((folder / "config.json").read_text()) == {
        "text_config": {"hidden": 8},
        "_name_or_path": "facebook/opt-125m",
    }
    assert json.loads((folder / "checkpoint-2" / "config.json").read_text()) == local  # checkpoints untouched
    assert scrub_local_paths(folder) == []


def test_package_names_and_the_training_utils_alias():
    modules = sorted(p.stem for p in Path(training.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert sorted(m.__name__.rsplit(".", 1)[1] for m in training.MODULES) == modules
    assert training.__all__ == sorted(name for m in training.MODULES for name in m.__all__)
    assert len(set(training.__all__)) == len(training.__all__)  # no name in two modules
    assert list(training_utils.__all__) == training.__all__
    for name in training.__all__:
        assert getattr(training_utils, name) is getattr(training, name)
    assert training_utils.save_checkpoint.__module__ == "storygptv.training.checkpoints"


def test_cast_folders_read_underscores_as_spaces(tmp_path):
    folder = tmp_path / "cast"
    folder.mkdir()
    PIL.Image.new("RGB", (4, 4), (255, 0, 0)).save(folder / "Mr_Slate.png")
    PIL.Image.new("L", (4, 4)).save(folder / "Fred.jpg")
    (folder / "notes.txt").write_text("not an image")
    refs = read_cast_images(folder)
    assert sorted(refs) == ["Fred", "Mr Slate"] and refs["Fred"].mode == "RGB"
    assert sorted(training_references(str(folder), "flintstones")) == ["Fred", "Mr Slate"]
    assert sorted(training_references(None, "synthsv")) == [
        "Ava",
        "Bo",
        "Cleo",
        "Dax",
        "Eli",
        "Fay",
        "Gus",
        "Hana",
    ]
    assert training_references(None, "flintstones", required=False) == {}
    with pytest.raises(TrainingSetupError, match="--reference_images_dir"):
        training_references(None, "flintstones")
    empty = tmp_path / "empty_cast"
    empty.mkdir()
    with pytest.raises(TrainingSetupError, match="holds no image"):
        read_cast_images(empty)
    with pytest.raises(TrainingSetupError, match="--validation_reference_dir .* is not a folder"):
        training_references(str(tmp_path / "missing"), "synthsv", option="--validation_reference_dir")
