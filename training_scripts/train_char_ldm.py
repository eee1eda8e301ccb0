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

Your own stories: ``--dataset folder --data_dir DIR`` (frames, ``metadata.jsonl`` and ``characters/``; see the
README, "Fine-tune on your own stories"). The exported folder carries its cast in ``characters/``:
``--reference_images_dir``, else the dataset's own references (SynthSV's, or ``DIR/characters``), else those
of the starting pipeline.

Determinism: the data order, the collator's randomness, the noise and the timesteps of micro-step ``i``
depend only on ``(--seed, i, rank)``; a run resumed with ``--resume_from_checkpoint latest`` ends with
the same weights as an uninterrupted one. The loop and its LR-scheduler semantics (schedules count
optimizer steps) are those of every training script: see ``storygptv.training.loop``.

``--cache_latents`` encodes each frame's VAE posterior (mean, std) once, into
``<output_dir>/latent_cache.safetensors``, and draws each step's latent sample from it instead of running the
VAE encoder on every batch. It is valid because the target frame gets no random augmentation here (only
the reference crops are augmented); the cache is rebuilt when the VAE, the data or the resolution change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from storygptv import CharacterFuser, CharLDMPipeline, install_character_attention_processors
from storygptv.attention import character_attention_loss
from storygptv.characters import find_character_mentions
from storygptv.training.accelerate_setup import (
    init_trackers,
    make_accelerator,
    setup_logging,
    weight_dtype_for,
)
from storygptv.training.arguments import run_settings, training_arg_parser
from storygptv.training.checkpoints import dump_rank_hash, save_checkpoint, state_dict_hash
from storygptv.training.checks import TrainingSetupError, check_dataset, check_pipeline_folder
from storygptv.training.data import (
    ResumableBatchSampler,
    load_train_stories,
    make_train_dataloader,
    next_batch,
)
from storygptv.training.diffusion import (
    LatentCache,
    denoising_loss,
    min_snr_weights,
    noisy_latents_and_target,
    sample_latents,
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
from storygptv.training.references import (
    pipeline_cast,
    read_cast_images,
    training_references,
    write_cast,
)
from storygptv.training.resume import find_resume_checkpoint, resume_training

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
    g.add_argument(
        "--max_characters",
        type=int,
        default=None,
        help="Fused characters per caption (default: 4 for a new fuser, a Char-LDM's own otherwise). Raising it "
        "on a Char-LDM teaches it more characters per frame (the fuser's weights do not depend on it).",
    )
    g.add_argument("--resolution", type=int, default=512, help="Training image side.")
    g.add_argument(
        "--reference_size", type=int, default=None, help="Reference-crop side (default: the image encoder's)."
    )
    g.add_argument("--train_image_encoder_layers", type=int, default=2, help="0 freezes the image encoder.")
    g.add_argument(
        "--train_fuser",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Train the fuser. --no-train_fuser --train_image_encoder_layers 0 --no-train_text_encoder trains the "
        "UNet alone, so the conditioning a trained stage 2 was fitted to stays exactly as it was.",
    )
    g.add_argument(
        "--train_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Train the text encoder (default: off as in the paper; on for --dataset synthsv). Pass it to teach "
        "the text side new character names, e.g. when fine-tuning the small default model (whose tokenizer and "
        "text encoder only saw SynthSV captions) on your own stories.",
    )
    g.add_argument(
        "--reference_images_dir",
        type=str,
        default=None,
        help='The cast: a folder of <Name>.png reference images (Mr_Slate.png is "Mr Slate"), written to '
        "<output_dir>/characters/ and used by validation. Default: SynthSV's references, the characters/ of "
        "--dataset folder, else the starting pipeline's characters/.",
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
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every frame's VAE posterior once (<output_dir>/latent_cache.safetensors) and sample the "
        "latents from it (valid: the target frame is not augmented).",
    )
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
        help="Folder of <Name>.png reference images for validation (default: the cast, see "
        "--reference_images_dir).",
    )
    args = parser.parse_args(argv)
    if args.train_text_encoder is None:
        args.train_text_encoder = args.dataset == "synthsv" and not args.train_dataset_path
    if not 0.0 <= args.mask_loss_prob <= 1.0:
        parser.error("--mask_loss_prob must be in [0, 1].")
    if args.train_image_encoder_layers < 0:
        parser.error("--train_image_encoder_layers must be >= 0.")
    if args.max_characters is not None and args.max_characters < 1:
        parser.error("--max_characters must be >= 1.")
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
        pipe = CharLDMPipeline.from_pretrained(name)
        if args.max_characters is not None:
            pipe.fuser.register_to_config(max_characters=args.max_characters)
        return pipe, True
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
        max_characters=args.max_characters or 4,
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
    pipe.fuser.requires_grad_(args.train_fuser)
    trained = ["unet", "fuser"] if args.train_fuser else ["unet"]
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


def union_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft union of the character masks (B, K, R, R) resized bilinearly to the latent: (B, 1, h, w)."""
    union = masks.float().amax(dim=1, keepdim=True)
    return F.interpolate(union, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------- validation
def run_cast(args: argparse.Namespace) -> dict[str, Any]:
    """The run's cast (``{name: image}``): ``--reference_images_dir``, else the dataset's own references,
    else the ``characters/`` of the starting pipeline folder (``{}`` when there is none)."""
    cast = training_references(
        args.reference_images_dir,
        args.dataset,
        args.train_dataset_path,
        data_dir=args.data_dir,
        required=False,
    )
    return cast or pipeline_cast(args.pretrained_model_name_or_path)


def run_validation(
    pipe: CharLDMPipeline, args: argparse.Namespace, accelerator: Any, step: int, refs: dict[str, Any]
) -> list[Any]:
    """Draw ``--validation_prompts`` (each with the references ``refs`` of the characters it names) into
    ``<output_dir>/validation/step-<step>/`` and tensorboard."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(args.validation_prompts):
        named = {m.name: refs[m.name] for m in find_character_mentions(prompt, refs)}
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
    check_dataset(args.dataset, args.data_dir, args.train_dataset_path)
    if args.pretrained_model_name_or_path and Path(args.pretrained_model_name_or_path).is_dir():
        check_pipeline_folder(args.pretrained_model_name_or_path)
    cast = run_cast(args)
    validation_refs = (
        read_cast_images(args.validation_reference_dir, "--validation_reference_dir")
        if args.validation_reference_dir
        else cast
    )
    if not cast:
        logger.warning(
            "No cast: the exported folder gets no characters/ (pass --reference_images_dir, one <Name>.png per "
            "character, so that the CLI draws with reference images)."
        )
    settings = run_settings(args)
    resume_path = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        settings,
        overwrite=args.overwrite_output_dir,
        allow_changed_settings=args.allow_changed_settings,
    )

    from diffusers import DDPMScheduler

    from storygptv.data import CharLDMCollator, story_frames

    accelerator = make_accelerator(
        args.output_dir,
        logging_dir=args.logging_dir,
        report_to=args.report_to,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        train_batch_size=args.train_batch_size,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Models: the frozen VAE (and text encoder unless trained) in the half type under mixed precision.
    pipe, was_char_ldm = load_pipeline(args)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trained_modules = set_trainable(pipe, args)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    vae = pipe.vae
    vae.to(accelerator.device)
    if weight_dtype != torch.float32:
        vae.to(dtype=weight_dtype)
        if not args.train_text_encoder:
            pipe.text_encoder.to(dtype=weight_dtype)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    model = CharLDMTrainModel(pipe, args.attention_blocks if args.reg_weight > 0 else None)
    params = [p for p in model.parameters() if p.requires_grad]
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

    # Data: one row per frame, collated with per-batch seeds (frames without characters dropped up front,
    # so every batch is full).
    stories = load_train_stories(
        args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        num_stories=args.num_stories,
        train_dataset_path=args.train_dataset_path,
        **args.dataset_options,
    )
    frames = story_frames(stories, drop_charless_frames=args.drop_charless_frames)
    reference_size = args.reference_size or int(getattr(pipe.image_encoder.config, "image_size", 224))
    collator = CharLDMCollator(
        pipe.tokenizer,
        resolution=args.resolution,
        reference_size=reference_size,
        max_characters=int(pipe.fuser.config.max_characters),
        uncondition_prob=args.uncondition_prob,
        text_only_prob=args.text_only_prob,
        text_only_rule=args.text_only_rule,
        augment=args.augment_references,
        seed=args.seed,
    )
    latent_cache = build_latent_cache(accelerator, vae, frames, args) if args.cache_latents else None

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
        collator,
        seed=args.seed,
        num_workers=args.dataloader_num_workers,
        with_example_index=latent_cache is not None,
    )
    init_trackers(accelerator, args.tracker_project_name or "train_char_ldm", vars(args))
    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    accelerator.print(
        f"Char-LDM: {len(frames)} frames, {sampler.batches_per_epoch} batches/epoch, total batch {total_batch}, "
        f"{args.max_train_steps} steps, trained: {', '.join(trained_modules)}; "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters."
    )

    # The loop (storygptv.training.loop): one micro-batch per iteration, one optimizer step every
    # --gradient_accumulation_steps of them.
    steps = StepLogger(
        accelerator,
        args.max_train_steps,
        initial_step=global_step,
        accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
    )
    model.train()
    data_iter = iter(dataloader)
    micro = sampler.start_batch
    device = accelerator.device
    while global_step < args.max_train_steps:
        batch = next_batch(data_iter, micro)
        generator = seed_micro_step(args.seed, "noise", micro, rank)
        with accelerator.accumulate(model):
            with torch.no_grad():
                if latent_cache is not None:
                    latents = latent_cache.sample(batch["example_index"], generator, vae.config, device)
                else:
                    pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
                    dist = vae.encode(pixels).latent_dist
                    latents = sample_latents(dist.mean, dist.std, generator, vae.config).float()
            noisy, timesteps, target = noisy_latents_and_target(noise_scheduler, latents, generator)
            use_mask = (
                args.mask_loss_prob > 0 and float(torch.rand((), generator=generator)) < args.mask_loss_prob
            )
            # Only fused frames carry fused tokens (and so L_reg terms).
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
            optimizer_step(accelerator, loss, optimizer, lr_scheduler, params, args.max_grad_norm)
        steps.add(loss=loss, loss_mse=loss_mse, loss_reg=loss_reg)
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
        if (
            args.validation_prompts
            and accelerator.is_main_process
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
        ):
            _validate(accelerator, model, pipe, ema, params, args, global_step, validation_refs)
    steps.close()

    # Final export (EMA weights when on).
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(params)
    if args.debug_dump_rank_hash:
        dump_rank_hash(args.output_dir, rank, unwrapped)
    result = {"output_dir": args.output_dir, **steps.summary()}
    if accelerator.is_main_process:
        final = export_pipeline(pipe, unwrapped, args)
        write_cast(args.output_dir, cast)
        if args.validation_prompts:
            run_validation(final, args, accelerator, global_step, validation_refs)
        write_model_card(
            args.output_dir,
            "char_ldm",
            repo_id=args.hub_model_id,
            base_model=args.pretrained_model_name_or_path
            if was_char_ldm
            else [args.pretrained_model_name_or_path, args.image_encoder_name_or_path],
            dataset=card_dataset_name(args.dataset, args.train_dataset_path, args.data_dir),
            hyperparameters=_card_hyperparameters(args, total_batch),
            metrics={f"final {k}": v for k, v in steps.last_logs.items() if k.startswith("loss")}
            | {"optimizer steps": global_step},
            trained_modules=", ".join(trained_modules),
            objective_extra=_objective_text(args),
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


def build_latent_cache(accelerator: Any, vae: Any, frames: Any, args: argparse.Namespace) -> LatentCache:
    """``--cache_latents``: the main process encodes every frame's posterior once (skipped when the cache of
    ``--output_dir`` was built from the same VAE weights, data and resolution); every process opens it."""
    from storygptv.data.collators import frame_pixel_values

    path = Path(args.output_dir) / "latent_cache.safetensors"
    if accelerator.is_main_process:
        fingerprint = {
            "vae": state_dict_hash(vae),
            "vae_dtype": str(vae.dtype),
            "frames": len(frames),
            "resolution": args.resolution,
            **{
                k: getattr(args, k)
                for k in ("dataset", "data_dir", "train_dataset_path", "num_stories", "seed")
            },
            "drop_charless_frames": args.drop_charless_frames,
        }
        built = LatentCache.build(
            path,
            vae,
            lambda i: frame_pixel_values(frames[i]["image"], args.resolution),
            len(frames),
            fingerprint=fingerprint,
            batch_size=args.train_batch_size,
        )
        accelerator.print(
            f"{'Built' if built else 'Reusing'} the latent cache of {len(frames)} frames: {path}"
        )
    accelerator.wait_for_everyone()
    return LatentCache(path)


def _validate(accelerator, model, pipe, ema, params, args, step, refs) -> None:
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        run_validation(_inference_pipeline(pipe, unwrapped), args, accelerator, step, refs)
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
