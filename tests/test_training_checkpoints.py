"""Checkpoints never lose or mix work (``storygptv.training.checkpoints`` / ``.resume``)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from storygptv.training.accelerate_setup import make_accelerator
from storygptv.training.arguments import add_common_args, run_settings
from storygptv.training.checkpoints import (
    TRAINING_STATE_FILE,
    checkpoint_problem,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    settings_fingerprint,
)
from storygptv.training.checks import TrainingSetupError
from storygptv.training.data import ResumableBatchSampler
from storygptv.training.resume import find_resume_checkpoint, resume_training


def _args(tmp_path, *extra):
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args(["--output_dir", str(tmp_path / "out"), *extra])


def _find(args, settings=None):
    """find_resume_checkpoint with the options a script unpacks from ``args``."""
    return find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        run_settings(args) if settings is None else settings,
        overwrite=args.overwrite_output_dir,
        allow_changed_settings=args.allow_changed_settings,
    )


def _save(accelerator, args, step, **kwargs):
    kwargs.setdefault("total_limit", args.checkpoints_total_limit)
    settings = kwargs.pop("settings", None) or run_settings(args)
    return save_checkpoint(accelerator, args.output_dir, step, settings, **kwargs)


def _accelerator(args):
    return make_accelerator(args.output_dir, report_to=args.report_to)


def test_find_resume_checkpoint(tmp_path):
    args = _args(tmp_path, "--resume_from_checkpoint", "latest")
    assert _find(args) is None  # no output dir yet: a fresh run
    out = tmp_path / "out"
    for step in (9, 10, 2):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / TRAINING_STATE_FILE).write_text(json.dumps({"global_step": step}))
    (out / "checkpoint-11").mkdir()  # empty (interrupted save): ignored
    assert _find(args).endswith("checkpoint-10")
    args.resume_from_checkpoint = str(out)  # a folder of checkpoints: the newest
    assert _find(args).endswith("checkpoint-10")
    args.resume_from_checkpoint = str(out / "checkpoint-2")
    assert _find(args).endswith("checkpoint-2")
    args.resume_from_checkpoint = str(out / "checkpoint-11")
    with pytest.raises(TrainingSetupError, match="holds no checkpoint"):
        _find(args)
    args.resume_from_checkpoint = str(tmp_path / "missing")
    with pytest.raises(TrainingSetupError, match="does not exist"):
        _find(args)


def test_save_and_load_checkpoint_with_pruning(tmp_path):
    args = _args(tmp_path, "--report_to", "none", "--checkpoints_total_limit", "2")
    accelerator = _accelerator(args)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (1, 2, 3):
        path = _save(accelerator, args, step, extra={"note": "x"})
    names = sorted(p.name for p in list_checkpoints(args.output_dir))
    assert names == ["checkpoint-2", "checkpoint-3"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    state = load_checkpoint(accelerator, path)
    assert state == {"global_step": 3, "note": "x"}
    torch.testing.assert_close(model.state_dict()["weight"], saved["weight"])
    args.resume_from_checkpoint = "latest"
    assert _find(args) == path


# ------------------------------------------------------------------------- checkpoints never lose or mix work
def _prepared(args):
    accelerator = _accelerator(args)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args = _args(tmp_path, "--report_to", "none", "--checkpoints_total_limit", "1")
    accelerator, model = _prepared(args)
    first = _save(accelerator, args, 1)
    real_save_state = accelerator.save_state

    def disk_full(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # some files are written, then the disk is full
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(accelerator, args, 2)
    assert [p.name for p in list_checkpoints(args.output_dir)] == ["checkpoint-1"]
    assert checkpoint_problem(first) is None
    args.resume_from_checkpoint = "latest"
    assert _find(args) == first
    assert load_checkpoint(accelerator, first)["global_step"] == 1
    # The next successful save replaces the partial folder and only then prunes checkpoint-1.
    monkeypatch.setattr(accelerator, "save_state", real_save_state)
    second = _save(accelerator, args, 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint-2"]
    assert _find(args) == second


def test_latest_falls_back_over_broken_checkpoints(tmp_path):
    args = _args(tmp_path, "--report_to", "none", "--resume_from_checkpoint", "latest")
    accelerator, model = _prepared(args)
    paths = [Path(_save(accelerator, args, step)) for step in (1, 2, 3, 4)]
    state = json.loads((paths[0] / TRAINING_STATE_FILE).read_text())
    assert {"model.safetensors", "optimizer.bin"} <= set(state["checkpoint_files"])
    (paths[3] / TRAINING_STATE_FILE).unlink()  # half-written
    weights = paths[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated safetensors
    (paths[1] / "optimizer.bin").unlink()  # missing optimizer state
    with pytest.warns(UserWarning, match=r"checkpoint-4: it has no training_state.json.*checkpoint-3: "
                      r"model.safetensors has \d+ bytes.*checkpoint-2: optimizer.bin is missing"):  # fmt: skip
        assert _find(args) == str(paths[0])
    assert load_checkpoint(accelerator, paths[0]) == {"global_step": 1}
    shutil.rmtree(paths[0])
    with pytest.raises(TrainingSetupError, match="no checkpoint in .* is complete.*--overwrite_output_dir"):
        _find(args)
    args.overwrite_output_dir = True
    with pytest.warns(UserWarning, match="starting a new run"):
        assert _find(args) is None


def test_checkpoints_of_an_older_version_need_their_optimizer_state(tmp_path):
    args = _args(tmp_path, "--report_to", "none")
    accelerator, model = _prepared(args)
    path = Path(_save(accelerator, args, 1))
    state = json.loads((path / TRAINING_STATE_FILE).read_text())
    legacy = {"global_step": state["global_step"]}  # what the older save_checkpoint wrote
    (path / TRAINING_STATE_FILE).write_text(json.dumps(legacy))
    assert checkpoint_problem(path) is None
    (path / "optimizer.bin").unlink()
    assert checkpoint_problem(path) == "it has no optimizer state (optimizer*.bin)"


def test_a_checkpoint_that_fails_to_load_is_a_clear_error(tmp_path):
    args = _args(tmp_path, "--report_to", "none")
    accelerator, model = _prepared(args)
    path = Path(_save(accelerator, args, 1))
    optimizer_file = path / "optimizer.bin"
    optimizer_file.write_bytes(b"\0" * optimizer_file.stat().st_size)  # same size, garbage content
    with pytest.raises(TrainingSetupError, match=r"checkpoint-1' could not be loaded.*previous one"):
        load_checkpoint(accelerator, path)


def test_a_new_run_refuses_a_used_output_dir(tmp_path):
    args = _args(tmp_path, "--report_to", "none")
    accelerator, model = _prepared(args)
    _save(accelerator, args, 5)
    with pytest.raises(TrainingSetupError, match=r"already holds checkpoints.*\(checkpoint-5\).*latest"):
        _find(args)
    args.overwrite_output_dir = True
    assert _find(args) is None
    sampler = ResumableBatchSampler(4, 2)
    assert (
        resume_training(
            accelerator,
            None,
            sampler,
            output_dir=args.output_dir,
            gradient_accumulation_steps=1,
            overwrite=True,
        )
        == 0
    )
    assert list_checkpoints(args.output_dir) == []  # the old run's checkpoints can never be `latest`


def test_changed_settings_are_refused_unless_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = _args(tmp_path, "--report_to", "none", "--data_dir", str(data), "--learning_rate", "1e-4")
    accelerator, model = _prepared(args)
    _save(accelerator, args, 1, settings=run_settings(args, {"resolution": 32}))
    saved = json.loads((tmp_path / "out" / "checkpoint-1" / TRAINING_STATE_FILE).read_text())
    assert saved["settings"]["learning_rate"] == 1e-4 and saved["settings"]["resolution"] == 32
    assert saved["settings_fingerprint"] == settings_fingerprint(saved["settings"])
    same = _args(
        tmp_path, "--data_dir", str(data), "--learning_rate", "1e-4", "--resume_from_checkpoint", "latest"
    )
    assert _find(same, run_settings(same, {"resolution": 32})).endswith("checkpoint-1")
    changed = _args(tmp_path, "--data_dir", str(data), "--seed", "3", "--resume_from_checkpoint", "latest")
    with pytest.raises(TrainingSetupError) as error:
        _find(changed, run_settings(changed, {"resolution": 64}))
    message = str(error.value)
    assert "learning_rate: 0.0001 in the checkpoint, 1e-05 now" in message
    assert "seed: 0 in the checkpoint, 3 now" in message and "resolution: 32" in message
    assert "--allow_changed_settings" in message and "data_dir" not in message
    changed.allow_changed_settings = True
    with pytest.warns(UserWarning, match="changed settings"):
        assert _find(changed).endswith("checkpoint-1")
