"""Stage-2 (LLM alignment) training collator of StoryGPT-V.

Each row is one story in the common story schema, with precomputed embeddings:

=========================  ==========================================================================
key                        content
=========================  ==========================================================================
``captions``               list of n original captions (str), one per frame
``referential_captions``   list of n referential ("-ref") captions; optional, falls back to ``captions``
``image_embeds``           n CLIP image embeddings (each ``vision_embed_dim`` numbers: list, array or
                           tensor; or one (n, vision_embed_dim) array / tensor)
``target_conditioning``    n conditioning targets (each ``ldm_seq_len x ldm_hidden_size``): the stage-1
                           (Char-LDM) embedding of the frame's **original, non-referential** caption
``caption_conditioning``   (caption-anchored mapper only) n anchors: the Char-LDM embedding of each
                           frame's referential caption as written
``target_token_roles``     optional: n role vectors (``ldm_seq_len``; 0 other, 1 character, 2 setting)
                           for the identity-weighted L_align
``characters``             (grounding head only) per frame, the names of its characters
``background``             (grounding head with settings, restating model) per frame, its setting ("" when unknown)
=========================  ==========================================================================

For each row a target frame t is chosen (``target_frame="random"``: uniform over 1..n-1, frame 0 is never a
target unless the story has one frame; an int: that frame, negative ints count from the end). The sequence
is built by :meth:`storygptv.models.processing_storygptv.StoryGPTVProcessor.build_sequence` from the referential captions of frames
0..t-1 (with their image embeddings) and the referential caption of frame t; ``target_conditioning`` is the
row's entry for frame t. Old frames that do not fit ``max_length`` are dropped (their embeddings too).

With ``restored_anchor_prob`` p > 0, a caption-anchored mapper is given, with probability p per row, the
target itself as its anchor (the caption with the names and setting restored) instead of the caption as
written: at inference the pipeline may hand it the grounded caption (``grounding="fuse"``), and the mapper
then learns to leave an anchor that already states everything as it is.

Example:
    >>> from storygptv.testing.story_model import tiny_story_model
    >>> model, tok = tiny_story_model()
    >>> collator = StoryGPTVCollator(tok, model.config, target_frame=-1)
    >>> row = {"captions": ["Fred is here.", "Fred talks."], "referential_captions": ["Fred is here.", "He talks."],
    ...        "image_embeds": torch.randn(2, 32), "target_conditioning": torch.randn(2, 77, 32)}
    >>> batch = collator([row])
    >>> batch["image_embeds"].shape, batch["target_frame"].tolist()
    (torch.Size([1, 32]), [1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from ..grounding import with_setting
from ..models.processing_storygptv import StoryGPTVProcessor
from ..models.story_inputs import IGNORE_INDEX
from ._common import multi_hot

#: The label of a setting the grounding head does not know (ignored by its cross-entropy).
UNKNOWN_SETTING = -100

__all__ = ["StoryGPTVCollator"]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    if isinstance(value, Sequence) and value and isinstance(value[0], torch.Tensor):
        return torch.stack([v.detach().float() for v in value])
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


def restated_captions(captions: Sequence[str], backgrounds: Sequence[str] | None) -> list[str]:
    """What a restating model writes for each frame: the original caption, with its setting stated when the
    caption leaves it implicit and the dataset labels it (the stage-2 target caption)."""
    backgrounds = list(backgrounds or [])
    if len(backgrounds) != len(captions):
        return list(captions)
    return [with_setting(c, str(b)) if b else c for c, b in zip(captions, backgrounds)]


class StoryGPTVCollator:
    """Turn story rows into a stage-2 training batch for ``StoryGPTVForConditionalGeneration``.

    Args:
        tokenizer: the LLM tokenizer with the story special tokens (``from_language_model`` adds them).
        config: the model's ``StoryGPTVConfig`` (layout ids, m, R, ``label_scope``, sizes).
        max_length: maximum sequence length (160 in the paper); oldest frames are dropped first.
        target_frame: ``"random"`` or a fixed frame index.
        seed: seed of the collator's own random generator (``"random"`` targets); None: nondeterministic.
        label_scope: overrides ``config.label_scope`` (``"all"`` captions or only the ``"target"`` caption).
        pad_to_multiple_of: pad the sequence length up to a multiple of this.
        restored_anchor_prob: probability of anchoring a caption-anchored mapper on the target instead of the
            caption as written (see the module docstring).

    Returns (``__call__``) a dict with ``input_ids`` (B, L), ``attention_mask`` (B, L), ``labels`` (B, L),
    ``image_embeds`` (num_images, vision_embed_dim) in placeholder order, ``target_conditioning``
    (B, ldm_seq_len, ldm_hidden_size) and ``target_frame`` (B,); plus ``caption_conditioning`` (B, L', d) for a
    caption-anchored mapper, ``target_token_roles`` (B, L') when the rows carry them, and ``character_labels``
    (B, C) / ``setting_labels`` (B,) for a model with a grounding head.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        max_length: int | None = 160,
        target_frame: Literal["random"] | int = "random",
        seed: int | None = None,
        label_scope: Literal["all", "target"] | None = None,
        pad_to_multiple_of: int | None = None,
        restored_anchor_prob: float = 0.0,
    ) -> None:
        if not (target_frame == "random" or isinstance(target_frame, int)):
            raise ValueError(f"`target_frame` must be 'random' or an int, got {target_frame!r}.")
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = max_length
        self.target_frame = target_frame
        self.rng = np.random.default_rng(seed)
        self.label_scope = label_scope or getattr(config, "label_scope", "all")
        self.pad_to_multiple_of = pad_to_multiple_of
        if not 0.0 <= restored_anchor_prob <= 1.0:
            raise ValueError(f"`restored_anchor_prob` must be in [0, 1], got {restored_anchor_prob}.")
        self.restored_anchor_prob = restored_anchor_prob
        self.anchored = getattr(config, "mapper_queries", "learned") == "caption"
        head = bool(getattr(config, "has_grounding_head", False))
        self.character_index = (
            {n.lower(): i for i, n in enumerate(config.grounding_characters or [])} if head else {}
        )
        self.setting_index = (
            {n.lower(): i for i, n in enumerate(config.grounding_settings or [])} if head else {}
        )
        self.restates = bool(getattr(config, "restates_captions", False))
        self.processor = StoryGPTVProcessor.from_story_model_config(tokenizer, config)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad with.")

    def reseed(self, seed: int) -> None:
        """Restart the collator's randomness (random target frames, restored anchors) from ``seed``; the
        training loader calls it before every batch, so a batch's draws depend only on its own seed."""
        self.rng = np.random.default_rng(int(seed))

    def choose_target(self, num_frames: int) -> int:
        """The target frame of a story of ``num_frames`` frames."""
        if num_frames < 1:
            raise ValueError("A story needs at least one frame.")
        if self.target_frame == "random":
            return 0 if num_frames == 1 else int(self.rng.integers(1, num_frames))
        t = self.target_frame + num_frames if self.target_frame < 0 else self.target_frame
        if not 0 <= t < num_frames:
            raise ValueError(
                f"`target_frame` {self.target_frame} is out of range for a story of {num_frames} frames."
            )
        return t

    def grounding_labels(self, row: Mapping[str, Any], t: int, i: int) -> tuple[list[int], int]:
        """The multi-hot cast and the setting index of frame ``t`` of ``row`` in the config's label sets."""
        characters = [-1] * len(self.character_index)
        if self.character_index:
            frames = row.get("characters")
            if frames is None or len(frames) <= t:
                raise KeyError(
                    f"Story row {i} has no `characters` for frame {t}: the grounding head trains on each frame's "
                    "cast (precompute the targets with a dataset that labels characters)."
                )
            characters = multi_hot([str(n) for n in frames[t] or []], self.config.grounding_characters)
        setting = UNKNOWN_SETTING
        settings = row.get("background")
        if self.setting_index and settings is not None and len(settings) > t:
            setting = self.setting_index.get(str(settings[t] or "").lower(), UNKNOWN_SETTING)
        return characters, setting

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, images, targets, chosen = [], [], [], [], []
        anchors, roles, character_labels, setting_labels = [], [], [], []
        for i, row in enumerate(rows):
            required = ["captions", "image_embeds", "target_conditioning"]
            if self.anchored:
                required.append("caption_conditioning")
            for key in required:
                if key not in row:
                    hint = (
                        " A caption-anchored mapper needs each frame's caption encoding: recompute the targets "
                        "with precompute_targets.py (format 2)."
                        if key == "caption_conditioning"
                        else ""
                    )
                    raise KeyError(f"Story row {i} lacks the key {key!r} (has {sorted(row)}).{hint}")
            captions = list(row["captions"])
            ref = list(row.get("referential_captions") or captions)
            n = len(captions)
            if len(ref) != n:
                raise ValueError(f"Row {i}: {len(ref)} referential captions for {n} captions.")
            embeds = _as_tensor(row["image_embeds"]).reshape(-1, self.config.vision_embed_dim)
            conds = row["target_conditioning"]
            if embeds.shape[0] != n or len(conds) != n:
                raise ValueError(
                    f"Row {i}: {n} captions but {embeds.shape[0]} image embeddings and {len(conds)} "
                    "target conditionings."
                )
            t = self.choose_target(n)
            if self.restates:  # history restated, the target caption as told and then restated
                restated = restated_captions(captions, row.get("background"))
                seq = self.processor.build_sequence(
                    restated[:t],
                    ref[t],
                    target_restated=restated[t],
                    max_length=self.max_length,
                    label_scope=self.label_scope,
                )
            else:
                seq = self.processor.build_sequence(
                    ref[:t], ref[t], max_length=self.max_length, label_scope=self.label_scope
                )
            input_ids.append(seq.input_ids)
            labels.append(seq.labels)
            images.extend(embeds[j] for j in seq.context_frames)
            targets.append(_as_tensor(conds[t]))
            chosen.append(t)
            if self.anchored:
                restored = self.restored_anchor_prob > 0 and self.rng.random() < self.restored_anchor_prob
                anchors.append(targets[-1] if restored else _as_tensor(row["caption_conditioning"][t]))
            if row.get("target_token_roles") is not None:
                roles.append(torch.as_tensor(np.asarray(row["target_token_roles"][t]), dtype=torch.long))
            if self.character_index or self.setting_index:
                chars, setting = self.grounding_labels(row, t, i)
                character_labels.append(chars)
                setting_labels.append(setting)

        length = max(len(ids) for ids in input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, lab) in enumerate(zip(input_ids, labels)):
            batch_ids[b, : len(ids)] = torch.tensor(ids)
            batch_labels[b, : len(lab)] = torch.tensor(lab)
            attention[b, : len(ids)] = 1
        vision_dim = self.config.vision_embed_dim
        batch = {
            "input_ids": batch_ids,
            "attention_mask": attention,
            "labels": batch_labels,
            "image_embeds": torch.stack(images) if images else torch.zeros(0, vision_dim),
            "target_conditioning": torch.stack(targets),
            "target_frame": torch.tensor(chosen, dtype=torch.long),
        }
        if anchors:
            batch["caption_conditioning"] = torch.stack(anchors)
        if len(roles) == len(rows):
            batch["target_token_roles"] = torch.stack(roles)
        if self.character_index:
            batch["character_labels"] = torch.tensor(character_labels, dtype=torch.float32)
        if self.setting_index:
            batch["setting_labels"] = torch.tensor(setting_labels, dtype=torch.long)
        return batch
