"""StoryGPT-V: a causal LLM reads the story so far and conditions Char-LDM for the next frame."""

from __future__ import annotations

import warnings
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

from ..characters import find_character_mentions
from ..grounding import ground_caption, named_setting
from ..models.configuration_storygptv import check_context_window
from ..models.fuser import CharacterFuser, normalize_character_embeds, preprocess_reference_images
from ..models.modeling_storygptv import StoryGPTVForConditionalGeneration
from ..models.processing_storygptv import StoryGPTVProcessor
from ..models.story_context import StoryContext
from .char_ldm_mixin import CharLDMMixin
from .mutual_consistency import check_character_masks, check_consistency

__all__ = [
    "GROUNDING_MODES",
    "FrameConditioning",
    "StoryGPTVPipeline",
    "StoryGPTVPipelineOutput",
    "check_story_components",
    "encode_story_images",
]

#: Values of the pipeline's ``grounding`` argument.
GROUNDING_MODES: tuple[str, ...] = ("none", "fuse")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import storygptv
        >>> from storygptv import StoryGPTVPipeline
        >>> from storygptv.data.synthsv import reference_images

        >>> pipe = StoryGPTVPipeline.from_pretrained(storygptv.DEFAULT_MODEL)
        >>> refs = reference_images()
        >>> cast = {"Ava": refs["Ava"], "Bo": refs["Bo"]}
        >>> story = pipe(
        ...     ["Ava and Bo are standing in the forest.", "They are jumping.", "Ava is waving."],
        ...     characters=cast,
        ...     generator=torch.Generator().manual_seed(42),
        ... )
        >>> len(story.images), story.characters[0]  # story.captions: what "They" (and the setting) became
        (3, ['Ava', 'Bo'])
        >>> more = pipe(["They are sitting."], characters=cast, story_context=story.story_context)  # continue
        >>> more.story_context.num_frames_committed
        4

        ```
"""


@dataclass
class StoryGPTVPipelineOutput(BaseOutput):
    """Output of :class:`StoryGPTVPipeline`.

    Attributes:
        images: one image per caption: a list of PIL images, a numpy array (N, H, W, 3), a tensor
            (N, 3, H, W), or latents (N, C, h, w), following ``output_type``.
        conditionings: with ``return_conditioning=True``, the UNet conditioning of each frame after the
            merge step, (N, seq_len, dim): the fused caption embedding for the first frame of a story, the
            story model's conditioning for later frames.
        characters: per frame, the characters it was drawn with: those its caption names, plus, with
            ``grounding="fuse"``, those the story model resolved for its pronouns. Without ``"fuse"``, a
            model with a grounding head reports what it predicted (the conditioning does not use it).
        settings: per frame, the setting named in the drawn caption (or predicted, see ``characters``), or None.
        captions: the captions the frames were drawn from: the story's, with ``grounding="fuse"`` grounded
            ("They are jumping." -> "Ava and Bo are jumping in the forest.").
        story_context: the :class:`~storygptv.models.story_context.StoryContext` after the last frame (its
            frames, KV cache and counters); pass it as ``story_context`` to continue the story.
        written_captions: with :meth:`StoryGPTVPipeline.continue_story`, the captions the story model wrote,
            as written (``captions`` holds them as drawn, grounded with ``grounding="fuse"``); else None.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    conditionings: torch.Tensor | None = None
    characters: list[list[str]] | None = None
    settings: list[str | None] | None = None
    captions: list[str] | None = None
    story_context: StoryContext | None = None
    written_captions: list[str] | None = None


@dataclass
class FrameConditioning:
    """What one frame of a story is denoised with (:meth:`StoryGPTVPipeline.frame_conditioning`).

    Attributes:
        caption: the caption drawn (the story's, grounded with ``grounding="fuse"``).
        characters: the characters drawn (see :class:`StoryGPTVPipelineOutput`); setting: likewise.
        text_embeds: the plain caption embedding of the steps before ``merge_step``.
        conditioning: the conditioning from ``merge_step`` on.
        merge_step: the first denoising step that uses ``conditioning``.
        restated: a restating model's restatement of the caption (what the story context keeps), or None.
    """

    caption: str
    characters: list[str]
    setting: str | None
    text_embeds: torch.Tensor
    conditioning: torch.Tensor
    merge_step: int
    restated: str | None = None


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


def check_story_components(story_model: Any, unet: Any, image_encoder: Any) -> None:
    """The story model must write the UNet's conditioning and read the image encoder's frames (a clear error
    when a story model is combined with another Char-LDM). Components left out (``None``) are not checked."""
    config = getattr(story_model, "config", None)
    if config is None:
        return
    if unet is not None and config.ldm_hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f"The story model writes {config.ldm_hidden_size}-wide conditioning (ldm_hidden_size) but the UNet "
            f"cross-attends to {unet.config.cross_attention_dim}: combine it with the Char-LDM it was trained on."
        )
    vision = getattr(getattr(image_encoder, "config", None), "hidden_size", None)
    if vision is not None and config.vision_embed_dim != vision:
        raise ValueError(
            f"The story model reads {config.vision_embed_dim}-wide frame embeddings (vision_embed_dim) but the "
            f"image encoder gives {vision}: combine it with the Char-LDM it was trained on."
        )


class StoryGPTVPipeline(CharLDMMixin, DiffusionPipeline):
    r"""Story visualisation with StoryGPT-V (arXiv 2312.02252).

    The first frame of a story comes from Char-LDM (the caption with the characters' reference images fused
    in). Every later frame is conditioned by the story model, which reads the frames generated so far (each
    as ``num_visual_tokens`` CLIP tokens, before its caption), then the current caption, and emits the
    ``[IMG]`` tokens whose hidden states the LDM mapper turns into the UNet conditioning. A model with a
    grounding head also says which characters (and setting) the frame shows, and with ``grounding="fuse"``
    their names and reference images are written into the caption. The story model's key/value cache is
    carried from frame to frame in a :class:`~storygptv.models.story_context.StoryContext`, so its work per
    frame does not grow with the story.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, image_encoder, fuser, feature_extractor: the
            Char-LDM components (see :class:`~storygptv.pipelines.pipeline_char_ldm.CharLDMPipeline`).
        story_model: the :class:`StoryGPTVForConditionalGeneration` (LLM, visual projection, mapper).
        story_tokenizer: the LLM's tokenizer with the ``<|image|>`` and ``[IMG]`` tokens.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->fuser->story_model->unet->vae"

    def __init__(
        self,
        story_model: StoryGPTVForConditionalGeneration,
        story_tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        image_encoder: CLIPVisionModelWithProjection,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        fuser: CharacterFuser,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__()
        check_story_components(story_model, unet, image_encoder)
        self.register_components(locals())

    # ------------------------------------------------------------------ per-call properties
    @property
    def current_frame(self) -> int:
        """Index of the frame being generated (for step callbacks)."""
        return getattr(self, "_current_frame", 0)

    @property
    def story_context(self) -> StoryContext | None:
        """The story context of the call in progress (for callbacks); None outside a call."""
        return getattr(self, "_story_context", None)

    @property
    def story_processor(self) -> StoryGPTVProcessor:
        """The processor (story tokenizer + layout) of ``story_model``."""
        return StoryGPTVProcessor.from_story_model_config(self.story_tokenizer, self.story_model.config)

    # ------------------------------------------------------------------ checks
    def resolve_grounding(self, grounding: str | None) -> str:
        """The grounding mode of a call: ``grounding``, or by default ``"fuse"`` when the story model has a
        grounding head and ``"none"`` otherwise. Raises a ``ValueError`` naming the fix for a bad value."""
        has_head = bool(getattr(self.story_model.config, "can_ground", False))
        if grounding is None:
            return "fuse" if has_head else "none"
        if grounding not in GROUNDING_MODES:
            raise ValueError(
                f"`grounding` must be one of {list(GROUNDING_MODES)} or None, got {grounding!r}."
            )
        if grounding == "fuse" and not has_head:
            raise ValueError(
                "`grounding='fuse'` needs a story model that grounds frames (its config's `grounding` is 'head' "
                "or 'restate'); this one does not. Use grounding='none', or train the story model with "
                "`train_storygptv.py --grounding restate`."
            )
        return grounding

    def check_story(
        self, captions: Any, context_window: Any, story_context: StoryContext | None
    ) -> list[str]:
        """Validate the story arguments; returns the captions as a list."""
        if isinstance(captions, str):
            raise TypeError(
                "`captions` is a single string; pass the story as a list of captions, one per frame."
            )
        captions = self.as_prompt_list(captions, name="captions")
        check_context_window(context_window)
        if story_context is not None:
            if not isinstance(story_context, StoryContext):
                raise TypeError(
                    f"`story_context` must be the StoryContext of an earlier call (`output.story_context`), got "
                    f"{type(story_context).__name__}."
                )
            if story_context.model is not self.story_model:
                raise ValueError(
                    "`story_context` belongs to another story model; continue it with its own pipeline."
                )
            if context_window is not None:
                raise ValueError(
                    "`context_window` is set when the story starts; the given `story_context` has its own."
                )
        return captions

    def check_frame_latents(
        self, latents: Any, num_frames: int, height: int, width: int
    ) -> list[torch.Tensor | None]:
        """``latents`` (one (C, h, w) noise per frame, as a (N, C, h, w) tensor or a list) split per frame."""
        if latents is None:
            return [None] * num_frames
        shape = self.latent_shape(1, height, width)[1:]
        frames = list(latents) if isinstance(latents, list | tuple) else list(latents.unbind(0))
        if len(frames) != num_frames or any(
            tuple(f.shape[-3:]) != shape or f.dim() not in (3, 4) for f in frames
        ):
            got = (
                [tuple(f.shape) for f in frames]
                if isinstance(latents, list | tuple)
                else tuple(latents.shape)
            )
            raise ValueError(
                f"`latents` must hold one noise of shape {shape} per frame ({num_frames} frames), got {got}."
            )
        return [f.reshape(1, *shape) for f in frames]

    # ------------------------------------------------------------------ one frame's conditioning
    def frame_conditioning(
        self,
        context: StoryContext,
        caption: str,
        character_embeds: Mapping[str, torch.Tensor],
        grounding: str,
        start_merge_step: int,
        max_characters: int | None,
        device: torch.device,
    ) -> FrameConditioning:
        """The conditioning of the next frame of ``context``.

        The first frame of a story is Char-LDM's (the caption with the cast fused in). A later frame: the story
        model reads the context and the caption; with ``grounding="fuse"`` the characters and setting it
        resolves are written into the caption; the caption's Char-LDM encoding is then the anchor of a
        caption-anchored mapper, or (for a learned-query mapper with ``"fuse"``) the conditioning itself, and
        otherwise the mapper's output is. A frame whose drawn caption names no character of the cast uses the
        story conditioning from step 0.
        """
        config = self.story_model.config
        known_settings = list(config.grounding_settings or [])
        known_names = list(dict.fromkeys([*character_embeds, *(config.grounding_characters or [])]))
        first = context.num_frames_committed == 0
        reading = predicted = predicted_setting = restated = None
        if not first or config.restates_captions:  # a restating model restates the first caption too
            reading = context.read_next_frame(caption)
            if reading.restated_captions:
                restated = reading.restated_captions[0]
                predicted = [m.name for m in find_character_mentions(restated, known_names)]
                predicted_setting = named_setting(restated, known_settings) if known_settings else None
            if reading.character_logits is not None:
                predicted = self.story_model.grounded_characters(reading.character_logits)[0]
                # A story's pronouns refer to its cast: resolve among the given characters.
                if character_embeds:
                    cast = {name.lower() for name in character_embeds}
                    predicted = [name for name in predicted if name.lower() in cast]
            if reading.setting_logits is not None:
                predicted_setting = self.story_model.grounded_settings(reading.setting_logits)[0]
        if first:
            reading = None  # the first frame is Char-LDM's
        drawn = caption
        if grounding == "fuse" and reading is not None:
            drawn = ground_caption(caption, predicted or [], predicted_setting, known_settings)
        # Names past the token limit or past `max_characters` warn, as in Char-LDM; cast members a frame does
        # not name are normal in a story and do not.
        encoded = self.encode_fused(
            drawn,
            max_characters=max_characters,
            device=device,
            warn_absent=False,
            character_embeds=character_embeds,
        )
        if reading is None:
            conditioning, merge_step = encoded.prompt_embeds, start_merge_step
        else:
            if config.mapper_queries == "caption":
                conditioning = self.story_model.map_img_tokens(
                    reading.img_hidden_states, reading.img_input_embeds, encoded.prompt_embeds
                )
            elif grounding == "fuse":
                conditioning = encoded.prompt_embeds
            else:
                conditioning = self.story_model.map_img_tokens(
                    reading.img_hidden_states, reading.img_input_embeds
                )
            names_characters = bool(character_embeds) and bool(
                find_character_mentions(drawn, character_embeds)
            )
            merge_step = start_merge_step if names_characters else 0
        characters = [m.name for m in find_character_mentions(drawn, known_names)]
        setting = named_setting(drawn, known_settings) if known_settings else None
        if grounding == "none" and reading is not None:
            characters = predicted if predicted is not None else characters
            setting = predicted_setting
        return FrameConditioning(
            caption=drawn,
            characters=characters,
            setting=setting,
            text_embeds=encoded.text_embeds,
            conditioning=conditioning.to(device=device, dtype=encoded.text_embeds.dtype),
            merge_step=merge_step,
            restated=restated,
        )

    def _warn_unused_cast(self, cast: Mapping[str, Any], captions: list[str], grounding: str) -> None:
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
                stacklevel=4,  # _warn_unused_cast < __call__ < no_grad wrapper < the caller
            )

    # ------------------------------------------------------------------ call
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
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        character_embeds: Mapping[str, torch.Tensor] | None = None,
        story_context: StoryContext | None = None,
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
        consistency: str | None = None,
        character_masks: list[Mapping[str, Any] | None] | None = None,
        mutual_attention: str = "cache",
        mutual_attention_weight: float = 1.0,
        character_descriptions: Mapping[str, str] | None = None,
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
            latents: the initial noise of every frame, (N, C, h, w) or a list of N tensors, instead of sampling.
            character_embeds: the cast as precomputed ``{name: image embedding}`` (:meth:`encode_characters`)
                instead of ``characters``; the frames are the same.
            story_context: the ``output.story_context`` of an earlier call, to continue that story (its frames
                stay in the story model's context; the first caption here is then not a first frame).
            context_window: keep only the last ``k`` frames in the LLM context (the local causal window of
                Causal-Story). ``None``: the story model's default (``story_model.config.context_window``; the
                embedded default reads the last 4 frames), and where that is None too, the whole story (when it
                outgrows the LLM's token budget, a block of the oldest frames is dropped, with one warning).
            start_merge_step: the first denoising step that uses the fused / story conditioning; earlier
                steps use the plain caption embedding. ``None`` means ``num_inference_steps // 2``. Later frames
                whose drawn caption names no character of the cast use the story conditioning from step 0, as
                in the paper.
            max_characters: most characters fused per caption (default: the fuser's).
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
                What it changes (its returned tensors, ``pipe._guidance_scale``) lasts for that frame only.
            callback_on_step_end_tensor_inputs: tensors the callback receives (default ``["latents"]``).
            callback_on_frame_end: called as ``callback(pipe, frame_index, image)`` with each finished frame as a
                PIL image, e.g. to save frames of a long story as they come.
            consistency: ``None`` (default) or ``"mutual"``: keeps characters consistent across frames from their
                portraits with DreamStory's masked mutual attention (:mod:`storygptv.attention.mutual`): inside its
                mask, a character attends to its portrait in self-attention (MMSA) and to its description in
                cross-attention (MMCA). The portrait is the character's reference image in ``characters``,
                VAE-encoded and noised to each step: exact identity from the first step, one VAE encode per
                character, no extra sampling chain, and the frames' generator untouched. Only the characters the
                frame is drawn with (``output.characters``: named, or resolved by the story model with
                ``grounding="fuse"``) use their masks; frames with none are drawn exactly as with ``None``.
            character_masks: with ``consistency="mutual"``, one entry per caption: ``None`` or ``{name: mask or
                box}``, a 2-D mask at the image's aspect ratio or a box ``(x0, y0, x1, y1)`` in pixels (floats in
                [0, 1]: fractions). A pixel belongs to at most one character (largest coverage, ties to the earlier
                name). At most ``max_characters`` (default: the fuser's) per frame. ``None`` (the whole argument):
                each frame's masks come from its characters' cross-attention maps at an early step
                (:meth:`attention_masks`).
            mutual_attention: ``"cache"`` (default): the portraits' keys / values are recorded once per story for
                every step and reused by every frame; ``"recompute"``: the portraits are denoised in the same batch
                as each frame, at every step.
            mutual_attention_weight: how much more a character's pixels attend to its portrait and description
                than DreamStory's plain joint softmax gives (``log(weight)`` is added to their attention logits;
                default 1: none).
            character_descriptions: ``{name: portrait prompt}`` (default: the name), the portraits' conditioning
                and the MMCA description.

        Returns:
            :class:`StoryGPTVPipelineOutput`, or ``(images, conditionings)`` when ``return_dict=False``.
        """
        # 1. Check inputs and set the call's parameters
        captions = self.check_story(captions, context_window, story_context)
        grounding = self.resolve_grounding(grounding)
        height, width, start_merge_step, callback_on_step_end_tensor_inputs = self.prepare_call(locals())
        self.check_generator(generator, len(captions), "frames")
        frame_latents = self.check_frame_latents(latents, len(captions), height, width)
        if characters is not None and character_embeds is not None:
            raise ValueError("Pass either `characters` (reference images) or `character_embeds`, not both.")
        check_consistency(consistency, mutual_attention, mutual_attention_weight)
        if character_masks is not None and consistency != "mutual":
            raise ValueError(
                "`character_masks` are used with `consistency='mutual'`; pass that too, or no masks."
            )
        cast = dict(characters) if isinstance(characters, Mapping) else {}
        masks = check_character_masks(
            character_masks,
            len(captions),
            height,
            width,
            list(cast),
            max_characters or self.fuser.config.max_characters,
        )
        device = self._execution_device

        # 2. Encode the cast once for the whole story (reference images are read before any long work)
        if character_embeds is None:
            character_embeds = self.encode_characters(characters, device)
        else:
            if not isinstance(character_embeds, Mapping):
                raise TypeError(
                    f"`character_embeds` has type {type(character_embeds).__name__}; pass the dict of "
                    "`pipe.encode_characters(characters)`."
                )
            character_embeds = normalize_character_embeds(character_embeds, 1)[0]
        self._warn_unused_cast(character_embeds, captions, grounding)

        # 3. Encode the negative prompt
        negative = (
            self.encode_negative(negative_prompt, 1, device) if self.do_classifier_free_guidance else None
        )

        # 4. Start the story context (or continue the given one)
        if context_window is None:
            context_window = self.story_model.config.context_window
        context = story_context or StoryContext(
            self.story_model, self.story_processor, context_window=context_window
        )
        self._story_context = context

        # 5. consistency="mutual": the portraits of the masked characters (reference latents, descriptions, and
        #    with mutual_attention="cache" their keys / values at every step, recorded once for the story)
        mutual = None
        automatic_masks = consistency == "mutual" and character_masks is None
        names = list(cast) if automatic_masks else [name for name in cast if any(name in f for f in masks)]
        if consistency == "mutual" and names:
            mutual = self.prepare_mutual_consistency(
                cast,
                names,
                character_descriptions,
                negative_prompt,
                height,
                width,
                num_inference_steps,
                mutual_attention,
                device,
                extra_weight=mutual_attention_weight,
            )

        # 6. Each frame: conditioning -> latents -> denoise (attending to the portraits of its masked characters)
        #    -> decode -> commit to the story context
        images, drawn = [], []
        try:
            for index in self.progress_bar(range(len(captions))):
                self._current_frame = index
                self._guidance_scale = guidance_scale  # what a step callback changed lasts one frame
                frame = self.frame_conditioning(
                    context,
                    captions[index],
                    character_embeds,
                    grounding,
                    start_merge_step,
                    max_characters,
                    device,
                )
                frame_generator = generator[index] if isinstance(generator, list) else generator
                frame_noise = self.prepare_latents(
                    1,
                    self.unet.config.in_channels,
                    height,
                    width,
                    frame.conditioning.dtype,
                    device,
                    frame_generator,
                    frame_latents[index],
                )
                # only the characters the frame is drawn with (named or resolved) use their masks
                present = [name for name in frame.characters if name in cast]
                if automatic_masks and mutual is not None and present:
                    frame_masks = self.attention_masks(
                        frame_noise,
                        frame.caption,
                        frame.text_embeds,
                        negative,
                        present,
                        num_inference_steps,
                        height,
                        width,
                        device,
                    )
                else:
                    frame_masks = {name: mask for name, mask in masks[index].items() if name in present}
                frame_mutual = mutual if mutual is not None and mutual.set_scenes([frame_masks]) else None
                frame_latent = self.denoise(
                    frame_noise,
                    frame.text_embeds,
                    frame.conditioning,
                    negative,
                    num_inference_steps,
                    frame.merge_step,
                    device,
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                    show_progress=False,
                    mutual=frame_mutual,
                )
                image = self.decode_latents(frame_latent, "pt")  # (1, 3, H, W) in [0, 1]
                pil = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(image))
                # The generated frame, not a ground-truth one, becomes the next frames' visual context.
                embeds = encode_story_images(pil, self.image_encoder, self.feature_extractor)
                # A restating model's history holds its restatements (names and setting explicit).
                context.append_frame(embeds.to(self.story_model.dtype), frame.restated or captions[index])
                if callback_on_frame_end is not None:
                    callback_on_frame_end(self, index, pil[0])
                images.append(frame_latent if output_type == "latent" else image)
                drawn.append(frame)
        finally:
            if mutual is not None:
                mutual.close()

        # 7. Post-process and return
        self._guidance_scale = guidance_scale
        self._story_context = None
        self.maybe_free_model_hooks()
        stacked = torch.cat(images)
        if output_type == "np" or output_type == "pil":
            stacked = self.image_processor.pt_to_numpy(stacked)
            if output_type == "pil":
                stacked = self.image_processor.numpy_to_pil(stacked)
        conditionings = torch.stack([f.conditioning[0] for f in drawn]) if return_conditioning else None
        if not return_dict:
            return (stacked, conditionings)
        return StoryGPTVPipelineOutput(
            images=stacked,
            conditionings=conditionings,
            characters=[f.characters for f in drawn],
            settings=[f.setting for f in drawn],
            captions=[f.caption for f in drawn],
            story_context=context,
        )

    # ------------------------------------------------------------------ continuation
    @torch.no_grad()
    def continue_story(
        self,
        story: StoryGPTVPipelineOutput | StoryContext | list[str],
        num_frames: int = 1,
        characters: Mapping[str, Any] | None = None,
        character_embeds: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_caption_tokens: int = 40,
        temperature: float = 0.0,
        caption_constraint: Callable[[str], bool] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_frame_end: Callable[[StoryGPTVPipeline, int, PIL.Image.Image], None] | None = None,
        **kwargs: Any,
    ) -> StoryGPTVPipelineOutput | tuple:
        r"""Let the story model write the next ``num_frames`` captions of a story, and draw them.

        For each new frame the story LLM reads the story so far (every frame's generated image and caption,
        as in :meth:`__call__`), writes the next caption after ``" Caption:"``
        (:meth:`~storygptv.models.story_context.StoryContext.write_caption`), and the frame is drawn from it
        as :meth:`__call__` draws a caption of a story; the drawn frame then joins the context of the next
        one.

        Args:
            story: the story so far: the output of an earlier call (its ``story_context``), a
                :class:`~storygptv.models.story_context.StoryContext` with at least one frame, or a list of
                captions, which are drawn first (with the same arguments) and are not part of the output.
            num_frames: the frames to add (>= 1).
            characters, character_embeds: the cast, as in :meth:`__call__` (pass it again to continue). A written
                caption names each cast member at most once, and no other character the story model knows
                (``StoryContext.write_caption``'s ``once`` / ``never``).
            generator: one ``torch.Generator`` for every frame (the caption sampling included), or one per new
                frame (per caption, then per new frame, when ``story`` is a list of captions).
            max_caption_tokens: the longest caption the model may write, in tokens.
            temperature: 0 (default) writes greedily; a positive value samples the captions.
            caption_constraint: ``constraint(text) -> bool``, whether a caption may start with ``text``: the
                captions are written inside it token by token (e.g. SynthSV's grammar:
                ``storygptv.data.synthsv.caption_prefix_validator(cast)``).
            output_type, return_dict, callback_on_frame_end: as in :meth:`__call__` (the callback's frame index
                counts the new frames from 0).
            **kwargs: other arguments of :meth:`__call__` (``num_inference_steps``, ``guidance_scale``,
                ``grounding``, ...); ``captions``, ``story_context`` and ``latents`` are not accepted.

        Returns:
            :class:`StoryGPTVPipelineOutput` of the new frames only (its ``written_captions`` are the captions as
            the model wrote them, its ``story_context`` the whole story), or ``(images, conditionings)`` when
            ``return_dict=False``.

        Examples:
            ```py
            >>> import storygptv
            >>> from storygptv import StoryGPTVPipeline
            >>> from storygptv.data.synthsv import reference_images

            >>> pipe = StoryGPTVPipeline.from_pretrained(storygptv.DEFAULT_MODEL)
            >>> cast = {name: reference_images()[name] for name in ("Ava", "Bo")}
            >>> story = pipe(["Ava and Bo are standing in the forest.", "They are jumping."], characters=cast)
            >>> more = pipe.continue_story(story, num_frames=2, characters=cast)
            >>> len(more.images), len(more.written_captions), more.story_context.num_frames_committed
            (2, 2, 4)

            ```
        """
        for name in ("captions", "story_context", "latents"):
            if name in kwargs:
                raise TypeError(
                    f"`continue_story` does not take `{name}`: the story so far is `story`, the new captions are "
                    "written by the story model. Use `pipe(...)` to draw given captions."
                )
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` must be an integer >= 1 (frames to add), got {num_frames!r}.")
        if isinstance(story, str):
            raise TypeError(
                "`story` is a single string; pass the story so far as a list of captions (one per frame), or the "
                "output of an earlier call. To turn prose into captions, use `storygptv.StoryDirector`."
            )
        if characters is not None and character_embeds is not None:
            raise ValueError("Pass either `characters` (reference images) or `character_embeds`, not both.")
        if character_embeds is None:
            character_embeds = self.encode_characters(characters, self._execution_device)
        if isinstance(story, (list, tuple)):
            captions = self.check_story(list(story), kwargs.get("context_window"), None)
            first_generators = generator
            if isinstance(generator, list):
                if len(generator) != len(captions) + num_frames:
                    raise ValueError(
                        f"`generator` is a list of {len(generator)}; with a list of captions it needs one per "
                        f"caption and one per new frame ({len(captions)} + {num_frames})."
                    )
                first_generators, generator = generator[: len(captions)], generator[len(captions) :]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Characters .* are not named in any caption")
                story = self(
                    captions,
                    character_embeds=character_embeds,
                    generator=first_generators,
                    output_type="latent",
                    **kwargs,
                )
        context = story.story_context if isinstance(story, StoryGPTVPipelineOutput) else story
        if not isinstance(context, StoryContext):
            raise TypeError(
                "`story` must be a StoryGPTVPipelineOutput (with its story_context), a StoryContext or a list of "
                f"captions, got {type(story).__name__}."
            )
        if context.num_frames_committed == 0:
            raise ValueError(
                "`story` has no frame yet; continue_story writes what comes next. Draw the first caption(s) "
                "with `pipe(captions, characters=...)`, or pass them as a list."
            )
        if context.batch_size != 1:
            raise ValueError(
                "`continue_story` continues one story at a time (a StoryContext of batch_size 1)."
            )
        self.check_generator(generator, num_frames, "new frames")
        kwargs.pop("context_window", None)  # the context keeps its own window
        if context.processor is None:  # the context reads what it writes with the pipeline's processor
            context.processor = self.story_processor
        processor = context.processor

        # A written caption names each cast member at most once, and no character the model knows outside the cast.
        cast_names = list(characters or character_embeds or [])
        cast_keys = {name.lower() for name in cast_names}
        strangers = [
            name
            for name in self.story_model.config.grounding_characters or []
            if cast_keys and name.lower() not in cast_keys
        ]
        outputs, written = [], []
        for index in range(num_frames):
            frame_generator = generator[index] if isinstance(generator, list) else generator
            ids = context.write_caption(
                max_caption_tokens,
                temperature,
                frame_generator,
                once=cast_names,
                never=strangers,
                constraint=caption_constraint,
            )
            caption = processor.decode_caption(ids)
            if not caption:
                warnings.warn(
                    f"The story model wrote an empty caption for new frame {index}; it is drawn from an empty "
                    "caption (a model trained without the caption loss cannot write captions, and a "
                    "`caption_constraint` that allows no first token leaves the caption empty).",
                    stacklevel=3,
                )
            written.append(caption)
            frame_callback = None
            if callback_on_frame_end is not None:

                def frame_callback(
                    pipe: StoryGPTVPipeline, _: int, image: PIL.Image.Image, i: int = index
                ) -> None:
                    callback_on_frame_end(pipe, i, image)

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Characters .* are not named in any caption")
                outputs.append(
                    self(
                        [caption],
                        character_embeds=character_embeds,
                        story_context=context,
                        generator=frame_generator,
                        output_type=output_type,
                        callback_on_frame_end=frame_callback,
                        **kwargs,
                    )
                )

        if output_type == "pil":
            images: Any = [image for out in outputs for image in out.images]
        elif output_type == "np":
            images = np.concatenate([out.images for out in outputs])
        else:
            images = torch.cat([out.images for out in outputs])
        conditionings = None
        if outputs[0].conditionings is not None:
            conditionings = torch.cat([out.conditionings for out in outputs])
        if not return_dict:
            return (images, conditionings)
        return StoryGPTVPipelineOutput(
            images=images,
            conditionings=conditionings,
            characters=[c for out in outputs for c in out.characters],
            settings=[s for out in outputs for s in out.settings],
            captions=[c for out in outputs for c in out.captions],
            story_context=context,
            written_captions=written,
        )


StoryGPTVPipeline.__call__.__doc__ = (StoryGPTVPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
