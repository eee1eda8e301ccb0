"""``consistency="mutual"``: consistent characters through masked mutual attention with their portraits (MMSA / MMCA).

The pipelines' side of :mod:`storygptv.attention.mutual`: checking the character masks / boxes, the portrait branch,
and one UNet step of a scene with its portraits (:class:`MutualConsistency`).

**Portrait branch.** Each character's portrait is its *reference image*, VAE-encoded once per call and noised to the
current timestep with a fixed noise (``add_noise``), rather than a portrait generated per character. The reference
is what the user asked the character to look like, it is exact from the first step on, it costs one VAE encode per
character and no extra sampling chain, and it leaves the frames' random generator untouched (so a frame without
characters is bit-identical to ``consistency=None``). The portraits' UNet passes use the character's description
(its *portrait prompt*, default: its name, fused with its reference image as Char-LDM fuses names).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..attention.mutual import MutualAttentionState, install_mutual_attention_processors

__all__ = [
    "CONSISTENCY_MODES",
    "MUTUAL_ATTENTION_MODES",
    "MutualConsistency",
    "check_character_masks",
    "check_consistency",
]

#: Values of the pipelines' ``consistency`` argument.
CONSISTENCY_MODES: tuple[str | None, ...] = (None, "mutual")
#: Values of ``mutual_attention``: where the portraits' keys / values come from.
MUTUAL_ATTENTION_MODES: tuple[str, ...] = ("cache", "recompute")


def check_consistency(consistency: Any, mutual_attention: Any, mutual_attention_weight: Any = 1.0) -> None:
    """Clear errors for an unknown ``consistency`` or ``mutual_attention`` value, or a bad weight."""
    if consistency not in CONSISTENCY_MODES:
        raise ValueError(
            f"`consistency` must be one of {list(CONSISTENCY_MODES)}, got {consistency!r}; use 'mutual' for "
            "masked mutual attention with the characters' portraits, or None."
        )
    if mutual_attention not in MUTUAL_ATTENTION_MODES:
        raise ValueError(
            f"`mutual_attention` must be one of {list(MUTUAL_ATTENTION_MODES)}, got {mutual_attention!r}: 'cache' "
            "records the portraits' keys once per call, 'recompute' denoises them with every frame."
        )
    if (
        isinstance(mutual_attention_weight, bool)
        or not isinstance(mutual_attention_weight, numbers.Real)
        or not 0 < mutual_attention_weight < math.inf
    ):
        raise ValueError(
            f"`mutual_attention_weight` must be a finite number > 0, got {mutual_attention_weight!r} (1 is "
            "DreamStory's plain attention; larger values pull the characters' pixels more towards their portraits)."
        )
    if mutual_attention_weight != 1 and consistency != "mutual":
        raise ValueError(
            "`mutual_attention_weight` is used with `consistency='mutual'`; pass that too, or leave the weight at 1."
        )


def _mask_tensor(item: Any, where: str, height: int, width: int) -> torch.Tensor:
    """One mask (2-D array / tensor / PIL image) or box ``(x0, y0, x1, y1)`` as a (height, width) float tensor."""
    if isinstance(item, Sequence) and not isinstance(item, str):
        if len(item) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in item):
            raise ValueError(
                f"`{where}` must be a box (x0, y0, x1, y1) of 4 numbers or a 2-D mask, got {item!r}."
            )
        x0, y0, x1, y1 = (float(v) for v in item)
        if all(isinstance(v, float) for v in item) and max(item) <= 1.0:  # fractions of the image
            x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"`{where}` = {tuple(item)} is not a box inside the {width}x{height} image: pass (x0, y0, x1, y1) "
                "in pixels with x0 < x1 and y0 < y1, or as fractions (floats in [0, 1])."
            )
        mask = torch.zeros(height, width)
        mask[round(y0) : max(round(y1), round(y0) + 1), round(x0) : max(round(x1), round(x0) + 1)] = 1.0
        return mask
    if isinstance(item, PIL.Image.Image):
        item = np.asarray(item.convert("L"), dtype=np.float32) / 255.0
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.asarray(item, dtype=np.float32))
    if not isinstance(item, torch.Tensor):
        raise TypeError(
            f"`{where}` has type {type(item).__name__}; pass a 2-D mask (array, tensor or PIL image) or a box "
            "(x0, y0, x1, y1)."
        )
    if item.ndim != 2:
        raise ValueError(f"`{where}` must be a 2-D mask (H, W), got shape {tuple(item.shape)}.")
    mask_h, mask_w = item.shape
    if mask_h * width != mask_w * height:
        raise ValueError(
            f"`{where}` has shape {tuple(item.shape)} but the image is {height}x{width}; pass a mask with the "
            "image's aspect ratio (any resolution)."
        )
    mask = item.float().clamp(0, 1)
    if (mask_h, mask_w) != (height, width):
        mask = torch.nn.functional.interpolate(mask[None, None], size=(height, width), mode="bilinear")[0, 0]
    return mask


def check_character_masks(
    character_masks: Any,
    num_frames: int,
    height: int,
    width: int,
    cast: Sequence[str],
    max_characters: int,
    name: str = "character_masks",
) -> list[dict[str, torch.Tensor]]:
    """Per frame, ``{character: (height, width) mask}`` from the user's masks or boxes, with clear errors.

    Args:
        character_masks: one entry per frame (a list of ``num_frames`` entries, or, with one frame, a dict):
            ``None`` or ``{name: mask or box}``; a mask is a 2-D array / tensor / PIL image at the image's aspect
            ratio, a box is ``(x0, y0, x1, y1)`` in pixels, or as floats in [0, 1] (fractions of the image).
        num_frames: the number of frames (captions / images).
        height, width: the image size.
        cast: the characters with a reference image (a mask for any other name is an error).
        max_characters: most characters per frame.

    Example:
        >>> masks = check_character_masks([{"Ava": (0, 0, 16, 32)}, None], 2, 32, 32, ["Ava"], 4)
        >>> masks[0]["Ava"].shape, masks[0]["Ava"].mean().item(), masks[1]
        (torch.Size([32, 32]), 0.5, {})
    """
    if character_masks is None:
        return [{} for _ in range(num_frames)]
    if isinstance(character_masks, Mapping):
        if num_frames != 1:
            raise ValueError(
                f"`{name}` is one dict but there are {num_frames} frames; pass a list with one dict (or None) per "
                "frame."
            )
        character_masks = [character_masks]
    if not isinstance(character_masks, Sequence) or isinstance(character_masks, str):
        raise TypeError(
            f"`{name}` has type {type(character_masks).__name__}; pass a list with one {{name: mask or box}} dict "
            "(or None) per frame."
        )
    if len(character_masks) != num_frames:
        raise ValueError(
            f"`{name}` has {len(character_masks)} entries but there are {num_frames} frames; pass one dict (or "
            "None) per frame."
        )
    frames = []
    for index, entry in enumerate(character_masks):
        if entry is None:
            frames.append({})
            continue
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"`{name}[{index}]` has type {type(entry).__name__}; pass a dict {{name: mask or box}} or None."
            )
        if len(entry) > max_characters:
            raise ValueError(
                f"`{name}[{index}]` has {len(entry)} characters but at most {max_characters} are allowed per frame "
                "(`max_characters`)."
            )
        frame = {}
        for character, item in entry.items():
            if character not in cast:
                raise ValueError(
                    f"`{name}[{index}][{character!r}]`: {character!r} has a mask but no portrait: add its reference "
                    f"image to `characters` (the cast is {sorted(cast)})."
                )
            frame[character] = _mask_tensor(item, f"{name}[{index}][{character!r}]", height, width)
        frames.append(frame)
    return frames


class MutualConsistency:
    """The portraits of a call and the mutual-attention state; :meth:`predict` runs one UNet step of the scenes.

    Built by the pipelines' ``prepare_mutual_consistency``: ``names`` are the characters with portraits,
    ``portrait_latents`` (N, C, h, w) their clean latents, ``portrait_noise`` the fixed noise, ``portrait_embeds``
    (N, L, D) their description embeddings (also MMCA's), ``negative_embeds`` (1, L, D) or ``None`` without
    classifier-free guidance, ``mode`` ``"cache"`` or ``"recompute"``, ``extra_weight`` the state's
    :attr:`~storygptv.attention.mutual.MutualAttentionState.extra_weight`.
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        names: list[str],
        portrait_latents: torch.Tensor,
        portrait_noise: torch.Tensor,
        portrait_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        mode: str,
        extra_weight: float = 1.0,
    ) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.names = names
        self.portrait_latents, self.portrait_noise = portrait_latents, portrait_noise
        self.portrait_embeds, self.negative_embeds = portrait_embeds, negative_embeds
        self.mode = mode
        self.state = install_mutual_attention_processors(
            unet, state=MutualAttentionState(max_characters=max(len(names), 1))
        )
        self.state.extra_weight = extra_weight

    @property
    def guided(self) -> bool:
        return self.negative_embeds is not None

    def close(self) -> None:
        """Put the UNet's processors back and free the cache."""
        from ..attention.mutual import uninstall_mutual_attention_processors

        uninstall_mutual_attention_processors(self.unet)
        self.state.cache.clear()

    def portrait_batch(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The portraits noised to ``t`` (UNet input) and their conditioning, doubled for guidance."""
        count = self.portrait_latents.shape[0]
        timesteps = t.reshape(1).expand(count).to(self.portrait_latents.device)
        noisy = self.scheduler.add_noise(self.portrait_latents, self.portrait_noise, timesteps)
        conditioning = self.portrait_embeds
        if self.guided:
            noisy = torch.cat([noisy] * 2)
            conditioning = torch.cat([self.negative_embeds.expand(count, -1, -1), conditioning])
        return self.scheduler.scale_model_input(noisy, t), conditioning

    @torch.no_grad()
    def record(self, num_inference_steps: int, device: torch.device) -> None:
        """``mode="cache"``: one pass over the portraits at every timestep, keeping their keys / values."""
        if self.mode != "cache":
            return
        self.state.cache.clear()
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        dtype = self.unet.dtype
        for step, t in enumerate(self.scheduler.timesteps):
            portraits, conditioning = self.portrait_batch(t)
            with self.state.activate("record", step):
                self.unet(
                    portraits.to(dtype), t, encoder_hidden_states=conditioning.to(dtype), return_dict=False
                )

    def set_scenes(self, masks: list[dict[str, torch.Tensor]]) -> bool:
        """Set the scenes of the next steps (one ``{name: mask}`` per scene image); ``False`` if no mask is set."""
        present = [name for name in self.names if any(name in frame for frame in masks)]
        if not present:
            self.state.clear_scene()
            return False
        count, scenes = len(self.names), len(masks)
        rows = 2 * scenes if self.guided else scenes
        height, width = next(iter(next(m for m in masks if m).values())).shape
        mask_tensor = torch.zeros(rows, len(present), height, width)
        index = torch.full((rows, len(present)), -1, dtype=torch.long)
        for row in range(rows):
            frame, half = masks[row % scenes], row // scenes
            for j, name in enumerate(present):
                if name in frame:
                    mask_tensor[row, j] = frame[name]
                index[row, j] = half * count + self.names.index(name)
        description = self.portrait_embeds[[self.names.index(name) for name in present]]
        portrait_rows = 2 * count if self.guided else count
        self.state.max_characters = max(self.state.max_characters, len(present))
        self.state.set_scene(
            mask_tensor,
            portrait_index=index,
            scene_rows=torch.arange(rows) + (portrait_rows if self.mode == "recompute" else 0),
            description_embeds=description[None].expand(rows, -1, -1, -1),
            # the description is conditioning, like the caption: only the conditional half attends to it
            description_rows=torch.arange(rows) >= (scenes if self.guided else 0),
        )
        return True

    def predict(
        self,
        latent_input: torch.Tensor,
        t: torch.Tensor,
        step: int,
        conditioning: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """The UNet's noise prediction of the scenes (``latent_input``) at ``t`` with mutual attention."""
        if self.mode == "cache":
            with self.state.activate("replay", step):
                return self.unet(
                    latent_input,
                    t,
                    encoder_hidden_states=conditioning,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]
        portraits, portrait_conditioning = self.portrait_batch(t)
        dtype = latent_input.dtype
        with self.state.activate("joint", step):
            out = self.unet(
                torch.cat([portraits.to(dtype), latent_input]),
                t,
                encoder_hidden_states=torch.cat([portrait_conditioning.to(conditioning.dtype), conditioning]),
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )[0]
        return out[portraits.shape[0] :]
