"""Char-LDM: Stable Diffusion conditioned on captions whose character names carry reference images."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPVisionModelWithProjection, PreTrainedTokenizerBase

from ..models.fuser import CharacterFuser
from .char_ldm_mixin import CharLDMMixin
from .mutual_consistency import check_character_masks, check_consistency

__all__ = ["CharLDMPipeline", "CharLDMPipelineOutput"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import storygptv
        >>> from storygptv import CharLDMPipeline
        >>> from storygptv.data.synthsv import reference_images

        >>> pipe = CharLDMPipeline.from_pretrained(storygptv.DEFAULT_MODEL)  # its Char-LDM components
        >>> refs = reference_images()
        >>> image = pipe(
        ...     "Ava and Bo are jumping in the forest.",
        ...     characters={"Ava": refs["Ava"], "Bo": refs["Bo"]},
        ...     num_inference_steps=30,
        ... ).images[0]

        ```
"""


@dataclass
class CharLDMPipelineOutput(BaseOutput):
    """Output of :class:`CharLDMPipeline`.

    Attributes:
        images: a list of PIL images, a numpy array (N, H, W, 3), a tensor (N, 3, H, W), or latents,
            following ``output_type``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class CharLDMPipeline(CharLDMMixin, DiffusionPipeline):
    r"""Character-aware latent diffusion (stage 1 of StoryGPT-V, arXiv 2312.02252).

    Each character named in a caption is fused with the CLIP image embedding of its reference image at
    the last sub-token of its name (see :func:`storygptv.encode_fused_prompt`), and the UNet denoises
    with that conditioning. *Delayed conditioning*: the first ``start_merge_step`` denoising steps use
    the plain caption embedding, which settles the layout; the remaining steps use the fused one.

    Args:
        vae: the ``AutoencoderKL``.
        text_encoder: the frozen ``CLIPTextModel``.
        tokenizer: its (fast) tokenizer.
        unet: the ``UNet2DConditionModel`` trained on fused conditionings.
        scheduler: any diffusers scheduler.
        image_encoder: ``CLIPVisionModelWithProjection`` that embeds the reference images.
        fuser: the :class:`CharacterFuser`.
        feature_extractor: the CLIP image processor for the reference images (optional).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->fuser->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection,
        fuser: CharacterFuser,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__()
        self.register_components(locals())

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        character_embeds: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor] | None] | None = None,
        start_merge_step: int | None = None,
        max_characters: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        consistency: str | None = None,
        character_masks: list[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        mutual_attention: str = "cache",
        mutual_attention_weight: float = 1.0,
        character_descriptions: Mapping[str, str] | None = None,
    ) -> CharLDMPipelineOutput | tuple:
        r"""Generate one image per caption (times ``num_images_per_prompt``).

        Args:
            prompt: a caption or a list of captions.
            characters: ``{name: reference image}`` shared by all captions, or one such dict per caption.
                Images may be PIL images, file paths, uint8 arrays (H, W, 3) or tensors (3, H, W) in [0, 1].
                Names are matched case-insensitively as whole words; see :func:`storygptv.encode_fused_prompt`.
            negative_prompt: the negative caption(s) for classifier-free guidance (default ``""``).
            height, width: image size in pixels, divisible by the VAE scale factor (default: the UNet's
                sample size times that factor).
            num_inference_steps: denoising steps (30 in the paper).
            guidance_scale: classifier-free guidance weight (5 in the paper); ``<= 1`` disables guidance.
            num_images_per_prompt: images per caption.
            generator: a ``torch.Generator`` (or one per image) for reproducible results.
            latents: initial noise (batch, C, h, w), instead of sampling it.
            prompt_embeds: the precomputed (fused) conditioning, instead of ``prompt``.
            text_embeds: with ``prompt_embeds``, the plain caption embedding the steps before
                ``start_merge_step`` use (the delayed conditioning); without it, every step uses
                ``prompt_embeds``.
            negative_prompt_embeds: the precomputed negative embedding.
            character_embeds: precomputed ``{name: image embedding}`` (:meth:`encode_characters`) instead of
                ``characters``; the frames are the same.
            start_merge_step: the first loop iteration that uses the fused conditioning; earlier ones use
                the plain caption embedding. ``None`` means ``num_inference_steps // 2``; ``0`` fuses from
                the start.
            max_characters: most characters fused per caption (default: the fuser's ``max_characters``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`CharLDMPipelineOutput` rather than a tuple.
            cross_attention_kwargs: passed to the UNet's attention processors.
            callback_on_step_end: called as ``callback(pipe, step, timestep, callback_kwargs)`` after every
                step; it returns a dict that may replace ``latents`` / ``prompt_embeds`` /
                ``negative_prompt_embeds``.
            callback_on_step_end_tensor_inputs: which tensors the callback receives (default ``["latents"]``).
            consistency: ``None`` (default) or ``"mutual"``: each character with a mask attends, inside its mask,
                to its portrait in self-attention (MMSA) and to its description in cross-attention (MMCA), as in
                DreamStory; see :mod:`storygptv.attention.mutual`. The portrait is the character's reference image
                in ``characters``, VAE-encoded and noised to each step (exact identity, no extra sampling chain,
                the images' generator untouched). Images without masks are drawn as with ``None``.
            character_masks: with ``consistency="mutual"``, per caption ``None`` or ``{name: mask or box}`` (a
                list with one entry per caption, or one dict for a single caption): a 2-D mask at the image's
                aspect ratio, or a box ``(x0, y0, x1, y1)`` in pixels (floats in [0, 1]: fractions). A pixel
                belongs to at most one character (largest coverage, ties to the earlier name). ``None`` (the whole
                argument): each caption's named characters get masks from their cross-attention at an early step
                (:meth:`attention_masks`); a caption that names none is drawn as with ``consistency=None``.
            mutual_attention: ``"cache"`` (default): the portraits' keys / values are recorded once per call for
                every step and reused; ``"recompute"``: the portraits are denoised in the same batch at every step.
            mutual_attention_weight: how much more a character's pixels attend to its portrait and description
                than DreamStory's plain joint softmax gives (``log(weight)`` is added to their attention logits;
                default 1: none).
            character_descriptions: ``{name: portrait prompt}`` (default: the name), the portraits' conditioning
                and the MMCA description.

        Returns:
            :class:`CharLDMPipelineOutput` (or ``(images,)`` when ``return_dict=False``).
        """
        # 1. Check inputs and set the call's parameters
        if prompt_embeds is not None and prompt is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if text_embeds is not None and prompt_embeds is None:
            raise ValueError("`text_embeds` goes with `prompt_embeds`; with `prompt` it is computed.")
        explicit_merge_step = start_merge_step
        height, width, start_merge_step, callback_on_step_end_tensor_inputs = self.prepare_call(locals())
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
        self.check_generator(generator)
        check_consistency(consistency, mutual_attention, mutual_attention_weight)
        num_prompts = (
            prompt_embeds.shape[0] if prompt_embeds is not None else len(self.as_prompt_list(prompt))
        )
        cast = {}
        for entry in characters if isinstance(characters, list | tuple) else [characters]:
            if isinstance(entry, Mapping):
                cast.update(entry)
        if character_masks is not None and consistency != "mutual":
            raise ValueError(
                "`character_masks` are used with `consistency='mutual'`; pass that too, or no masks."
            )
        masks = check_character_masks(
            character_masks,
            num_prompts,
            height,
            width,
            list(cast),
            max_characters or self.fuser.config.max_characters,
        )
        device = self._execution_device

        # 2. Encode the captions: fused conditioning + the plain embedding of the delayed conditioning
        if prompt_embeds is None:
            prompts = self.as_prompt_list(prompt)
            encoded = self.encode_fused(
                prompts,
                characters,
                max_characters=max_characters,
                device=device,
                character_embeds=character_embeds,
            )
            fused_embeds, text_embeds = encoded.prompt_embeds, encoded.text_embeds
        else:
            fused_embeds = prompt_embeds.to(device)
            if text_embeds is None:
                if explicit_merge_step:
                    raise ValueError(
                        "`start_merge_step` needs the plain caption embedding of the first steps: pass "
                        "`text_embeds` with `prompt_embeds` (e.g. from `pipe.encode_fused(...)`)."
                    )
                start_merge_step = 0  # no plain embedding: every step uses prompt_embeds
                text_embeds = fused_embeds
            text_embeds = text_embeds.to(device)

        # 3. Encode the negative prompt and repeat per image
        fused_embeds, negative_prompt_embeds = self.encode_prompt(
            None,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=fused_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        text_embeds = text_embeds.repeat_interleave(num_images_per_prompt, dim=0)

        # 4. Prepare the latents
        latents = self.prepare_latents(
            fused_embeds.shape[0],
            self.unet.config.in_channels,
            height,
            width,
            fused_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. consistency="mutual": each image's masks (the user's, or, without them, from the early cross-attention
        #    of the caption's named characters) and the portraits (reference latents, descriptions, cache)
        mutual = None
        if consistency == "mutual":
            if character_masks is None:
                if prompt is None:
                    raise ValueError(
                        "`consistency='mutual'` with `prompt_embeds` needs `character_masks`: the automatic masks "
                        "come from the names' tokens in the caption."
                    )
                prompts = self.as_prompt_list(prompt)
                image_masks = [
                    self.attention_masks(
                        latents[b : b + 1],
                        prompts[b // num_images_per_prompt],
                        text_embeds[b : b + 1],
                        negative_prompt_embeds[b : b + 1] if negative_prompt_embeds is not None else None,
                        list(cast),
                        num_inference_steps,
                        height,
                        width,
                        device,
                    )
                    for b in range(latents.shape[0])
                ]
            else:
                image_masks = [masks[b // num_images_per_prompt] for b in range(latents.shape[0])]
            names = [name for name in cast if any(name in frame for frame in image_masks)]
            if names:
                mutual = self.prepare_mutual_consistency(
                    cast,
                    names,
                    character_descriptions,
                    negative_prompt if isinstance(negative_prompt, str) else None,
                    height,
                    width,
                    num_inference_steps,
                    mutual_attention,
                    device,
                    extra_weight=mutual_attention_weight,
                )

        # 6. Denoise with delayed conditioning
        try:
            if mutual is not None:
                mutual.set_scenes(image_masks)
            latents = self.denoise(
                latents,
                text_embeds,
                fused_embeds,
                negative_prompt_embeds,
                num_inference_steps,
                start_merge_step,
                device,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
                mutual=mutual,
            )
        finally:
            if mutual is not None:
                mutual.close()

        # 7. Decode and post-process
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return CharLDMPipelineOutput(images=images)


CharLDMPipeline.__call__.__doc__ = (CharLDMPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
