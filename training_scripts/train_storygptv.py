#!/usr/bin/env python
"""Stage 2 of StoryGPT-V: align a (frozen) LLM with the trained Char-LDM.

The story model (:class:`storygptv.models.modeling_storygptv.StoryGPTVForConditionalGeneration`) reads an
interleaved story ``[BOS] Image: <4 visual tokens of frame 0> Caption: c_0 ... Caption: c_t Image: [IMG0..7]``
(ground-truth frames, referential captions) and maps the ``[IMG]`` states to the 77 x d conditioning of the
Char-LDM. Trained: the visual input projection, the ``[IMG]`` embedding rows and the LDM mapper (the LLM stays
frozen; ``--lora_rank`` adds LoRA adapters). The loss is

    gen_loss_weight * L_gen  +  align_loss_weight * L_align  +  img_loss_weight * L_img

- L_gen: cross-entropy over the captions and ``[IMG0]``;
- L_align: ``--align_loss mse`` (paper) or ``l2`` (GILL's per-token L2) between the mapped conditioning and the
  precomputed stage-1 conditioning of the frame's non-referential caption (``precompute_targets.py``);
- L_img: denoising loss of the ground-truth target frame through the **frozen** Char-LDM UNet conditioned on the
  mapped conditioning (gradients reach the mapper through the UNet). The frame enters the VAE scaled to
  [-1, 1]; ``--vae_input_compat`` reproduces the public code, which feeds raw 0-255 values;
- with ``--grounding head``, plus ``grounding_loss_weight * L_ground``: the grounding head's BCE over the target
  frame's cast (and CE over its setting) from the ``[IMG]`` states; with ``--grounding restate`` the LLM's
  restatement of the target caption (names and setting filled in) is part of L_gen.

Stage-2 design options (each a ``StoryGPTVConfig`` field, so they can be measured alone):
``--mapper_queries caption`` anchors the mapper on the frame's own caption encoding (``--restored_anchor_prob``
sometimes anchors it on the target instead, as the pipeline's ``grounding="fuse"`` does at inference);
``--align_character_weight`` / ``--align_setting_weight`` weigh the target rows of the fused character tokens
and of the setting word in L_align; ``--grounding head|restate`` makes the model ground frames, with the
characters and settings that ``precompute_targets.py`` recorded.

Presets (``--loss_preset``, the table ``STAGE2_LOSS_PRESETS`` of ``storygptv.models.configuration_storygptv``;
explicit ``--*_loss_weight`` options override them): ``paper`` (1, 1, 1), ``reference_v1`` (0.5, 1, 0: public
code, v1 script), ``reference_v2`` (0.5, 0, 1: public code, v2 script; alignment still logged), and the default
``paper_code_scale`` (0.5, 1, 1: the paper's terms with the code's CE scale).

Validation (``--validation_targets_dir``, a ``precompute_targets.py`` output of held-out stories): every
``--validation_steps`` steps the mean L_align over one fixed target frame per validation story is logged, and the
trained weights of the best step so far are kept in ``<output_dir>/best_alignment/``. The final folder then holds
the best step's weights (the paper's rule: lowest validation alignment distance); ``--export_last`` keeps the
last step's instead.

Without ``--targets_dir`` the targets are computed first (resumably) into ``<output_dir>/targets`` with the
library's ``storygptv.training.targets.compute_targets``, as ``precompute_targets.py`` would. The loop, its
LR-scheduler semantics (every schedule counts optimizer steps) and the checkpoints are those of every
training script (``storygptv.training``); checkpoints hold only the trained weights of the story model.

After every optimizer step the ``[IMG]`` rows are rescaled to the mean norm of the frozen rows. The final folder
is a whole :class:`storygptv.pipelines.pipeline_storygptv.StoryGPTVPipeline` (Char-LDM components of
``--pretrained_model_name_or_path`` + the trained story model and its tokenizer) that carries its cast in
``characters/`` (the reference images of the targets: ``--reference_images_dir``, else SynthSV's or the story
folder's, else the Char-LDM folder's ``characters/``), or only the story model with ``--save_story_model_only``.
Your own stories: ``--dataset folder --data_dir DIR`` (README, "Fine-tune on your own stories").

Example::

    accelerate launch training_scripts/train_storygptv.py \
        --pretrained_model_name_or_path out/char-ldm --language_model_name_or_path facebook/opt-6.7b \
        --language_model_dtype bfloat16 --targets_dir out/flintstones-targets --dataset flintstones \
        --output_dir out/storygptv-flintstones --mixed_precision bf16 --train_batch_size 32
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from storygptv.models.configuration_storygptv import DEFAULT_TRAINING_LOSS_PRESET, STAGE2_LOSS_PRESETS
from storygptv.training.accelerate_setup import (
    init_trackers,
    make_accelerator,
    setup_logging,
    weight_dtype_for,
)
from storygptv.training.arguments import (
    frames_per_story_default,
    json_object,
    run_settings,
    training_arg_parser,
)
from storygptv.training.checkpoints import save_checkpoint
from storygptv.training.checks import TrainingSetupError, check_dataset, check_pipeline_folder
from storygptv.training.data import (
    ResumableBatchSampler,
    derive_seed,
    load_train_stories,
    make_train_dataloader,
    next_batch,
)
from storygptv.training.hub import TRAINING_LEFTOVERS, hub_repo_id, push_folder_to_hub, scrub_local_paths
from storygptv.training.loop import (
    StepLogger,
    finish_training,
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
from storygptv.training.stage2 import (
    BEST_DIR,
    AlignmentValidator,
    DenoisingLoss,
    Stage2Collator,
    check_language_model,
    check_stage2_targets,
    register_checkpoint_hooks,
    story_model_source,
)
from storygptv.training.targets import CONFIG_FILE, compute_targets, load_precomputed_targets

logger = logging.getLogger("train_storygptv")

_CHAR_LDM_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder", "fuser")
# The options (beyond the common ones) that determine a stage-2 run's result; a resume must match them.
_SETTINGS = (
    "language_model_name_or_path", "story_model_name_or_path", "targets_dir", "frames_per_story", "max_length",
    "lora_rank", "num_img_tokens", "num_visual_tokens", "mapper_queries", "restored_anchor_prob", "grounding",
    "align_loss", "align_character_weight", "align_setting_weight", "loss_weights", "train_language_model",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Paper / public-code hyper-parameters (method notes section 3.3).
    parser = training_arg_parser(
        __doc__,
        allow_abbrev=False,
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_weight_decay=0.01,
        adam_epsilon=1e-8,
        lr_scheduler="warmup_step",
        lr_warmup_steps=2000,
        max_grad_norm=1.0,
        train_batch_size=32,
        max_train_steps=180_000,
        checkpointing_steps=2000,
        output_dir="outputs/storygptv",
        lr_step_size=10_000,  # the reference: x0.1 every 5 epochs of 2000 steps
    )
    g = parser.add_argument_group("stage-2 data")
    g.add_argument(
        "--targets_dir",
        default=None,
        help="Output of precompute_targets.py. Default: computed (resumably) into <output_dir>/targets from "
        "--dataset / --data_dir with the Char-LDM of --pretrained_model_name_or_path.",
    )
    g.add_argument(
        "--frames_per_story",
        type=int,
        default=None,
        help="(on-the-fly targets) frames per story (default: 4; whole stories for --dataset folder).",
    )
    g.add_argument(
        "--reference_images_dir",
        default=None,
        help="<Name>.png references: fused into the on-the-fly targets, and the cast written to "
        "<output_dir>/characters/ (default: the targets' own references, else the Char-LDM folder's).",
    )
    g.add_argument(
        "--target_type",
        choices=("fused", "text"),
        default="fused",
        help="(on-the-fly targets) Emb_fuse / Emb_text.",
    )
    g.add_argument(
        "--validation_targets_dir",
        default=None,
        help="precompute_targets.py output of held-out stories (e.g. --split validation): validate L_align on "
        "it and export the best step's weights.",
    )
    g.add_argument(
        "--validation_steps", type=int, default=None, help="Validate every N steps (default: checkpointing)."
    )
    g.add_argument(
        "--export_last",
        action="store_true",
        help="With validation, export the last step's weights rather than the best step's.",
    )
    g.add_argument("--max_length", type=int, default=160, help="LLM sequence length (oldest frames dropped).")
    g.add_argument("--label_scope", choices=("all", "target"), default="all", help="Captions with CE labels.")

    g = parser.add_argument_group("story model")
    g.add_argument(
        "--language_model_name_or_path",
        default="facebook/opt-6.7b",
        help="Causal LM to build the story model around (Hub id, or a train_text_lm.py folder).",
    )
    g.add_argument("--tokenizer_name_or_path", default=None, help="LLM tokenizer (default: the LLM's own).")
    g.add_argument(
        "--story_model_name_or_path",
        default=None,
        help="Continue from a trained story model (a StoryGPTVPipeline folder or a story-model folder) instead "
        "of --language_model_name_or_path.",
    )
    g.add_argument(
        "--language_model_dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype of the frozen LLM weights (bfloat16 for OPT-6.7B); the new layers stay float32.",
    )
    g.add_argument("--num_visual_tokens", type=int, default=4, help="m: LLM tokens per image.")
    g.add_argument("--num_img_tokens", type=int, default=8, help="R: number of [IMG] tokens.")
    g.add_argument("--mapper_hidden_size", type=int, default=512)
    g.add_argument("--mapper_num_heads", type=int, default=4)
    g.add_argument("--mapper_num_layers", type=int, default=4, help="Encoder and decoder layers each.")
    g.add_argument("--mapper_ffn_dim", type=int, default=2048)
    g.add_argument(
        "--story_config_overrides",
        type=json_object,
        default={},
        help="JSON object of further StoryGPTVConfig fields.",
    )
    g.add_argument(
        "--mapper_queries",
        choices=("learned", "caption"),
        default=None,
        help="learned: the paper's learned queries; caption: the mapper starts from the frame's caption encoding "
        "and adds a residual. Default: the continued story model's own, else learned.",
    )
    g.add_argument(
        "--restored_anchor_prob",
        type=float,
        default=0.0,
        help="(caption mapper) probability per example of anchoring on the target (caption with names and "
        "setting restored) instead of the caption as written.",
    )
    g.add_argument(
        "--grounding",
        nargs="?",
        const="head",
        default=None,
        choices=("none", "head", "restate"),
        help="How the story model grounds frames: 'head' (also plain --grounding): a multi-label head on the "
        "[IMG] states, trained on the targets' character / setting labels; 'restate': the LLM restates each "
        "caption with its characters and setting filled in before its [IMG] tokens (L_gen on the original "
        "captions) and reads a restated history; 'none' (the paper). Default: the continued story model's own, "
        "else none.",
    )
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on the LLM (0: LLM fully frozen).")
    g.add_argument(
        "--train_language_model",
        action="store_true",
        help="Train the whole LLM instead of keeping it frozen (the paper freezes OPT-6.7B). For a small LLM "
        "trained on the story world, such as the SynthSV default's: frozen, its [IMG] states do not learn to "
        "carry who a frame shows (benchmarks/README.md).",
    )
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument(
        "--gradient_checkpointing", action="store_true", help="Activation checkpointing in the LLM."
    )

    g = parser.add_argument_group("losses")
    g.add_argument(
        "--loss_preset",
        choices=sorted(STAGE2_LOSS_PRESETS),
        default=DEFAULT_TRAINING_LOSS_PRESET,
        help="Weights of L_gen / L_align / L_img (STAGE2_LOSS_PRESETS of the story model's config).",
    )
    g.add_argument(
        "--gen_loss_weight", type=float, default=None, help="Weight of L_gen (overrides the preset)."
    )
    g.add_argument("--align_loss_weight", type=float, default=None, help="Weight of L_align (overrides it).")
    g.add_argument("--img_loss_weight", type=float, default=None, help="Weight of L_img (overrides it).")
    g.add_argument("--align_loss", choices=("mse", "l2"), default="mse", help="mse (paper) or l2 (GILL).")
    g.add_argument(
        "--align_character_weight",
        type=float,
        default=1.0,
        help="L_align weight of the target rows at fused character tokens (1: the paper's plain mean).",
    )
    g.add_argument(
        "--align_setting_weight",
        type=float,
        default=1.0,
        help="L_align weight of the target row at the setting word (1: the paper's plain mean).",
    )
    g.add_argument(
        "--grounding_loss_weight", type=float, default=1.0, help="Weight of the grounding loss (--grounding)."
    )
    g.add_argument(
        "--vae_input_compat",
        action="store_true",
        help="L_img: feed the VAE raw 0-255 pixel values, like the public code (default: [-1, 1]).",
    )
    g.add_argument(
        "--resolution", type=int, default=None, help="L_img frame size (default: the UNet's native size)."
    )

    g = parser.add_argument_group("output")
    g.add_argument(
        "--save_story_model_only",
        action="store_true",
        help="Save only the story model + tokenizer instead of the whole StoryGPTVPipeline.",
    )
    args = parser.parse_args(argv)
    try:
        resolve_story_design(args)
    except (OSError, ValueError, TrainingSetupError) as error:
        parser.error(f"--story_model_name_or_path: {error}")
    weights = dict(STAGE2_LOSS_PRESETS[args.loss_preset])
    for key in ("gen", "align", "img"):
        value = getattr(args, f"{key}_loss_weight")
        if value is not None:
            weights[key] = float(value)
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        parser.error(f"Loss weights must be >= 0 with at least one > 0, got {weights}.")
    if args.grounding == "head":
        if args.grounding_loss_weight < 0:
            parser.error("--grounding_loss_weight must be >= 0.")
        weights["grounding"] = float(args.grounding_loss_weight)
    if args.grounding == "restate" and weights["gen"] <= 0:
        parser.error(
            "--grounding restate learns its restatements through L_gen: --gen_loss_weight must be > 0."
        )
    args.loss_weights = weights
    if not 0.0 <= args.restored_anchor_prob <= 1.0:
        parser.error("--restored_anchor_prob must be in [0, 1].")
    if args.restored_anchor_prob > 0 and args.mapper_queries != "caption":
        parser.error("--restored_anchor_prob only applies to --mapper_queries caption.")
    if args.align_character_weight < 0 or args.align_setting_weight < 0:
        parser.error("--align_character_weight and --align_setting_weight must be >= 0.")
    if args.max_length < 16:
        parser.error("--max_length must be at least 16.")
    args.frames_per_story = frames_per_story_default(args.dataset, args.frames_per_story)
    if args.validation_steps is None:
        args.validation_steps = args.checkpointing_steps
    if args.validation_steps < 1:
        parser.error("--validation_steps must be >= 1.")
    return args


def resolve_story_design(args: argparse.Namespace) -> None:
    """Fill ``--mapper_queries`` / ``--grounding`` when not given: a continued story model keeps its own design
    (so fine-tuning the default needs no flags restating it); a new one gets the paper's (learned, none)."""
    if args.mapper_queries is not None and args.grounding is not None:
        return
    design = {"mapper_queries": "learned", "grounding": "none"}
    if args.story_model_name_or_path:
        from storygptv.models.configuration_storygptv import StoryGPTVConfig

        path, kwargs = story_model_source(args.story_model_name_or_path)
        config = StoryGPTVConfig.from_pretrained(path, subfolder=kwargs.get("subfolder", ""))
        design = {"mapper_queries": config.mapper_queries, "grounding": config.grounding}
    for key, value in design.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ---------------------------------------------------------------------------------------------- model
def model_loss_weights(args: argparse.Namespace) -> dict[str, float]:
    """The loss weights the story model's config holds (L_img is the trainer's)."""
    return {k: v for k, v in args.loss_weights.items() if k != "img"}


def build_story_model(
    args: argparse.Namespace,
    vision_dim: int,
    ldm_seq_len: int,
    ldm_hidden: int,
    grounding_labels: tuple[list[str], list[str]] | None = None,
) -> tuple[Any, Any]:
    """The story model and its tokenizer (new around an LLM, or loaded from ``--story_model_name_or_path``).

    ``grounding_labels`` = ``(characters, settings)`` adds a grounding head with these label sets.
    """
    from transformers import AutoTokenizer

    from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration

    dtype = getattr(torch, args.language_model_dtype)
    if args.story_model_name_or_path:
        path, kw = story_model_source(args.story_model_name_or_path)
        tok_sub = kw.pop("tokenizer_subfolder", None)
        model = StoryGPTVForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **({"subfolder": tok_sub} if tok_sub else {}))
        cfg = model.config
        if (cfg.vision_embed_dim, cfg.ldm_seq_len, cfg.ldm_hidden_size) != (
            vision_dim,
            ldm_seq_len,
            ldm_hidden,
        ):
            raise TrainingSetupError(
                f"The story model expects vision {cfg.vision_embed_dim} / conditioning {cfg.ldm_seq_len}x"
                f"{cfg.ldm_hidden_size}, but the Char-LDM gives {vision_dim} / {ldm_seq_len}x{ldm_hidden}."
            )
        if args.grounding != "none" and cfg.grounding != args.grounding:
            raise TrainingSetupError(
                f"--grounding {args.grounding} was given, but the story model of {args.story_model_name_or_path!r} "
                f"grounds with {cfg.grounding!r}; start from --language_model_name_or_path to change it."
            )
        if cfg.mapper_queries != args.mapper_queries:
            raise TrainingSetupError(
                f"The story model uses mapper_queries={cfg.mapper_queries!r} but --mapper_queries is "
                f"{args.mapper_queries!r}; they must match when continuing a model."
            )
        if grounding_labels is not None and model.grounding_head is not None:
            added = model.extend_grounding_labels(*grounding_labels)
            if any(added):
                logger.info("Grounding head extended with characters %s and settings %s.", *added)
        cfg.loss_weights = model_loss_weights(args)
        cfg.align_loss = args.align_loss
        cfg.align_character_weight = args.align_character_weight
        cfg.align_setting_weight = args.align_setting_weight
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer_name_or_path or args.language_model_name_or_path
        )
        overrides = {
            "vision_embed_dim": vision_dim,
            "ldm_seq_len": ldm_seq_len,
            "ldm_hidden_size": ldm_hidden,
            "num_visual_tokens": args.num_visual_tokens,
            "num_img_tokens": args.num_img_tokens,
            "mapper_hidden_size": args.mapper_hidden_size,
            "mapper_num_heads": args.mapper_num_heads,
            "mapper_num_encoder_layers": args.mapper_num_layers,
            "mapper_num_decoder_layers": args.mapper_num_layers,
            "mapper_ffn_dim": args.mapper_ffn_dim,
            "align_loss": args.align_loss,
            "align_character_weight": args.align_character_weight,
            "align_setting_weight": args.align_setting_weight,
            "mapper_queries": args.mapper_queries,
            "loss_weights": model_loss_weights(args),
            "label_scope": args.label_scope,
            "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha,
            **args.story_config_overrides,
        }
        if grounding_labels is not None:
            overrides["grounding"] = args.grounding
            overrides["grounding_characters"] = grounding_labels[0] or None
            overrides["grounding_settings"] = grounding_labels[1] or None
        torch.manual_seed(derive_seed(args.seed, "init"))
        model, tokenizer = StoryGPTVForConditionalGeneration.from_language_model(
            args.language_model_name_or_path, tokenizer, config_overrides=overrides, dtype=dtype
        )
    # The new layers train in float32 whatever the LLM dtype.
    model.visual_projection.float()
    model.ldm_mapper.float()
    model.config.freeze_language_model = not args.train_language_model
    model.freeze_language_model(not args.train_language_model)
    return model, tokenizer


def targets_references(reference_images_dir: str | None, targets_dir: str) -> dict[str, Any]:
    """The cast of a run on precomputed targets: ``--reference_images_dir``, else the references the targets
    were computed with (read again from what ``precompute_config.json`` recorded; ``{}`` when that cannot be
    read from here, e.g. a relative path from another working directory)."""
    if reference_images_dir:
        return read_cast_images(reference_images_dir)
    source = json.loads((Path(targets_dir) / CONFIG_FILE).read_text())
    try:
        return training_references(
            source.get("reference_images_dir"),
            str(source.get("dataset") or ""),
            source.get("train_dataset_path"),
            data_dir=source.get("data_dir"),
            required=False,
        )
    except TrainingSetupError as error:
        logger.warning("The references of %s cannot be read again (%s).", targets_dir, error)
        return {}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    """Train stage 2; returns the output folder."""
    args = parse_args(argv)
    setup_logging()
    from diffusers import DDPMScheduler

    from storygptv import CharLDMPipeline
    from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration

    output_dir = Path(args.output_dir)
    use_img = args.loss_weights["img"] > 0
    # ---- checks that can fail, before any long work
    check_pipeline_folder(args.pretrained_model_name_or_path, required=_CHAR_LDM_COMPONENTS)
    if args.story_model_name_or_path:
        story_model_source(args.story_model_name_or_path)
    else:
        check_language_model(args.language_model_name_or_path)
    settings = run_settings(args, {key: getattr(args, key) for key in _SETTINGS})
    resume = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        settings,
        overwrite=args.overwrite_output_dir,
        allow_changed_settings=args.allow_changed_settings,
    )
    targets_dir = args.targets_dir
    if targets_dir is None:  # computed below, into the output folder
        check_dataset(args.dataset, args.data_dir, args.train_dataset_path)
        references = training_references(
            args.reference_images_dir,
            args.dataset,
            args.train_dataset_path,
            data_dir=args.data_dir,
            required=args.target_type == "fused",
        )
        targets_dir = str(output_dir / "targets")
    elif not (Path(targets_dir) / CONFIG_FILE).exists():
        raise TrainingSetupError(
            f"--targets_dir {targets_dir!r} is not a precompute_targets.py output (no {CONFIG_FILE})."
        )
    else:
        references = targets_references(args.reference_images_dir, targets_dir)
    cast = references or pipeline_cast(args.pretrained_model_name_or_path)
    val_data = None
    if args.validation_targets_dir is not None:  # loaded now: a clear error before training if incomplete
        val_data = load_precomputed_targets(args.validation_targets_dir)
        if "images" in val_data.column_names:
            val_data = val_data.remove_columns("images")  # validation scores L_align only

    accelerator = make_accelerator(
        args.output_dir,
        logging_dir=args.logging_dir,
        report_to=args.report_to,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        train_batch_size=args.train_batch_size,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.targets_dir is None:
        if accelerator.is_main_process:
            stories = load_train_stories(
                args.dataset,
                data_dir=args.data_dir,
                seed=args.seed,
                num_stories=args.num_stories,
                train_dataset_path=args.train_dataset_path,
                frames_per_story=args.frames_per_story,
                referential=True,
                **args.dataset_options,
            )
            source_keys = ("dataset", "data_dir", "train_dataset_path", "frames_per_story", "seed")
            compute_targets(
                args.pretrained_model_name_or_path,
                stories,
                targets_dir,
                references=references,
                source={k: getattr(args, k) for k in source_keys}
                | {
                    "split": "train",
                    "reference_images_dir": args.reference_images_dir,
                    "dataset_options": args.dataset_options or None,
                },
                target_type=args.target_type,
                store_images=use_img,
            )
        accelerator.wait_for_everyone()
    data = load_precomputed_targets(targets_dir)
    target_info = json.loads(data.info.description)

    char_ldm = CharLDMPipeline.from_pretrained(args.pretrained_model_name_or_path)
    vision_dim = int(char_ldm.image_encoder.config.hidden_size)
    ldm_hidden = int(char_ldm.text_encoder.config.hidden_size)
    ldm_seq_len = int(char_ldm.tokenizer.model_max_length)
    grounding_labels = check_stage2_targets(
        targets_dir,
        target_info,
        data.column_names,
        char_ldm_sizes=(vision_dim, ldm_seq_len, ldm_hidden),
        img_loss=use_img,
        grounding=args.grounding != "none",
        caption_anchored=args.mapper_queries == "caption",
    )
    if not use_img and "images" in data.column_names:
        data = data.remove_columns("images")  # not decoded at all
    model, tokenizer = build_story_model(args, vision_dim, ldm_seq_len, ldm_hidden, grounding_labels)
    if args.gradient_checkpointing:
        lm = model.language_model
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable()
    weight_dtype = weight_dtype_for(args.mixed_precision)
    resolution = None
    img_loss = None
    if use_img:  # the frozen VAE and UNet of L_img, in the half type under mixed precision
        vae, unet = char_ldm.vae, char_ldm.unet
        for module in (vae, unet):
            module.requires_grad_(False)
            module.eval()
            module.to(accelerator.device)
            if weight_dtype != torch.float32:
                module.to(dtype=weight_dtype)
        resolution = args.resolution or unet.config.sample_size * char_ldm.vae_scale_factor
        noise_scheduler = DDPMScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler"
        )
        img_loss = DenoisingLoss(vae, unet, noise_scheduler, weight_dtype)
    del char_ldm  # reloaded in float32 for the final export

    groups = model.trainable_parameter_groups(weight_decay=args.adam_weight_decay)
    trainable = [p for group in groups for p in group["params"]]
    n_trainable = sum(v.numel() for v in model.trainable_state_dict().values())
    logger.info(
        "%d stories; story model: %s trained values ([IMG] rows included); losses %s",
        len(data),
        f"{n_trainable:,}",
        args.loss_weights,
    )
    optimizer = make_optimizer(  # the groups set their own weight_decay
        groups,
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
    register_checkpoint_hooks(accelerator, StoryGPTVForConditionalGeneration)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    untied_head = unwrapped.has_untied_output_head

    sampler = ResumableBatchSampler(
        len(data), args.train_batch_size, seed=args.seed, num_replicas=world, rank=rank
    )
    global_step = resume_training(
        accelerator,
        resume,
        sampler,
        output_dir=args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        overwrite=args.overwrite_output_dir,
        log=logger.info,
    )
    collator_options = {"max_length": args.max_length, "label_scope": args.label_scope, "seed": args.seed}
    collator = Stage2Collator(
        tokenizer,
        unwrapped.config,
        **collator_options,
        resolution=resolution,
        raw_pixels=args.vae_input_compat,
        restored_anchor_prob=args.restored_anchor_prob,
    )
    loader = make_train_dataloader(
        data, sampler, collator, seed=args.seed, num_workers=args.dataloader_num_workers
    )
    validator = None
    if val_data is not None and accelerator.is_main_process:
        validator = AlignmentValidator(
            val_data,
            Stage2Collator(tokenizer, unwrapped.config, **collator_options),
            output_dir,
            args.train_batch_size,
            resumed_step=global_step,
            grounding_weight=args.loss_weights.get("grounding", 0.0),
        )
        logger.info("Validation: %d held-out stories every %d steps", len(val_data), args.validation_steps)
    init_trackers(accelerator, args.tracker_project_name or "storygptv-stage2", vars(args))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # The loop of every training script (storygptv.training.loop).
    steps = StepLogger(
        accelerator,
        args.max_train_steps,
        initial_step=global_step,
        accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
    )
    model.train()
    unwrapped.language_model.eval()  # frozen LLM: no dropout
    data_iter = iter(loader)
    micro = sampler.start_batch
    w = args.loss_weights
    while global_step < args.max_train_steps:
        batch = next_batch(data_iter, micro)
        generator = seed_micro_step(args.seed, "noise", micro, rank)
        batch.pop("target_frame")
        pixel_values = batch.pop("pixel_values", None)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if w["gen"] == 0:
            batch.pop("labels")
        with accelerator.accumulate(model):
            out = model(**batch, compute_logits=w["gen"] > 0)
            terms = {"align_loss": out.align_loss}
            loss = w["align"] * out.align_loss
            if out.gen_loss is not None:
                terms["gen_loss"] = out.gen_loss
                loss = loss + w["gen"] * out.gen_loss
            if out.grounding_loss is not None:
                terms["grounding_loss"] = out.grounding_loss
                loss = loss + w.get("grounding", 0.0) * out.grounding_loss
            if img_loss is not None:
                with accelerator.autocast():
                    terms["img_loss"] = img_loss(pixel_values, out.conditioning, generator)
                loss = loss + w["img"] * terms["img_loss"]
            optimizer_step(accelerator, loss, optimizer, lr_scheduler, trainable, args.max_grad_norm)
            if accelerator.sync_gradients:
                unwrapped.renormalize_img_embeddings(include_output_head=untied_head)
        steps.add(loss=loss, **terms)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        # One optimizer step done.
        global_step += 1
        steps.end_step(global_step, lr_scheduler.get_last_lr()[0])
        if args.validation_targets_dir is not None and (
            global_step % args.validation_steps == 0 or global_step == args.max_train_steps
        ):
            if validator is not None:  # main process only; the others wait
                value = validator.score(unwrapped, accelerator.device)
                parts = ", ".join(f"{k} {v:.4f}" for k, v in validator.last.items())
                best = validator.update(unwrapped, global_step, value)
                logger.info("step %d: validation %s%s", global_step, parts, " (best so far)" if best else "")
                accelerator.log({f"val_{k}": v for k, v in validator.last.items()}, step=global_step)
            accelerator.wait_for_everyone()
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(
                accelerator,
                args.output_dir,
                global_step,
                settings,
                extra={"loss_weights": w},
                total_limit=args.checkpoints_total_limit,
            )
        if global_step == args.debug_interrupt_at_step:
            raise KeyboardInterrupt(f"--debug_interrupt_at_step {global_step}")
    steps.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).eval()
        exported_step = global_step
        if validator is not None and validator.best is not None and not args.export_last:
            validator.load_best(final)
            exported_step = int(validator.best["step"])
        summary = {
            "global_step": global_step,
            "exported_step": exported_step,
            "best_validation": validator.best if validator is not None else None,
            "mean_step_time_s": steps.mean_step_time,
            "final_logs": steps.last_logs,
            "loss_weights": w,
            "num_stories": len(data),
        }
        export(args, output_dir, final, tokenizer, summary, target_info, cast)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if args.push_to_hub:
            url = push_folder_to_hub(
                output_dir,
                hub_repo_id(args.hub_model_id, output_dir),
                token=args.hub_token,
                private=args.hub_private or None,
                ignore_patterns=(*TRAINING_LEFTOVERS, "targets/*", f"{BEST_DIR}/*", "train_summary.json"),
            )
            logger.info("Pushed to %s", url)
    finish_training(accelerator, args.output_dir, steps)
    return output_dir


def export(
    args: argparse.Namespace,
    output_dir: Path,
    model: Any,
    tokenizer: Any,
    summary: dict[str, Any],
    target_info: dict,
    cast: dict[str, Any],
) -> None:
    """Save the whole StoryGPTVPipeline (with its ``cast`` in ``characters/``), or the story model only, with
    its model card."""
    from storygptv import CharLDMPipeline
    from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

    model.config.use_cache = True
    base_lm = (
        args.language_model_name_or_path
        if not args.story_model_name_or_path
        else args.story_model_name_or_path
    )
    hp_keys = [
        "loss_preset", "align_loss", "vae_input_compat", "max_length", "num_visual_tokens", "num_img_tokens",
        "label_scope", "lora_rank", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
        "adam_beta1", "adam_beta2", "adam_weight_decay", "lr_scheduler", "lr_warmup_steps", "max_train_steps",
        "mixed_precision", "language_model_dtype", "seed",
    ]  # fmt: skip
    hyper = {k: getattr(args, k) for k in hp_keys if getattr(args, k, None) is not None}
    hyper.update({f"{k}_loss_weight": v for k, v in args.loss_weights.items()})
    hyper["target_type"] = target_info.get("target_type")
    metrics = {f"final {k}": v for k, v in summary["final_logs"].items() if k not in ("lr", "step_time_s")}
    if summary.get("best_validation"):
        metrics["best validation align_loss"] = summary["best_validation"]["align_loss"]
        metrics["exported step"] = summary["exported_step"]
    dataset = card_dataset_name(
        target_info.get("dataset"), target_info.get("train_dataset_path"), target_info.get("data_dir")
    )
    repo_id = args.hub_model_id or output_dir.name
    if args.save_story_model_only:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        scrub_local_paths(output_dir)
        write_model_card(
            output_dir,
            "story_model",
            repo_id=repo_id,
            base_model=[base_lm, args.pretrained_model_name_or_path],
            dataset=dataset,
            hyperparameters=hyper,
            metrics=metrics,
            char_ldm=args.pretrained_model_name_or_path,
        )
        return
    char_ldm = CharLDMPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe = StoryGPTVPipeline(**char_ldm.components, story_model=model, story_tokenizer=tokenizer)
    pipe.save_pretrained(output_dir)
    scrub_local_paths(output_dir)
    write_cast(output_dir, cast)
    write_model_card(
        output_dir,
        "storygptv",
        repo_id=repo_id,
        base_model=[base_lm, args.pretrained_model_name_or_path],
        dataset=dataset,
        hyperparameters=hyper,
        metrics=metrics,
        tags=["text-to-image"],
    )


if __name__ == "__main__":
    main()
