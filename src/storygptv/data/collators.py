"""Stage-1 (Char-LDM) batch collator (frame rows: :mod:`storygptv.data.frames`; crops: :mod:`.reference_crops`).

:class:`CharLDMCollator` turns a list of frame rows into the tensors of a Char-LDM training step:
the target image, the caption's token ids, the fused-token positions of the characters, one
reference crop per character cut from the frame itself, the characters' masks and the conditioning
mode drawn from the 10 / 10 / 80 mix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageFilter
import PIL.ImageOps
import torch

from ..characters import find_character_tokens
from ..models.fuser import CLIP_MEAN, CLIP_STD
from .frames import frame_features, frame_pixel_values, story_frames
from .reference_crops import augment_reference, make_reference_crop, to_pil, valid_box

__all__ = [
    "CONDITION_FUSED",
    "CONDITION_TEXT",
    "CONDITION_UNCONDITIONAL",
    "CharLDMCollator",
    "frame_features",
    "frame_pixel_values",
    "make_reference_crop",
    "story_frames",
]

#: Values of the ``condition`` tensor.
CONDITION_UNCONDITIONAL = 0
CONDITION_TEXT = 1
CONDITION_FUSED = 2


# ----------------------------------------------------------------------------------------------
# The collator
# ----------------------------------------------------------------------------------------------


class CharLDMCollator:
    """Collate frame rows (see :func:`story_frames`) into a Char-LDM training batch.

    Returned tensors (B frames, K = ``max_characters``, R = ``resolution``, S = ``reference_size``):

    - ``pixel_values`` (B, 3, R, R) float in [-1, 1] (the frame resized to R x R);
    - ``input_ids`` (B, L) long, padded to ``tokenizer.model_max_length`` (77 for CLIP);
    - ``character_token_indices`` (B, K) long: the fused token of each character (the last sub-token
      of its name in the *original* caption), ``-1`` padding;
    - ``reference_pixel_values`` (B, K, 3, S, S): CLIP-normalised reference crops (``image_processor``
      when given, else CLIP mean / std), zeros for padding;
    - ``character_masks`` (B, K, R, R) float {0, 1}: the characters' masks (the frame's label map,
      else its box), zeros for padding;
    - ``condition`` (B,) long: 0 unconditional (caption ``""``, no characters), 1 text only,
      2 fused.

    Conditioning mix (notes 2.2 and 8.1 #4): with p ~ U(0, 1), p < ``uncondition_prob`` gives
    unconditional; else p < ``uncondition_prob + text_only_prob`` gives text only (rule ``"any"``, ours)
    or, with ``text_only_rule="le1"`` (the public code), only when the frame has at most one
    character; else fused. A fused frame none of whose characters is named in its caption carries
    no fused token and is reported as text only (1), the conditioning it actually gets. Characters
    not named in the caption, or without mask and box, get no fused token (one warning per collator).
    When more than K characters are named, K are drawn at random and kept in caption order.

    Args:
        tokenizer: the CLIP tokenizer of the text encoder (a fast tokenizer: offsets are needed).
        image_processor: optional CLIP image processor for the reference crops.
        resolution: side of ``pixel_values`` and ``character_masks``.
        reference_size: side of the reference crops.
        max_characters: K, the number of character slots.
        uncondition_prob: probability of the unconditional mode.
        text_only_prob: probability of the text-only mode.
        text_only_rule: ``"any"`` or ``"le1"``.
        drop_charless_frames: drop frames without characters from the batch (``min_num_objects=1``).
        augment: augment the reference crops (zoom, rotation, colour jitter, blur, grayscale, flip).
        seed: seeds the mix, the noise and the augmentation (per DataLoader worker: ``seed + id``).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any = None,
        resolution: int = 512,
        reference_size: int = 224,
        max_characters: int = 4,
        uncondition_prob: float = 0.1,
        text_only_prob: float = 0.1,
        text_only_rule: str = "any",
        drop_charless_frames: bool = False,
        augment: bool = False,
        seed: int | None = None,
    ) -> None:
        if text_only_rule not in ("any", "le1"):
            raise ValueError(f"text_only_rule must be 'any' or 'le1', got {text_only_rule!r}.")
        if not (
            uncondition_prob >= 0.0 and text_only_prob >= 0.0 and uncondition_prob + text_only_prob <= 1.0
        ):
            raise ValueError("uncondition_prob and text_only_prob must be >= 0 with a sum <= 1.")
        if max_characters < 1:
            raise ValueError("max_characters must be at least 1.")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.resolution = int(resolution)
        self.reference_size = int(reference_size)
        self.max_characters = int(max_characters)
        self.uncondition_prob = float(uncondition_prob)
        self.text_only_prob = float(text_only_prob)
        self.text_only_rule = text_only_rule
        self.drop_charless_frames = drop_charless_frames
        self.augment = augment
        self.seed = seed
        self.max_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
        if self.max_length > 10_000:
            self.max_length = 77
        self._rng: np.random.Generator | None = None
        self._rng_worker: int | None = None
        self._warned = False
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        self._mean, self._std = mean, std

    # -- randomness ---------------------------------------------------------------------------

    @property
    def rng(self) -> np.random.Generator:
        """The collator's generator (re-seeded with ``seed + worker id`` inside DataLoader workers)."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else None
        if self._rng is None or worker != self._rng_worker:
            if self.seed is None:
                self._rng = np.random.default_rng()
            else:
                self._rng = np.random.default_rng(
                    int(self.seed) if worker is None else [int(self.seed), worker]
                )
            self._rng_worker = worker
        return self._rng

    def reseed(self, seed: int) -> None:
        """Restart the collator's randomness (mix, crop noise, augmentation, slot choice) from ``seed``.

        The training loader calls it before every batch with a seed derived from the batch's index, so a
        batch's randomness does not depend on which worker collates it or on what came before (resume).
        The seed is used as given, also inside a DataLoader worker.
        """
        info = torch.utils.data.get_worker_info()
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._rng_worker = info.id if info is not None else None

    def sample_condition(self, num_characters: int) -> int:
        """Draw the conditioning mode (0, 1 or 2) of a frame with ``num_characters`` characters."""
        p = float(self.rng.random())
        if p < self.uncondition_prob:
            return CONDITION_UNCONDITIONAL
        if p < self.uncondition_prob + self.text_only_prob and (
            self.text_only_rule == "any" or num_characters <= 1
        ):
            return CONDITION_TEXT
        return CONDITION_FUSED

    # -- per-frame work -----------------------------------------------------------------------

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message + " (warned once per collator)", stacklevel=3)

    def _normalise_reference(self, crop: PIL.Image.Image) -> torch.Tensor:
        if self.image_processor is not None:
            values = self.image_processor(images=crop, return_tensors="pt")["pixel_values"][0]
            if values.shape[-2:] != (self.reference_size, self.reference_size):
                values = torch.nn.functional.interpolate(
                    values[None],
                    size=(self.reference_size, self.reference_size),
                    mode="bilinear",
                    align_corners=False,
                )[0]
            return values.float()
        tensor = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (tensor - self._mean) / self._std

    def _frame(self, frame: dict[str, Any]) -> dict[str, Any]:
        image = to_pil(frame["image"], "RGB")
        width, height = image.size
        array = np.asarray(image)
        characters = [str(c) for c in (frame.get("characters") or [])]
        boxes = list(frame.get("boxes") or [])
        boxes += [[]] * (len(characters) - len(boxes))
        seg = frame.get("segmentation")
        label = np.asarray(to_pil(seg, "L")) if seg is not None else np.zeros((height, width), dtype=np.uint8)
        if label.shape != (height, width):
            label = np.asarray(
                PIL.Image.fromarray(label).resize((width, height), PIL.Image.Resampling.NEAREST)
            )

        r = self.resolution
        pixel_values = frame_pixel_values(image, r)
        condition = self.sample_condition(len(characters))
        caption = "" if condition == CONDITION_UNCONDITIONAL else str(frame.get("caption") or "")

        k_max = self.max_characters
        token_indices = torch.full((k_max,), -1, dtype=torch.long)
        references = torch.zeros(k_max, 3, self.reference_size, self.reference_size)
        masks = torch.zeros(k_max, r, r)
        if condition == CONDITION_FUSED:
            usable: dict[str, tuple[np.ndarray, list[float] | None]] = {}
            for index, name in enumerate(characters):
                mask = label == index + 1
                box = boxes[index] if index < len(boxes) else []
                if not mask.any():
                    bounds = valid_box(box, width, height)
                    if bounds is None:
                        continue
                    x1, y1, x2, y2 = bounds
                    mask = np.zeros((height, width), dtype=bool)
                    mask[y1:y2, x1:x2] = True
                usable.setdefault(name, (mask, box or None))
            mentions = find_character_tokens(
                caption,
                list(usable),
                self.tokenizer,
                max_characters=max(len(usable), 1),
                max_length=self.max_length,
                warn=False,
            )
            missing = [n for n in characters if n not in {m.name for m in mentions}]
            if missing:
                self._warn_once(
                    f"Characters {missing} of frame {frame.get('frame_id', '?')!r} are not named in its caption "
                    f"{caption!r} (or have no mask or box); they get no fused token."
                )
            if len(mentions) > k_max:
                keep = sorted(self.rng.choice(len(mentions), size=k_max, replace=False).tolist())
                mentions = [mentions[i] for i in keep]
            for slot, mention in enumerate(mentions):
                mask, box = usable[mention.name]
                crop = make_reference_crop(array, mask, box, self.reference_size, self.rng)
                if self.augment:
                    crop = augment_reference(crop, self.rng)
                references[slot] = self._normalise_reference(crop)
                mask_image = PIL.Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
                if mask_image.size != (r, r):
                    mask_image = mask_image.resize((r, r), PIL.Image.Resampling.NEAREST)
                masks[slot] = torch.from_numpy((np.asarray(mask_image) > 127).astype(np.float32))
                token_indices[slot] = int(mention.token_index)
            if not mentions:
                condition = CONDITION_TEXT
        return {
            "pixel_values": pixel_values,
            "caption": caption,
            "character_token_indices": token_indices,
            "reference_pixel_values": references,
            "character_masks": masks,
            "condition": condition,
        }

    def __call__(self, frames: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate frame rows into a batch (see the class docstring for the returned tensors)."""
        if self.drop_charless_frames:
            frames = [f for f in frames if f.get("characters")]
        items = [self._frame(f) for f in frames]
        r, s, k = self.resolution, self.reference_size, self.max_characters
        if not items:
            return {
                "pixel_values": torch.zeros(0, 3, r, r),
                "input_ids": torch.zeros(0, self.max_length, dtype=torch.long),
                "character_token_indices": torch.zeros(0, k, dtype=torch.long),
                "reference_pixel_values": torch.zeros(0, k, 3, s, s),
                "character_masks": torch.zeros(0, k, r, r),
                "condition": torch.zeros(0, dtype=torch.long),
            }
        input_ids = self.tokenizer(
            [item["caption"] for item in items],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )["input_ids"]
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": input_ids.long(),
            "character_token_indices": torch.stack([item["character_token_indices"] for item in items]),
            "reference_pixel_values": torch.stack([item["reference_pixel_values"] for item in items]),
            "character_masks": torch.stack([item["character_masks"] for item in items]),
            "condition": torch.tensor([item["condition"] for item in items], dtype=torch.long),
        }
