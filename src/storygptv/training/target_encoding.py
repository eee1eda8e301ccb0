"""Encoding the stage-2 targets of story rows with the frozen Char-LDM (one shard of stories at a time).

For every frame of every story, with the Char-LDM's encoders:

- ``target_conditioning``: the alignment target, the Char-LDM conditioning (``77 x d``) of the frame's
  **original, non-referential** caption with the reference image of each named character fused in
  (``target_type="fused"``, the paper's Emb_fuse), or the plain CLIP text embedding of that caption
  (``"text"``, the Emb_text ablation). With ``name_background`` the caption also states the frame's
  setting when it leaves it implicit ("Bo is waving." -> "Bo is waving in the lake.");
- ``image_embeds``: the CLIP embedding of the ground-truth frame that the story LLM reads, computed with
  :func:`storygptv.pipelines.pipeline_storygptv.encode_story_images` (the function the pipeline uses);
- ``caption_conditioning``: the conditioning of the frame's **referential** caption as written (names fused
  where it states them): the anchor of a caption-anchored mapper (``mapper_queries="caption"``);
- ``target_token_roles``: per conditioning row of the target, 1 at a fused character token, 2 at the
  setting word's last token, 0 elsewhere (for the identity-weighted L_align);
- ``background`` and ``characters``: the frame's setting and cast, the grounding head's labels.

:mod:`storygptv.training.targets` writes the shards and reads them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..characters import locate_character_tokens
from ..grounding import with_setting
from .checks import TrainingSetupError

__all__ = ["TargetEncoder", "compute_shard", "frame_settings", "story_cast", "target_captions"]


class TargetEncoder:
    """Encodes frames with the frozen encoders of a Char-LDM pipeline, ``batch_size`` frames at a time.

    Args:
        pipe: a ``CharLDMPipeline`` (its text encoder, tokenizer, image encoder, fuser, feature extractor).
        target_type: ``"fused"`` (Emb_fuse) or ``"text"`` (Emb_text).
        max_characters: characters fused per caption (``None``: the fuser's own limit).
        batch_size: frames per encoder batch.
    """

    def __init__(self, pipe: Any, target_type: str, max_characters: int | None, batch_size: int) -> None:
        self.pipe = pipe
        self.target_type = target_type
        self.max_characters = max_characters
        self.batch_size = batch_size

    @torch.no_grad()
    def targets(self, captions: Sequence[str], casts: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """The conditioning (N, L, d) of ``captions`` with ``casts`` (one ``{name: image}`` per caption)."""
        return self.encode(captions, casts)[0]

    @torch.no_grad()
    def encode(
        self, captions: Sequence[str], casts: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conditioning (N, L, d), character_token_indices (N, max_characters))`` of ``captions``."""
        out, indices = [], []
        for start in range(0, len(captions), self.batch_size):
            chunk = list(captions[start : start + self.batch_size])
            chunk_casts = list(casts[start : start + self.batch_size])
            encoded = self.pipe.encode_fused(
                chunk,
                chunk_casts if self.target_type == "fused" else None,
                max_characters=self.max_characters,
                device=self.pipe.text_encoder.device,
                warn=False,
            )
            embeds = encoded.prompt_embeds if self.target_type == "fused" else encoded.text_embeds
            out.append(embeds.float().cpu())
            indices.append(encoded.character_token_indices.cpu())
        return torch.cat(out), torch.cat(indices)

    def token_roles(
        self, captions: Sequence[str], character_token_indices: torch.Tensor, settings: Sequence[str]
    ) -> torch.Tensor:
        """(N, L) int8: 1 at each fused character token, 2 at the last token of the named setting, else 0."""
        tokenizer = self.pipe.tokenizer
        roles = torch.zeros(len(captions), int(tokenizer.model_max_length), dtype=torch.int8)
        for row, (caption, setting) in enumerate(zip(captions, settings)):
            if setting:
                for mention in locate_character_tokens(caption, [setting], tokenizer):
                    roles[row, mention.token_index] = 2
            for index in character_token_indices[row].tolist():
                if index >= 0:
                    roles[row, index] = 1
        return roles

    @torch.no_grad()
    def image_embeds(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """(N, D) CLIP embeddings of frames, as the story pipeline computes them for the LLM."""
        from storygptv.pipelines.pipeline_storygptv import encode_story_images

        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            embeds = encode_story_images(chunk, self.pipe.image_encoder, self.pipe.feature_extractor)
            out.append(embeds.float().cpu())
        return torch.cat(out)


def story_cast(row: Mapping[str, Any], refs: Mapping[str, Any]) -> dict[str, Any]:
    """The reference images of the story's characters (all of ``refs`` when the row lists none)."""
    names: list[str] = []
    for frame in row.get("characters") or []:
        names.extend(n for n in frame or [] if n not in names)
    if not names:
        return dict(refs)
    lowered = {k.lower(): k for k in refs}
    return {lowered[n.lower()]: refs[lowered[n.lower()]] for n in names if n.lower() in lowered}


def _row_frames(row: Mapping[str, Any], index: int) -> tuple[list[str], list[str], list[Any]]:
    captions = [str(c) for c in (row.get("captions") or [])]
    if not captions or not all(c.strip() for c in captions):
        raise TrainingSetupError(
            f"Story {row.get('story_id', index)!r} has no (or empty) captions; every frame needs one."
        )
    referential = [str(c) for c in (row.get("referential_captions") or captions)]
    images = list(row.get("images") or [])
    if len(referential) != len(captions) or len(images) != len(captions):
        raise TrainingSetupError(
            f"Story {row.get('story_id', index)!r}: {len(captions)} captions, {len(referential)} referential "
            f"captions and {len(images)} images; they must match."
        )
    if any(im is None for im in images):
        raise TrainingSetupError(f"Story {row.get('story_id', index)!r} has frames without an image.")
    return captions, referential, images


def target_captions(row: Mapping[str, Any], captions: list[str], name_background: bool) -> list[str]:
    """The captions whose conditioning is the target: the originals, with the setting restored if asked."""
    if not name_background:
        return captions
    backgrounds = list(row.get("background") or [])
    if len(backgrounds) != len(captions) or not all(backgrounds):
        raise TrainingSetupError(
            f"--name_background needs a `background` label for every frame; story "
            f"{row.get('story_id')!r} has {backgrounds!r}. Drop the flag for datasets without one."
        )
    return [with_setting(c, str(b)) for c, b in zip(captions, backgrounds)]


def frame_settings(row: Mapping[str, Any], num_frames: int) -> list[str]:
    """The setting label of each frame (``""`` where the dataset gives none)."""
    backgrounds = list(row.get("background") or [])
    if len(backgrounds) != num_frames:
        return [""] * num_frames
    return [str(b or "") for b in backgrounds]


def compute_shard(
    stories: Any,
    indices: range,
    encoder: TargetEncoder,
    refs: Mapping[str, Any],
    features: Any,
    store_images: bool,
    name_background: bool = False,
) -> Any:
    """The ``datasets.Dataset`` of one shard: the stories ``indices`` of ``stories`` encoded by ``encoder``
    with the reference images ``refs`` (each story fuses its own cast, :func:`story_cast`), in the
    ``features`` of :func:`storygptv.training.targets.target_features`."""
    import datasets

    rows = [stories[i] for i in indices]
    all_captions, all_referential, all_casts, all_images, all_settings = [], [], [], [], []
    sizes, parsed = [], []
    for i, row in zip(indices, rows):
        captions, referential, images = _row_frames(row, i)
        cast = story_cast(row, refs)
        all_captions += target_captions(row, captions, name_background)
        all_referential += referential
        all_casts += [cast] * len(captions)
        all_images += images
        all_settings += frame_settings(row, len(captions))
        sizes.append(len(captions))
        parsed.append((captions, referential, images))
    targets, character_tokens = encoder.encode(all_captions, all_casts)
    roles = encoder.token_roles(all_captions, character_tokens, all_settings)
    anchors = encoder.targets(all_referential, all_casts)
    image_embeds = encoder.image_embeds(all_images)
    dtype = np.float16 if features["image_embeds"].dtype == "float16" else np.float32
    columns: dict[str, list[Any]] = {name: [] for name in features}
    offset = 0
    for i, row, (captions, referential, images), n in zip(indices, rows, parsed, sizes):
        columns["story_id"].append(str(row.get("story_id", i)))
        columns["captions"].append(captions)
        columns["referential_captions"].append(referential)
        columns["characters"].append(
            [list(c or []) for c in (row.get("characters") or [[] for _ in captions])]
        )
        columns["background"].append(all_settings[offset : offset + n])
        columns["image_embeds"].append(image_embeds[offset : offset + n].numpy().astype(dtype))
        columns["target_conditioning"].append(targets[offset : offset + n].numpy().astype(dtype))
        columns["caption_conditioning"].append(anchors[offset : offset + n].numpy().astype(dtype))
        columns["target_token_roles"].append(roles[offset : offset + n].numpy())
        if store_images:
            columns["images"].append(images)
        offset += n
    return datasets.Dataset.from_dict(columns, features=features)
