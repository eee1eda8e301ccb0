"""StoryGPT-V stage 2: a (frozen) causal LLM that reads an interleaved story and maps ``[IMG]`` tokens to LDM
conditioning.

Components (method notes section 3.1):

- ``language_model``: any ``AutoModelForCausalLM`` (OPT by default), frozen; optional LoRA adapters.
- ``visual_projection``: Linear(vision_embed_dim -> m * embed_dim). A CLIP image embedding becomes m LLM input
  embeddings, scattered into the m placeholder positions (``image_token_id``) of ``input_ids``.
- R ``[IMG]`` tokens: rows of the LLM embedding matrix; a gradient row mask keeps every other row frozen (and
  likewise the ``[IMG]`` rows of an untied output head).
- ``ldm_mapper``: :class:`~storygptv.models.mapper.StoryLDMMapper`, fed with the last-layer hidden states **plus**
  the input embeddings at the R ``[IMG]`` positions; outputs (B, 77, ldm_hidden_size).
- ``grounding_head`` (optional): :class:`~storygptv.models.grounding_head.StoryGroundingHead`, the frame's cast
  and setting from the ``[IMG]`` states.

``forward`` reads top to bottom like Llava's: input embeddings with the projected images scattered into their
placeholders, the language model (with ``cache=``), the ``[IMG]`` states, the mapper, the losses. The model never
tokenizes and holds no story: :class:`~storygptv.models.processing_storygptv.StoryGPTVProcessor` lays sequences
out, and :class:`~storygptv.models.story_context.StoryContext` carries a story's cache from frame to frame.
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils.generic import can_return_tuple

from .alignment import alignment_loss
from .configuration_storygptv import StoryGPTVConfig
from .grounding_head import StoryGroundingHead
from .mapper import StoryLDMMapper
from .outputs_storygptv import NextFrameOutput, StoryGPTVOutput, cache_argument_name, output_cache
from .story_inputs import StoryTokens, add_story_special_tokens
from .story_weights import IMG_ROWS_SUFFIX, StoryWeightsMixin

__all__ = [
    "IMG_ROWS_SUFFIX",
    "NextFrameOutput",
    "StoryGPTVForConditionalGeneration",
    "StoryGPTVOutput",
    "StoryGPTVPreTrainedModel",
    "cache_argument_name",
    "output_cache",
]


class StoryGPTVPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight init of the new layers, capability flags."""

    config: StoryGPTVConfig
    base_model_prefix = "language_model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["StoryLDMMapper"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, StoryLDMMapper):
            init.normal_(module.queries, mean=0.0, std=self.config.initializer_range)
            if module.anchored:
                # A caption-anchored mapper starts as the identity on its anchor (zero residual).
                init.zeros_(module.out_proj.weight)
                init.zeros_(module.out_proj.bias)


class StoryGPTVForConditionalGeneration(StoryWeightsMixin, StoryGPTVPreTrainedModel, GenerationMixin):
    """StoryGPT-V stage-2 model (LLM + visual projection + ``[IMG]`` tokens + LDM mapper).

    Args:
        config: the model configuration.
        language_model: an already built causal LM to wrap instead of a random one from ``config.text_config``
            (used by :meth:`from_language_model`; its weights are left untouched).

    Example:
        >>> from storygptv.models.processing_storygptv import StoryGPTVProcessor
        >>> from storygptv.testing.story_model import tiny_story_model
        >>> model, tok = tiny_story_model()
        >>> seq = StoryGPTVProcessor(tok).build_sequence(["Fred is in the yard."], "He waves.")
        >>> out = model(input_ids=torch.tensor([seq.input_ids]), image_embeds=torch.randn(1, 32))
        >>> out.conditioning.shape, out.img_hidden_states.shape
        (torch.Size([1, 77, 32]), torch.Size([1, 8, 32]))
    """

    def __init__(self, config: StoryGPTVConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            # Weights of a pretrained LLM must survive `post_init`.
            for module in language_model.modules():
                module._is_hf_initialized = True
        self.language_model = language_model
        if config.lora_rank > 0:
            self.inject_lora()
        embed_dim = self.language_model.get_input_embeddings().weight.shape[1]
        self.visual_projection = nn.Linear(config.vision_embed_dim, config.num_visual_tokens * embed_dim)
        self.ldm_mapper = StoryLDMMapper(
            in_dim=embed_dim,
            d_model=config.mapper_hidden_size,
            num_heads=config.mapper_num_heads,
            num_encoder_layers=config.mapper_num_encoder_layers,
            num_decoder_layers=config.mapper_num_decoder_layers,
            ffn_dim=config.mapper_ffn_dim,
            num_queries=config.ldm_seq_len,
            out_dim=config.ldm_hidden_size,
            dropout=config.mapper_dropout,
            norm_first=config.mapper_norm_first,
            anchored=config.mapper_queries == "caption",
        )
        self.grounding_head = (
            StoryGroundingHead(
                embed_dim, len(config.grounding_characters or []), len(config.grounding_settings or [])
            )
            if config.has_grounding_head
            else None
        )
        self._grad_mask_handles: list[Any] = []
        self._grad_masked_params: list[int] = []
        self._llm_frozen = False
        self.post_init()
        if config.freeze_language_model:
            self.freeze_language_model()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_language_model(
        cls,
        language_model: str | os.PathLike | PreTrainedModel,
        tokenizer: Any = None,
        config_overrides: dict[str, Any] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> tuple["StoryGPTVForConditionalGeneration", Any]:
        """Build a StoryGPT-V model around a pretrained causal LM and its tokenizer.

        Adds ``<|image|>`` and ``[IMG0]..[IMG{R-1}]`` to the tokenizer (in place), resizes the LLM embeddings
        when needed (``mean_resizing=False``), records every layout id in the config and returns
        ``(model, tokenizer)``. The visual projection and the mapper are freshly initialised.

        Args:
            language_model: a Hub id / local folder (loaded with ``AutoModelForCausalLM.from_pretrained``) or a
                model instance.
            tokenizer: the LLM tokenizer (loaded with ``AutoTokenizer`` from ``language_model`` when None and a
                path was given).
            config_overrides: ``StoryGPTVConfig`` fields (e.g. ``{"vision_embed_dim": 1024, "lora_rank": 8}``).
            **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ...).

        Example:
            >>> model, tok = StoryGPTVForConditionalGeneration.from_language_model(
            ...     "facebook/opt-6.7b", config_overrides={"vision_embed_dim": 1024}, dtype=torch.float16
            ... )  # doctest: +SKIP
        """
        overrides = dict(config_overrides or {})
        if isinstance(language_model, (str, os.PathLike)):
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(language_model)
            language_model = AutoModelForCausalLM.from_pretrained(language_model, **from_pretrained_kwargs)
        elif from_pretrained_kwargs:
            raise TypeError(
                f"Loading kwargs {sorted(from_pretrained_kwargs)} were given with an already built model."
            )
        if tokenizer is None:
            raise ValueError("A tokenizer is required when `language_model` is a model instance.")
        num_img = int(overrides.get("num_img_tokens", 8))
        num_visual = int(overrides.get("num_visual_tokens", 4))
        add_story_special_tokens(tokenizer, num_img)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        tokens = StoryTokens.from_tokenizer(tokenizer, num_visual_tokens=num_visual, num_img_tokens=num_img)
        kwargs = {**tokens.to_config_kwargs(), **overrides}
        config = StoryGPTVConfig(text_config=language_model.config, **kwargs)
        model = cls(config, language_model=language_model)
        return model, tokenizer

    # ------------------------------------------------------------------ embeddings / freezing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def _llm_body(self) -> nn.Module:
        lm = self.language_model
        return getattr(lm, lm.base_model_prefix)

    @property
    def has_untied_output_head(self) -> bool:
        """Whether the LLM output head has its own weight (e.g. Llama) instead of sharing the input embedding."""
        head = self.get_output_embeddings()
        return head is not None and head.weight is not self.get_input_embeddings().weight

    # ------------------------------------------------------------------ forward pieces
    def project_images(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, vision_embed_dim) -> (N * m, embed_dim) LLM input embeddings, in placeholder order."""
        embed_dim = self.get_input_embeddings().weight.shape[1]
        weight = self.visual_projection.weight
        projected = self.visual_projection(image_embeds.to(device=weight.device, dtype=weight.dtype))
        return projected.reshape(-1, embed_dim)

    def embed_inputs(
        self, input_ids: torch.LongTensor, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with the projected ``image_embeds`` scattered into the placeholders.

        ``image_embeds`` is (num_images, vision_embed_dim) (or (B, n, vision_embed_dim), flattened), one row per
        run of ``num_visual_tokens`` placeholders, in the row-major order of the placeholders in ``input_ids``.
        """
        inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder = (
            input_ids == self.config.image_token_id if self.config.image_token_id is not None else None
        )
        n_placeholders = int(placeholder.sum()) if placeholder is not None else 0
        m = self.config.num_visual_tokens
        if image_embeds is None:
            if n_placeholders:
                raise ValueError(
                    f"`input_ids` contain {n_placeholders} image placeholder tokens ({n_placeholders / m:g} images "
                    f"of {m} tokens) but no `image_embeds` were given."
                )
            return inputs_embeds
        image_embeds = image_embeds.reshape(-1, image_embeds.shape[-1])
        if image_embeds.shape[-1] != self.config.vision_embed_dim:
            raise ValueError(
                f"`image_embeds` must have {self.config.vision_embed_dim} features (vision_embed_dim), got "
                f"{image_embeds.shape[-1]}."
            )
        n_images = image_embeds.shape[0]
        if n_placeholders != n_images * m:
            raise ValueError(
                f"Got {n_images} image embeddings (x {m} visual tokens = {n_images * m} positions) but `input_ids` "
                f"contain {n_placeholders} image placeholder tokens (id {self.config.image_token_id})."
            )
        if n_images == 0:
            return inputs_embeds
        visual = self.project_images(image_embeds).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(placeholder.unsqueeze(-1).expand_as(inputs_embeds), visual)

    def _img_positions(self, input_ids: torch.LongTensor) -> torch.Tensor | None:
        """(B, R) positions of the ``[IMG]`` run of each row, or None when no row has ``[IMG]`` tokens."""
        if not self.config.img_token_ids:
            return None
        ids = torch.tensor(self.config.img_token_ids, device=input_ids.device)
        mask = torch.isin(input_ids, ids)
        counts = mask.sum(-1)
        if int(counts.sum()) == 0:
            return None
        R = len(self.config.img_token_ids)
        if not bool((counts == R).all()):
            raise ValueError(
                f"Every sequence must hold exactly one run of the {R} [IMG] tokens; found per-row counts "
                f"{counts.tolist()}."
            )
        positions = mask.nonzero()[:, 1].view(-1, R)
        if not bool((positions[:, -1] - positions[:, 0] == R - 1).all()):
            raise ValueError("The [IMG] tokens of a sequence must be consecutive ([IMG0]..[IMG{R-1}]).")
        return positions

    def map_img_tokens(
        self,
        img_hidden_states: torch.Tensor,
        img_input_embeds: torch.Tensor,
        caption_conditioning: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mapper on ``hidden + input embedding`` of the R ``[IMG]`` tokens -> (B, ldm_seq_len, ldm_hidden_size).

        ``caption_conditioning`` is the anchor of a caption-anchored mapper (``mapper_queries="caption"``): the
        frame's caption encoding as Char-LDM computes it. The learned-query mapper takes none.
        """
        mapper_dtype = self.ldm_mapper.in_proj.weight.dtype
        features = img_hidden_states.to(mapper_dtype) + img_input_embeds.to(mapper_dtype)
        if caption_conditioning is not None:
            caption_conditioning = caption_conditioning.to(device=features.device)
        return self.ldm_mapper(features, caption_conditioning)

    def compute_align_loss(
        self, conditioning: torch.Tensor, target: torch.Tensor, token_roles: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L_align with the config's distance and identity weights (see :mod:`storygptv.models.alignment`)."""
        config = self.config
        return alignment_loss(
            conditioning,
            target,
            token_roles,
            kind=config.align_loss,
            character_weight=config.align_character_weight,
            setting_weight=config.align_setting_weight,
        )

    def ground(self, img_hidden_states: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Grounding logits ``(characters, settings)`` of the ``[IMG]`` states; ``(None, None)`` without a head."""
        if self.grounding_head is None:
            return None, None
        return self.grounding_head(img_hidden_states)

    def extend_grounding_labels(
        self, characters: list[str], settings: list[str]
    ) -> tuple[list[str], list[str]]:
        """Teach the grounding head the names of ``characters`` / ``settings`` it does not know yet (e.g. the
        cast of a story folder the model is fine-tuned on): their rows are added after the known ones, which
        keep their weights, and the config's label sets grow with them. Returns the added ``(characters,
        settings)``; names compare ignoring case, as everywhere."""
        if self.grounding_head is None:
            raise ValueError(
                "This story model has no grounding head to extend (`grounding_characters` is unset)."
            )
        config = self.config
        known_chars = {n.lower() for n in config.grounding_characters or []}
        known_settings = {n.lower() for n in config.grounding_settings or []}
        new_chars = list(dict.fromkeys(n for n in characters if n.lower() not in known_chars))
        # A head without a setting output stays without one (settings need a label set from the start).
        new_settings = [] if not known_settings else list(dict.fromkeys(
            n for n in settings if n.lower() not in known_settings
        ))  # fmt: skip
        if new_chars or new_settings:
            self.grounding_head.extend(len(new_chars), len(new_settings))
            config.grounding_characters = [*(config.grounding_characters or []), *new_chars]
            if new_settings:
                config.grounding_settings = [*config.grounding_settings, *new_settings]
        return new_chars, new_settings

    def grounded_characters(self, character_logits: torch.Tensor, threshold: float = 0.5) -> list[list[str]]:
        """Names of the characters predicted present (probability >= ``threshold``), most probable first."""
        names = self.config.grounding_characters or []
        probs = character_logits.float().sigmoid().cpu()
        out = []
        for row in probs:
            order = torch.argsort(row, descending=True, stable=True).tolist()
            out.append([names[i] for i in order if float(row[i]) >= threshold])
        return out

    def grounded_settings(self, setting_logits: torch.Tensor) -> list[str]:
        """The most probable setting of each row."""
        names = self.config.grounding_settings or []
        return [names[i] for i in setting_logits.float().argmax(-1).tolist()]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        target_conditioning: torch.Tensor | None = None,
        caption_conditioning: torch.Tensor | None = None,
        target_token_roles: torch.LongTensor | None = None,
        character_labels: torch.Tensor | None = None,
        setting_labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        compute_logits: bool = True,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> StoryGPTVOutput:
        """Run the LLM over an interleaved story batch.

        Args:
            input_ids: (B, L) ids laid out by :mod:`storygptv.models.story_inputs` (right padding), with
                ``num_visual_tokens`` placeholders per image and one run of the R ``[IMG]`` ids per row.
            attention_mask: (B, L) padding mask.
            image_embeds: (num_images, vision_embed_dim) CLIP embeddings in placeholder order.
            labels: (B, L) CE labels (-100 ignored); shifted inside.
            target_conditioning: (B, ldm_seq_len, ldm_hidden_size) alignment target.
            caption_conditioning: (B, ldm_seq_len, ldm_hidden_size) the anchor of a caption-anchored mapper (the
                target frame's caption encoding as written); required with ``mapper_queries="caption"``.
            target_token_roles: (B, ldm_seq_len) role of each target row (0 other, 1 character, 2 setting) for
                the identity-weighted L_align.
            character_labels: (B, len(grounding_characters)) multi-hot cast of the target frame (rows of -1:
                unknown), for the grounding loss.
            setting_labels: (B,) index of the target frame's setting in ``grounding_settings`` (-100: unknown).
            inputs_embeds: precomputed input embeddings (then ``input_ids`` may still be given to locate
                ``[IMG]`` tokens).
            cache: the LLM key/value cache (``past_key_values`` is accepted as its old name).
            compute_logits: set False to skip the LM head (conditioning only).

        Returns:
            :class:`StoryGPTVOutput`.
        """
        if (input_ids is None) == (inputs_embeds is None) and inputs_embeds is None:
            raise ValueError("Pass `input_ids` (and optionally `inputs_embeds`).")
        if cache is None:
            cache = past_key_values
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if self.training:
            self._ensure_trainable_rows()
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        body = self._llm_body()
        out = body(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **{cache_argument_name(body): cache},
            **kwargs,
        )
        hidden = out.last_hidden_state
        logits = None
        if compute_logits or labels is not None:
            logits = self.get_output_embeddings()(hidden)

        gen_loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
            gen_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

        conditioning = img_hidden = img_embeds = character_logits = setting_logits = None
        positions = self._img_positions(input_ids) if input_ids is not None else None
        if positions is not None:
            rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(-1)
            img_hidden, img_embeds = hidden[rows, positions], inputs_embeds[rows, positions]
            character_logits, setting_logits = self.ground(img_hidden)
            # A caption-anchored mapper needs its anchor; without one (e.g. a story context reading the frame
            # before it resolves the caption) the conditioning is left to the caller.
            if caption_conditioning is not None or not self.ldm_mapper.anchored:
                conditioning = self.map_img_tokens(img_hidden, img_embeds, caption_conditioning)

        align_loss = None
        if target_conditioning is not None:
            if conditioning is None:
                raise ValueError(
                    "`target_conditioning` was given but there is no conditioning to align: `input_ids` hold no "
                    "[IMG] tokens, or a caption-anchored mapper got no `caption_conditioning`."
                )
            align_loss = self.compute_align_loss(conditioning, target_conditioning, target_token_roles)
        grounding_loss = StoryGroundingHead.loss(
            character_logits, setting_logits, character_labels, setting_labels
        )

        weights = self.config.loss_weights
        terms = []
        if gen_loss is not None:
            terms.append(weights["gen"] * gen_loss)
        if align_loss is not None:
            terms.append(weights["align"] * align_loss)
        if grounding_loss is not None:
            terms.append(weights.get("grounding", 1.0) * grounding_loss)
        loss = torch.stack(terms).sum() if terms else None

        return StoryGPTVOutput(
            loss=loss,
            gen_loss=gen_loss,
            align_loss=align_loss,
            grounding_loss=grounding_loss,
            logits=logits,
            conditioning=conditioning,
            img_hidden_states=img_hidden,
            img_input_embeds=img_embeds,
            character_logits=character_logits,
            setting_logits=setting_logits,
            cache=output_cache(out) if use_cache is not False else None,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, is_first_iteration: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        image_embeds = kwargs.pop("image_embeds", None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["image_embeds"] = image_embeds
        return model_inputs


AutoConfig.register("storygptv", StoryGPTVConfig, exist_ok=True)
AutoModel.register(StoryGPTVConfig, StoryGPTVForConditionalGeneration, exist_ok=True)
