"""StoryGPT-V: a causal LLM reads the story so far and conditions Char-LDM for the next frame."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPVisionModelWithProjection, PreTrainedTokenizerBase

from ..characters import find_character_mentions, normalize_characters
from ..grounding import ground_caption, named_setting
from ..models.fuser import CharacterFuser, preprocess_reference_images
from ..models.modeling_storygptv import StoryGPTVForConditionalGeneration
from .pipeline_char_ldm import CharLDMPipeline

__all__ = ["GROUNDING_MODES", "StoryGPTVPipeline", "StoryGPTVPipelineOutput", "encode_story_images"]

#: Values of the pipeline's ``grounding`` argument.
GROUNDING_MODES: tuple[str, ...] = ("none", "fuse")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from storygptv import StoryGPTVPipeline
        >>> from storygptv.data.synthsv import reference_images

        >>> # The lines marked +SKIP need a trained checkpoint, so the doctests skip them.
        >>> pipe = StoryGPTVPipeline.from_pretrained("path/or/hub-id")  # doctest: +SKIP
        >>> refs = reference_images()
        >>> story = pipe(  # doctest: +SKIP
        ...     ["Ava and Bo are standing in the forest.", "They are jumping.", "Ava is waving."],
        ...     characters={"Ava": refs["Ava"], "Bo": refs["Bo"]},
        ...     generator=torch.Generator().manual_seed(42),
        ... )
        >>> story.images[1].save("frame_2.png")  # doctest: +SKIP
        ```
"""


@dataclass
class StoryGPTVPipelineOutput(BaseOutput):
    """Output of :class:`StoryGPTVPipeline`.

    Attributes:
        images: one image per caption: a list of PIL images, a numpy array (N, H, W, 3), a tensor
            (N, 3, H, W), or latents (N, C, h, w), following ``output_type``.
        conditionings: with ``return_conditioning=True``, the UNet conditioning of each frame after the
            merge step, (N, seq_len, dim): the fused caption embedding for frame 1, the mapped LLM
            output for later frames.
        characters: per frame, the characters it was drawn with: those its caption names, plus, with
            ``grounding="fuse"``, those the story model resolved for its pronouns. Without ``"fuse"``, a
            model with a grounding head reports what it predicted (the conditioning does not use it).
        settings: per frame, the setting named in the drawn caption (or predicted, see ``characters``), or None.
        captions: the captions the frames were drawn from: the story's, with ``grounding="fuse"`` grounded
            ("They are jumping." -> "Ava and Bo are jumping in the forest.").
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    conditionings: torch.Tensor | None = None
    characters: list[list[str]] | None = None
    settings: list[str | None] | None = None
    captions: list[str] | None = None


def encode_story_images(
    images: list[PIL.Image.Image], image_encoder: CLIPVisionModelWithProjection, feature_extractor: Any = None
) -> torch.Tensor:
    """CLIP embeddings that the story LLM reads for frames: the vision tower's ``pooler_output``.

    StoryGPT-V feeds the LLM the pooled CLIP ViT output (1024 for ViT-L/14) *without* the projection;
    training (the stage-2 collator's precomputed embeddings) must use this same function.
    """
    image_size = getattr(image_encoder.config, "image_size", 224)
    pixel_values = preprocess_reference_images(images, feature_extractor, image_size)
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder.vision_model(pixel_values=pixel_values).pooler_output


class StoryGPTVPipeline(CharLDMPipeline):
    r"""Story visualisation with StoryGPT-V (arXiv 2312.02252).

    Frame 1 comes from Char-LDM (the caption with the characters' reference images fused in). Every
    later frame is conditioned on the output of the story LLM, which reads the frames generated so far
    (each as ``num_visual_tokens`` CLIP tokens, before its caption), then the current caption, and
    emits the ``[IMG]`` tokens whose hidden states the LDM mapper turns into the UNet conditioning. The
    LLM resolves pronouns ("They start to argue.") from this context. Its key/value cache is carried
    from frame to frame, so the LLM work per frame does not grow with the story.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, image_encoder, fuser, feature_extractor: the
            Char-LDM components (see :class:`CharLDMPipeline`).
        story_model: the :class:`StoryGPTVForConditionalGeneration` (LLM, visual projection, mapper).
        story_tokenizer: the LLM's tokenizer with the ``<|image|>`` and ``[IMG]`` tokens.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->fuser->story_model->unet->vae"
    _optional_components = ["feature_extractor"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection,
        fuser: CharacterFuser,
        story_model: StoryGPTVForConditionalGeneration,
        story_tokenizer: PreTrainedTokenizerBase,
        feature_extractor: Any = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            fuser=fuser,
            feature_extractor=feature_extractor,
        )
        self.register_modules(story_model=story_model, story_tokenizer=story_tokenizer)

    @property
    def current_frame(self) -> int:
        """Index of the frame being generated (for step callbacks)."""
        return getattr(self, "_current_frame", 0)

    @property
    def story_state(self) -> Any:
        """The story model's state of the current (or last) story: its KV cache, retained frames and
        token counters (e.g. ``llm_tokens_total``)."""
        return getattr(self, "_story_state", None)

    def resolve_grounding(self, grounding: str | None) -> str:
        """The grounding mode of a call: ``grounding``, or by default ``"fuse"`` when the story model has a
        grounding head and ``"none"`` otherwise. Raises a ``ValueError`` naming the fix for a bad value."""
        has_head = bool(getattr(self.story_model.config, "has_grounding_head", False))
        if grounding is None:
            return "fuse" if has_head else "none"
        if grounding not in GROUNDING_MODES:
            raise ValueError(
                f"`grounding` must be one of {list(GROUNDING_MODES)} or None, got {grounding!r}."
            )
        if grounding == "fuse" and not has_head:
            raise ValueError(
                "`grounding='fuse'` needs a story model with a grounding head (its config sets "
                "`grounding_characters`); this one has none. Use grounding='none', or train the story model "
                "with `train_storygptv.py --grounding`."
            )
        return grounding

    def _check_story(self, captions: Any, context_window: int | None) -> list[str]:
        if isinstance(captions, str):
            raise TypeError(
                "`captions` is a single string; pass the story as a list of captions, one per frame."
            )
        captions = self._as_prompt_list(captions, name="captions")
        if context_window is not None and (
            isinstance(context_window, bool) or not isinstance(context_window, int) or context_window < 1
        ):
            raise ValueError(
                f"`context_window` must be None (the whole story) or an integer >= 1, got {context_window!r}."
            )
        return captions

    @torch.no_grad()
    def __call__(
        self,
        captions: list[str],
        characters: Mapping[str, Any] | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        context_window: int | None = None,
        start_merge_step: int | None = None,
        max_characters: int | None = None,
        grounding: str | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_conditioning: bool = False,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        callback_on_frame_end: Callable[[StoryGPTVPipeline, int, PIL.Image.Image], None] | None = None,
    ) -> StoryGPTVPipelineOutput | tuple:
        r"""Generate one image per caption of a story.

        Args:
            captions: the story, one caption per frame; later captions may use pronouns.
            characters: ``{name: reference image}`` for the story's cast (PIL images, paths, uint8 arrays or
                (3, H, W) tensors in [0, 1]). Names are fused wherever a caption mentions them.
            negative_prompt: the negative caption for classifier-free guidance (default ``""``).
            height, width: image size, divisible by the VAE scale factor.
            num_inference_steps: denoising steps per frame (30 in the paper).
            guidance_scale: classifier-free guidance weight (5 in the paper).
            generator: a ``torch.Generator`` used for every frame in turn, or one generator per frame.
            context_window: keep only the last ``k`` frames in the LLM context (the local causal window of
                Causal-Story); ``None`` keeps the whole story (cut to the most recent frames, with a
                warning, if it outgrows the LLM's token budget).
            start_merge_step: the first denoising step that uses the fused / LLM conditioning; earlier
                steps use the plain caption embedding. ``None`` means ``num_inference_steps // 2``. Frames
                after the first whose caption names no character of ``characters`` (pronoun-only captions)
                use the LLM conditioning from step 0, as in the paper.
            max_characters: most characters fused per caption for frame 1 (default: the fuser's).
            grounding: how frames after the first use the story model's grounding head. ``"fuse"``: the
                characters it resolves for a caption's pronouns, and the setting it resolves when the caption
                names none, are written into the caption ("They are jumping." -> "Ava and Bo are jumping in the
                forest.") and their reference images fused, so identity comes from the references rather
                than the mapper's memory; names the caption states are always kept. ``"none"``: the
                conditioning is the mapper's alone (the paper). ``None`` (default): ``"fuse"`` when the model
                has a grounding head, else ``"none"``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`StoryGPTVPipelineOutput` rather than a tuple.
            return_conditioning: also return each frame's UNet conditioning.
            cross_attention_kwargs: passed to the UNet's attention processors.
            callback_on_step_end: called after every denoising step of every frame as
                ``callback(pipe, step, timestep, callback_kwargs)``; ``pipe.current_frame`` tells the frame.
            callback_on_step_end_tensor_inputs: tensors the callback receives (default ``["latents"]``).
            callback_on_frame_end: called as ``callback(pipe, frame_index, image)`` with each finished frame as a
                PIL image, e.g. to save frames of a long story as they come.

        Returns:
            :class:`StoryGPTVPipelineOutput`, or ``(images, conditionings)`` when ``return_dict=False``.
        """
        captions = self._check_story(captions, context_window)
        grounding = self.resolve_grounding(grounding)
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
        self.check_generator(generator, len(captions), "frames")
        if characters is not None and not isinstance(characters, Mapping):
            raise TypeError(
                f"`characters` has type {type(characters).__name__}; pass a dict {{name: reference image}} "
                "for the story's cast, or None."
            )
        # Read every reference image before any long work starts.
        cast = normalize_characters(characters, 1)[0]
        # With grounding="fuse", a character the story model knows can enter a frame through a pronoun.
        resolvable = set(self.story_model.config.grounding_characters or []) if grounding == "fuse" else set()
        unused = [
            name
            for name in cast
            if name not in resolvable and not any(find_character_mentions(c, [name]) for c in captions)
        ]
        if unused:
            warnings.warn(
                f"Characters {unused} are not named in any caption of the story; their reference images are "
                "ignored.",
                stacklevel=2,
            )
        device = self._execution_device

        negative = (
            self.encode_negative(negative_prompt, 1, device) if self.do_classifier_free_guidance else None
        )
        state = self.story_model.start_story(
            batch_size=1, context_window=context_window, tokenizer=self.story_tokenizer
        )
        self._story_state = state
        config = self.story_model.config
        known_names = list(dict.fromkeys([*cast, *(config.grounding_characters or [])]))
        known_settings = list(config.grounding_settings or [])
        anchored = config.mapper_queries == "caption"
        frames: list[torch.Tensor] = []
        latents_out: list[torch.Tensor] = []
        conditionings: list[torch.Tensor] = []
        drawn_captions: list[str] = []
        frame_characters: list[list[str]] = []
        frame_settings: list[str | None] = []
        for index in self.progress_bar(range(len(captions))):
            self._current_frame = index
            caption = captions[index]
            reading = predicted = predicted_setting = None
            if index > 0:
                reading = self.story_model.read_next_frame(state, caption)
                if reading.character_logits is not None:
                    predicted = self.story_model.grounded_characters(reading.character_logits)[0]
                if reading.setting_logits is not None:
                    predicted_setting = self.story_model.grounded_settings(reading.setting_logits)[0]
            drawn = caption
            if grounding == "fuse" and reading is not None:
                drawn = ground_caption(caption, predicted or [], predicted_setting, known_settings)
            # Characters a caption names past the token limit or past `max_characters` warn, as in Char-LDM;
            # cast members a frame does not name are normal in a story and do not.
            encoded = self.encode_fused(
                drawn, cast, max_characters=max_characters, device=device, warn=True, warn_absent=False
            )
            if reading is None:
                conditioning, merge_step = encoded.prompt_embeds, start_merge_step
            else:
                if anchored:
                    conditioning = self.story_model.map_img_tokens(
                        reading.img_hidden_states, reading.img_input_embeds, encoded.prompt_embeds
                    )
                elif grounding == "fuse":
                    conditioning = encoded.prompt_embeds
                else:
                    conditioning = self.story_model.map_img_tokens(
                        reading.img_hidden_states, reading.img_input_embeds
                    )
                names_characters = bool(cast) and bool(find_character_mentions(drawn, cast))
                merge_step = start_merge_step if names_characters else 0
            conditioning = conditioning.to(device=device, dtype=encoded.text_embeds.dtype)
            drawn_captions.append(drawn)
            named = [m.name for m in find_character_mentions(drawn, known_names)]
            if grounding == "none" and predicted is not None:
                named = predicted
            frame_characters.append(named)
            setting = named_setting(drawn, known_settings) if known_settings else None
            frame_settings.append(
                predicted_setting if grounding == "none" and reading is not None else setting
            )
            frame_generator = generator[index] if isinstance(generator, list) else generator
            latents = self.prepare_latents(
                1, self.unet.config.in_channels, height, width, conditioning.dtype, device, frame_generator
            )
            latents = self.denoise(
                latents,
                encoded.text_embeds,
                conditioning,
                negative,
                num_inference_steps,
                merge_step,
                device,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
                show_progress=False,
            )
            image = self.decode_latents(latents, "pt")  # (1, 3, H, W) in [0, 1]
            pil = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(image))
            if index + 1 < len(captions):
                # The generated frame, not a ground-truth one, becomes the next frames' visual context.
                embeds = encode_story_images(pil, self.image_encoder, self.feature_extractor)
                self.story_model.append_frame(state, embeds.to(self.story_model.dtype), caption)
            if callback_on_frame_end is not None:
                callback_on_frame_end(self, index, pil[0])
            frames.append(image)
            latents_out.append(latents)
            if return_conditioning:
                conditionings.append(conditioning[0])

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images: Any = torch.cat(latents_out)
        else:
            stacked = torch.cat(frames)
            if output_type == "pt":
                images = stacked
            else:
                images = self.image_processor.pt_to_numpy(stacked)
                if output_type == "pil":
                    images = self.image_processor.numpy_to_pil(images)
        stacked_conditioning = torch.stack(conditionings) if return_conditioning else None
        if not return_dict:
            return (images, stacked_conditioning)
        return StoryGPTVPipelineOutput(
            images=images,
            conditionings=stacked_conditioning,
            characters=frame_characters,
            settings=frame_settings,
            captions=drawn_captions,
        )


StoryGPTVPipeline.__call__.__doc__ = (StoryGPTVPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
