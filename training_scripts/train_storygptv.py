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
- with ``--grounding``, plus ``grounding_loss_weight * L_ground``: the grounding head's BCE over the target
  frame's cast (and CE over its setting) from the ``[IMG]`` states.

Stage-2 design options (each a ``StoryGPTVConfig`` field, so they can be measured alone):
``--mapper_queries caption`` anchors the mapper on the frame's own caption encoding (``--restored_anchor_prob``
sometimes anchors it on the target instead, as the pipeline's ``grounding="fuse"`` does at inference);
``--align_character_weight`` / ``--align_setting_weight`` weigh the target rows of the fused character tokens
and of the setting word in L_align; ``--grounding`` adds the grounding head, whose label sets are the
characters and settings that ``precompute_targets.py`` recorded.

Presets (``--loss_preset``; explicit ``--*_loss_weight`` options override them): ``paper`` (1, 1, 1),
``reference_v1`` (0.5, 1, 0: public code, v1 script), ``reference_v2`` (0.5, 0, 1: public code, v2 script;
alignment still logged). Without a preset: 0.5 / 1.0 / 1.0 (the paper's terms with the code's CE scale).

Validation (``--validation_targets_dir``, a ``precompute_targets.py`` output of held-out stories): every
``--validation_steps`` steps the mean L_align over one fixed target frame per validation story is logged, and the
trained weights of the best step so far are kept in ``<output_dir>/best_alignment/``. The final folder then holds
the best step's weights (the paper's rule: lowest validation alignment distance); ``--export_last`` keeps the
last step's instead.

After every optimizer step the ``[IMG]`` rows are rescaled to the mean norm of the frozen rows. The final folder
is a whole :class:`storygptv.pipelines.pipeline_storygptv.StoryGPTVPipeline` (Char-LDM components of
``--pretrained_model_name_or_path`` + the trained story model and its tokenizer), or only the story model with
``--save_story_model_only``.

Example::

    accelerate launch training_scripts/train_storygptv.py \
        --pretrained_model_name_or_path out/char-ldm --language_model_name_or_path facebook/opt-6.7b \
        --language_model_dtype bfloat16 --targets_dir out/flintstones-targets --dataset flintstones \
        --output_dir out/storygptv-flintstones --mixed_precision bf16 --train_batch_size 32
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from storygptv import training_utils as tu

logger = logging.getLogger("train_storygptv")

#: Stage-2 loss weights ``(gen, align, img)`` of ``--loss_preset`` (method notes section 8.1, row 1).
LOSS_PRESETS: dict[str, dict[str, float]] = {
    "paper": {"gen": 1.0, "align": 1.0, "img": 1.0},
    "reference_v1": {"gen": 0.5, "align": 1.0, "img": 0.0},
    "reference_v2": {"gen": 0.5, "align": 0.0, "img": 1.0},
}
#: Weights when neither a preset nor a weight option is given.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"gen": 0.5, "align": 1.0, "img": 1.0}

TRAINABLE_FILE = "story_model_trainable.safetensors"
_CHAR_LDM_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder", "fuser")

STORY_MODEL_CARD = """---
{{ card_data }}
---

# {{ model_name }}

The stage-2 **story model** of StoryGPT-V ([arXiv 2312.02252](https://arxiv.org/abs/2312.02252)), trained with
the [`storygptv`](https://github.com/storygptv/storygptv) library: a frozen causal LLM, a visual input
projection, `[IMG]` tokens and an LDM mapper that turns the story context into Char-LDM conditioning.
This folder holds only the story model and its tokenizer; combine it with a Char-LDM pipeline:

```python
from transformers import AutoTokenizer
from storygptv import CharLDMPipeline
from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline

story_model = StoryGPTVForConditionalGeneration.from_pretrained("{{ repo_id }}")
story_tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
char_ldm = CharLDMPipeline.from_pretrained("{{ char_ldm }}")
pipe = StoryGPTVPipeline(**char_ldm.components, story_model=story_model, story_tokenizer=story_tokenizer)
```

- **Base models:** {{ base_model }}
- **Training data:** {{ dataset }}

## Training

{{ hyperparameters }}

## Evaluation

{{ metrics }}
"""


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Paper / public-code hyper-parameters (method notes section 3.3).
    parser = tu.training_arg_parser(
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
    )
    parser.add_argument(
        "--lr_step_size",
        type=int,
        default=10_000,
        help="warmup_step schedule: multiply the LR by --lr_step_gamma every N optimizer steps (reference: "
        "5 epochs x 2000 steps).",
    )
    parser.add_argument("--lr_step_gamma", type=float, default=0.1)
    g = parser.add_argument_group("stage-2 data")
    g.add_argument(
        "--targets_dir",
        default=None,
        help="Output of precompute_targets.py. Default: computed (resumably) into <output_dir>/targets from "
        "--dataset / --data_dir with the Char-LDM of --pretrained_model_name_or_path.",
    )
    g.add_argument("--frames_per_story", type=int, default=4, help="(on-the-fly targets) frames per story.")
    g.add_argument("--reference_images_dir", default=None, help="(on-the-fly targets) <Name>.png references.")
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
        "--story_config_overrides", default=None, help="JSON object of further StoryGPTVConfig fields."
    )
    g.add_argument(
        "--mapper_queries",
        choices=("learned", "caption"),
        default="learned",
        help="learned: the paper's learned queries; caption: the mapper starts from the frame's caption encoding "
        "and adds a residual.",
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
        action="store_true",
        help="Add the grounding head (cast and setting of the frame from the [IMG] states), trained on the "
        "targets' character / setting labels.",
    )
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on the LLM (0: LLM fully frozen).")
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument(
        "--gradient_checkpointing", action="store_true", help="Activation checkpointing in the LLM."
    )

    g = parser.add_argument_group("losses")
    g.add_argument("--loss_preset", choices=sorted(LOSS_PRESETS), default=None)
    g.add_argument("--gen_loss_weight", type=float, default=None, help="Weight of L_gen (default 0.5).")
    g.add_argument("--align_loss_weight", type=float, default=None, help="Weight of L_align (default 1.0).")
    g.add_argument("--img_loss_weight", type=float, default=None, help="Weight of L_img (default 1.0).")
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
    weights = dict(LOSS_PRESETS[args.loss_preset]) if args.loss_preset else dict(DEFAULT_LOSS_WEIGHTS)
    for key in ("gen", "align", "img"):
        value = getattr(args, f"{key}_loss_weight")
        if value is not None:
            weights[key] = float(value)
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        parser.error(f"Loss weights must be >= 0 with at least one > 0, got {weights}.")
    if args.grounding:
        if args.grounding_loss_weight < 0:
            parser.error("--grounding_loss_weight must be >= 0.")
        weights["grounding"] = float(args.grounding_loss_weight)
    args.loss_weights = weights
    if not 0.0 <= args.restored_anchor_prob <= 1.0:
        parser.error("--restored_anchor_prob must be in [0, 1].")
    if args.restored_anchor_prob > 0 and args.mapper_queries != "caption":
        parser.error("--restored_anchor_prob only applies to --mapper_queries caption.")
    if args.align_character_weight < 0 or args.align_setting_weight < 0:
        parser.error("--align_character_weight and --align_setting_weight must be >= 0.")
    try:
        args.story_config_overrides = (
            json.loads(args.story_config_overrides) if args.story_config_overrides else {}
        )
    except ValueError as error:
        parser.error(f"--story_config_overrides is not valid JSON: {error}")
    if args.max_length < 16:
        parser.error("--max_length must be at least 16.")
    if args.validation_steps is None:
        args.validation_steps = args.checkpointing_steps
    if args.validation_steps < 1:
        parser.error("--validation_steps must be >= 1.")
    return args


# ---------------------------------------------------------------------------------------------- loading
def _sibling_module(name: str) -> Any:
    """Import a sibling training script (``precompute_targets``) as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _story_model_paths(path: str) -> tuple[str, dict[str, Any]]:
    """``(model path, kwargs)`` of a story model given a pipeline folder or a story-model folder / Hub id."""
    root = Path(path)
    if root.is_dir():
        if (root / "model_index.json").exists():
            if not (root / "story_model").is_dir():
                raise tu.TrainingSetupError(f"Pipeline folder {path!r} has no story_model/ subfolder.")
            return path, {"subfolder": "story_model", "tokenizer_subfolder": "story_tokenizer"}
        if not (root / "config.json").exists():
            raise tu.TrainingSetupError(f"--story_model_name_or_path {path!r} has no config.json.")
    return path, {}


def check_language_model(path: str) -> None:
    root = Path(path)
    if root.is_dir() and not (root / "config.json").exists():
        raise tu.TrainingSetupError(
            f"--language_model_name_or_path {path!r} is a folder without config.json: not a causal-LM folder "
            "(train one with train_text_lm.py)."
        )
    if not root.exists() and (path.startswith((".", "/")) or path.count("/") > 1):
        raise tu.TrainingSetupError(f"--language_model_name_or_path {path!r} does not exist.")


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
        path, kw = _story_model_paths(args.story_model_name_or_path)
        tok_sub = kw.pop("tokenizer_subfolder", None)
        model = StoryGPTVForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **({"subfolder": tok_sub} if tok_sub else {}))
        cfg = model.config
        if (cfg.vision_embed_dim, cfg.ldm_seq_len, cfg.ldm_hidden_size) != (
            vision_dim,
            ldm_seq_len,
            ldm_hidden,
        ):
            raise tu.TrainingSetupError(
                f"The story model expects vision {cfg.vision_embed_dim} / conditioning {cfg.ldm_seq_len}x"
                f"{cfg.ldm_hidden_size}, but the Char-LDM gives {vision_dim} / {ldm_seq_len}x{ldm_hidden}."
            )
        if grounding_labels is not None and not cfg.has_grounding_head:
            raise tu.TrainingSetupError(
                f"--grounding was given, but the story model of {args.story_model_name_or_path!r} has no grounding "
                "head; start from --language_model_name_or_path to add one."
            )
        if cfg.mapper_queries != args.mapper_queries:
            raise tu.TrainingSetupError(
                f"The story model uses mapper_queries={cfg.mapper_queries!r} but --mapper_queries is "
                f"{args.mapper_queries!r}; they must match when continuing a model."
            )
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
            overrides["grounding_characters"] = grounding_labels[0] or None
            overrides["grounding_settings"] = grounding_labels[1] or None
        torch.manual_seed(tu.derive_seed(args.seed, "init"))
        model, tokenizer = StoryGPTVForConditionalGeneration.from_language_model(
            args.language_model_name_or_path, tokenizer, config_overrides=overrides, dtype=dtype
        )
    # The new layers train in float32 whatever the LLM dtype.
    model.visual_projection.float()
    model.ldm_mapper.float()
    model.freeze_language_model(True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- data
def frame_pixels(image: Any, resolution: int, compat: bool) -> torch.Tensor:
    """(3, R, R) VAE input of a frame: [-1, 1], or raw 0-255 values with ``compat`` (the public code's bug)."""
    if not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image))
    image = image.convert("RGB").resize((resolution, resolution), PIL.Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels if compat else pixels / 127.5 - 1.0


class Stage2Collator:
    """:class:`StoryGPTVCollator` + the target frame's pixels (for L_img), reseedable per batch."""

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        args: argparse.Namespace,
        resolution: int | None,
        restored_anchor_prob: float = 0.0,
    ) -> None:
        from storygptv.data.collators_story import StoryGPTVCollator

        self.inner = StoryGPTVCollator(
            tokenizer,
            config,
            max_length=args.max_length,
            label_scope=args.label_scope,
            seed=args.seed,
            restored_anchor_prob=restored_anchor_prob,
        )
        self.resolution = resolution
        self.compat = args.vae_input_compat

    def reseed(self, seed: int) -> None:
        self.inner = copy.copy(self.inner)
        self.inner.rng = np.random.default_rng(seed)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(rows)
        if self.resolution is not None:
            batch["pixel_values"] = torch.stack(
                [
                    frame_pixels(row["images"][int(t)], self.resolution, self.compat)
                    for row, t in zip(rows, batch["target_frame"])
                ]
            )
        return batch


# ---------------------------------------------------------------------------------------------- checkpoints
def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The trained weights only (see ``StoryGPTVForConditionalGeneration.trainable_state_dict``)."""
    return model.trainable_state_dict()


def load_trainable_state_dict(model: Any, state: dict[str, torch.Tensor]) -> None:
    model.load_trainable_state_dict(state)


def register_checkpoint_hooks(accelerator: Any, story_model_class: type) -> None:
    """accelerate save/load hooks that store only the trained story-model weights (not the frozen LLM)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for i in reversed(range(len(models))):
            unwrapped = accelerator.unwrap_model(models[i])
            if isinstance(unwrapped, story_model_class):
                if accelerator.is_main_process:
                    save_file(trainable_state_dict(unwrapped), str(Path(output_dir) / TRAINABLE_FILE))
                if weights:
                    weights.pop(i)

    def load_hook(models: list[Any], input_dir: str) -> None:
        for i in reversed(range(len(models))):
            unwrapped = accelerator.unwrap_model(models[i])
            if isinstance(unwrapped, story_model_class):
                path = Path(input_dir) / TRAINABLE_FILE
                if not path.exists():
                    raise tu.TrainingSetupError(f"Checkpoint {input_dir!r} has no {TRAINABLE_FILE}.")
                load_trainable_state_dict(unwrapped, load_file(str(path)))
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------- LR schedule
def make_lr_scheduler(args: argparse.Namespace, optimizer: Any, num_processes: int) -> Any:
    """``--lr_scheduler``: a diffusers schedule, or ``warmup_step`` (the reference: linear warm-up, then x
    ``--lr_step_gamma`` every ``--lr_step_size`` steps, i.e. StepLR x0.1 every 5 epochs of 2000 steps)."""
    if args.lr_scheduler == "warmup_step":
        warmup = args.lr_warmup_steps * num_processes
        size = max(1, args.lr_step_size) * num_processes

        def factor(step: int) -> float:
            ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
            return ramp * args.lr_step_gamma ** (step // size)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return tu.make_lr_scheduler(args, optimizer, num_processes)


# ---------------------------------------------------------------------------------------------- L_img
class DenoisingLoss:
    """L_img: the frozen Char-LDM's denoising loss of the target frames, conditioned on the mapped states."""

    def __init__(self, vae: Any, unet: Any, scheduler: Any, weight_dtype: torch.dtype) -> None:
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self.weight_dtype = weight_dtype

    def __call__(
        self, pixel_values: torch.Tensor, conditioning: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        device = self.unet.device
        with torch.no_grad():
            dist = self.vae.encode(pixel_values.to(device, self.weight_dtype)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator).to(device, dist.mean.dtype)
            latents = dist.mean + dist.std * eps
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = (latents - shift) * self.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            steps = torch.randint(
                0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
            ).to(device)
            noisy = self.scheduler.add_noise(latents, noise, steps)
            if self.scheduler.config.prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, steps)
            else:
                target = noise
        pred = self.unet(noisy, steps, encoder_hidden_states=conditioning.to(self.weight_dtype)).sample
        return F.mse_loss(pred.float(), target.float())


# ---------------------------------------------------------------------------------------------- validation
BEST_DIR = "best_alignment"


class AlignmentValidator:
    """Mean L_align over one fixed target frame per held-out story; keeps the best step's trained weights.

    With a grounding head the selection score is ``L_align + grounding_weight * L_ground`` (both means over the
    frames), and the exact-match rate of the predicted cast is logged beside it.

    The target frames are drawn once, with a fixed seed, so every validation scores the same frames. The best step
    lives in ``<output_dir>/best_alignment/`` (weights + ``best.json``) and survives a resume: an entry from a
    step later than the resumed one (the run was killed before that step's checkpoint) is discarded.
    """

    def __init__(
        self,
        data: Any,
        collator: Any,
        output_dir: Path,
        batch_size: int,
        resumed_step: int,
        grounding_weight: float = 0.0,
    ) -> None:
        self.grounding_weight = grounding_weight
        self.last: dict[str, float] = {}
        self.batches = []
        collator.reseed(0)
        for start in range(0, len(data), batch_size):
            rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            batch = collator(rows)
            for key in ("batch_index", "target_frame", "pixel_values", "labels"):
                batch.pop(key, None)
            self.batches.append(batch)
        self.folder = output_dir / BEST_DIR
        self.best: dict[str, float] | None = None
        record = self.folder / "best.json"
        if record.exists():
            best = json.loads(record.read_text())
            if int(best["step"]) <= resumed_step:
                self.best = best

    @torch.no_grad()
    def score(self, model: Any, device: torch.device) -> float:
        """The selection score (lower is better); its parts are left in ``self.last``."""
        was_training = model.training
        model.eval()
        align = grounding = exact = 0.0
        count = 0
        for batch in self.batches:
            out = model(**{k: v.to(device) for k, v in batch.items()}, compute_logits=False)
            n = next(iter(batch.values())).shape[0]
            align += float(out.align_loss) * n
            if out.grounding_loss is not None:
                grounding += float(out.grounding_loss) * n
            if out.character_logits is not None and "character_labels" in batch:
                predicted = out.character_logits.sigmoid().cpu() >= 0.5
                exact += float((predicted == batch["character_labels"].bool()).all(-1).sum())
            count += n
        model.train(was_training)
        model.language_model.eval()
        count = max(count, 1)
        self.last = {"align_loss": align / count}
        if model.grounding_head is not None:
            self.last.update(grounding_loss=grounding / count, grounding_exact=100.0 * exact / count)
        return self.last["align_loss"] + self.grounding_weight * self.last.get("grounding_loss", 0.0)

    def update(self, model: Any, step: int, value: float) -> bool:
        """Record ``value`` at ``step``; save the weights if it is the best so far. Returns whether it is."""
        from safetensors.torch import save_file

        if self.best is not None and value >= self.best.get("score", self.best["align_loss"]):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state_dict(model), str(self.folder / TRAINABLE_FILE))
        self.best = {"step": step, "score": value, **(self.last or {"align_loss": value})}
        (self.folder / "best.json").write_text(json.dumps(self.best))
        return True

    def load_best(self, model: Any) -> None:
        from safetensors.torch import load_file

        load_trainable_state_dict(model, load_file(str(self.folder / TRAINABLE_FILE)))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    """Train stage 2; returns the output folder."""
    args = parse_args(argv)
    tu.setup_logging()
    from diffusers import DDPMScheduler

    from storygptv import CharLDMPipeline
    from storygptv.models.modeling_storygptv import StoryGPTVForConditionalGeneration

    output_dir = Path(args.output_dir)
    use_img = args.loss_weights["img"] > 0
    # ---- checks that can fail, before any long work
    tu.check_pipeline_folder(args.pretrained_model_name_or_path, required=_CHAR_LDM_COMPONENTS)
    if args.story_model_name_or_path:
        _story_model_paths(args.story_model_name_or_path)
    else:
        check_language_model(args.language_model_name_or_path)
    settings = tu.run_settings(
        args,
        {
            key: getattr(args, key)
            for key in (
                "language_model_name_or_path", "story_model_name_or_path", "targets_dir", "frames_per_story",
                "max_length", "lora_rank", "num_img_tokens", "num_visual_tokens", "mapper_queries",
                "restored_anchor_prob", "grounding", "align_loss", "align_character_weight",
                "align_setting_weight", "loss_weights",
            )
        },
    )  # fmt: skip
    resume = tu.find_resume_checkpoint(args, settings)
    precompute = _sibling_module("precompute_targets")
    targets_dir = args.targets_dir
    if targets_dir is None:
        tu.check_dataset_args(args)
        targets_dir = str(output_dir / "targets")
    elif not (Path(targets_dir) / precompute.CONFIG_FILE).exists():
        raise tu.TrainingSetupError(
            f"--targets_dir {targets_dir!r} is not a precompute_targets.py output (no {precompute.CONFIG_FILE})."
        )

    val_data = None
    if args.validation_targets_dir is not None:  # loaded now: a clear error before training if incomplete
        val_data = precompute.load_precomputed_targets(args.validation_targets_dir)
        if "images" in val_data.column_names:
            val_data = val_data.remove_columns("images")  # validation scores L_align only

    accelerator = tu.make_accelerator(args)
    if args.targets_dir is None:
        if accelerator.is_main_process:
            pre_argv = [
                "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                "--dataset", args.dataset, "--split", "train", "--seed", str(args.seed),
                "--frames_per_story", str(args.frames_per_story), "--output_dir", targets_dir,
                "--target_type", args.target_type,
            ]  # fmt: skip
            for flag in ("data_dir", "num_stories", "train_dataset_path", "reference_images_dir"):
                if getattr(args, flag) is not None:
                    pre_argv += [f"--{flag}", str(getattr(args, flag))]
            if not use_img:
                pre_argv.append("--no_store_images")
            precompute.main(pre_argv)
        accelerator.wait_for_everyone()
    data = precompute.load_precomputed_targets(targets_dir)
    target_info = json.loads(data.info.description)
    if use_img and "images" not in data.column_names:
        raise tu.TrainingSetupError(
            f"L_img needs the ground-truth frames, but {targets_dir!r} was computed with --no_store_images; "
            "recompute it with images or pass --img_loss_weight 0."
        )
    if not use_img and "images" in data.column_names:
        data = data.remove_columns("images")  # not decoded at all

    char_ldm = CharLDMPipeline.from_pretrained(args.pretrained_model_name_or_path)
    vision_dim = int(char_ldm.image_encoder.config.hidden_size)
    ldm_hidden = int(char_ldm.text_encoder.config.hidden_size)
    ldm_seq_len = int(char_ldm.tokenizer.model_max_length)
    got = (target_info["vision_embed_dim"], target_info["ldm_seq_len"], target_info["ldm_hidden_size"])
    if got != (vision_dim, ldm_seq_len, ldm_hidden):
        raise tu.TrainingSetupError(
            f"{targets_dir!r} was computed for vision {got[0]} / conditioning {got[1]}x{got[2]}, but the Char-LDM "
            f"gives {vision_dim} / {ldm_seq_len}x{ldm_hidden}: recompute the targets with this Char-LDM."
        )

    grounding_labels = None
    if args.grounding:
        if "character_names" not in target_info:
            raise tu.TrainingSetupError(
                f"--grounding needs the character / setting label sets that precompute_targets.py (format 2) "
                f"records; {targets_dir!r} has none: recompute it."
            )
        grounding_labels = (list(target_info["character_names"]), list(target_info["setting_names"]))
        if not grounding_labels[0] and not grounding_labels[1]:
            raise tu.TrainingSetupError(
                f"--grounding: the stories of {targets_dir!r} label no character and no setting."
            )
    if args.mapper_queries == "caption" and "caption_conditioning" not in data.column_names:
        raise tu.TrainingSetupError(
            f"--mapper_queries caption needs each frame's caption encoding, which {targets_dir!r} lacks: "
            "recompute it with this version of precompute_targets.py."
        )
    model, tokenizer = build_story_model(args, vision_dim, ldm_seq_len, ldm_hidden, grounding_labels)
    if args.gradient_checkpointing:
        lm = model.language_model
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable()
    weight_dtype = tu.weight_dtype_for(args.mixed_precision)
    resolution = None
    img_loss = None
    if use_img:
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
    n_trainable = sum(v.numel() for v in trainable_state_dict(model).values())
    logger.info(
        "%d stories; story model: %s trained values ([IMG] rows included); losses %s",
        len(data),
        f"{n_trainable:,}",
        args.loss_weights,
    )
    optimizer = tu.make_optimizer(groups, args)  # the groups set their own weight_decay
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    register_checkpoint_hooks(accelerator, StoryGPTVForConditionalGeneration)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    untied_head = unwrapped.has_untied_output_head

    sampler = tu.make_batch_sampler(len(data), args, accelerator)
    global_step = tu.resume_training(accelerator, args, resume, sampler, log=logger.info)
    collator = Stage2Collator(
        tokenizer, unwrapped.config, args, resolution, restored_anchor_prob=args.restored_anchor_prob
    )
    loader = tu.make_train_dataloader(data, sampler, collator, args)
    validator = None
    if val_data is not None and accelerator.is_main_process:
        val_collator = Stage2Collator(tokenizer, unwrapped.config, args, None)
        validator = AlignmentValidator(
            val_data,
            val_collator,
            output_dir,
            args.train_batch_size,
            resumed_step=global_step,
            grounding_weight=args.loss_weights.get("grounding", 0.0),
        )
        logger.info("Validation: %d held-out stories every %d steps", len(val_data), args.validation_steps)
    tu.init_trackers(accelerator, args, "storygptv-stage2")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    progress = tu.progress_bar(accelerator, args, global_step)
    model.train()
    unwrapped.language_model.eval()  # frozen LLM: no dropout
    batches = iter(loader)
    step_times: list[float] = []
    last_logs: dict[str, float] = {}
    w = args.loss_weights
    while global_step < args.max_train_steps:
        started = time.perf_counter()
        sums: dict[str, list[torch.Tensor]] = {}
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            batch_index = batch.pop("batch_index")
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
                    generator = tu.step_generator(args.seed, "noise", batch_index, accelerator.process_index)
                    with accelerator.autocast():
                        terms["img_loss"] = img_loss(pixel_values, out.conditioning, generator)
                    loss = loss + w["img"] * terms["img_loss"]
                tu.optimizer_step(accelerator, loss, optimizer, trainable, args.max_grad_norm, lr_scheduler)
                if accelerator.sync_gradients:
                    unwrapped.renormalize_img_embeddings(include_output_head=untied_head)
            terms["loss"] = loss
            for key, value in terms.items():
                sums.setdefault(key, []).append(value.detach().float())
        global_step += 1
        step_times.append(time.perf_counter() - started)
        last_logs = {k: float(accelerator.gather(torch.stack(v).mean()).mean()) for k, v in sums.items()}
        last_logs["lr"] = lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{last_logs['loss']:.4f}", align=f"{last_logs['align_loss']:.4f}")
        if global_step % args.logging_steps == 0:
            accelerator.log({**last_logs, "step_time_s": step_times[-1]}, step=global_step)
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
        tu.end_of_step_checkpoint(
            accelerator, args, global_step, at_end=True, extra={"loss_weights": w}, settings=settings
        )
    progress.close()

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
            "mean_step_time_s": float(np.mean(step_times)) if step_times else None,
            "final_logs": last_logs,
            "loss_weights": w,
            "num_stories": len(data),
        }
        export(args, output_dir, final, tokenizer, summary, target_info)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if args.push_to_hub:
            repo_id = args.hub_model_id or output_dir.name
            url = tu.push_folder_to_hub(
                output_dir,
                repo_id,
                token=args.hub_token,
                private=args.hub_private,
                ignore_patterns=("checkpoint-*", "logs/*", "targets/*", "train_summary.json"),
            )
            logger.info("Pushed to %s", url)
    accelerator.end_training()
    return output_dir


def export(
    args: argparse.Namespace,
    output_dir: Path,
    model: Any,
    tokenizer: Any,
    summary: dict[str, Any],
    target_info: dict,
) -> None:
    """Save the whole StoryGPTVPipeline (or the story model only) with its model card."""
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
    metrics = {f"final {k}": v for k, v in summary["final_logs"].items() if k != "lr"}
    if summary.get("best_validation"):
        metrics["best validation align_loss"] = summary["best_validation"]["align_loss"]
        metrics["exported step"] = summary["exported_step"]
    dataset = "custom stories" if target_info.get("train_dataset_path") else target_info.get("dataset")
    repo_id = args.hub_model_id or output_dir.name
    if args.save_story_model_only:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        tu.scrub_local_paths(output_dir)
        _story_model_card(args, output_dir, repo_id, base_lm, dataset, hyper, metrics)
        return
    char_ldm = CharLDMPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe = StoryGPTVPipeline(**char_ldm.components, story_model=model, story_tokenizer=tokenizer)
    pipe.save_pretrained(output_dir)
    tu.scrub_local_paths(output_dir)
    tu.write_model_card(
        output_dir,
        "storygptv",
        repo_id=repo_id,
        base_model=[base_lm, args.pretrained_model_name_or_path],
        dataset=dataset,
        hyperparameters=hyper,
        metrics=metrics,
        tags=["text-to-image"],
    )


def _story_model_card(
    args: argparse.Namespace,
    folder: Path,
    repo_id: str,
    base_lm: str,
    dataset: Any,
    hyper: dict,
    metrics: dict,
) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    bases = [b for b in (base_lm, args.pretrained_model_name_or_path) if b]
    hub = [b for b in bases if not Path(b).exists() and re.match(r"^[\w.-]+/[\w.-]+$", b)]
    data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["storygptv", "story-visualization"],
        base_model=hub or None,
        inference=False,
    )

    def table(rows: dict[str, Any]) -> str:
        if not rows:
            return "(none recorded)"
        body = "\n".join(
            f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in rows.items()
        )
        return "| name | value |\n|---|---|\n" + body

    card = ModelCard.from_template(
        data,
        template_str=STORY_MODEL_CARD,
        model_name=repo_id,
        repo_id=repo_id,
        char_ldm=args.pretrained_model_name_or_path,
        base_model=", ".join(bases),
        dataset=dataset or "(unspecified)",
        hyperparameters=table(hyper),
        metrics=table(metrics),
    )
    card.save(str(folder / "README.md"))


if __name__ == "__main__":
    main()
