"""Stage-2 training scripts: train_text_lm.py, precompute_targets.py, train_storygptv.py (tiny, offline, CPU)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storygptv.grounding import with_setting
from storygptv.training.checks import TrainingSetupError
from storygptv.training.stage2 import (
    BEST_DIR,
    TRAINABLE_FILE,
    AlignmentValidator,
    DenoisingLoss,
    Stage2Collator,
)
from storygptv.training.target_encoding import target_captions
from storygptv.training.targets import CONFIG_FILE, load_precomputed_targets

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"


def _script(name: str):
    """A training script as a module (the tests call their ``main``; scripts never load each other)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text_lm():
    return _script("train_text_lm")


@pytest.fixture(scope="module")
def precompute():
    return _script("precompute_targets")


@pytest.fixture(scope="module")
def stage2():
    return _script("train_storygptv")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("story_training")


@pytest.fixture(scope="module")
def char_ldm_dir(work):
    from storygptv import CharLDMPipeline
    from storygptv.testing import tiny_char_ldm_components

    path = work / "char_ldm"
    CharLDMPipeline(**tiny_char_ldm_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_dir(work, text_lm):
    path = work / "lm"
    text_lm.main(
        [
            "--dataset", "synthsv", "--num_stories", "24", "--output_dir", str(path),
            "--train_batch_size", "8", "--max_train_steps", "3", "--checkpointing_steps", "3",
            "--vocab_size", "300", "--hidden_size", "32", "--num_layers", "2", "--num_heads", "2",
            "--max_position_embeddings", "512", "--lr_warmup_steps", "0", "--report_to", "none",
        ]
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def targets_dir(work, precompute, char_ldm_dir):
    path = work / "targets"
    precompute.main(
        [
            "--pretrained_model_name_or_path", str(char_ldm_dir), "--dataset", "synthsv",
            "--num_stories", "6", "--shard_size", "4", "--output_dir", str(path),
        ]
    )  # fmt: skip
    return path


TINY_MAPPER = [
    "--mapper_hidden_size", "32", "--mapper_num_heads", "2", "--mapper_num_layers", "1", "--mapper_ffn_dim", "64",
]  # fmt: skip


def stage2_argv(char_ldm_dir, lm_dir, targets_dir, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(char_ldm_dir), "--language_model_name_or_path", str(lm_dir),
        "--targets_dir", str(targets_dir), "--output_dir", str(output_dir), "--train_batch_size", "2",
        "--lr_warmup_steps", "1", "--report_to", "none", *TINY_MAPPER, *map(str, extra),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------- train_text_lm
def test_text_lm_folder_loads_with_auto_classes(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    assert model.config.model_type == "opt" and model.config.hidden_size == 32
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    ids = tokenizer(" She is jumping.", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # the BPE was trained on SynthSV captions
    card = (lm_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    summary = json.loads((lm_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    assert (lm_dir / "checkpoint-3").is_dir()


def test_story_texts_join_referential_captions(text_lm):
    import datasets

    rows = datasets.Dataset.from_dict(
        {"captions": [["Ava waves.", "Ava sits."]], "referential_captions": [["Ava waves.", "She sits."]]}
    )
    texts, corpus = text_lm.story_texts(rows, include_original=True)
    assert texts == ["Ava waves. She sits.", "Ava waves. Ava sits."]
    assert "She sits." in corpus and "Ava sits." in corpus
    with pytest.raises(TrainingSetupError, match="captions"):
        text_lm.story_texts(datasets.Dataset.from_dict({"story_id": ["a"]}), include_original=False)


# ----------------------------------------------------------------------------------- precompute_targets
def test_precomputed_targets_match_the_pipeline(precompute, targets_dir, char_ldm_dir):
    from storygptv import CharLDMPipeline
    from storygptv.data import load_story_dataset
    from storygptv.data.synthsv import reference_images
    from storygptv.pipelines.pipeline_storygptv import encode_story_images

    data = load_precomputed_targets(targets_dir)
    assert len(data) == 6 and "images" in data.column_names
    row = data[5]
    assert row["image_embeds"].shape == (4, 32) and row["target_conditioning"].shape == (4, 77, 32)
    story = load_story_dataset("synthsv", split="train", num_stories=6)[5]
    assert row["captions"] == story["captions"]
    assert row["referential_captions"] == story["referential_captions"]
    pipe = CharLDMPipeline.from_pretrained(char_ldm_dir)
    refs = reference_images()
    cast = {n: refs[n] for frame in story["characters"] for n in frame}
    expected = pipe.encode_fused(story["captions"], cast, warn=False).prompt_embeds
    torch.testing.assert_close(row["target_conditioning"], expected, rtol=1e-5, atol=1e-5)
    images = encode_story_images(story["images"], pipe.image_encoder, pipe.feature_extractor)
    torch.testing.assert_close(row["image_embeds"], images, rtol=1e-5, atol=1e-5)


def test_precompute_resumes_without_redoing_finished_shards(precompute, targets_dir, char_ldm_dir, work):
    path = work / "targets_resume"
    shutil.copytree(targets_dir, path)
    kept = path / "shards" / "shard-00000" / "dataset_info.json"
    before = kept.stat().st_mtime_ns
    shutil.rmtree(path / "shards" / "shard-00001")  # "killed" before the last shard was written
    argv = [
        "--pretrained_model_name_or_path", str(char_ldm_dir), "--dataset", "synthsv",
        "--num_stories", "6", "--shard_size", "4", "--output_dir", str(path),
    ]  # fmt: skip
    with pytest.raises(TrainingSetupError, match="incomplete"):
        load_precomputed_targets(path)
    precompute.main(argv)
    assert kept.stat().st_mtime_ns == before
    again = load_precomputed_targets(path)
    ref = load_precomputed_targets(targets_dir)
    assert torch.equal(again[5]["target_conditioning"], ref[5]["target_conditioning"])
    # Other settings in the same folder: refused.
    with pytest.raises(TrainingSetupError, match="target_type"):
        precompute.main([*argv, "--target_type", "text"])


def test_name_background_restores_the_setting_of_the_target_caption(precompute, char_ldm_dir, work):
    from storygptv import CharLDMPipeline
    from storygptv.data import load_story_dataset
    from storygptv.data.synthsv import reference_images

    assert with_setting("Bo and Ava are waving.", "lake") == "Bo and Ava are waving in the lake."
    assert with_setting("Bo sits in the Lake.", "lake") == "Bo sits in the Lake."
    assert with_setting("Bo sits", "cave") == "Bo sits in the cave."
    with pytest.raises(TrainingSetupError, match="background"):
        target_captions({"story_id": "x"}, ["Bo sits."], name_background=True)

    out = work / "targets_named_background"
    precompute.main(
        [
            "--pretrained_model_name_or_path", str(char_ldm_dir), "--dataset", "synthsv",
            "--num_stories", "6", "--output_dir", str(out), "--name_background", "--no_store_images",
        ]
    )  # fmt: skip
    data = load_precomputed_targets(out)
    stories = load_story_dataset("synthsv", split="train", num_stories=6)
    pipe = CharLDMPipeline.from_pretrained(char_ldm_dir)
    refs = reference_images()
    implicit = 0
    for row, story in zip(data, stories):
        assert row["captions"] == story["captions"]  # the stored captions stay the originals
        named = [with_setting(c, b) for c, b in zip(story["captions"], story["background"])]
        implicit += sum(a != b for a, b in zip(named, story["captions"]))
        cast = {n: refs[n] for frame in story["characters"] for n in frame}
        expected = pipe.encode_fused(named, cast, warn=False).prompt_embeds
        torch.testing.assert_close(row["target_conditioning"], expected, rtol=1e-5, atol=1e-5)
    assert implicit > 0  # the sample has frames whose caption leaves the setting implicit


def test_precompute_records_anchors_roles_and_label_sets(precompute, targets_dir, char_ldm_dir):
    from storygptv import CharLDMPipeline
    from storygptv.characters import locate_character_tokens
    from storygptv.data import load_story_dataset
    from storygptv.data.synthsv import reference_images

    data = load_precomputed_targets(targets_dir)
    config = json.loads((targets_dir / CONFIG_FILE).read_text())
    stories = load_story_dataset("synthsv", split="train", num_stories=6)
    assert config["character_names"] == sorted({n for s in stories for f in s["characters"] for n in f})
    assert config["setting_names"] == sorted({b for s in stories for b in s["background"]})
    pipe = CharLDMPipeline.from_pretrained(char_ldm_dir)
    refs = reference_images()
    row, story = data[2], stories[2]
    assert row["background"] == story["background"] and row["characters"] == story["characters"]
    cast = {n: refs[n] for frame in story["characters"] for n in frame}
    # The anchor: the referential captions as written, names fused where they are stated.
    anchors = pipe.encode_fused(story["referential_captions"], cast, warn=False).prompt_embeds
    torch.testing.assert_close(row["caption_conditioning"], anchors, rtol=1e-5, atol=1e-5)
    # Roles: 1 at each fused character token of the target caption, 2 at its setting word (if named).
    encoded = pipe.encode_fused(story["captions"], cast, warn=False)
    for t, caption in enumerate(story["captions"]):
        expected = torch.zeros(pipe.tokenizer.model_max_length, dtype=torch.int8)
        for m in locate_character_tokens(caption, [story["background"][t]], pipe.tokenizer):
            expected[m.token_index] = 2
        for index in encoded.character_token_indices[t].tolist():
            if index >= 0:
                expected[index] = 1
        assert torch.equal(row["target_token_roles"][t], expected)
    assert (data[0]["target_token_roles"] == 1).any()


# -------------------------------------------------------------------------------------- train_storygptv
def test_stage2_restating_model_trains_validates_and_draws(stage2, char_ldm_dir, lm_dir, targets_dir, work):
    from storygptv.data.synthsv import reference_images
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    out = work / "stage2_restate"
    stage2.main(
        stage2_argv(
            char_ldm_dir, lm_dir, targets_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2,
            "--grounding", "restate", "--img_loss_weight", 0, "--validation_targets_dir", targets_dir,
        )
    )  # fmt: skip
    best = json.loads((out / stage2.BEST_DIR / "best.json").read_text())
    assert {"restate_loss", "restate_exact"} <= set(best) and best["restate_loss"] > 0
    pipe = StoryGPTVPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.story_model.config
    assert cfg.grounding == "restate" and cfg.restate_prefix_ids and pipe.story_model.grounding_head is None
    refs = reference_images()
    story = pipe(["Ava is standing in the forest.", "She is jumping."], characters={"Ava": refs["Ava"]},
                 num_inference_steps=1)  # fmt: skip
    assert len(story.images) == 2 and len(story.story_context.frames) == 2
    with pytest.raises(SystemExit):  # a restatement is learned through L_gen
        stage2.parse_args(stage2_argv(char_ldm_dir, lm_dir, targets_dir, out, "--grounding", "restate",
                                      "--gen_loss_weight", 0))  # fmt: skip
    # Continuing the model (as the README's fine-tuning does with the default) keeps its design unasked;
    # a new model gets the paper's.
    cont = stage2.parse_args(
        stage2_argv(char_ldm_dir, lm_dir, targets_dir, work / "cont", "--story_model_name_or_path", out)
    )
    assert (cont.grounding, cont.mapper_queries) == ("restate", cfg.mapper_queries)
    new = stage2.parse_args(stage2_argv(char_ldm_dir, lm_dir, targets_dir, work / "new"))
    assert (new.grounding, new.mapper_queries) == ("none", "learned")


def test_stage2_design_options_train_and_ground(stage2, precompute, char_ldm_dir, lm_dir, targets_dir, work):
    from storygptv.data.synthsv import reference_images
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    config = json.loads((targets_dir / CONFIG_FILE).read_text())
    out = work / "stage2_design"
    stage2.main(
        stage2_argv(
            char_ldm_dir, lm_dir, targets_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2,
            "--mapper_queries", "caption", "--restored_anchor_prob", 0.5, "--align_character_weight", 4,
            "--align_setting_weight", 2, "--grounding", "--grounding_loss_weight", 0.5, "--img_loss_weight", 0,
            "--validation_targets_dir", targets_dir,
        )
    )  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    logs = summary["final_logs"]
    assert logs["loss"] == pytest.approx(
        0.5 * logs["gen_loss"] + logs["align_loss"] + 0.5 * logs["grounding_loss"], rel=1e-4
    )
    assert {"grounding_loss", "grounding_exact"} <= set(summary["best_validation"])
    pipe = StoryGPTVPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.story_model.config
    assert cfg.mapper_queries == "caption" and (cfg.align_character_weight, cfg.align_setting_weight) == (
        4,
        2,
    )
    assert cfg.grounding_characters == config["character_names"]
    assert cfg.grounding_settings == config["setting_names"]
    assert cfg.loss_weights["grounding"] == 0.5
    refs = reference_images()
    story = pipe(
        ["Ava and Bo are standing in the forest.", "They are jumping."],
        characters={"Ava": refs["Ava"], "Bo": refs["Bo"]},
        num_inference_steps=2,
    )
    assert len(story.characters) == 2 and story.captions[0] == "Ava and Bo are standing in the forest."
    assert all(name in cfg.grounding_characters for name in story.characters[1])
    with pytest.raises(SystemExit):  # an option that only applies to the caption mapper
        stage2.parse_args(stage2_argv(char_ldm_dir, lm_dir, targets_dir, out, "--restored_anchor_prob", 0.5))


def test_stage2_end_to_end_whole_pipeline(stage2, char_ldm_dir, lm_dir, targets_dir, work):
    from storygptv.data.synthsv import reference_images
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    out = work / "stage2"
    stage2.main(
        stage2_argv(
            char_ldm_dir, lm_dir, targets_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2
        )
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["loss_weights"] == {"gen": 0.5, "align": 1.0, "img": 1.0}
    logs = summary["final_logs"]
    assert {"gen_loss", "align_loss", "img_loss", "loss"} <= set(logs)
    assert logs["loss"] == pytest.approx(
        0.5 * logs["gen_loss"] + logs["align_loss"] + logs["img_loss"], rel=1e-4
    )
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "StoryGPTVPipeline" in card
    assert (out / "checkpoint-2" / TRAINABLE_FILE).exists()
    assert not (out / "checkpoint-2" / "model.safetensors").exists()  # the frozen LLM is not re-saved
    assert (out / "characters" / "Ava.png").is_file()  # the cast of the targets (SynthSV's references)

    pipe = StoryGPTVPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.story_model.config.vision_embed_dim == 32 and pipe.story_model.config.ldm_hidden_size == 32
    refs = reference_images()
    story = pipe(
        ["Ava and Bo are standing in the forest.", "They are jumping.", "Ava is waving."],
        characters={"Ava": refs["Ava"], "Bo": refs["Bo"]},
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert story.images.shape == (3, 32, 32, 3) and np.isfinite(story.images).all()


def test_resume_after_kill_gives_the_same_weights(stage2, char_ldm_dir, lm_dir, targets_dir, work):
    from safetensors.torch import load_file

    common = ("--max_train_steps", 4, "--checkpointing_steps", 2, "--gradient_accumulation_steps", 2)
    full = work / "resume_full"
    stage2.main(stage2_argv(char_ldm_dir, lm_dir, targets_dir, full, *common, "--save_story_model_only"))

    killed = work / "resume_killed"
    argv = stage2_argv(char_ldm_dir, lm_dir, targets_dir, killed, *common, "--save_story_model_only")
    with pytest.raises(KeyboardInterrupt):  # killed right after the checkpoint of step 2
        stage2.main([*argv, "--debug_interrupt_at_step", "2"])
    assert (killed / "checkpoint-2").is_dir() and not (killed / "model.safetensors").exists()
    stage2.main([*argv, "--resume_from_checkpoint", "latest"])

    a = load_file(str(full / "checkpoint-4" / TRAINABLE_FILE))
    b = load_file(str(killed / "checkpoint-4" / TRAINABLE_FILE))
    assert a.keys() == b.keys() and any(k.endswith("@img_rows") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # Resuming with a setting that changes the result (here a stage-2 design option) is refused.
    with pytest.raises(TrainingSetupError, match="align_character_weight"):
        stage2.main([*argv, "--resume_from_checkpoint", "latest", "--align_character_weight", "3"])


def test_validation_exports_the_best_step(stage2, precompute, char_ldm_dir, lm_dir, targets_dir, work):
    from safetensors.torch import load_file

    from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration

    val_dir = work / "targets_validation"
    precompute.main(
        [
            "--pretrained_model_name_or_path", str(char_ldm_dir), "--dataset", "synthsv", "--split", "validation",
            "--num_stories", "3", "--no_store_images", "--output_dir", str(val_dir),
        ]
    )  # fmt: skip
    common = (
        "--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_steps", 1, "--learning_rate", 0.05,
        "--validation_targets_dir", val_dir, "--save_story_model_only",
    )  # fmt: skip
    out = work / "validated"
    stage2.main(stage2_argv(char_ldm_dir, lm_dir, targets_dir, out, *common))
    summary = json.loads((out / "train_summary.json").read_text())
    best = json.loads((out / BEST_DIR / "best.json").read_text())
    assert summary["best_validation"] == best and summary["exported_step"] == best["step"]

    # The exported model is the best step's, and it scores what was recorded on the validation stories.
    model = StoryGPTVForConditionalGeneration.from_pretrained(out)
    exported = model.trainable_state_dict()
    saved = load_file(str(out / BEST_DIR / TRAINABLE_FILE))
    assert exported.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(exported[key], saved[key], rtol=0, atol=0)
    from transformers import AutoTokenizer

    data = load_precomputed_targets(val_dir)
    collator = Stage2Collator(
        AutoTokenizer.from_pretrained(out), model.config, max_length=160, label_scope="all"
    )
    rescored = AlignmentValidator(data, collator, work / "unused", 2, resumed_step=0).score(
        model, torch.device("cpu")
    )
    assert rescored == pytest.approx(best["align_loss"], rel=1e-3)  # attention kernels may differ

    # --export_last: the final folder holds the last step's weights, the best step is still recorded.
    last = work / "validated_last"
    stage2.main(stage2_argv(char_ldm_dir, lm_dir, targets_dir, last, *common, "--export_last"))
    assert json.loads((last / "train_summary.json").read_text())["exported_step"] == 4
    exported = StoryGPTVForConditionalGeneration.from_pretrained(last).trainable_state_dict()
    final = load_file(str(last / "checkpoint-4" / TRAINABLE_FILE))
    for key in final:
        torch.testing.assert_close(exported[key], final[key], rtol=0, atol=0)


def test_img_loss_gradient_reaches_the_mapper(stage2):
    from diffusers import DDPMScheduler

    from storygptv.testing import tiny_char_ldm_components
    from storygptv.testing.story_model import tiny_story_model

    c = tiny_char_ldm_components()
    model, tokenizer = tiny_story_model(vision_embed_dim=32, ldm_hidden_size=32)
    model.train()
    for module in (c["vae"], c["unet"]):
        module.requires_grad_(False)
    loss_fn = DenoisingLoss(c["vae"], c["unet"], DDPMScheduler(num_train_timesteps=1000), torch.float32)
    hidden = torch.randn(2, 8, 32)
    conditioning = model.map_img_tokens(hidden, torch.zeros_like(hidden))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = loss_fn(pixels, conditioning, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.ldm_mapper.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in c["unet"].parameters())
    again = loss_fn(pixels, conditioning.detach(), torch.Generator().manual_seed(0))
    assert torch.equal(again, loss.detach())  # noise and timesteps come from the generator only


def test_vae_input_range_and_compat():
    import PIL.Image

    from storygptv.data.collators import frame_pixel_values

    image = PIL.Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8))
    assert frame_pixel_values(image, 4).max() == 1.0
    raw = frame_pixel_values(image, 4, raw=True)
    assert raw.shape == (3, 4, 4) and raw.max() == 255.0


def test_loss_presets_and_overrides(stage2):
    from storygptv.models.configuration_storygptv import LOSS_WEIGHT_PRESETS, STAGE2_LOSS_PRESETS
    from storygptv.training.loop import make_lr_scheduler

    base = ["--pretrained_model_name_or_path", "x", "--targets_dir", "y"]
    default = stage2.parse_args(base)
    assert default.loss_preset == "paper_code_scale"
    assert default.loss_weights == {"gen": 0.5, "align": 1.0, "img": 1.0}
    # One table: the script's presets are the config's, which the model config sees without L_img.
    for name, row in STAGE2_LOSS_PRESETS.items():
        assert stage2.parse_args([*base, "--loss_preset", name]).loss_weights == row
        assert LOSS_WEIGHT_PRESETS[name] == {k: v for k, v in row.items() if k != "img"}
    assert stage2.parse_args([*base, "--loss_preset", "reference_v2"]).loss_weights == {
        "gen": 0.5,
        "align": 0.0,
        "img": 1.0,
    }
    args = stage2.parse_args([*base, "--loss_preset", "paper", "--img_loss_weight", "0"])
    assert args.loss_weights == {"gen": 1.0, "align": 1.0, "img": 0.0}
    assert args.learning_rate == 1e-3 and args.adam_beta2 == 0.95 and args.max_length == 160
    assert args.lr_scheduler == "warmup_step" and args.lr_warmup_steps == 2000
    assert args.lr_step_size == 10_000 and args.lr_step_gamma == 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(
        args.lr_scheduler, opt, total_steps=args.max_train_steps, warmup_steps=2, step_size=3, step_gamma=0.1
    )
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.1, 0.1, 0.1, 0.01])
    with pytest.raises(SystemExit):
        stage2.parse_args(
            [*base, "--gen_loss_weight", "0", "--align_loss_weight", "0", "--img_loss_weight", "0"]
        )


def test_clear_errors_before_training(stage2, precompute, text_lm, char_ldm_dir, lm_dir, targets_dir, work):
    import datasets

    broken = work / "broken_char_ldm"
    shutil.copytree(char_ldm_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(TrainingSetupError, match="unet"):
        stage2.main(stage2_argv(broken, lm_dir, targets_dir, work / "e1"))
    with pytest.raises(TrainingSetupError, match="holds no checkpoint"):
        stage2.main(
            stage2_argv(char_ldm_dir, lm_dir, targets_dir, work / "e2", "--resume_from_checkpoint", work)
        )
    with pytest.raises(TrainingSetupError, match="not a precompute_targets.py output"):
        stage2.main(stage2_argv(char_ldm_dir, lm_dir, lm_dir, work / "e3"))
    with pytest.raises(TrainingSetupError, match="config.json"):
        stage2.main(stage2_argv(char_ldm_dir, work, targets_dir, work / "e4"))
    with pytest.raises(TrainingSetupError, match="data_dir"):
        precompute.main(
            [
                "--pretrained_model_name_or_path",
                str(char_ldm_dir),
                "--dataset",
                "flintstones",
                "--output_dir",
                str(work / "e5"),
            ]
        )
    no_text = work / "no_captions"
    datasets.Dataset.from_dict({"story_id": ["a"], "captions": [["", " "]]}).save_to_disk(str(no_text))
    with pytest.raises(TrainingSetupError, match="no captions"):
        text_lm.main(
            ["--train_dataset_path", str(no_text), "--output_dir", str(work / "e6"), "--report_to", "none"]
        )
    with pytest.raises(TrainingSetupError, match="reference_images_dir"):
        precompute.main(
            ["--pretrained_model_name_or_path", str(char_ldm_dir), "--train_dataset_path", str(no_text),
             "--output_dir", str(work / "e7")]
        )  # fmt: skip


def test_story_model_only_lora_l2_and_continue(stage2, char_ldm_dir, lm_dir, targets_dir, work):
    from transformers import AutoTokenizer

    from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    out = work / "lora_only"
    stage2.main(
        stage2_argv(
            char_ldm_dir, lm_dir, targets_dir, out, "--max_train_steps", 2, "--lora_rank", 2,
            "--loss_preset", "reference_v1", "--align_loss", "l2", "--save_story_model_only",
        )
    )  # fmt: skip
    model = StoryGPTVForConditionalGeneration.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.lora_rank == 2 and model.config.align_loss == "l2"
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert tokenizer.convert_tokens_to_ids("[IMG0]") == model.config.img_token_ids[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert "img_loss" not in summary["final_logs"]
    # Continue from the saved story model, exporting a whole pipeline.
    cont = work / "continued"
    stage2.main(
        stage2_argv(
            char_ldm_dir, lm_dir, targets_dir, cont, "--max_train_steps", 1, "--story_model_name_or_path", out
        )
    )
    pipe = StoryGPTVPipeline.from_pretrained(cont)
    assert pipe.story_model.config.lora_rank == 2


def test_llama_lm_on_the_fly_targets_and_compat(stage2, text_lm, char_ldm_dir, work):
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    lm = work / "llama_lm"
    text_lm.main(
        [
            "--dataset", "synthsv", "--num_stories", "16", "--output_dir", str(lm), "--model_type", "llama",
            "--model_config", '{"tie_word_embeddings": false}', "--train_batch_size", "8", "--max_train_steps", "2",
            "--vocab_size", "300", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
            "--report_to", "none",
        ]
    )  # fmt: skip
    out = work / "llama_stage2"
    argv = [
        "--pretrained_model_name_or_path", str(char_ldm_dir), "--language_model_name_or_path", str(lm),
        "--dataset", "synthsv", "--num_stories", "4", "--output_dir", str(out), "--train_batch_size", "2",
        "--max_train_steps", "2", "--vae_input_compat", "--gradient_accumulation_steps", "2",
        "--report_to", "tensorboard", *TINY_MAPPER,
    ]  # fmt: skip
    stage2.main(argv)
    assert (out / "targets" / "precompute_config.json").exists()  # computed on the fly
    assert list((out / "logs").rglob("events.out.tfevents*"))
    pipe = StoryGPTVPipeline.from_pretrained(out)
    model = pipe.story_model
    assert model.has_untied_output_head
    ids = model.config.img_token_ids
    head = model.get_output_embeddings().weight
    keep = torch.ones(head.shape[0], dtype=torch.bool)
    keep[ids] = False
    torch.testing.assert_close(head[ids].norm(dim=-1), head[keep].norm(dim=-1).mean().expand(len(ids)))
    # Targets without frames cannot feed L_img.
    stripped = work / "targets_no_images"
    _script("precompute_targets").main(
        ["--pretrained_model_name_or_path", str(char_ldm_dir), "--num_stories", "2", "--output_dir", str(stripped),
         "--no_store_images"]
    )  # fmt: skip
    with pytest.raises(TrainingSetupError, match="no_store_images"):
        stage2.main(
            [
                *argv[:4],
                "--targets_dir",
                str(stripped),
                "--output_dir",
                str(work / "e8"),
                "--report_to",
                "none",
            ]
        )


def test_train_language_model_updates_the_whole_llm(stage2, char_ldm_dir, lm_dir, targets_dir, work):
    from transformers import AutoModelForCausalLM

    from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration

    out = work / "whole_llm"
    stage2.main(
        stage2_argv(char_ldm_dir, lm_dir, targets_dir, out, "--max_train_steps", 2, "--train_language_model",
                    "--learning_rate", 1e-2, "--save_story_model_only")
    )  # fmt: skip
    model = StoryGPTVForConditionalGeneration.from_pretrained(out)
    assert model.config.freeze_language_model is False
    before = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    after = model.language_model.state_dict()
    name = next(k for k in before if k.endswith("layers.0.fc1.weight"))
    assert not torch.equal(before[name], after[name])  # a frozen run changes only LoRA and the [IMG] rows
