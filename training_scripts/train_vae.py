#!/usr/bin/env python
"""Train an ``AutoencoderKL`` on the frames of a story dataset (from scratch or from a folder).

The small SynthSV default (64x64 frames) is a 3-level VAE, ``block_out_channels (16, 32, 64)``, 4 latent
channels (16x16x4 latents, about 650 k parameters); on 2 CPU cores about 0.3 s per batch of 32. Change
the architecture with ``--vae_config config.json`` (``AutoencoderKL`` kwargs) or the flags below. Loss:
L1 or MSE reconstruction + ``--kl_weight`` (1e-6) x KL.

    python training_scripts/train_vae.py --dataset synthsv --output_dir runs/vae \
        --train_batch_size 32 --learning_rate 1e-3 --max_train_steps 1000

The output folder loads with ``AutoencoderKL.from_pretrained(output_dir)``; a reconstruction grid and the
reconstruction error on validation frames are written next to it (``validation/``, ``README.md``).
Same infrastructure as ``train_char_ldm.py``: checkpoints, ``--resume_from_checkpoint latest`` (exact),
trackers, ``accelerate launch``, ``--push_to_hub``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from storygptv.data.collators import frame_pixel_values
from storygptv.training.accelerate_setup import init_trackers, make_accelerator, setup_logging
from storygptv.training.arguments import run_settings, training_arg_parser
from storygptv.training.checkpoints import dump_rank_hash, save_checkpoint
from storygptv.training.checks import TrainingSetupError, check_dataset
from storygptv.training.data import (
    ResumableBatchSampler,
    load_train_stories,
    make_train_dataloader,
    next_batch,
)
from storygptv.training.hub import hub_repo_id, push_folder_to_hub, scrub_local_paths
from storygptv.training.loop import (
    StepLogger,
    finish_training,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    seed_micro_step,
)
from storygptv.training.model_cards import card_dataset_name, write_model_card
from storygptv.training.resume import find_resume_checkpoint, resume_training

logger = logging.getLogger("train_vae")

#: The small SynthSV VAE (64x64 frames -> 16x16x4 latents).
DEFAULT_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_arg_parser(
        __doc__, learning_rate=1e-3, train_batch_size=32, lr_scheduler="constant", output_dir="outputs/vae"
    )
    g = parser.add_argument_group("VAE")
    g.add_argument(
        "--vae_config",
        type=str,
        default=None,
        help="JSON file of AutoencoderKL kwargs (new VAE from scratch).",
    )
    g.add_argument("--block_out_channels", type=int, nargs="+", default=None)
    g.add_argument("--latent_channels", type=int, default=None)
    g.add_argument("--layers_per_block", type=int, default=None)
    g.add_argument("--norm_num_groups", type=int, default=None)
    g.add_argument(
        "--subfolder",
        type=str,
        default=None,
        help='Subfolder of --pretrained_model_name_or_path holding the VAE (default: "vae" for a pipeline).',
    )
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips (seeded).")
    g.add_argument("--recon_loss", choices=["l1", "mse"], default="mse")
    g.add_argument("--kl_weight", type=float, default=1e-6)
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--validation_steps", type=int, default=500, help="Reconstruction check every N steps.")
    g.add_argument("--num_validation_frames", type=int, default=16)
    args = parser.parse_args(argv)
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8.")
    return args


def vae_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``AutoencoderKL`` kwargs: defaults < ``--vae_config`` < flags."""
    config = dict(DEFAULT_VAE_CONFIG)
    if args.vae_config:
        path = Path(args.vae_config)
        if not path.is_file():
            raise TrainingSetupError(f"--vae_config {str(path)!r} does not exist.")
        config.update({k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    levels = len(config["block_out_channels"])
    config["down_block_types"] = [config["down_block_types"][0]] * levels
    config["up_block_types"] = [config["up_block_types"][0]] * levels
    config["sample_size"] = args.resolution
    groups = config.get("norm_num_groups", 32)
    bad = [c for c in config["block_out_channels"] if c % groups]
    if bad:
        raise TrainingSetupError(f"block_out_channels {bad} are not multiples of norm_num_groups {groups}.")
    return config


def load_vae(args: argparse.Namespace) -> Any:
    from diffusers import AutoencoderKL

    name = args.pretrained_model_name_or_path
    if not name:
        return AutoencoderKL(**vae_config(args))
    local = Path(name)
    subfolder = args.subfolder
    if local.is_dir():
        if subfolder is None:
            subfolder = "" if (local / "config.json").exists() else "vae"
        if not (local / subfolder / "config.json").exists():
            raise TrainingSetupError(
                f"No VAE in {str(local / subfolder)!r}: expected a config.json (an AutoencoderKL folder or a "
                "pipeline folder with a vae/ subfolder)."
            )
    elif subfolder is None:
        subfolder = "vae"
    return AutoencoderKL.from_pretrained(name, subfolder=subfolder or None)


class FrameCollator:
    """Frames -> ``pixel_values`` in [-1, 1] at ``resolution`` (random flips from a reseedable generator)."""

    def __init__(self, resolution: int, random_flip: bool = False, seed: int = 0) -> None:
        self.resolution = resolution
        self.random_flip = random_flip
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tensors = []
        for frame in frames:
            pixels = frame_pixel_values(frame["image"], self.resolution)
            if self.random_flip and self.rng.random() < 0.5:
                pixels = pixels.flip(-1)
            tensors.append(pixels)
        return {"pixel_values": torch.stack(tensors)}


def vae_loss(
    vae: Any, pixel_values: torch.Tensor, generator: torch.Generator, recon: str, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, KL) for one batch; the posterior is sampled with ``generator``."""
    posterior = vae.encode(pixel_values).latent_dist
    z = posterior.sample(generator=generator)
    decoded = vae.decode(z).sample
    loss_fn = F.l1_loss if recon == "l1" else F.mse_loss
    rec = loss_fn(decoded.float(), pixel_values.float())
    kl = posterior.kl().mean() / pixel_values[0].numel()  # per pixel, like the reconstruction term
    return rec + kl_weight * kl, rec, kl


class VAEWithLoss(torch.nn.Module):
    """The VAE with its training loss as ``forward`` (one DDP-wrappable module)."""

    def __init__(self, vae: Any, recon: str, kl_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.recon = recon
        self.kl_weight = kl_weight

    def forward(self, pixel_values: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return vae_loss(self.vae, pixel_values, generator, self.recon, self.kl_weight)


@torch.no_grad()
def evaluate(vae: Any, pixel_values: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Reconstruction MSE / PSNR (images in [0, 1], posterior mode) and the reconstructions."""
    vae.eval()
    decoded = vae.decode(vae.encode(pixel_values).latent_dist.mode()).sample.clamp(-1, 1)
    mse = float(F.mse_loss((decoded + 1) / 2, (pixel_values + 1) / 2))
    return {"val_mse": mse, "val_psnr": 10 * float(np.log10(1.0 / max(mse, 1e-12)))}, decoded


def _save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    import PIL.Image

    rows = torch.cat([originals, recons], dim=2)  # originals above reconstructions
    grid = torch.cat(list(rows), dim=2)
    array = ((grid.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    check_dataset(args.dataset, args.data_dir, args.train_dataset_path)
    if not args.pretrained_model_name_or_path:
        vae_config(args)  # fail fast on a bad config
    settings = run_settings(args)
    resume_path = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        settings,
        overwrite=args.overwrite_output_dir,
        allow_changed_settings=args.allow_changed_settings,
    )

    from storygptv.data import story_frames

    accelerator = make_accelerator(
        args.output_dir,
        logging_dir=args.logging_dir,
        report_to=args.report_to,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        train_batch_size=args.train_batch_size,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    vae = load_vae(args)
    vae.requires_grad_(True)
    vae.train()
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params,
        learning_rate=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        device=accelerator.device,
    )
    lr_scheduler = make_lr_scheduler(
        args.lr_scheduler,
        optimizer,
        total_steps=args.max_train_steps,
        warmup_steps=args.lr_warmup_steps,
        num_processes=world,
        step_size=args.lr_step_size,
        step_gamma=args.lr_step_gamma,
    )
    ema = make_ema(params, decay=args.ema_decay) if args.use_ema else None

    source = {
        "data_dir": args.data_dir,
        "seed": args.seed,
        "num_stories": args.num_stories,
        "train_dataset_path": args.train_dataset_path,
        **args.dataset_options,
    }
    frames = story_frames(load_train_stories(args.dataset, **source))
    try:
        val_frames = story_frames(load_train_stories(args.dataset, split="validation", **source))
    except (ValueError, FileNotFoundError, KeyError):
        val_frames = frames
    n_val = min(args.num_validation_frames, len(val_frames))
    val_pixels = FrameCollator(args.resolution)([val_frames[i] for i in range(n_val)])["pixel_values"]

    model = VAEWithLoss(vae, args.recon_loss, args.kl_weight)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    sampler = ResumableBatchSampler(
        len(frames), args.train_batch_size, seed=args.seed, num_replicas=world, rank=rank
    )
    global_step = resume_training(
        accelerator,
        resume_path,
        sampler,
        output_dir=args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        overwrite=args.overwrite_output_dir,
    )
    dataloader = make_train_dataloader(
        frames,
        sampler,
        FrameCollator(args.resolution, args.random_flip),
        seed=args.seed,
        num_workers=args.dataloader_num_workers,
    )
    init_trackers(accelerator, args.tracker_project_name or "train_vae", vars(args))
    accelerator.print(
        f"VAE: {len(frames)} frames, {sampler.batches_per_epoch} batches/epoch, "
        f"{sum(p.numel() for p in params) / 1e3:.0f} k parameters, {args.max_train_steps} steps."
    )
    unwrapped = accelerator.unwrap_model(model).vae

    # The loop of every training script (storygptv.training.loop).
    steps = StepLogger(
        accelerator,
        args.max_train_steps,
        initial_step=global_step,
        accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
    )
    data_iter = iter(dataloader)
    micro = sampler.start_batch
    while global_step < args.max_train_steps:
        batch = next_batch(data_iter, micro)
        generator = seed_micro_step(args.seed, "posterior", micro, rank)
        with accelerator.accumulate(model):
            pixels = batch["pixel_values"].to(accelerator.device)
            loss, rec, kl = model(pixels, generator)
            optimizer_step(accelerator, loss, optimizer, lr_scheduler, params, args.max_grad_norm)
        steps.add(loss=loss, loss_rec=rec, loss_kl=kl)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        # One optimizer step done.
        global_step += 1
        if ema is not None:
            ema.step(params)
        steps.end_step(global_step, lr_scheduler.get_last_lr()[0])
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(
                accelerator, args.output_dir, global_step, settings, total_limit=args.checkpoints_total_limit
            )
        if global_step == args.debug_interrupt_at_step:
            raise KeyboardInterrupt(f"--debug_interrupt_at_step {global_step}")
        if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process:
                metrics, _ = evaluate(unwrapped, val_pixels.to(accelerator.device))
                accelerator.log(metrics, step=global_step)
            unwrapped.train()
    steps.close()

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)
    if args.debug_dump_rank_hash:
        dump_rank_hash(args.output_dir, rank, unwrapped)
    result = {"output_dir": args.output_dir, **steps.summary()}
    if accelerator.is_main_process:
        metrics, recons = evaluate(unwrapped, val_pixels.to(accelerator.device))
        accelerator.log(metrics, step=global_step)
        result["metrics"] = metrics
        _save_grid(val_pixels[:8], recons[:8], Path(args.output_dir) / "validation" / "reconstructions.png")
        unwrapped.save_pretrained(args.output_dir, safe_serialization=True)
        scrub_local_paths(args.output_dir)
        card_keys = (
            "learning_rate",
            "lr_scheduler",
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "resolution",
            "recon_loss",
            "kl_weight",
            "use_ema",
            "seed",
        )
        write_model_card(
            args.output_dir,
            "vae",
            repo_id=args.hub_model_id,
            base_model=args.pretrained_model_name_or_path,
            dataset=card_dataset_name(args.dataset, args.train_dataset_path, args.data_dir),
            hyperparameters={k: getattr(args, k) for k in card_keys}
            | {"block_out_channels": list(unwrapped.config.block_out_channels)},
            metrics={"validation frames": n_val, **metrics, "optimizer steps": global_step},
            latent_channels=unwrapped.config.latent_channels,
        )
        if args.push_to_hub:
            result["hub_commit"] = push_folder_to_hub(
                args.output_dir,
                hub_repo_id(args.hub_model_id, args.output_dir),
                token=args.hub_token,
                private=args.hub_private or None,
            )
    finish_training(accelerator, args.output_dir, steps)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TrainingSetupError as error:
        sys.exit(f"error: {error}")
