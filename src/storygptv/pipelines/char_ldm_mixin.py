"""The steps Char-LDM and the story pipeline share: encoding captions and the cast, checks, latents, denoising.

Both :class:`~storygptv.pipelines.pipeline_char_ldm.CharLDMPipeline` and
:class:`~storygptv.pipelines.pipeline_storygptv.StoryGPTVPipeline` are ``DiffusionPipeline`` s with this mixin;
each writes its own ``__call__`` out in numbered steps from these methods (neither overrides the other's call).
The mixin needs the components ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``,
``image_encoder``, ``fuser`` and (optional) ``feature_extractor``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..characters import normalize_characters
from ..loading import load_checked, realign_cpu_tensors
from ..models.fuser import (
    FusedPromptOutput,
    encode_fused_prompt,
    encode_reference_images,
    encode_text,
    per_prompt,
)
from .mutual_consistency import MutualConsistency

__all__ = ["CharLDMMixin"]


class CharLDMMixin:
    """Shared steps of the Char-LDM pipelines (see the module docstring)."""

    _optional_components = ["feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def register_components(self, init_arguments: Mapping[str, Any]) -> None:
        """``register_modules`` of every ``__init__`` argument (pass ``locals()``), then the VAE image processing.

        The component names are the parameters of the pipeline's ``__init__``, which diffusers also reads to
        save and load the pipeline, so a pipeline lists its components once, in its signature.
        """
        names = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        self.register_modules(**{name: init_arguments[name] for name in names})
        vae = getattr(self, "vae", None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """``DiffusionPipeline.from_pretrained`` whose errors name the broken component and file.

        A local folder is checked first (``model_index.json``, each component's folder, config and
        safetensors headers; :func:`storygptv.loading.check_model_folder`), and a failure while loading
        (e.g. a config whose shapes do not match its weights) raises
        :class:`storygptv.loading.ModelLoadingError` naming the component. Hub ids load unchanged. Loaded CPU
        weights are re-aligned (:func:`storygptv.loading.realign_cpu_tensors`) so that a loaded pipeline draws
        bit-identically to the one that was saved.
        """
        pipe = load_checked(super().from_pretrained, pretrained_model_name_or_path, **kwargs)
        for component in pipe.components.values():
            realign_cpu_tensors(component)
        return pipe

    # ------------------------------------------------------------------ sharing
    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        characters: Mapping[str, Any] | None = None,
        base_model: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        **card_fields: Any,
    ) -> str:
        """Upload the pipeline to the Hub with its cast and a model card; returns the commit URL.

        Like ``DiffusionPipeline.push_to_hub``, plus what a story pipeline needs on the Hub: the reference images
        of its cast in ``characters/`` (``characters``, or the ``characters/`` folder of the folder it was loaded
        from) and a model card with the Hub metadata (``library_name: diffusers``, ``pipeline_tag:
        text-to-image``, ``base_model``, ``datasets``, tags, licence) and a usage snippet that loads it with
        ``DiffusionPipeline.from_pretrained`` and draws a story with its cast.
        """
        import tempfile
        from pathlib import Path

        from ..characters import cast_file_stem, load_character_image, read_cast_folder
        from ..hub import push_folder_to_hub
        from ..model_cards import write_model_card

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            source = Path(str(getattr(self.config, "_name_or_path", "") or ""))
            if characters is None and (source / "characters").is_dir():
                characters = dict(read_cast_folder(source / "characters"))
            if characters:
                (Path(tmp) / "characters").mkdir()
                for name, image in characters.items():
                    load_character_image(image, name).save(
                        Path(tmp) / "characters" / f"{cast_file_stem(name)}.png"
                    )
            template = "storygptv" if "story_model" in self.components else "char_ldm"
            write_model_card(
                tmp, template, repo_id=repo_id, base_model=base_model, dataset=dataset, **card_fields
            )
            if create_pr:
                raise NotImplementedError(
                    "`create_pr=True` is not supported; push to a branch of your own repo."
                )
            return push_folder_to_hub(
                tmp,
                repo_id,
                token=token,
                private=private,
                commit_message=commit_message or "Upload storygptv pipeline",
            )

    # ------------------------------------------------------------------ per-call properties
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
    @torch.no_grad()
    def encode_characters(
        self, characters: Mapping[str, Any] | None, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """``{name: (D,) image embedding}`` of a cast's reference images, each encoded once.

        Pass the result as ``character_embeds`` to reuse it (e.g. across stories with the same cast); it gives
        exactly the frames the reference images give.
        """
        if characters is None:
            return {}
        if not isinstance(characters, Mapping):
            raise TypeError(
                f"`characters` has type {type(characters).__name__}; pass a dict {{name: reference image}} for the "
                "story's cast, or None."
            )
        images = normalize_characters(characters, 1)[0]
        if not images:
            return {}
        embeds = encode_reference_images(
            list(images.values()),
            self.image_encoder,
            self.feature_extractor,
            device or self._execution_device,
        )
        return dict(zip(images, embeds))

    def encode_fused(
        self,
        prompt: str | list[str],
        characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None = None,
        max_characters: int | None = None,
        device: torch.device | None = None,
        warn: bool = True,
        warn_absent: bool = True,
        character_embeds: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor] | None] | None = None,
    ) -> FusedPromptOutput:
        """Fused and plain caption embeddings of ``prompt`` (see :func:`storygptv.encode_fused_prompt`)."""
        components = ("tokenizer", "text_encoder", "image_encoder", "fuser", "feature_extractor")
        return encode_fused_prompt(
            prompt,
            characters,
            character_embeds=character_embeds,
            max_characters=max_characters,
            device=device or self._execution_device,
            warn=warn,
            warn_absent=warn_absent,
            **{name: getattr(self, name) for name in components},
        )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        character_embeds: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor] | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode captions into the fused conditioning and the negative (unconditional) embedding.

        Without characters only the text encoder and tokenizer are used. Returns ``(prompt_embeds,
        negative_prompt_embeds)``, each repeated ``num_images_per_prompt`` times; ``negative_prompt_embeds`` is
        ``None`` without classifier-free guidance.
        """
        if prompt_embeds is None:
            if characters is None and character_embeds is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds = encode_text(prompts, self.tokenizer, self.text_encoder, device)[0]
            else:
                prompt_embeds = self.encode_fused(
                    prompt, characters, device=device, character_embeds=character_embeds
                ).prompt_embeds
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
        negatives = per_prompt(
            "" if negative_prompt is None else negative_prompt, batch_size, "negative_prompt", str
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
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer number of pixels, got {value!r}.")
        factor = self.vae_scale_factor
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

    def prepare_call(self, arguments: Mapping[str, Any]) -> tuple[int, int, int, list[str]]:
        """Resolve the defaults of a call's arguments (the pipeline passes its ``locals()``: ``height``,
        ``width``, ``num_inference_steps``, ``guidance_scale``, ``start_merge_step``, ``output_type``,
        ``cross_attention_kwargs`` and the step callback with its tensor inputs), validate them with
        :meth:`check_inputs` and set the per-call state.

        Returns ``(height, width, start_merge_step, callback_on_step_end_tensor_inputs)``.
        """
        call = dict(arguments)
        callback = call["callback_on_step_end"]
        if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            call["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs
        if call["callback_on_step_end_tensor_inputs"] is None:
            call["callback_on_step_end_tensor_inputs"] = ["latents"]
        for side in ("height", "width"):
            if call[side] is None:
                call[side] = self.unet.config.sample_size * self.vae_scale_factor
        if call["start_merge_step"] is None:
            call["start_merge_step"] = call["num_inference_steps"] // 2
        checked = inspect.signature(self.check_inputs).parameters
        self.check_inputs(**{name: call[name] for name in checked})
        self._guidance_scale = call["guidance_scale"]
        self._cross_attention_kwargs = call["cross_attention_kwargs"]
        self._interrupt = False
        return (
            call["height"],
            call["width"],
            call["start_merge_step"],
            call["callback_on_step_end_tensor_inputs"],
        )

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
    def as_prompt_list(prompt: str | list[str] | None, name: str = "prompt") -> list[str]:
        """``prompt`` as a non-empty list of strings (a clear error naming ``name`` otherwise)."""
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

    # ------------------------------------------------------------------ consistent characters
    @torch.no_grad()
    def prepare_mutual_consistency(
        self,
        characters: Mapping[str, Any],
        names: list[str],
        character_descriptions: Mapping[str, str] | None,
        negative_prompt: str | None,
        height: int,
        width: int,
        num_inference_steps: int,
        mode: str,
        device: torch.device,
        extra_weight: float = 1.0,
    ) -> MutualConsistency:
        """The portraits of ``names`` for ``consistency="mutual"`` (see :mod:`.mutual_consistency`).

        Each portrait is the character's reference image resized to ``height`` x ``width`` and VAE-encoded (the
        latent mean), noised at every step with a fixed noise (seed 0, so the frames' generator is untouched); its
        conditioning and MMCA description is the fused embedding of ``character_descriptions[name]`` (default: the
        name). Installs the mutual-attention processors; with ``mode="cache"`` also records the portraits' keys and
        values at every step. Call ``.close()`` on the result to put the UNet's processors back.
        """
        descriptions = dict(character_descriptions or {})
        unknown = sorted(set(descriptions) - set(characters))
        if unknown:
            raise ValueError(
                f"`character_descriptions` names {unknown}, who have no reference image in `characters`."
            )
        images = normalize_characters({name: characters[name] for name in names}, 1)[0]
        pixels = self.image_processor.preprocess(list(images.values()), height=height, width=width)
        vae_dtype = self.vae.dtype
        latents = torch.cat(
            [
                self.vae.encode(pixels[i : i + 1].to(device=device, dtype=vae_dtype)).latent_dist.mean
                for i in range(len(names))
            ]
        )
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(latents)
        prompts = [descriptions.get(name, name) for name in names]
        embeds = self.encode_characters(images, device)
        portrait_embeds = self.encode_fused(
            prompts,
            character_embeds=[{name: embeds[name]} for name in names],
            device=device,
            warn=False,
            warn_absent=False,
        ).prompt_embeds
        negative = (
            self.encode_negative(negative_prompt, 1, device) if self.do_classifier_free_guidance else None
        )
        mutual = MutualConsistency(
            self.unet,
            self.scheduler,
            list(names),
            latents,
            noise,
            portrait_embeds,
            negative,
            mode,
            extra_weight=extra_weight,
        )
        try:
            mutual.record(num_inference_steps, device)
        except BaseException:
            mutual.close()
            raise
        return mutual

    @torch.no_grad()
    def attention_masks(
        self,
        latents: torch.Tensor,
        caption: str,
        text_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        names: list[str],
        num_inference_steps: int,
        height: int,
        width: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """``{name: (height, width) mask}`` from the characters' cross-attention maps at an early step.

        For a frame without user masks: the first ``max(1, num_inference_steps // 5)`` steps are sampled from
        ``latents`` (one image, plain caption embedding, as the frame's own first steps) with the Char-LDM capture
        processors (:func:`storygptv.install_character_attention_processors`) recording the cross-attention of
        each name's token at the last of them. Each map is averaged over the captured layers, scaled to a maximum
        of 1 and kept where >= 0.5, and a pixel goes to the character with the highest value (no blending). Names
        the caption does not mention get no mask. The UNet's processors are restored afterwards; ``latents`` are
        not changed, so the frame is then denoised from the same noise.
        """
        from ..attention.processors import install_character_attention_processors
        from ..characters import find_character_tokens

        mentions = find_character_tokens(
            caption, names, self.tokenizer, max_characters=len(names), warn=False
        )
        if not mentions:
            return {}
        before = dict(self.unet.attn_processors)
        store = install_character_attention_processors(self.unet)
        try:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            steps = max(1, num_inference_steps // 5)
            indices = torch.tensor([[m.token_index for m in mentions]])
            sample = latents
            for i, t in enumerate(self.scheduler.timesteps[:steps]):
                guided = self.do_classifier_free_guidance
                latent_input = self.scheduler.scale_model_input(
                    torch.cat([sample] * 2) if guided else sample, t
                )
                conditioning = torch.cat([negative_prompt_embeds, text_embeds]) if guided else text_embeds
                last = i == steps - 1
                if last:
                    store.enable(indices.expand(latent_input.shape[0], -1))
                noise = self.unet(
                    latent_input, t, encoder_hidden_states=conditioning.to(self.unet.dtype), return_dict=False
                )[0]
                store.disable()
                if last:
                    break
                if guided:
                    uncond, text = noise.chunk(2)
                    noise = uncond + self.guidance_scale * (text - uncond)
                sample = self.scheduler.step(noise, t, sample, return_dict=False)[0]
            side = latents.shape[-2:]
            maps = []
            for layer in store.maps.values():  # (rows, HW, K): the conditional (last) row
                tokens = layer.shape[1]
                h = round((tokens * side[0] / side[1]) ** 0.5)
                grid = layer[-1].T.reshape(1, -1, h, tokens // h).float()
                maps.append(torch.nn.functional.interpolate(grid, size=side, mode="bilinear")[0])
            mean = torch.stack(maps).mean(0)  # (K, h, w)
            mean = mean / mean.flatten(1).amax(-1).clamp_min(1e-12)[:, None, None]
            value, owner = mean.max(0)
            pixels = torch.nn.functional.interpolate(
                torch.stack([(owner == k) & (value >= 0.5) for k in range(len(mentions))])[None].float(),
                size=(height, width),
                mode="nearest",
            )[0]
        finally:
            self.unet.set_attn_processor(dict(before))
        return {m.name: pixels[k].cpu() for k, m in enumerate(mentions)}

    # ------------------------------------------------------------------ denoising
    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        factor = self.vae_scale_factor
        return (batch_size, self.unet.config.in_channels, height // factor, width // factor)

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
        mutual: MutualConsistency | None = None,
    ) -> torch.Tensor:
        """Run the sampler with delayed conditioning and return the final latents.

        Loop iteration ``i < start_merge_step`` conditions on ``text_embeds``; from ``start_merge_step``
        on, on ``fused_embeds``. (The public StoryGPT-V code uses ``i <= start_merge_step``; our
        ``start_merge_step + 1`` reproduces it.) A step callback may return replacements for ``latents``,
        ``prompt_embeds`` (the conditioning of the current phase) and ``negative_prompt_embeds``; they last
        until the end of this call of ``denoise``. With ``mutual`` (``consistency="mutual"``, its scenes set), every
        UNet call attends to the characters' portraits (:meth:`MutualConsistency.predict`).
        """
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        unet_dtype = self.unet.dtype  # read once: the property walks every parameter
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
                if mutual is None:
                    noise_pred = self.unet(
                        latent_input,
                        t,
                        encoder_hidden_states=conditioning.to(unet_dtype),
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        return_dict=False,
                    )[0]
                else:
                    noise_pred = mutual.predict(
                        latent_input, t, i, conditioning.to(unet_dtype), self.cross_attention_kwargs
                    )
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
