"""Tiny random Char-LDM components (32x32 images, 16x16 latents)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..models.fuser import CharacterFuser
from .tokenizers import build_bpe_tokenizer

__all__ = ["tiny_char_ldm_components", "tiny_unet", "tiny_vae"]

TEXT_DIM = 32
IMAGE_EMBED_DIM = 32


def tiny_unet(cross_attention_dim: int = TEXT_DIM, sample_size: int = 16) -> UNet2DConditionModel:
    """A UNet with Stable Diffusion 1.5's block layout (so the default L_reg layers exist), 8-16 channels."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def tiny_vae(sample_size: int = 32) -> AutoencoderKL:
    """A two-level VAE (scale factor 2), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
    )


def tiny_char_ldm_components(seed: int = 0) -> dict[str, Any]:
    """Random components for ``CharLDMPipeline(**components)``: 32x32 images, fully offline.

    Every module is built after ``torch.manual_seed(seed)`` (so two calls with the same seed give
    identical weights) and put in eval mode.

    Example:
        >>> from storygptv import CharLDMPipeline
        >>> from storygptv.testing import tiny_char_ldm_components
        >>> pipe = CharLDMPipeline(**tiny_char_ldm_components())
        >>> pipe.set_progress_bar_config(disable=True)
        >>> pipe("Fred is here.", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    tokenizer = build_bpe_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=TEXT_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=IMAGE_EMBED_DIM,
        )
    )
    torch.manual_seed(seed + 2)
    unet = tiny_unet()
    torch.manual_seed(seed + 3)
    vae = tiny_vae()
    torch.manual_seed(seed + 4)
    fuser = CharacterFuser(text_embed_dim=TEXT_DIM, image_embed_dim=IMAGE_EMBED_DIM)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    modules = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "image_encoder": image_encoder,
        "fuser": fuser,
        "feature_extractor": feature_extractor,
    }
    for module in modules.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return modules
