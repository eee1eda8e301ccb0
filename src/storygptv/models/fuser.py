"""The character fuser of Char-LDM and the fused caption encoding built on it.

Char-LDM conditions the UNet on the CLIP text-encoder output of the caption in which the output at
each character's name token is replaced by a fusion of that output with the CLIP image embedding of
the character's reference image (the "postfuse" module of FastComposer, arXiv 2305.10431).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..characters import (
    find_character_mentions,
    locate_character_tokens,
    normalize_characters,
    warn_ignored_characters,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CharacterFuser",
    "FusedPromptOutput",
    "encode_fused_prompt",
    "encode_reference_images",
    "normalize_character_embeds",
    "per_prompt",
    "preprocess_reference_images",
]

#: CLIP's per-channel (RGB) image normalisation. The one home of these numbers: whoever normalises
#: reference images for the CLIP image encoder (collators, pipelines) imports them from here.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class _MLP(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, eps: float):
        super().__init__(
            nn.LayerNorm(in_dim, eps=eps),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )


class CharacterFuser(ModelMixin, ConfigMixin):
    r"""Fuses a character's CLIP image embedding into the text-encoder output at its name token.

    With ``h`` the text-encoder output (``last_hidden_state``) at the name token and ``v`` the
    character's projected CLIP image embedding:

    .. code-block:: text

        f = MLP1(concat(h, v)) + h
        f = f + MLP2(f)
        out = LayerNorm(f)          # replaces h; every other position is left untouched

    where each MLP is LayerNorm -> Linear -> GELU -> Linear.

    Args:
        text_embed_dim: width of the text-encoder output (768 for Stable Diffusion 1.5).
        image_embed_dim: width of the image embedding (768 for CLIP ViT-L/14 with projection).
        hidden_dim: hidden width of both MLPs; defaults to ``text_embed_dim``.
        max_characters: the most characters fused per caption (the model is trained with this many).
        layer_norm_eps: epsilon of every LayerNorm.

    Example:
        >>> import torch
        >>> fuser = CharacterFuser(text_embed_dim=32, image_embed_dim=16)
        >>> text = torch.randn(1, 77, 32)
        >>> fused = fuser(text, torch.randn(1, 1, 16), torch.tensor([[3]]))
        >>> bool((fused[:, 4:] == text[:, 4:]).all())
        True
    """

    @register_to_config
    def __init__(
        self,
        text_embed_dim: int = 768,
        image_embed_dim: int = 768,
        hidden_dim: int | None = None,
        max_characters: int = 4,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        hidden_dim = hidden_dim or text_embed_dim
        self.mlp1 = _MLP(text_embed_dim + image_embed_dim, hidden_dim, text_embed_dim, layer_norm_eps)
        self.mlp2 = _MLP(text_embed_dim, hidden_dim, text_embed_dim, layer_norm_eps)
        self.layer_norm = nn.LayerNorm(text_embed_dim, eps=layer_norm_eps)

    def fuse(self, text_features: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Fuse matched rows: ``text_features`` (N, text_embed_dim), ``image_embeds`` (N, image_embed_dim)."""
        fused = (
            self.mlp1(torch.cat([text_features, image_embeds.to(text_features.dtype)], dim=-1))
            + text_features
        )
        fused = fused + self.mlp2(fused)
        return self.layer_norm(fused)

    def forward(
        self, text_embeds: torch.Tensor, image_embeds: torch.Tensor, token_indices: torch.Tensor
    ) -> torch.Tensor:
        """Return ``text_embeds`` with the positions named by ``token_indices`` replaced by fused vectors.

        Args:
            text_embeds: (batch, seq_len, text_embed_dim) text-encoder output.
            image_embeds: (batch, num_characters, image_embed_dim) one embedding per character slot.
            token_indices: (batch, num_characters) long; the token position of each character, ``-1``
                for an empty slot.
        """
        if token_indices.shape != image_embeds.shape[:2]:
            raise ValueError(
                f"`token_indices` has shape {tuple(token_indices.shape)} but `image_embeds` has "
                f"{tuple(image_embeds.shape[:2])} character slots; they must match."
            )
        batch_index, slot_index = (token_indices >= 0).nonzero(as_tuple=True)
        if batch_index.numel() == 0:
            return text_embeds
        positions = token_indices[batch_index, slot_index]
        fused = self.fuse(
            text_embeds[batch_index, positions].to(self.dtype), image_embeds[batch_index, slot_index]
        )
        output = text_embeds.clone()
        output[batch_index, positions] = fused.to(output.dtype)
        return output


@dataclass
class FusedPromptOutput(BaseOutput):
    """Result of :func:`encode_fused_prompt`.

    Attributes:
        prompt_embeds: (batch, seq_len, dim) the conditioning with character embeddings fused in.
        text_embeds: (batch, seq_len, dim) the plain caption embedding (no fusion), used for delayed
            conditioning and as the text-only variant.
        character_token_indices: (batch, max_characters) long, the fused position of each character
            in caption order, ``-1`` for empty slots.
        character_names: per prompt, the names of the fused characters in caption order.
        input_ids: (batch, seq_len) the token ids of the captions.
    """

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    character_token_indices: torch.Tensor
    character_names: list[list[str]]
    input_ids: torch.Tensor


def preprocess_reference_images(
    images: Sequence[Any], feature_extractor: Any | None = None, image_size: int = 224
) -> torch.Tensor:
    """Turn RGB PIL images into CLIP pixel values (N, 3, S, S).

    Uses ``feature_extractor`` (a CLIP image processor) when given; otherwise resizes the shorter side to
    ``image_size``, centre-crops and normalises with the CLIP mean and standard deviation.
    """
    if feature_extractor is not None:
        return feature_extractor(images=list(images), return_tensors="pt").pixel_values
    import numpy as np
    import PIL.Image

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    tensors = []
    for image in images:
        width, height = image.size
        scale = image_size / min(width, height)
        resized = image.resize(
            (max(image_size, round(width * scale)), max(image_size, round(height * scale))),
            PIL.Image.Resampling.BICUBIC,
        )
        left = (resized.width - image_size) // 2
        top = (resized.height - image_size) // 2
        cropped = resized.crop((left, top, left + image_size, top + image_size))
        array = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensors.append((array - mean) / std)
    return torch.stack(tensors)


def encode_text(
    prompts: list[str], tokenizer: Any, text_encoder: Any, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP text embedding (``last_hidden_state``) of ``prompts`` padded to the tokenizer's max length.

    Returns ``(embeddings, input_ids)``.
    """
    device = device if device is not None else text_encoder.device
    input_ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(input_ids)[0], input_ids


def encode_reference_images(
    images: Sequence[Any], image_encoder: Any, feature_extractor: Any | None = None, device: Any = None
) -> torch.Tensor:
    """(N, D) projected CLIP embeddings (``image_embeds``) of RGB reference images.

    One image at a time: batched CPU kernels round differently with the batch size, and a character's
    embedding should not depend on which other characters share its caption (or on a cast encoded at once).
    """
    image_size = getattr(getattr(image_encoder, "config", None), "image_size", 224)
    pixel_values = preprocess_reference_images(list(images), feature_extractor, image_size)
    pixel_values = pixel_values.to(device=device or image_encoder.device, dtype=image_encoder.dtype)
    return torch.cat(
        [image_encoder(pixel_values=pixel_values[i : i + 1]).image_embeds for i in range(len(images))]
    )


def per_prompt(value: Any, batch_size: int, name: str, shared_type: type | tuple[type, ...]) -> list[Any]:
    """``value`` for each of ``batch_size`` prompts: one ``shared_type`` value shared by all, or a list with one
    entry per prompt (a clear error naming ``name`` when the counts differ)."""
    if isinstance(value, shared_type):
        return [value] * batch_size
    entries = list(value)
    if len(entries) != batch_size:
        raise ValueError(
            f"`{name}` has {len(entries)} entries but there are {batch_size} prompts; pass one per prompt, or a "
            "single value shared by all prompts."
        )
    return entries


def normalize_character_embeds(
    character_embeds: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor] | None], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Validate precomputed ``character_embeds`` (``{name: (D,) tensor}``, shared or one dict per prompt)."""
    entries = per_prompt(character_embeds, batch_size, "character_embeds", Mapping)
    out = []
    for entry in entries:
        if entry is not None and not isinstance(entry, Mapping):
            raise TypeError(
                f"`character_embeds` entries must be dicts {{name: tensor}}, got {type(entry).__name__}."
            )
        checked = {}
        for name, value in (entry or {}).items():
            if not isinstance(value, torch.Tensor) or value.reshape(-1).shape[0] != value.shape[-1]:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"`character_embeds[{name!r}]` must be one embedding, a (D,) tensor (e.g. from "
                    f"`pipe.encode_characters`), got {shape}."
                )
            checked[name] = value.reshape(-1)
        out.append(checked)
    return out


def encode_fused_prompt(
    prompt: str | list[str],
    characters: Mapping[str, Any] | list[Mapping[str, Any] | None] | None = None,
    *,
    tokenizer: Any,
    text_encoder: Any,
    image_encoder: Any = None,
    fuser: CharacterFuser | None = None,
    feature_extractor: Any | None = None,
    character_embeds: Mapping[str, torch.Tensor] | list[Mapping[str, torch.Tensor] | None] | None = None,
    max_characters: int | None = None,
    device: torch.device | str | None = None,
    warn: bool = True,
    warn_absent: bool = True,
) -> FusedPromptOutput:
    """Encode captions with the reference images of the characters they name fused in (Char-LDM).

    Each name is found in the caption (case-insensitive whole words, multi-word names, punctuation and
    possessives; see :mod:`storygptv.characters`), and the image embedding of its reference image is
    fused into the text-encoder output at the **last sub-token** of the name's **first** mention. At most
    ``max_characters`` characters are fused per caption, in caption order; names that are absent, or
    beyond ``max_characters``, are ignored with a warning.

    Args:
        prompt: one caption or a list of captions.
        characters: ``{name: reference image}`` shared by all captions, a list with one such dict per
            caption, or ``None``. Images may be PIL images, paths, uint8 arrays or (3, H, W) tensors.
        tokenizer, text_encoder: the CLIP tokenizer (a fast tokenizer) and ``CLIPTextModel``.
        image_encoder: a ``CLIPVisionModelWithProjection``; its ``image_embeds`` are fused (not needed with
            ``character_embeds`` or without characters).
        fuser: the :class:`CharacterFuser` (not needed when no caption names a character).
        character_embeds: precomputed ``{name: (D,) image embedding}`` (see :func:`encode_reference_images`),
            shared or one dict per caption, instead of ``characters``; they give exactly the same result.
        feature_extractor: the CLIP image processor for the reference images (optional).
        max_characters: defaults to ``fuser.config.max_characters``.
        device: where to run; defaults to the text encoder's device.
        warn: warn about reference images that are not fused.
        warn_absent: with ``warn``, also warn about characters a caption does not name (set it to False for a
            story's shared cast, where most captions name only some of it); characters named beyond the token
            limit or beyond ``max_characters`` always warn.

    Returns:
        A :class:`FusedPromptOutput`.

    Example:
        >>> from storygptv.testing import tiny_char_ldm_components
        >>> from storygptv.data.synthsv import reference_images
        >>> c = tiny_char_ldm_components()
        >>> out = encode_fused_prompt(
        ...     "Fred and Barney are in the yard.",
        ...     {"Fred": reference_images()["Ava"], "Barney": reference_images()["Bo"]},
        ...     **{k: c[k] for k in ("tokenizer", "text_encoder", "image_encoder", "fuser", "feature_extractor")},
        ... )
        >>> out.character_names
        [['Fred', 'Barney']]
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("`prompt` is an empty list; pass at least one caption.")
    for index, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(
                f"`prompt[{index}]` has type {type(text).__name__}; every caption must be a string."
            )
    if characters is not None and character_embeds is not None:
        raise ValueError("Pass either `characters` (reference images) or `character_embeds`, not both.")
    if character_embeds is not None:
        per_prompt: list[dict[str, Any]] = normalize_character_embeds(character_embeds, len(prompts))
    else:
        per_prompt = normalize_characters(characters, len(prompts))
    if max_characters is None:
        max_characters = fuser.config.max_characters if fuser is not None else 0
    device = device if device is not None else text_encoder.device

    text_embeds, input_ids = encode_text(prompts, tokenizer, text_encoder, device)

    token_indices = torch.full((len(prompts), max_characters), -1, dtype=torch.long)
    names: list[list[str]] = []
    slots: list[tuple[int, int, Any]] = []
    unmatched: list[list[str]] = []
    for row, (text, refs) in enumerate(zip(prompts, per_prompt)):
        mentions = locate_character_tokens(text, refs.keys(), tokenizer) if refs else []
        kept, dropped = mentions[:max_characters], mentions[max_characters:]
        found = {m.name for m in mentions}
        if warn:
            named = [m.name for m in find_character_mentions(text, refs.keys())] if refs else []
            truncated = [name for name in named if name not in found]
            if dropped or truncated:
                warn_ignored_characters(text, [], [m.name for m in dropped], max_characters, truncated)
            found |= set(truncated)  # warned about already
        unmatched.append([name for name in refs if name not in found])
        names.append([m.name for m in kept])
        for slot, mention in enumerate(kept):
            token_indices[row, slot] = mention.token_index
            slots.append((row, slot, refs[mention.name]))
    if warn and warn_absent:
        if isinstance(characters if character_embeds is None else character_embeds, Mapping):
            # One dict shared by every caption (e.g. a story's cast): a name is only worth a warning
            # when no caption mentions it.
            never = [name for name in unmatched[0] if all(name in row for row in unmatched)]
            if never:
                warn_ignored_characters(" / ".join(prompts), never, [], max_characters)
        else:
            for text, absent in zip(prompts, unmatched):
                if absent:
                    warn_ignored_characters(text, absent, [], max_characters)

    # Without a character to fuse, the plain text encoding is the conditioning (no fuser, no image encoder).
    if not slots:
        return FusedPromptOutput(text_embeds, text_embeds, token_indices.to(device), names, input_ids)
    if fuser is None:
        raise ValueError("Captions name characters to fuse, but no `fuser` was given.")

    if character_embeds is not None:
        embeds = torch.stack([value for _, _, value in slots]).to(device)
        index_of = list(range(len(slots)))
    else:
        # Encode each distinct reference image once (a shared dict gives the same objects to every row).
        unique: dict[int, int] = {}
        images = []
        for _, _, image in slots:
            if id(image) not in unique:
                unique[id(image)] = len(images)
                images.append(image)
        if image_encoder is None:
            raise ValueError(
                "Reference images need an `image_encoder` (or pass precomputed `character_embeds`)."
            )
        embeds = encode_reference_images(images, image_encoder, feature_extractor, device)
        index_of = [unique[id(image)] for _, _, image in slots]

    image_embeds = embeds.new_zeros(len(prompts), max_characters, embeds.shape[-1])
    for (row, slot, _), index in zip(slots, index_of):
        image_embeds[row, slot] = embeds[index]
    token_indices = token_indices.to(device)
    prompt_embeds = fuser(text_embeds, image_embeds.to(fuser.dtype), token_indices)
    return FusedPromptOutput(prompt_embeds, text_embeds, token_indices, names, input_ids)
