"""Configuration of the StoryGPT-V stage-2 model (LLM + visual input projection + ``[IMG]`` tokens + LDM mapper)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = [
    "DEFAULT_TRAINING_LOSS_PRESET",
    "GROUNDING_KINDS",
    "LOSS_WEIGHT_KEYS",
    "check_context_window",
    "LOSS_WEIGHT_PRESETS",
    "MAPPER_QUERY_MODES",
    "STAGE2_LOSS_PRESETS",
    "StoryGPTVConfig",
]

#: The stage-2 loss presets (method notes section 8.1, row 1): the one table of them. Each row weighs
#: L_gen (``"gen"``), L_align (``"align"``) and L_img (``"img"``). The model computes L_gen and L_align, so
#: its config holds those two weights (:data:`LOSS_WEIGHT_PRESETS`); L_img needs the frozen Char-LDM, so
#: the trainer (``train_storygptv.py --loss_preset``) reads ``"img"`` from here.
#:
#: - ``"paper"``: 1.0 / 1.0 / 1.0 (the paper gives no weights, so a plain sum).
#: - ``"reference_v1"``: 0.5 * CE + 1.0 * align, no L_img (the public code, v1 script).
#: - ``"reference_v2"``: 0.5 * CE + 1.0 * L_img, alignment logged but not added (the public code, v2 script).
#: - ``"paper_code_scale"``: the paper's three terms with the public code's CE scale, 0.5 / 1.0 / 1.0 (the
#:   trainer's default, :data:`DEFAULT_TRAINING_LOSS_PRESET`).
#:
#: The grounding loss (only computed by a model with a grounding head) weighs 1.0 unless a dict sets it.
STAGE2_LOSS_PRESETS: dict[str, dict[str, float]] = {
    "paper": {"gen": 1.0, "align": 1.0, "img": 1.0},
    "reference_v1": {"gen": 0.5, "align": 1.0, "img": 0.0},
    "reference_v2": {"gen": 0.5, "align": 0.0, "img": 1.0},
    "paper_code_scale": {"gen": 0.5, "align": 1.0, "img": 1.0},
}
#: The preset of ``train_storygptv.py`` when ``--loss_preset`` is not given.
DEFAULT_TRAINING_LOSS_PRESET = "paper_code_scale"
#: The presets as the model config holds them (``loss_weights="paper"``): the weights of the model's losses.
LOSS_WEIGHT_PRESETS: dict[str, dict[str, float]] = {
    name: {key: weight for key, weight in row.items() if key != "img"}
    for name, row in STAGE2_LOSS_PRESETS.items()
}
LOSS_WEIGHT_KEYS: tuple[str, ...] = ("gen", "align", "grounding")
#: Values of ``grounding``: none (the paper), a multi-label head, or restated captions.
GROUNDING_KINDS: tuple[str, ...] = ("none", "head", "restate")
#: Values of ``mapper_queries``: the paper's learned queries, or the frame's own caption encoding.
MAPPER_QUERY_MODES: tuple[str, ...] = ("learned", "caption")


def check_context_window(context_window: Any) -> None:
    """The one rule for a story window (a config's default, or a call's): None (the whole story) or an int >= 1."""
    if context_window is not None and (
        isinstance(context_window, bool) or not isinstance(context_window, int) or context_window < 1
    ):
        raise ValueError(
            f"`context_window` must be None (the whole story) or an integer >= 1, got {context_window!r}."
        )


@strict
class StoryGPTVConfig(PreTrainedConfig):
    r"""Configuration of :class:`~storygptv.models.modeling_storygptv.StoryGPTVForConditionalGeneration`.

    Args:
        text_config: the causal LM, as a config or a dict with ``model_type`` (default: OPT). Any
            ``AutoModelForCausalLM`` architecture works (OPT, Llama, GPT-2, SmolLM, ...).
        vision_embed_dim: width of the image embedding fed to the LLM (CLIP ViT-L/14 ``pooler_output``: 1024).
        num_visual_tokens: m, LLM tokens per image (4).
        num_img_tokens: R, number of ``[IMG]`` tokens (8).
        img_token_ids: the R ids of ``[IMG0]..[IMG{R-1}]`` in the tokenizer (set by ``from_language_model``).
        image_token_id: the placeholder id (``<|image|>``) marking the m visual positions of each image.
        story_bos_token_id: id put once at the start of a story sequence (None: no BOS).
        image_prefix_ids / caption_prefix_ids / target_suffix_ids: token ids of the layout markers
            ``"Image:"``, ``" Caption:"`` and ``" Image:"`` (see :mod:`storygptv.models.story_inputs`); they let
            the model run the KV-cached story API without a tokenizer.
        mapper_hidden_size, mapper_num_heads, mapper_num_encoder_layers, mapper_num_decoder_layers,
        mapper_ffn_dim, mapper_dropout, mapper_norm_first: the LDM mapper (paper: 512, 4, 4, 4, 2048, 0, True).
        ldm_seq_len: number of mapper queries, i.e. the conditioning length (77).
        ldm_hidden_size: conditioning width (768 for SD-1.5).
        mapper_queries: what the mapper's decoder starts from. ``"learned"`` (the paper): ``ldm_seq_len``
            learned queries, so the whole conditioning comes from the LLM. ``"caption"``: the frame's own
            caption encoding as Char-LDM computes it (names fused with their reference images where the
            caption states them), passed as ``caption_conditioning``; the mapper adds a residual to it,
            zero at initialisation, so a frame that names its cast starts from the conditioning Char-LDM
            draws right and the LLM only supplies what the caption leaves open (a pronoun, the setting).
        align_loss: ``"mse"`` (paper, mean over all elements) or ``"l2"`` (GILL: per-token L2 norm of the
            difference, averaged over tokens and batch).
        align_character_weight, align_setting_weight: identity-weighted alignment. L_align weighs each
            conditioning row by its role in the target caption (``target_token_roles``): the fused token of
            a character by ``align_character_weight``, the token of the setting word by
            ``align_setting_weight``, every other row by 1 (a weighted mean over the rows). 1.0 / 1.0 is the
            paper's plain mean.
        grounding: how the model says which characters (and setting) a frame shows, which the pipeline's
            ``grounding="fuse"`` writes into the caption. ``"none"``: it does not (the paper). ``"head"``: a
            multi-label head on the ``[IMG]`` hidden states, trained with the datasets' character labels.
            ``"restate"``: the LLM restates each caption with the characters and setting it leaves open
            filled in (``" Means: Ava and Bo are jumping in the forest."``, trained with L_gen against the
            original captions) between the caption and its ``[IMG]`` tokens, and its history holds the
            restated captions; the names and setting are read off the restatement. Default: ``"head"`` when
            ``grounding_characters`` is set, else ``"none"``.
        grounding_characters: the cast the model grounds (e.g. SynthSV's eight names): the head's labels, or
            the names read off a restatement.
        grounding_settings: the settings it grounds (the head's single label, or read off a restatement), or
            None.
        restate_prefix_ids: token ids of the ``" Means:"`` marker of a restating model.
        max_restate_tokens: most tokens of one restatement at inference (generation stops at a full stop).
        loss_weights: ``{"gen": w, "align": w, "grounding": w}`` or the name of a preset in
            :data:`LOSS_WEIGHT_PRESETS` (``"paper"`` = 1.0 / 1.0, the default; ``"reference_v1"`` = 0.5 / 1.0;
            ``"reference_v2"`` = 0.5 / 0.0). ``"grounding"`` defaults to 1.0 and needs a grounding head.
        label_scope: which captions carry CE labels in training sequences: ``"all"`` (every caption of the
            interleaved story plus ``[IMG0]``, as in the reference) or ``"target"`` (only the target caption and
            ``[IMG0]``).
        freeze_language_model: freeze the LLM (only the ``[IMG]`` rows of its embedding / untied head train).
        lora_rank: LoRA rank on the LLM (0 = off). The adapters are injected at construction, so their weights
            live in ``model.safetensors``.
        lora_alpha, lora_dropout: LoRA scaling and dropout.
        lora_target_modules: module names to adapt (None: peft's default for the LLM's ``model_type``).
        max_context_tokens: LLM token budget of the story context (None: ``text_config.max_position_embeddings``
            when the LLM has one, else unlimited).
        context_window: how many earlier frames the story model reads by default (the pipeline's
            ``context_window`` when a call gives none); None: the whole story. A model trained on short
            stories can set the window it reads well (the SynthSV default: 4, chosen on validation stories;
            benchmarks/README.md).
        initializer_range: std of the normal init of the new layers.

    Example:
        >>> cfg = StoryGPTVConfig(text_config={"model_type": "llama", "hidden_size": 64,
        ...                                    "intermediate_size": 128, "num_hidden_layers": 2,
        ...                                    "num_attention_heads": 4, "num_key_value_heads": 2},
        ...                       loss_weights="reference_v1")
        >>> cfg.loss_weights
        {'gen': 0.5, 'align': 1.0}
    """

    model_type = "storygptv"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_embed_dim: int = 1024
    num_visual_tokens: int = 4
    num_img_tokens: int = 8
    img_token_ids: list[int] | None = None
    image_token_id: int | None = None
    story_bos_token_id: int | None = None
    image_prefix_ids: list[int] | None = None
    caption_prefix_ids: list[int] | None = None
    target_suffix_ids: list[int] | None = None
    mapper_hidden_size: int = 512
    mapper_num_heads: int = 4
    mapper_num_encoder_layers: int = 4
    mapper_num_decoder_layers: int = 4
    mapper_ffn_dim: int = 2048
    mapper_dropout: float = 0.0
    mapper_norm_first: bool = True
    ldm_seq_len: int = 77
    ldm_hidden_size: int = 768
    mapper_queries: Literal["learned", "caption"] = "learned"
    align_loss: Literal["mse", "l2"] = "mse"
    align_character_weight: float = 1.0
    align_setting_weight: float = 1.0
    grounding: Literal["none", "head", "restate"] | None = None
    grounding_characters: list[str] | None = None
    grounding_settings: list[str] | None = None
    restate_prefix_ids: list[int] | None = None
    max_restate_tokens: int = 40
    loss_weights: dict[str, float] | str | None = None
    label_scope: Literal["all", "target"] = "all"
    freeze_language_model: bool = True
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    max_context_tokens: int | None = None
    context_window: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # Follow the LLM's own tie (as Llava does): the wrapper exposes the LLM's embeddings.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._check_grounding()
        if isinstance(self.loss_weights, str):
            if self.loss_weights not in LOSS_WEIGHT_PRESETS:
                raise ValueError(
                    f"Unknown loss-weight preset {self.loss_weights!r}; choose one of {sorted(LOSS_WEIGHT_PRESETS)}."
                )
            weights = dict(LOSS_WEIGHT_PRESETS[self.loss_weights])
        elif self.loss_weights is None:
            weights = dict(LOSS_WEIGHT_PRESETS["paper"])
        else:
            unknown = set(self.loss_weights) - set(LOSS_WEIGHT_KEYS)
            if unknown:
                raise ValueError(
                    f"`loss_weights` keys must be among {list(LOSS_WEIGHT_KEYS)}, got unknown {sorted(unknown)}."
                )
            weights = {"gen": 1.0, "align": 1.0, **{k: float(v) for k, v in self.loss_weights.items()}}
        if self.has_grounding_head:
            weights.setdefault("grounding", 1.0)
        self.loss_weights = weights
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"`loss_weights` must be >= 0, got {self.loss_weights}.")
        check_context_window(self.context_window)
        if self.mapper_queries not in MAPPER_QUERY_MODES:
            raise ValueError(
                f"`mapper_queries` must be one of {list(MAPPER_QUERY_MODES)}, got {self.mapper_queries!r}."
            )
        if self.align_character_weight < 0 or self.align_setting_weight < 0:
            raise ValueError(
                f"`align_character_weight` ({self.align_character_weight}) and `align_setting_weight` "
                f"({self.align_setting_weight}) must be >= 0."
            )
        if self.num_visual_tokens < 1 or self.num_img_tokens < 1:
            raise ValueError(
                f"`num_visual_tokens` ({self.num_visual_tokens}) and `num_img_tokens` ({self.num_img_tokens}) "
                "must both be >= 1."
            )
        if self.img_token_ids is not None and len(self.img_token_ids) != self.num_img_tokens:
            raise ValueError(
                f"`img_token_ids` has {len(self.img_token_ids)} ids but `num_img_tokens` is {self.num_img_tokens}."
            )
        if self.mapper_hidden_size % self.mapper_num_heads != 0:
            raise ValueError(
                f"`mapper_hidden_size` ({self.mapper_hidden_size}) must be divisible by `mapper_num_heads` "
                f"({self.mapper_num_heads})."
            )
        if self.lora_rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0, got {self.lora_rank}.")

    def _check_grounding(self) -> None:
        names_given = bool(self.grounding_characters) or bool(self.grounding_settings)
        if self.grounding is None:  # configs from before the field: names mean a head
            self.grounding = "head" if names_given else "none"
        if self.grounding not in GROUNDING_KINDS:
            raise ValueError(f"`grounding` must be one of {list(GROUNDING_KINDS)}, got {self.grounding!r}.")
        if self.grounding == "head" and not names_given:
            raise ValueError(
                "`grounding='head'` needs `grounding_characters` (and/or `grounding_settings`): the names the head "
                "predicts."
            )
        if self.grounding == "restate" and self.max_restate_tokens < 1:
            raise ValueError(f"`max_restate_tokens` must be >= 1, got {self.max_restate_tokens}.")
        for field_name in ("grounding_characters", "grounding_settings"):
            names = getattr(self, field_name)
            if names is None:
                continue
            names = [str(n) for n in names]
            if not names:
                raise ValueError(
                    f"`{field_name}` is an empty list; pass None for no such head, or the names."
                )
            folded = [n.strip().lower() for n in names]
            if any(not n for n in folded) or len(set(folded)) != len(folded):
                raise ValueError(
                    f"`{field_name}` must hold distinct, non-empty names (compared ignoring case), got {names}."
                )
            setattr(self, field_name, names)
        if (
            isinstance(self.loss_weights, dict)
            and float(self.loss_weights.get("grounding", 0.0)) > 0
            and not self.has_grounding_head
        ):
            raise ValueError(
                "`loss_weights` sets a 'grounding' weight, but the model has no grounding head: set "
                "`grounding_characters` (and/or `grounding_settings`) to the names it should predict, or drop "
                "the 'grounding' weight."
            )

    @property
    def has_grounding_head(self) -> bool:
        """Whether the model predicts the frame's characters and / or setting from its ``[IMG]`` states."""
        return self.grounding == "head"

    @property
    def restates_captions(self) -> bool:
        """Whether the LLM restates each caption with its characters and setting filled in."""
        return self.grounding == "restate"

    @property
    def can_ground(self) -> bool:
        """Whether the model says which characters (and setting) a frame shows (``grounding="fuse"``)."""
        return self.grounding in ("head", "restate")

    @property
    def context_token_budget(self) -> int | None:
        """The effective LLM context budget: ``max_context_tokens`` or the LLM's ``max_position_embeddings``."""
        if self.max_context_tokens is not None:
            return self.max_context_tokens
        return getattr(self.text_config, "max_position_embeddings", None)
