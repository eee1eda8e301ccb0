"""Tests of ``training_scripts/train_char_ldm.py`` and ``train_vae.py`` on tiny models (CPU, offline)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from storygptv import CharLDMPipeline
from storygptv.training.checks import TrainingSetupError
from storygptv.training.diffusion import denoising_loss

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "training_scripts"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script("train_char_ldm")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from storygptv.testing import tiny_char_ldm_components

    folder = tmp_path_factory.mktemp("tiny") / "char-ldm"
    CharLDMPipeline(**tiny_char_ldm_components(0)).save_pretrained(folder)
    return folder


def _base_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--dataset",
        "synthsv",
        "--num_stories",
        "2",
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--attention_blocks",
        "down_blocks.1",
        "up_blocks.2",
        "--reg_weight",
        "0.1",
        *extra,
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for sub in ("unet", "fuser", "image_encoder", "text_encoder"):
        for file in (folder / sub).glob("*.safetensors"):
            out.update({f"{sub}.{k}": v for k, v in load_file(file).items()})
    return out


def test_tiny_run_exports_a_loadable_pipeline(script, tiny_folder, tmp_path):
    out = tmp_path / "run"
    result = script.main(
        _base_args(
            tiny_folder,
            out,
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "100",
            "--report_to",
            "tensorboard",
            "--validation_prompts",
            "Ava is jumping in the forest.",
            "--validation_inference_steps",
            "2",
            "--use_ema",
        )
    )
    assert result["global_step"] == 2
    logs = result["logs"]
    assert set(logs) >= {"loss", "loss_mse", "loss_reg", "lr", "step_time_s"}
    assert logs["loss_reg"] != 0.0  # L_reg is computed on the captured layers
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "validation" / "step-2" / "00.png").exists()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert len(list((out / "characters").glob("*.png"))) == 8  # the cast: SynthSV's references
    pipe = CharLDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    from storygptv.data.synthsv import reference_images

    image = pipe(
        "Ava is jumping.",
        characters={"Ava": reference_images()["Ava"]},
        num_inference_steps=2,
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3)
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card
    assert "DiffusionPipeline.from_pretrained(" in card and "storygptv.load_cast(" in card
    assert "| `reg_weight` | 0.1 |" in card
    assert "exported weights are an EMA" in card
    assert str(tiny_folder) in card  # named in the text, but not as Hub `base_model` metadata
    assert "base_model" not in card.split("---")[1]


def test_resume_gives_the_same_weights(script, tiny_folder, tmp_path):
    extra = [
        "--max_train_steps",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--lr_scheduler",
        "linear",
        "--lr_warmup_steps",
        "1",
        "--use_ema",
        "--snr_gamma",
        "5",
        "--mask_loss_prob",
        "0.5",
    ]
    straight = tmp_path / "straight"
    script.main(_base_args(tiny_folder, straight, *extra))
    resumed = tmp_path / "resumed"
    args = _base_args(tiny_folder, resumed, *extra, "--checkpoints_total_limit", "1")
    with pytest.raises(KeyboardInterrupt):
        script.main([*args, "--debug_interrupt_at_step", "2"])
    assert (resumed / "checkpoint-2").is_dir()
    assert not (resumed / "model_index.json").exists()
    result = script.main([*args, "--resume_from_checkpoint", "latest"])
    assert result["global_step"] == 4
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4"]
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_cached_latents_train_and_resume_exactly(script, tiny_folder, tmp_path):
    """--cache_latents: the posterior of every frame is encoded once; the run is as deterministic as without
    it (resume bit-exact) and close to the uncached run (same draws, encoder batches of another size)."""
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--train_text_encoder"]
    plain = script.main(_base_args(tiny_folder, tmp_path / "plain", *extra))
    cached_args = _base_args(tiny_folder, tmp_path / "cached", *extra, "--cache_latents")
    with pytest.raises(KeyboardInterrupt):
        script.main([*cached_args, "--debug_interrupt_at_step", "2"])
    cache = tmp_path / "cached" / "latent_cache.safetensors"
    built = cache.stat().st_mtime_ns
    cached = script.main([*cached_args, "--resume_from_checkpoint", "latest"])
    assert cache.stat().st_mtime_ns == built  # reused by the resumed run, not rebuilt
    straight = script.main(_base_args(tiny_folder, tmp_path / "straight", *extra, "--cache_latents"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cached")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert cached["logs"]["loss"] == pytest.approx(straight["logs"]["loss"], rel=0, abs=0)
    assert cached["logs"]["loss"] == pytest.approx(plain["logs"]["loss"], rel=1e-3)


def test_reused_output_dir_and_changed_settings_are_refused(script, tiny_folder, tmp_path):
    out = tmp_path / "run"
    args = _base_args(tiny_folder, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    script.main(args)
    assert (out / "checkpoint-1").is_dir()
    with pytest.raises(TrainingSetupError, match=r"already holds checkpoints.*--overwrite_output_dir"):
        script.main(args)  # a second new run would mix its checkpoints with the first one's
    with pytest.raises(TrainingSetupError, match=r"other settings: learning_rate: 0.001 in the checkpoint"):
        script.main([*args, "--resume_from_checkpoint", "latest", "--learning_rate", "2e-3"])
    result = script.main(
        [*args, "--overwrite_output_dir", "--max_train_steps", "2", "--checkpointing_steps", "2"]
    )
    assert result["global_step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_loss_helpers_and_reg_gradient(script, tiny_folder):
    pipe = CharLDMPipeline.from_pretrained(tiny_folder)
    model = script.CharLDMTrainModel(pipe, ["down_blocks.1", "up_blocks.2"])
    latents = torch.randn(2, 4, 16, 16)
    ids = pipe.tokenizer(["Ava is here.", ""], padding="max_length", return_tensors="pt").input_ids
    tokens = torch.tensor([[1, -1], [-1, -1]])
    refs = torch.randn(2, 2, 3, 32, 32)
    pred, maps = model(latents, torch.tensor([10, 20]), ids, tokens, refs, capture=True)
    assert len(maps) == 1 + 2  # attn2 layers: 1 in down_blocks.1, 2 in up_blocks.2 (1 layer per block)
    masks = torch.zeros(2, 2, 32, 32)
    masks[0, 0, :16, :16] = 1
    loss = script.character_attention_loss(maps, masks, (tokens >= 0))
    loss.backward()
    grad = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert pipe.fuser.layer_norm.weight.grad is not None  # the fused token feeds the captured keys
    # Masked denoising loss: no area normalisation.
    union = script.union_mask(masks, (16, 16))
    assert union.shape == (2, 1, 16, 16) and union[1].sum() == 0
    p, t = torch.ones(2, 4, 16, 16), torch.zeros(2, 4, 16, 16)
    torch.testing.assert_close(denoising_loss(p, t, mask=union), union.mean())
    torch.testing.assert_close(denoising_loss(p, t, weights=torch.tensor([1.0, 0.0])), torch.tensor(0.5))


def test_setup_errors_come_first(script, tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "fuser")
    with pytest.raises(TrainingSetupError, match=r"missing subfolders \['fuser'\]"):
        script.main(_base_args(broken, tmp_path / "o1", "--max_train_steps", "1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingSetupError, match="holds no checkpoint"):
        script.main(_base_args(tiny_folder, tmp_path / "o2", "--resume_from_checkpoint", str(empty)))
    with pytest.raises(TrainingSetupError, match="No FlintstonesSV release"):
        script.main(
            [*_base_args(tiny_folder, tmp_path / "o3"), "--dataset", "flintstones", "--data_dir", str(empty)]
        )
    with pytest.raises(SystemExit):
        script.main([*_base_args(tiny_folder, tmp_path / "o4"), "--dataset", "coco"])
    with pytest.raises(TrainingSetupError, match="neither a local folder nor a Hub repo"):
        script.main(_base_args(tmp_path / "not-there", tmp_path / "o5"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_start_from_stable_diffusion_folder(script, tiny_folder, tmp_path):
    """SD-1.5-style folder (no fuser / image encoder) + --image_encoder_name_or_path: a new fuser."""
    sd = tmp_path / "sd"
    sd.mkdir()
    index = json.loads((tiny_folder / "model_index.json").read_text())
    for name in ("image_encoder", "fuser", "feature_extractor"):
        index.pop(name)
    index["_class_name"] = "StableDiffusionPipeline"
    (sd / "model_index.json").write_text(json.dumps(index))
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        shutil.copytree(tiny_folder / name, sd / name)
    args = script.parse_args(
        _base_args(sd, tmp_path / "o", "--image_encoder_name_or_path", str(tiny_folder / "image_encoder"))
    )
    pipe, was_char_ldm = script.load_pipeline(args)
    assert not was_char_ldm
    assert pipe.fuser.config.text_embed_dim == pipe.text_encoder.config.hidden_size
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, tiny_folder: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(SCRIPTS / "configs" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(_free_port()),
        str(SCRIPTS / "train_char_ldm.py"),
        *_base_args(tiny_folder, out, *extra),
        "--debug_dump_rank_hash",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _check_two_ranks(out: Path, proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    h0, h1 = (out / "rank0.txt").read_text(), (out / "rank1.txt").read_text()
    assert h0 == h1
    return h0


def test_two_cpu_processes_end_with_identical_weights(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    _check_two_ranks(out, _launch(out, tiny_folder, "--max_train_steps", "1"))
    CharLDMPipeline.from_pretrained(out)


@pytest.mark.slow
def test_two_cpu_processes_resume(tiny_folder, tmp_path):
    """2 processes, accumulation, EMA: interrupted at step 2 + resumed == straight (same rank hashes)."""
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2"]
    extra += ["--use_ema", "--lr_scheduler", "cosine"]
    straight = _check_two_ranks(tmp_path / "a", _launch(tmp_path / "a", tiny_folder, *extra))
    interrupted = _launch(tmp_path / "b", tiny_folder, *extra, "--debug_interrupt_at_step", "2")
    assert interrupted.returncode != 0 and (tmp_path / "b" / "checkpoint-2").is_dir()
    proc = _launch(tmp_path / "b", tiny_folder, *extra, "--resume_from_checkpoint", "latest")
    assert _check_two_ranks(tmp_path / "b", proc) == straight


# ------------------------------------------------------------------------------------------ train_vae.py
def _vae_args(out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "synthsv",
        "--num_stories",
        "1",
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--block_out_channels",
        "8",
        "16",
        "--norm_num_groups",
        "4",
        "--train_batch_size",
        "2",
        "--report_to",
        "none",
        "--num_validation_frames",
        "2",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "1",
        "--random_flip",
        "--use_ema",
        *extra,
    ]


def test_train_vae_resume_and_export(tmp_path):
    from diffusers import AutoencoderKL

    vae_script = _load_script("train_vae")
    straight = vae_script.main(_vae_args(tmp_path / "a", "--debug_dump_rank_hash"))
    assert straight["global_step"] == 3 and set(straight["metrics"]) == {"val_mse", "val_psnr"}
    with pytest.raises(KeyboardInterrupt):
        vae_script.main(_vae_args(tmp_path / "b", "--debug_interrupt_at_step", "2"))
    vae_script.main(_vae_args(tmp_path / "b", "--resume_from_checkpoint", "latest", "--debug_dump_rank_hash"))
    assert (tmp_path / "a" / "rank0.txt").read_text() == (tmp_path / "b" / "rank0.txt").read_text()
    vae = AutoencoderKL.from_pretrained(tmp_path / "a")
    assert list(vae.config.block_out_channels) == [8, 16] and vae.config.sample_size == 32
    card = (tmp_path / "a" / "README.md").read_text()
    assert "val_psnr" in card and "AutoencoderKL.from_pretrained" in card
    assert (tmp_path / "a" / "validation" / "reconstructions.png").exists()
    # Fine-tuning from the exported folder, and a bad config, fail or work before long work.
    resumed = vae_script.main(
        _vae_args(
            tmp_path / "c", "--pretrained_model_name_or_path", str(tmp_path / "a"), "--max_train_steps", "1"
        )
    )
    assert resumed["global_step"] == 1
    with pytest.raises(TrainingSetupError, match="does not exist"):
        vae_script.main(_vae_args(tmp_path / "d", "--vae_config", str(tmp_path / "missing.json")))
    with pytest.raises(TrainingSetupError, match="No VAE"):
        vae_script.main(_vae_args(tmp_path / "e", "--pretrained_model_name_or_path", str(tmp_path)))


def test_unet_only_fine_tune_on_four_character_frames(script, tiny_folder, tmp_path):
    """--no-train_fuser (+ frozen encoders) changes the UNet alone; --max_characters raises the fuser's limit
    and --dataset_options reaches the loader (SynthSV's four-character variant)."""
    out = tmp_path / "four"
    args = _base_args(
        tiny_folder,
        out,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "100",
        "--no-train_fuser",
        "--train_image_encoder_layers",
        "0",
        "--no-train_text_encoder",
        "--max_characters",
        "4",
        "--dataset_options",
        '{"four_character_rate": 1.0}',
    )
    script.main(args)
    before, after = _weights(tiny_folder), _weights(out)
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"unet"}
    assert json.loads((out / "fuser" / "config.json").read_text())["max_characters"] == 4
    parsed = script.parse_args(args)
    assert parsed.dataset_options == {"four_character_rate": 1.0} and not parsed.train_fuser
    for bad in ("[0.5]", "{four: 1}"):
        with pytest.raises(SystemExit):
            script.parse_args([*args, "--dataset_options", bad])
