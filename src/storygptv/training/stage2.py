"""Stage 2 (``train_storygptv.py``): its batches, L_img, checkpoints of the trained weights only, and the
validation that picks the exported step.

- :class:`Stage2Collator`: :class:`~storygptv.data.collators_story.StoryGPTVCollator` plus the target
  frame's pixels for L_img;
- :class:`DenoisingLoss`: L_img, the frozen Char-LDM's denoising loss of the target frame conditioned on
  the mapped ``[IMG]`` states (gradients reach the mapper through the frozen UNet);
- :func:`register_checkpoint_hooks`: accelerate checkpoints hold the story model's trained weights
  (``model.trainable_state_dict()``), not the frozen LLM;
- :class:`AlignmentValidator`: mean L_align on held-out stories, keeping the best step's weights;
- :func:`check_stage2_targets`, :func:`story_model_source`, :func:`check_language_model`: the checks that
  run before the long work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..data.collators import frame_pixel_values
from .checks import TrainingSetupError
from .diffusion import denoising_loss, noisy_latents_and_target, sample_latents

__all__ = [
    "BEST_DIR",
    "TRAINABLE_FILE",
    "AlignmentValidator",
    "DenoisingLoss",
    "Stage2Collator",
    "check_language_model",
    "check_stage2_targets",
    "register_checkpoint_hooks",
    "restatement_scores",
    "story_model_source",
]

#: The trained story-model weights inside a checkpoint folder (and ``best_alignment/``).
TRAINABLE_FILE = "story_model_trainable.safetensors"
#: Subfolder of the output folder holding the best validation step's trained weights and ``best.json``.
BEST_DIR = "best_alignment"


class Stage2Collator:
    """:class:`~storygptv.data.collators_story.StoryGPTVCollator` + the target frame's ``pixel_values``.

    Args:
        tokenizer, config: the story model's tokenizer and config.
        max_length: ``--max_length`` (oldest frames dropped beyond it).
        label_scope: ``--label_scope``.
        seed: the collator's seed (the training loader reseeds it per batch anyway).
        resolution: side of ``pixel_values`` (L_img), or ``None`` to leave them out.
        raw_pixels: ``--vae_input_compat``: 0-255 values instead of [-1, 1] (the public code's VAE input).
        restored_anchor_prob: ``--restored_anchor_prob`` (caption-anchored mapper).
    """

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        *,
        max_length: int,
        label_scope: str,
        seed: int = 0,
        resolution: int | None = None,
        raw_pixels: bool = False,
        restored_anchor_prob: float = 0.0,
    ) -> None:
        from ..data.collators_story import StoryGPTVCollator

        self.inner = StoryGPTVCollator(
            tokenizer,
            config,
            max_length=max_length,
            label_scope=label_scope,
            seed=seed,
            restored_anchor_prob=restored_anchor_prob,
        )
        self.resolution = resolution
        self.raw_pixels = raw_pixels

    def reseed(self, seed: int) -> None:
        """Restart the randomness of the story collator (target frames, anchors) from ``seed``."""
        self.inner.reseed(seed)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(rows)
        if self.resolution is not None:
            batch["pixel_values"] = torch.stack(
                [
                    frame_pixel_values(row["images"][int(t)], self.resolution, raw=self.raw_pixels)
                    for row, t in zip(rows, batch["target_frame"])
                ]
            )
        return batch


class DenoisingLoss:
    """L_img: the frozen Char-LDM's denoising loss of the target frames, conditioned on the mapped states.

    ``vae`` and ``unet`` are frozen and in ``weight_dtype``; the posterior sample, the noise and the
    timesteps come from the micro-step's generator (:mod:`storygptv.training.diffusion`).
    """

    def __init__(self, vae: Any, unet: Any, scheduler: Any, weight_dtype: torch.dtype) -> None:
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self.weight_dtype = weight_dtype

    def __call__(
        self, pixel_values: torch.Tensor, conditioning: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        device = self.unet.device
        with torch.no_grad():
            dist = self.vae.encode(pixel_values.to(device, self.weight_dtype)).latent_dist
            latents = sample_latents(dist.mean, dist.std, generator, self.vae.config)
            noisy, steps, target = noisy_latents_and_target(self.scheduler, latents, generator)
        pred = self.unet(noisy, steps, encoder_hidden_states=conditioning.to(self.weight_dtype)).sample
        return denoising_loss(pred, target)


def register_checkpoint_hooks(accelerator: Any, story_model_class: type) -> None:
    """accelerate save/load hooks that store only the trained weights of the story model
    (``model.trainable_state_dict()``, in :data:`TRAINABLE_FILE`), not the frozen LLM."""
    from safetensors.torch import load_file, save_file

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for i in reversed(range(len(models))):
            unwrapped = accelerator.unwrap_model(models[i])
            if isinstance(unwrapped, story_model_class):
                if accelerator.is_main_process:
                    save_file(unwrapped.trainable_state_dict(), str(Path(output_dir) / TRAINABLE_FILE))
                if weights:
                    weights.pop(i)

    def load_hook(models: list[Any], input_dir: str) -> None:
        for i in reversed(range(len(models))):
            unwrapped = accelerator.unwrap_model(models[i])
            if isinstance(unwrapped, story_model_class):
                path = Path(input_dir) / TRAINABLE_FILE
                if not path.exists():
                    raise TrainingSetupError(f"Checkpoint {input_dir!r} has no {TRAINABLE_FILE}.")
                unwrapped.load_trainable_state_dict(load_file(str(path)))
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def restatement_scores(logits: torch.Tensor, input_ids: torch.Tensor, config: Any) -> tuple[float, int]:
    """(mean cross-entropy, number of rows right token for token) of the restatements in ``input_ids``: the
    tokens between the restate marker (``config.restate_prefix_ids``) and the target's ``" Image:"``."""
    marker, suffix = list(config.restate_prefix_ids or []), list(config.target_suffix_ids)
    first_img = config.img_token_ids[0]
    losses, right = [], 0
    for row, ids in enumerate(input_ids.tolist()):
        end = ids.index(first_img) - len(suffix)
        start = max(i for i in range(end) if ids[i : i + len(marker)] == marker) + len(marker)
        predicted = logits[row, start - 1 : end - 1].float()  # the logits of position i predict token i + 1
        target = input_ids[row, start:end].to(predicted.device)
        losses.append(torch.nn.functional.cross_entropy(predicted, target))
        right += int(bool((predicted.argmax(-1) == target).all()))
    return float(torch.stack(losses).mean()), right


class AlignmentValidator:
    """Mean L_align over one fixed target frame per held-out story; keeps the best step's trained weights.

    With a grounding head the selection score is ``L_align + grounding_weight * L_ground`` (both means over the
    frames), and the exact-match rate of the predicted cast is logged beside it. A restating model adds the
    cross-entropy of its (teacher-forced) restatements of the target captions, and logs the share of them it
    gets right token for token (``restate_exact``).

    The target frames are drawn once, with a fixed seed, so every validation scores the same frames. The best step
    lives in ``<output_dir>/best_alignment/`` (weights + ``best.json``) and survives a resume: an entry from a
    step later than the resumed one (the run was killed before that step's checkpoint) is discarded.
    """

    def __init__(
        self,
        data: Any,
        collator: Any,
        output_dir: str | os.PathLike,
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
            for key in ("target_frame", "pixel_values", "labels"):
                batch.pop(key, None)
            self.batches.append(batch)
        self.folder = Path(output_dir) / BEST_DIR
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
        restates = bool(getattr(model.config, "restates_captions", False))
        restate_loss = restate_exact = 0.0
        for batch in self.batches:
            out = model(**{k: v.to(device) for k, v in batch.items()}, compute_logits=restates)
            n = next(iter(batch.values())).shape[0]
            align += float(out.align_loss) * n
            if restates:
                loss, right = restatement_scores(out.logits, batch["input_ids"], model.config)
                restate_loss += loss * n
                restate_exact += right
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
        if restates:
            self.last.update(restate_loss=restate_loss / count, restate_exact=100.0 * restate_exact / count)
        return (
            self.last["align_loss"]
            + self.grounding_weight * self.last.get("grounding_loss", 0.0)
            + self.last.get("restate_loss", 0.0)
        )

    def update(self, model: Any, step: int, value: float) -> bool:
        """Record ``value`` at ``step``; save the weights if it is the best so far. Returns whether it is."""
        from safetensors.torch import save_file

        if self.best is not None and value >= self.best.get("score", self.best["align_loss"]):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(model.trainable_state_dict(), str(self.folder / TRAINABLE_FILE))
        self.best = {"step": step, "score": value, **(self.last or {"align_loss": value})}
        (self.folder / "best.json").write_text(json.dumps(self.best))
        return True

    def load_best(self, model: Any) -> None:
        """Load the best step's trained weights into ``model``."""
        from safetensors.torch import load_file

        model.load_trainable_state_dict(load_file(str(self.folder / TRAINABLE_FILE)))


def check_stage2_targets(
    targets_dir: str,
    target_info: Mapping[str, Any],
    columns: list[str],
    *,
    char_ldm_sizes: tuple[int, int, int],
    img_loss: bool,
    grounding: bool,
    caption_anchored: bool,
) -> tuple[list[str], list[str]] | None:
    """Check a targets folder (its ``precompute_config.json`` ``target_info`` and dataset ``columns``) for a
    stage-2 run on a Char-LDM of ``char_ldm_sizes`` = ``(vision width, conditioning length, width)``; raises
    ``TrainingSetupError`` naming the fix. Returns the grounding label sets ``(characters, settings)`` when
    ``grounding`` (``--grounding``), else ``None``."""
    got = (target_info["vision_embed_dim"], target_info["ldm_seq_len"], target_info["ldm_hidden_size"])
    if tuple(got) != tuple(char_ldm_sizes):
        vision, seq_len, hidden = char_ldm_sizes
        raise TrainingSetupError(
            f"{targets_dir!r} was computed for vision {got[0]} / conditioning {got[1]}x{got[2]}, but the Char-LDM "
            f"gives {vision} / {seq_len}x{hidden}: recompute the targets with this Char-LDM."
        )
    if img_loss and "images" not in columns:
        raise TrainingSetupError(
            f"L_img needs the ground-truth frames, but {targets_dir!r} was computed with --no_store_images; "
            "recompute it with images or pass --img_loss_weight 0."
        )
    if caption_anchored and "caption_conditioning" not in columns:
        raise TrainingSetupError(
            f"--mapper_queries caption needs each frame's caption encoding, which {targets_dir!r} lacks: "
            "recompute it with this version of precompute_targets.py."
        )
    if not grounding:
        return None
    if "character_names" not in target_info:
        raise TrainingSetupError(
            f"--grounding needs the character / setting label sets that precompute_targets.py (format 2) "
            f"records; {targets_dir!r} has none: recompute it."
        )
    labels = (list(target_info["character_names"]), list(target_info["setting_names"]))
    if not labels[0] and not labels[1]:
        raise TrainingSetupError(
            f"--grounding: the stories of {targets_dir!r} label no character and no setting."
        )
    return labels


def story_model_source(path: str) -> tuple[str, dict[str, Any]]:
    """``(model path, kwargs)`` of a story model given a pipeline folder (``story_model/`` subfolder; the
    kwargs then hold ``subfolder`` and ``tokenizer_subfolder``), the ``story_model/`` subfolder of one (read
    as its pipeline folder: the tokenizer is beside it, in ``story_tokenizer/``) or a story-model folder /
    Hub id."""
    root = Path(path)
    if root.name == "story_model" and (root.parent / "model_index.json").exists():
        return story_model_source(str(root.parent))
    if root.is_dir():
        if (root / "model_index.json").exists():
            if not (root / "story_model").is_dir():
                raise TrainingSetupError(f"Pipeline folder {path!r} has no story_model/ subfolder.")
            return path, {"subfolder": "story_model", "tokenizer_subfolder": "story_tokenizer"}
        if not (root / "config.json").exists():
            raise TrainingSetupError(f"--story_model_name_or_path {path!r} has no config.json.")
    return path, {}


def check_language_model(path: str) -> None:
    """Fail fast when ``--language_model_name_or_path`` is a folder without a causal-LM config, or a path
    that does not exist (a Hub id is not checked)."""
    root = Path(path)
    if root.is_dir() and not (root / "config.json").exists():
        raise TrainingSetupError(
            f"--language_model_name_or_path {path!r} is a folder without config.json: not a causal-LM folder "
            "(train one with train_text_lm.py)."
        )
    if not root.exists() and (path.startswith((".", "/")) or path.count("/") > 1):
        raise TrainingSetupError(f"--language_model_name_or_path {path!r} does not exist.")
