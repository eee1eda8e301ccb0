"""Tests of ``storygptv.training_utils`` (shared by every training script)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from storygptv import training_utils as tu


def _args(tmp_path, *extra):
    parser = tu.add_common_args(argparse.ArgumentParser())
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


def test_find_resume_checkpoint(tmp_path):
    args = _args(tmp_path, "--resume_from_checkpoint", "latest")
    assert tu.find_resume_checkpoint(args) is None  # no output dir yet: a fresh run
    out = tmp_path / "out"
    for step in (9, 10, 2):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / tu.TRAINING_STATE_FILE).write_text(json.dumps({"global_step": step}))
    (out / "checkpoint-11").mkdir()  # empty (interrupted save): ignored
    assert tu.find_resume_checkpoint(args).endswith("checkpoint-10")
    args.resume_from_checkpoint = str(out)  # a folder of checkpoints: the newest
    assert tu.find_resume_checkpoint(args).endswith("checkpoint-10")
    args.resume_from_checkpoint = str(out / "checkpoint-2")
    assert tu.find_resume_checkpoint(args).endswith("checkpoint-2")
    args.resume_from_checkpoint = str(out / "checkpoint-11")
    with pytest.raises(tu.TrainingSetupError, match="holds no checkpoint"):
        tu.find_resume_checkpoint(args)
    args.resume_from_checkpoint = str(tmp_path / "missing")
    with pytest.raises(tu.TrainingSetupError, match="does not exist"):
        tu.find_resume_checkpoint(args)


def test_save_and_load_checkpoint_with_pruning(tmp_path):
    args = _args(tmp_path, "--report_to", "none", "--checkpoints_total_limit", "2")
    accelerator = tu.make_accelerator(args)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (1, 2, 3):
        path = tu.save_checkpoint(accelerator, args, step, extra={"note": "x"})
    names = sorted(p.name for p in tu.list_checkpoints(args.output_dir))
    assert names == ["checkpoint-2", "checkpoint-3"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    state = tu.load_checkpoint(accelerator, path)
    assert state == {"global_step": 3, "note": "x"}
    torch.testing.assert_close(model.state_dict()["weight"], saved["weight"])
    args.resume_from_checkpoint = "latest"
    assert tu.find_resume_checkpoint(args) == path


def test_batch_sampler_is_deterministic_and_resumable():
    full = tu.ResumableBatchSampler(10, 2, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(12)]  # crosses an epoch boundary (5 batches / epoch)
    assert [b[0][0] for b in batches] == list(range(12))
    epoch0 = sorted(i for b in batches[:5] for _, i in b)
    assert epoch0 == list(range(10))
    assert [i for _, i in batches[5]] != [i for _, i in batches[0]] or [i for _, i in batches[6]] != [
        i for _, i in batches[1]
    ]
    resumed = iter(tu.ResumableBatchSampler(10, 2, seed=3, start_batch=7))
    assert [next(resumed) for _ in range(5)] == batches[7:12]
    # Two ranks take disjoint halves of every global batch.
    r0 = tu.ResumableBatchSampler(10, 2, seed=3, num_replicas=2, rank=0)
    r1 = tu.ResumableBatchSampler(10, 2, seed=3, num_replicas=2, rank=1)
    assert not set(r0.indices(0)) & set(r1.indices(0))
    with pytest.raises(tu.TrainingSetupError, match="fewer than one global batch"):
        tu.ResumableBatchSampler(3, 2, num_replicas=2)


class _RngCollator:
    def __init__(self):
        self.seed = 0
        self._rng = None
        self._rng_worker = None

    def __call__(self, frames):
        return {"x": torch.tensor(self._rng.random(len(frames))), "n": len(frames)}


def test_seeded_collate_depends_only_on_batch_index():
    collate = tu.seeded_collate(_RngCollator(), seed=1, rank=0)
    a = collate([(4, "a"), (4, "b")])
    b = collate([(5, "a"), (5, "b")])
    c = collate([(4, "a"), (4, "b")])
    assert a["batch_index"] == 4
    torch.testing.assert_close(a["x"], c["x"])
    assert not torch.equal(a["x"], b["x"])
    other_rank = tu.seeded_collate(_RngCollator(), seed=1, rank=1)([(4, "a"), (4, "b")])
    assert not torch.equal(a["x"], other_rank["x"])


def test_step_generator_and_hash():
    g1, g2 = tu.step_generator(0, "noise", 5, 0), tu.step_generator(0, "noise", 5, 0)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert tu.derive_seed(0, 1) != tu.derive_seed(1, 0)
    a = torch.nn.Linear(2, 2)
    h = tu.state_dict_hash(a)
    assert h == tu.state_dict_hash(a.state_dict())
    with torch.no_grad():
        a.bias[0] += 1e-7
    assert tu.state_dict_hash(a) != h


def test_check_dataset_args(tmp_path):
    tu.check_dataset_args(_args(tmp_path))  # synthsv needs nothing
    with pytest.raises(tu.TrainingSetupError, match="needs --data_dir"):
        tu.check_dataset_args(_args(tmp_path, "--dataset", "flintstones"))
    with pytest.raises(tu.TrainingSetupError, match="does not exist"):
        tu.check_dataset_args(_args(tmp_path, "--dataset", "pororo", "--data_dir", str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tu.TrainingSetupError, match="No FlintstonesSV release"):
        tu.check_dataset_args(_args(tmp_path, "--dataset", "flintstones", "--data_dir", str(empty)))
    with pytest.raises(tu.TrainingSetupError, match="No PororoSV release"):
        tu.check_dataset_args(_args(tmp_path, "--dataset", "pororo", "--data_dir", str(empty)))
    (empty / "split.json").write_text("{}")
    tu.check_dataset_args(_args(tmp_path, "--dataset", "flintstones", "--data_dir", str(empty)))
    with pytest.raises(tu.TrainingSetupError, match="save_to_disk"):
        tu.check_dataset_args(_args(tmp_path, "--train_dataset_path", str(empty)))
    args = _args(tmp_path)
    args.dataset = "mnist"
    with pytest.raises(tu.TrainingSetupError, match="Unknown dataset"):
        tu.check_dataset_args(args)


def test_check_pipeline_folder(tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    with pytest.raises(tu.TrainingSetupError, match="no model_index.json"):
        tu.check_pipeline_folder(folder)
    index = {"_class_name": "CharLDMPipeline", "unet": ["diffusers", "X"], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(tu.TrainingSetupError, match=r"missing subfolders \['unet'\]"):
        tu.check_pipeline_folder(folder)
    (folder / "unet").mkdir()
    assert tu.check_pipeline_folder(folder)["unet"] == ["diffusers", "X"]
    with pytest.raises(tu.TrainingSetupError, match="fuser"):
        tu.check_pipeline_folder(folder, required=["unet", "fuser"])
    assert tu.check_pipeline_folder("someone/some-model") == {}  # Hub ids are not checked locally


def test_write_model_card(tmp_path):
    card = tu.write_model_card(
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
    assert "from storygptv import CharLDMPipeline" in text
    assert 'CharLDMPipeline.from_pretrained("me/char-ldm-synthsv")' in text
    assert "| `learning_rate` | 1e-05 |" in text
    assert "down_blocks.1 up_blocks.1" in text
    assert "| final loss | 0.123457 |" in text
    story = tu.write_model_card(tmp_path / "s", "storygptv", base_model="meta-llama/Llama-2-7b-hf")
    assert "from storygptv import StoryGPTVPipeline" in str(story)
    with pytest.raises(tu.TrainingSetupError, match="available"):
        tu.write_model_card(tmp_path / "x", "nope")


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
    url = tu.push_folder_to_hub(tmp_path, "model", token="t")
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
    changed = tu.scrub_local_paths(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in changed) == ["config.json", "unet/config.json"]
    assert json.loads((folder / "unet" / "config.json").read_text()) == {"layers": 2}
    assert json.loads((folder / "config.json").read_text()) == {
        "text_config": {"hidden": 8},
        "_name_or_path": "facebook/opt-125m",
    }
    assert json.loads((folder / "checkpoint-2" / "config.json").read_text()) == local  # checkpoints untouched
    assert tu.scrub_local_paths(folder) == []


# ------------------------------------------------------------------------- checkpoints never lose or mix work
def _prepared(args):
    accelerator = tu.make_accelerator(args)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args = _args(tmp_path, "--report_to", "none", "--checkpoints_total_limit", "1")
    accelerator, model = _prepared(args)
    first = tu.save_checkpoint(accelerator, args, 1)
    real_save_state = accelerator.save_state

    def disk_full(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # some files are written, then the disk is full
        (tu.Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tu.save_checkpoint(accelerator, args, 2)
    assert [p.name for p in tu.list_checkpoints(args.output_dir)] == ["checkpoint-1"]
    assert tu.checkpoint_problem(first) is None
    args.resume_from_checkpoint = "latest"
    assert tu.find_resume_checkpoint(args) == first
    assert tu.load_checkpoint(accelerator, first)["global_step"] == 1
    # The next successful save replaces the partial folder and only then prunes checkpoint-1.
    monkeypatch.setattr(accelerator, "save_state", real_save_state)
    second = tu.save_checkpoint(accelerator, args, 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint-2"]
    assert tu.find_resume_checkpoint(args) == second


def test_latest_falls_back_over_broken_checkpoints(tmp_path):
    args = _args(tmp_path, "--report_to", "none", "--resume_from_checkpoint", "latest")
    accelerator, model = _prepared(args)
    paths = [tu.Path(tu.save_checkpoint(accelerator, args, step)) for step in (1, 2, 3, 4)]
    state = json.loads((paths[0] / tu.TRAINING_STATE_FILE).read_text())
    assert {"model.safetensors", "optimizer.bin"} <= set(state["checkpoint_files"])
    (paths[3] / tu.TRAINING_STATE_FILE).unlink()  # half-written
    weights = paths[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated safetensors
    (paths[1] / "optimizer.bin").unlink()  # missing optimizer state
    with pytest.warns(UserWarning, match=r"checkpoint-4: it has no training_state.json.*checkpoint-3: "
                      r"model.safetensors has \d+ bytes.*checkpoint-2: optimizer.bin is missing"):  # fmt: skip
        assert tu.find_resume_checkpoint(args) == str(paths[0])
    assert tu.load_checkpoint(accelerator, paths[0]) == {"global_step": 1}
    shutil.rmtree(paths[0])
    with pytest.raises(
        tu.TrainingSetupError, match="no checkpoint in .* is complete.*--overwrite_output_dir"
    ):
        tu.find_resume_checkpoint(args)
    args.overwrite_output_dir = True
    with pytest.warns(UserWarning, match="starting a new run"):
        assert tu.find_resume_checkpoint(args) is None


def test_checkpoints_of_an_older_version_need_their_optimizer_state(tmp_path):
    args = _args(tmp_path, "--report_to", "none")
    accelerator, model = _prepared(args)
    path = tu.Path(tu.save_checkpoint(accelerator, args, 1))
    state = json.loads((path / tu.TRAINING_STATE_FILE).read_text())
    legacy = {"global_step": state["global_step"]}  # what the older save_checkpoint wrote
    (path / tu.TRAINING_STATE_FILE).write_text(json.dumps(legacy))
    assert tu.checkpoint_problem(path) is None
    (path / "optimizer.bin").unlink()
    assert tu.checkpoint_problem(path) == "it has no optimizer state (optimizer*.bin)"


def test_a_checkpoint_that_fails_to_load_is_a_clear_error(tmp_path):
    args = _args(tmp_path, "--report_to", "none")
    accelerator, model = _prepared(args)
    path = tu.Path(tu.save_checkpoint(accelerator, args, 1))
    optimizer_file = path / "optimizer.bin"
    optimizer_file.write_bytes(b"\0" * optimizer_file.stat().st_size)  # same size, garbage content
    with pytest.raises(tu.TrainingSetupError, match=r"checkpoint-1' could not be loaded.*previous one"):
        tu.load_checkpoint(accelerator, path)


def test_a_new_run_refuses_a_used_output_dir(tmp_path):
    args = _args(tmp_path, "--report_to", "none")
    accelerator, model = _prepared(args)
    tu.save_checkpoint(accelerator, args, 5)
    with pytest.raises(tu.TrainingSetupError, match=r"already holds checkpoints.*\(checkpoint-5\).*latest"):
        tu.find_resume_checkpoint(args)
    args.overwrite_output_dir = True
    assert tu.find_resume_checkpoint(args) is None
    sampler = tu.ResumableBatchSampler(4, 2)
    assert tu.resume_training(accelerator, args, None, sampler) == 0
    assert tu.list_checkpoints(args.output_dir) == []  # the old run's checkpoints can never be `latest`


def test_changed_settings_are_refused_unless_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = _args(tmp_path, "--report_to", "none", "--data_dir", str(data), "--learning_rate", "1e-4")
    accelerator, model = _prepared(args)
    tu.save_checkpoint(accelerator, args, 1, settings=tu.run_settings(args, {"resolution": 32}))
    saved = json.loads((tmp_path / "out" / "checkpoint-1" / tu.TRAINING_STATE_FILE).read_text())
    assert saved["settings"]["learning_rate"] == 1e-4 and saved["settings"]["resolution"] == 32
    assert saved["settings_fingerprint"] == tu.settings_fingerprint(saved["settings"])
    same = _args(
        tmp_path, "--data_dir", str(data), "--learning_rate", "1e-4", "--resume_from_checkpoint", "latest"
    )
    assert tu.find_resume_checkpoint(same, tu.run_settings(same, {"resolution": 32})).endswith("checkpoint-1")
    changed = _args(tmp_path, "--data_dir", str(data), "--seed", "3", "--resume_from_checkpoint", "latest")
    with pytest.raises(tu.TrainingSetupError) as error:
        tu.find_resume_checkpoint(changed, tu.run_settings(changed, {"resolution": 64}))
    message = str(error.value)
    assert "learning_rate: 0.0001 in the checkpoint, 1e-05 now" in message
    assert "seed: 0 in the checkpoint, 3 now" in message and "resolution: 32" in message
    assert "--allow_changed_settings" in message and "data_dir" not in message
    changed.allow_changed_settings = True
    with pytest.warns(UserWarning, match="changed settings"):
        assert tu.find_resume_checkpoint(changed).endswith("checkpoint-1")
