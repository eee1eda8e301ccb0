#!/usr/bin/env python
"""Stage 1 of StoryGPT-V: train a Char-LDM (``storygptv.CharLDMPipeline``).

Trained: the whole UNet, the character fuser, the last ``--train_image_encoder_layers`` layers of the
CLIP vision tower (with its post-layernorm and projection) and, optionally, the text encoder.

Loss (method notes 2.2): ``MSE(eps_pred, eps)`` (optionally min-SNR weighted, optionally masked by the
union of the character masks with probability ``--mask_loss_prob``) ``+ --reg_weight * L_reg``, where
L_reg pulls each fused token's cross-attention into its character's mask on the ``attn2`` layers of
``--attention_blocks``. The 10 / 10 / 80 unconditional / text-only / fused mix comes from the collator.

Start from a Char-LDM folder or Hub id, or from Stable Diffusion 1.5 plus ``--image_encoder_name_or_path``
(a new fuser is created)::

    accelerate launch training_scripts/train_char_ldm.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset flintstones --data_dir data/flintstones --output_dir outputs/char-ldm-flintstones \
        --mixed_precision bf16 --train_batch_size 32 --max_train_steps 100000

Determinism: the data order, the collator's randomness, the noise and the timesteps of micro-step ``i``
depend only on ``(--seed, i, rank)``; a run resumed with ``--resume_from_checkpoint latest`` ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from storygptv import CharacterFuser, CharLDMPipeline, install_character_attention_processors
from storygptv.attention import character_attention_loss
from storygptv.training_utils import (
    TrainingSetupError,
    add_running,
    card_dataset_name,
    check_dataset_args,
    check_pipeline_folder,
    dump_rank_hash,
    end_of_step_checkpoint,
    end_optimizer_step,
    find_resume_checkpoint,
    finish_training,
    init_trackers,
    load_train_stories,
    log_running_means,
    make_accelerator,
    make_batch_sampler,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    make_train_dataloader,
    next_batch,
    optimizer_step,
    prepare_training,
    progress_bar,
    push_output_to_hub,
    resume_training,
    scrub_local_paths,
    seed_micro_step,
    setup_logging,
    training_arg_parser,
    training_result,
    weight_dtype_for,
    write_model_card,
)

logger = logging.getLogger("train_char_ldm")

CHAR_LDM_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder", "fuser")
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


# ------------------------------------------------------------------------------------------------ args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_arg_parser(
        __doc__, learning_rate=1e-5, train_batch_size=32, lr_scheduler="constant", lr_warmup_steps=0
    )
    g = parser.add_argument_group("Char-LDM")
    g.add_argument(
        "--image_encoder_name_or_path",
        type=str,
        default="openai/clip-vit-large-patch14",
        help="CLIP vision tower used when starting from a Stable Diffusion model (ignored for a Char-LDM).",
    )
    g.add_argument("--max_characters", type=int, default=4, help="Fused characters per caption (new fuser).")
    g.add_argument("--resolution", type=int, default=512, help="Training image side.")
    g.add_argument(
        "--reference_size", type=int, default=None, help="Reference-crop side (default: the image encoder's)."
    )
    g.add_argument("--train_image_encoder_layers", type=int, default=2, help="0 freezes the image encoder.")
    g.add_argument(
        "--train_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Train the text encoder (default: off as in the paper; on for --dataset synthsv).",
    )
    g.add_argument("--reg_weight", type=float, default=1e-3, help="Weight of L_reg (0 disables it).")
    g.add_argument(
        "--attention_blocks",
        nargs="+",
        default=["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"],
        help="UNet blocks whose attn2 layers enter L_reg (default: the 11 SD-1.5 layers).",
    )
    g.add_argument(
        "--mask_loss_prob",
        type=float,
        default=0.0,
        help="Probability per batch of the masked denoising loss (off; the public code uses 0.3).",
    )
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (e.g. 5).")
    g.add_argument("--uncondition_prob", type=float, default=0.1)
    g.add_argument("--text_only_prob", type=float, default=0.1)
    g.add_argument("--text_only_rule", choices=["any", "le1"], default="any")
    g.add_argument("--drop_charless_frames", action="store_true")
    g.add_argument(
        "--augment_references",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Augment the reference crops (zoom, rotation, jitter, blur, grayscale, flip).",
    )
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights (exported).")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--validation_prompts", nargs="+", default=None)
    g.add_argument(
        "--validation_steps", type=int, default=500, help="Validate every N steps (and at the end)."
    )
    g.add_argument("--validation_inference_steps", type=int, default=30)
    g.add_argument("--validation_guidance_scale", type=float, default=5.0)
    g.add_argument(
        "--validation_reference_dir",
        type=str,
        default=None,
        help="Folder of <Name>.png reference images (default for SynthSV: its rendered references).",
    )
    g.add_argument("--debug_interrupt_at_step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_text_encoder is None:
        args.train_text_encoder = args.dataset == "synthsv" and not args.train_dataset_path
    if not 0.0 <= args.mask_loss_prob <= 1.0:
        parser.error("--mask_loss_prob must be in [0, 1].")
    if args.train_image_encoder_layers < 0:
        parser.error("--train_image_encoder_layers must be >= 0.")
    return args


# ----------------------------------------------------------------------------------------------- model
def _model_index(name_or_path: str) -> dict[str, Any]:
    local = Path(name_or_path)
    if local.is_dir():
        return check_pipeline_folder(local)
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(name_or_path, "model_index.json")).read_text())
    except Exception as error:  # offline, unknown repo, invalid id...
        raise TrainingSetupError(
            f"--pretrained_model_name_or_path {name_or_path!r} is neither a local folder nor a Hub repo with "
            f"a model_index.json that can be fetched ({type(error).__name__}: {error})."
        ) from error


def load_pipeline(args: argparse.Namespace) -> tuple[CharLDMPipeline, bool]:
    """The starting pipeline and whether it is a Char-LDM (``False``: SD-1.5 plus a new fuser)."""
    name = args.pretrained_model_name_or_path
    if not name:
        raise TrainingSetupError(
            "--pretrained_model_name_or_path is required (a Char-LDM or SD-1.5 folder / id)."
        )
    index = _model_index(name)
    if index.get("fuser") and index["fuser"][0] is not None:
        if Path(name).is_dir():
            check_pipeline_folder(name, CHAR_LDM_COMPONENTS)
        return CharLDMPipeline.from_pretrained(name), True
    if Path(name).is_dir():
        check_pipeline_folder(name, SD_COMPONENTS)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPVisionModelWithProjection

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(args.image_encoder_name_or_path)
    try:
        from transformers import CLIPImageProcessor

        feature_extractor = CLIPImageProcessor.from_pretrained(args.image_encoder_name_or_path)
    except (OSError, ValueError):
        feature_extractor = None
    text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder")
    fuser = CharacterFuser(
        text_embed_dim=text_encoder.config.hidden_size,
        image_embed_dim=image_encoder.config.projection_dim,
        max_characters=args.max_characters,
    )
    pipe = CharLDMPipeline(
        vae=AutoencoderKL.from_pretrained(name, subfolder="vae"),
        text_encoder=text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet"),
        scheduler=DDPMScheduler.from_pretrained(name, subfolder="scheduler"),
        image_encoder=image_encoder,
        fuser=fuser,
        feature_extractor=feature_extractor,
    )
    return pipe, False


def set_trainable(pipe: CharLDMPipeline, args: argparse.Namespace) -> list[str]:
    """Freeze / unfreeze per the options; returns a readable list of the trained modules."""
    for module in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False)
    pipe.unet.requires_grad_(True)
    pipe.fuser.requires_grad_(True)
    trained = ["unet", "fuser"]
    n = args.train_image_encoder_layers
    if n > 0:
        vision = pipe.image_encoder.vision_model
        layers = vision.encoder.layers
        if n > len(layers):
            raise TrainingSetupError(
                f"--train_image_encoder_layers {n} exceeds the {len(layers)} layers of the image encoder."
            )
        for layer in layers[len(layers) - n :]:
            layer.requires_grad_(True)
        vision.post_layernorm.requires_grad_(True)
        pipe.image_encoder.visual_projection.requires_grad_(True)
        trained.append(f"image_encoder (last {n} layers + post-layernorm + projection)")
    if args.train_text_encoder:
        pipe.text_encoder.requires_grad_(True)
        trained.append("text_encoder")
    return trained


class CharLDMTrainModel(nn.Module):
    """The trained modules in one ``nn.Module`` (one DDP wrapper) with the conditioning + UNet forward."""

    def __init__(self, pipe: CharLDMPipeline, attention_blocks: list[str] | None):
        super().__init__()
        self.unet = pipe.unet
        self.fuser = pipe.fuser
        self.image_encoder = pipe.image_encoder
        self.text_encoder = pipe.text_encoder
        self.store = (
            install_character_attention_processors(self.unet, attention_blocks) if attention_blocks else None
        )

    def encode(
        self, input_ids: torch.Tensor, token_indices: torch.Tensor, references: torch.Tensor
    ) -> torch.Tensor:
        """Caption embeddings with each fused slot's reference embedding fused at its token."""
        text_embeds = self.text_encoder(input_ids)[0]
        valid = token_indices >= 0
        if not bool(valid.any()):
            return text_embeds
        batch, slots = token_indices.shape
        pixels = references[valid].to(dtype=next(self.image_encoder.parameters()).dtype)
        embeds = self.image_encoder(pixel_values=pixels).image_embeds
        image_embeds = embeds.new_zeros(batch, slots, embeds.shape[-1])
        image_embeds[valid] = embeds
        return self.fuser(text_embeds, image_embeds, token_indices)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        token_indices: torch.Tensor,
        references: torch.Tensor,
        capture: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.encode(input_ids, token_indices, references)
        if capture and self.store is not None:
            with self.store.capture(token_indices):
                pred = self.unet(noisy_latents, timesteps, hidden).sample
            return pred, dict(self.store.maps)
        return self.unet(noisy_latents, timesteps, hidden).sample, {}


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE over all elements; ``mask`` (B, 1, h, w) multiplies both sides first (no area normalisation);
    ``weights`` (B,) are per-sample min-SNR weights."""
    pred, target = pred.float(), target.float()
    if mask is not None:
        pred, target = pred * mask, target * mask
    if weights is None:
        return F.mse_loss(pred, target)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def union_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft union of the character masks (B, K, R, R) resized bilinearly to the latent: (B, 1, h, w)."""
    union = masks.float().amax(dim=1, keepdim=True)
    return F.interpolate(union, size=size, mode="bilinear", align_corners=False)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) for epsilon or v prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1)
    return weights


# ------------------------------------------------------------------------------------------- validation
def _validation_references(args: argparse.Namespace) -> dict[str, Any]:
    import PIL.Image

    if args.validation_reference_dir:
        refs = {}
        for path in sorted(Path(args.validation_reference_dir).iterdir()):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                refs[path.stem] = PIL.Image.open(path).convert("RGB")
        return refs
    if args.dataset == "synthsv":
        from storygptv.data.synthsv import reference_images

        return reference_images()
    return {}


def run_validation(pipe: CharLDMPipeline, args: argparse.Namespace, accelerator: Any, step: int) -> list[Any]:
    refs = _validation_references(args)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(args.validation_prompts):
        named = {name: image for name, image in refs.items() if name.lower() in prompt.lower()}
        generator = torch.Generator(device="cpu").manual_seed(args.seed + i)
        with torch.no_grad():
            image = pipe(
                prompt,
                characters=named or None,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                generator=generator,
            ).images[0]
        images.append(image)
    folder = Path(args.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    return images


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    # Every check that can fail runs before the long work.
    check_dataset_args(args)
    if args.pretrained_model_name_or_path and Path(args.pretrained_model_name_or_path).is_dir():
        check_pipeline_folder(args.pretrained_model_name_or_path)
    resume_path = find_resume_checkpoint(args)

    from diffusers import DDPMScheduler

    from storygptv.data import CharLDMCollator, story_frames

    accelerator = make_accelerator(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    pipe, was_char_ldm = load_pipeline(args)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trained_modules = set_trainable(pipe, args)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    pipe.vae.to(accelerator.device)
    if weight_dtype != torch.float32:
        pipe.vae.to(dtype=weight_dtype)
        if not args.train_text_encoder:
            pipe.text_encoder.to(dtype=weight_dtype)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    model = CharLDMTrainModel(pipe, args.attention_blocks if args.reg_weight > 0 else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args)
    lr_scheduler = make_lr_scheduler(args, optimizer)
    ema = make_ema(params, decay=args.ema_decay) if args.use_ema else None

    # Data (one row per frame), collated with per-batch seeds.
    stories = load_train_stories(args)
    frames = story_frames(stories)
    reference_size = args.reference_size or int(getattr(pipe.image_encoder.config, "image_size", 224))
    collator = CharLDMCollator(
        pipe.tokenizer,
        resolution=args.resolution,
        reference_size=reference_size,
        max_characters=int(pipe.fuser.config.max_characters),
        uncondition_prob=args.uncondition_prob,
        text_only_prob=args.text_only_prob,
        text_only_rule=args.text_only_rule,
        drop_charless_frames=args.drop_charless_frames,
        augment=args.augment_references,
        seed=args.seed,
    )

    model, optimizer = prepare_training(accelerator, model, optimizer, lr_scheduler, ema)

    sampler = make_batch_sampler(len(frames), args, accelerator)
    global_step = resume_training(accelerator, args, resume_path, sampler)
    dataloader = make_train_dataloader(frames, sampler, collator, args)
    init_trackers(accelerator, args, "train_char_ldm")
    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    accelerator.print(
        f"Char-LDM: {len(frames)} frames, {sampler.batches_per_epoch} batches/epoch, total batch {total_batch}, "
        f"{args.max_train_steps} steps, trained: {', '.join(trained_modules)}; "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters."
    )

    vae = pipe.vae
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    progress = progress_bar(accelerator, args, global_step)
    model.train()
    running: dict[str, float] = {}
    last_logs: dict[str, float] = {}
    step_start = time.perf_counter()
    step_times: list[float] = []
    data_iter = iter(dataloader)
    micro = sampler.start_batch
    while global_step < args.max_train_steps:
        batch = next_batch(data_iter, micro)
        generator = seed_micro_step(args, "noise", micro, rank)
        device = accelerator.device
        with accelerator.accumulate(model):
            pixel_values = batch["pixel_values"].to(device, dtype=weight_dtype)
            with torch.no_grad():
                latents = vae.encode(pixel_values).latent_dist.sample(generator=generator)
                latents = ((latents - shift) * scaling).float()
            noise = torch.randn(latents.shape, generator=generator).to(device)
            bsz = latents.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator
            ).to(device)
            use_mask = (
                args.mask_loss_prob > 0 and float(torch.rand((), generator=generator)) < args.mask_loss_prob
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            condition = batch["condition"].to(device)
            token_indices = batch["character_token_indices"].to(device)
            token_indices = torch.where(
                condition.unsqueeze(1) == 2, token_indices, torch.full_like(token_indices, -1)
            )
            masks = batch["character_masks"].to(device)
            valid = (token_indices >= 0) & (masks.flatten(2).amax(-1) > 0)
            capture = args.reg_weight > 0 and bool(valid.any())
            pred, maps = model(
                noisy,
                timesteps,
                batch["input_ids"].to(device),
                token_indices,
                batch["reference_pixel_values"].to(device),
                capture,
            )
            weights = min_snr_weights(noise_scheduler, timesteps, args.snr_gamma) if args.snr_gamma else None
            mask = union_mask(masks, tuple(latents.shape[-2:])) if use_mask else None
            loss_mse = denoising_loss(pred, target, weights, mask)
            loss_reg = character_attention_loss(maps, masks, valid) if maps else pred.new_zeros(())
            loss = loss_mse + args.reg_weight * loss_reg
            # (max_grad_norm <= 0: no clipping)
            optimizer_step(accelerator, loss, optimizer, model.parameters(), max(args.max_grad_norm, 0.0))
        parts = {"loss": loss, "loss_mse": loss_mse, "loss_reg": loss_reg}
        add_running(running, parts, args.gradient_accumulation_steps)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        # One optimizer step done.
        step_start = end_optimizer_step(lr_scheduler, ema, params, progress, step_times, step_start)
        global_step += 1
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            last_logs = log_running_means(accelerator, running, lr_scheduler, step_times[-1], global_step)
            progress.set_postfix(loss=f"{last_logs['loss']:.4f}", reg=f"{last_logs['loss_reg']:.4f}")
        running = {}
        end_of_step_checkpoint(accelerator, args, global_step)
        if (
            args.validation_prompts
            and accelerator.is_main_process
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
        ):
            _validate(accelerator, model, pipe, ema, params, args, global_step)
    progress.close()

    # Final export (EMA weights when on).
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(params)
    dump_rank_hash(args, rank, unwrapped)
    result = training_result(args, global_step, last_logs, step_times)
    if accelerator.is_main_process:
        final = export_pipeline(pipe, unwrapped, args)
        if args.validation_prompts:
            run_validation(final, args, accelerator, global_step)
        write_model_card(
            args.output_dir,
            "char_ldm",
            repo_id=args.hub_model_id,
            base_model=args.pretrained_model_name_or_path
            if was_char_ldm
            else [args.pretrained_model_name_or_path, args.image_encoder_name_or_path],
            dataset=card_dataset_name(args),
            hyperparameters=_card_hyperparameters(args, total_batch),
            metrics={f"final {k}": v for k, v in last_logs.items() if k.startswith("loss")}
            | {"optimizer steps": global_step},
            trained_modules=", ".join(trained_modules),
            objective_extra=_objective_text(args),
        )
        if args.push_to_hub:
            result["hub_commit"] = push_output_to_hub(args)
    finish_training(accelerator, args, result)
    return result


def _validate(accelerator, model, pipe, ema, params, args, step) -> None:
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        run_validation(_inference_pipeline(pipe, unwrapped), args, accelerator, step)
    finally:
        if ema is not None:
            ema.restore(params)
        unwrapped.train()


def _inference_pipeline(pipe: CharLDMPipeline, unwrapped: CharLDMTrainModel) -> CharLDMPipeline:
    return CharLDMPipeline(
        vae=pipe.vae,
        text_encoder=unwrapped.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unwrapped.unet,
        scheduler=pipe.scheduler,
        image_encoder=unwrapped.image_encoder,
        fuser=unwrapped.fuser,
        feature_extractor=pipe.feature_extractor,
    )


def export_pipeline(
    pipe: CharLDMPipeline, unwrapped: CharLDMTrainModel, args: argparse.Namespace
) -> CharLDMPipeline:
    """Save the trained pipeline (fp32, safetensors) into ``--output_dir``."""
    for module in (
        unwrapped.unet,
        unwrapped.fuser,
        unwrapped.image_encoder,
        unwrapped.text_encoder,
        pipe.vae,
    ):
        if module.dtype != torch.float32:
            module.to(torch.float32)
        module.eval()
    final = _inference_pipeline(pipe, unwrapped)
    final.save_pretrained(args.output_dir, safe_serialization=True)
    scrub_local_paths(args.output_dir)
    return final


def _objective_text(args: argparse.Namespace) -> str:
    parts = []
    if args.snr_gamma:
        parts.append(f" with min-SNR weighting (gamma {args.snr_gamma:g})")
    if args.reg_weight > 0:
        parts.append(
            f" + {args.reg_weight:g} x L_reg on the attn2 layers of {', '.join(args.attention_blocks)}"
        )
    if args.mask_loss_prob > 0:
        parts.append(f"; masked denoising loss with probability {args.mask_loss_prob:g}")
    if args.use_ema:
        parts.append(f"; exported weights are an EMA (decay {args.ema_decay:g})")
    return "".join(parts)


def _card_hyperparameters(args: argparse.Namespace, total_batch: int) -> dict[str, Any]:
    keys = (
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "mixed_precision",
        "resolution",
        "reg_weight",
        "attention_blocks",
        "mask_loss_prob",
        "snr_gamma",
        "uncondition_prob",
        "text_only_prob",
        "text_only_rule",
        "train_image_encoder_layers",
        "train_text_encoder",
        "use_ema",
        "ema_decay",
        "max_grad_norm",
        "seed",
    )
    values = {k: getattr(args, k) for k in keys}
    values["total_batch_size"] = total_batch
    return values


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TrainingSetupError as error:
        sys.exit(f"error: {error}")
