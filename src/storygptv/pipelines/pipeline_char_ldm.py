"""Char-LDM: Stable Diffusion conditioned on captions whose character names carry reference images."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPVisionModelWithProjection, PreTrainedTokenizerBase

from ..loading import load_checked
from ..models.fuser import CharacterFuser, FusedPromptOutput, encode_fused_prompt, encode_text

__all__ = ["CharLDMPipeline", "CharLDMPipelineOutput"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import storygptv
        >>> from storygptv import CharLDMPipeline
        >>> from storygptv.data.synthsv import reference_images

        >>> # The lines marked +SKIP need a trained Char-LDM checkpoint, so the doctests skip them.
        >>> pipe = CharLDMPipeline.from_pretrained("path/or/hub-id-of-a-char-ldm")  # doctest: +SKIP
        >>> refs = reference_images()
        >>> image = pipe(  # doctest: +SKIP
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


class CharLDMPipeline(DiffusionPipeline):
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
        feature_extractor: the CLIP image processor for the reference images.
        fuser: the :class:`CharacterFuser`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->fuser->unet->vae"
    _optional_components = ["feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

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
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            fuser=fuser,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """``DiffusionPipeline.from_pretrained`` whose errors name the broken component and file.

        A local folder is checked first (``model_index.json``, each component's folder, config and
        safetensors headers; :func:`storygptv.loading.check_model_folder`), and a failure while loading
        (e.g. a config whose shapes do not match its weights) raises
        :class:`storygptv.loading.ModelLoadingError` naming the component. Hub ids load unchanged.
        """
        return load_checked(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    # ------------------------------------------------------------------ encoding
    def encode_fused(
        self,
        prompt: str | list[str],
        characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None = None,
        max_characters: int | None = None,
        device: torch.device | None = None,
        warn: bool = True,
        warn_absent: bool = True,
    ) -> FusedPromptOutput:
        """Fused and plain caption embeddings of ``prompt`` (see :func:`storygptv.encode_fused_prompt`)."""
        return encode_fused_prompt(
            prompt,
            characters,
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            image_encoder=self.image_encoder,
            fuser=self.fuser,
            feature_extractor=self.feature_extractor,
            max_characters=max_characters,
            device=device or self._execution_device,
            warn=warn,
            warn_absent=warn_absent,
        )

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode captions into the fused conditioning and the negative (unconditional) embedding.

        Returns ``(prompt_embeds, negative_prompt_embeds)``, each repeated ``num_images_per_prompt``
        times; ``negative_prompt_embeds`` is ``None`` without classifier-free guidance.
        """
        if prompt_embeds is None:
            prompt_embeds = self.encode_fused(prompt, characters, device=device).prompt_embeds
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_negative(negative_prompt, batch_size, device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def encode_negative(
        self, negative_prompt: str | list[str] | None, batch_size: int, device: torch.device
    ) -> torch.Tensor:
        """Plain text embedding of ``negative_prompt`` (``""`` by default), one row per prompt."""
        if negative_prompt is None:
            negative_prompt = ""
        negatives = (
            [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        if len(negatives) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negatives)} entries but there are {batch_size} prompts; "
                "pass one negative prompt per prompt or a single string."
            )
        return encode_text(negatives, self.tokenizer, self.text_encoder, device)[0]

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        start_merge_step: int | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer number of pixels, got {value!r}.")
        if height % factor != 0 or width % factor != 0:
            raise ValueError(
                f"`height` and `width` must be divisible by the VAE scale factor {factor}, got "
                f"{height}x{width}; use e.g. {height // factor * factor}x{width // factor * factor}."
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, numbers.Real)
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}; use 0 or 1 to disable "
                "guidance."
            )
        if start_merge_step is not None:
            if isinstance(start_merge_step, bool) or not isinstance(start_merge_step, numbers.Integral):
                raise ValueError(f"`start_merge_step` must be an integer or None, got {start_merge_step!r}.")
            if start_merge_step < 0:
                raise ValueError(f"`start_merge_step` must be >= 0 (or None), got {start_merge_step}.")
            if start_merge_step >= num_inference_steps:
                warnings.warn(
                    f"`start_merge_step` ({start_merge_step}) >= `num_inference_steps` ({num_inference_steps}): "
                    "every step uses the plain caption embedding, so the fused (character / story) conditioning "
                    "is never used. Pass a smaller `start_merge_step` (None: half the steps).",
                    stacklevel=5,  # check_inputs < prepare_call < __call__ < no_grad wrapper < the caller
                )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(
                f"`output_type` must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}."
            )
        unknown = [
            k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}."
            )

    def prepare_call(
        self,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        start_merge_step: int | None,
        output_type: str,
        cross_attention_kwargs: dict[str, Any] | None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> tuple[int, int, int, list[str]]:
        """Resolve the call's defaults, validate them and set the per-call state.

        Returns ``(height, width, start_merge_step, callback_on_step_end_tensor_inputs)``.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if height is None:
            height = self.unet.config.sample_size * self.vae_scale_factor
        if width is None:
            width = self.unet.config.sample_size * self.vae_scale_factor
        if start_merge_step is None:
            start_merge_step = num_inference_steps // 2
        self.check_inputs(
            height,
            width,
            num_inference_steps,
            guidance_scale,
            start_merge_step,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        return height, width, start_merge_step, callback_on_step_end_tensor_inputs

    @staticmethod
    def check_generator(generator: Any, count: int | None = None, what: str = "images") -> None:
        """``generator`` must be None, a ``torch.Generator`` or a list of them (``count`` long when given)."""
        items = generator if isinstance(generator, list) else [generator]
        for item in items:
            if item is not None and not isinstance(item, torch.Generator):
                raise TypeError(
                    f"`generator` must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), a list of "
                    f"them, or None; got {type(item).__name__}."
                )
        if isinstance(generator, list) and count is not None and len(generator) != count:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators for {count} {what}; pass one per "
                f"{what[:-1]}, or a single generator."
            )

    @staticmethod
    def _as_prompt_list(prompt: str | list[str] | None, name: str = "prompt") -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list | tuple):
            raise TypeError(f"`{name}` must be a string or a list of strings, got {type(prompt).__name__}.")
        if len(prompt) == 0:
            raise ValueError(f"`{name}` is an empty list; pass at least one caption.")
        for index, text in enumerate(prompt):
            if not isinstance(text, str):
                raise TypeError(
                    f"`{name}[{index}]` has type {type(text).__name__}; every caption must be a string."
                )
        return list(prompt)

    # ------------------------------------------------------------------ denoising
    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (
            batch_size,
            num_channels_latents,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has {batch_size} images; "
                "pass one generator per image, or a single generator."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def denoise(
        self,
        latents: torch.Tensor,
        text_embeds: torch.Tensor,
        fused_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        num_inference_steps: int,
        start_merge_step: int,
        device: torch.device,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        show_progress: bool = True,
    ) -> torch.Tensor:
        """Run the sampler with delayed conditioning and return the final latents.

        Loop iteration ``i < start_merge_step`` conditions on ``text_embeds``; from ``start_merge_step``
        on, on ``fused_embeds``. (The public StoryGPT-V code uses ``i <= start_merge_step``; our
        ``start_merge_step + 1`` reproduces it.)
        """
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        bar = (
            self.progress_bar(total=len(timesteps))
            if show_progress
            else tqdm(total=len(timesteps), disable=True)
        )
        with bar as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                prompt_embeds = text_embeds if i < start_merge_step else fused_embeds
                if self.do_classifier_free_guidance:
                    latent_input = torch.cat([latents] * 2)
                    conditioning = torch.cat([negative_prompt_embeds, prompt_embeds])
                else:
                    latent_input, conditioning = latents, prompt_embeds
                latent_input = self.scheduler.scale_model_input(latent_input, t)
                noise_pred = self.unet(
                    latent_input,
                    t,
                    encoder_hidden_states=conditioning.to(self.unet.dtype),
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    step_locals = locals()
                    for name in callback_on_step_end_tensor_inputs or []:
                        callback_kwargs[name] = step_locals[name]
                    outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    if not isinstance(outputs, dict):
                        raise TypeError(
                            f"`callback_on_step_end` must return a dict (e.g. the `callback_kwargs` it was given), "
                            f"got {type(outputs).__name__} at step {i}."
                        )
                    latents = outputs.pop("latents", latents)
                    if "prompt_embeds" in outputs:  # replaces the conditioning of the current phase
                        if i < start_merge_step:
                            text_embeds = outputs.pop("prompt_embeds")
                        else:
                            fused_embeds = outputs.pop("prompt_embeds")
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        return latents

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """Decode latents with the VAE and post-process to ``output_type`` (``"latent"`` returns them)."""
        if output_type == "latent":
            return latents
        image = self.vae.decode(
            latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False
        )[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    # ------------------------------------------------------------------ call
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
        negative_prompt_embeds: torch.Tensor | None = None,
        start_merge_step: int | None = None,
        max_characters: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
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
            prompt_embeds, negative_prompt_embeds: precomputed conditionings, instead of ``prompt``.
            start_merge_step: the first loop iteration that uses the fused conditioning; earlier ones use
                the plain caption embedding. ``None`` means ``num_inference_steps // 2``; ``0`` fuses from
                the start.
            max_characters: most characters fused per caption (default: the fuser's ``max_characters``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`CharLDMPipelineOutput` rather than a tuple.
            cross_attention_kwargs: passed to the UNet's attention processors.
            callback_on_step_end: called as ``callback(pipe, step, timestep, callback_kwargs)`` after every
                step; it may return a dict replacing ``latents`` / ``prompt_embeds`` / ``negative_prompt_embeds``.
            callback_on_step_end_tensor_inputs: which tensors the callback receives (default ``["latents"]``).

        Returns:
            :class:`CharLDMPipelineOutput` (or ``(images,)`` when ``return_dict=False``).
        """
        height, width, start_merge_step, callback_on_step_end_tensor_inputs = self.prepare_call(
            height,
            width,
            num_inference_steps,
            guidance_scale,
            start_merge_step,
            output_type,
            cross_attention_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
        self.check_generator(generator)
        device = self._execution_device

        if prompt_embeds is None:
            prompts = self._as_prompt_list(prompt)
            encoded = self.encode_fused(prompts, characters, max_characters=max_characters, device=device)
            fused_embeds, text_embeds = encoded.prompt_embeds, encoded.text_embeds
        else:
            if prompt is not None:
                raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
            fused_embeds = text_embeds = prompt_embeds.to(device)
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
        )
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return CharLDMPipelineOutput(images=images)


CharLDMPipeline.__call__.__doc__ = (CharLDMPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
