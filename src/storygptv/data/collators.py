"""Stage-1 (Char-LDM) training data: story rows flattened into frames, and the batch collator.

:func:`story_frames` turns a story dataset (common schema, one row per story) into one row per frame;
:class:`CharLDMCollator` turns a list of such frame rows into the tensors of a Char-LDM training step:
the target image, the caption's token ids, the fused-token positions of the characters, one
reference crop per character cut from the frame itself, the characters' masks and the conditioning
mode drawn from the 10 / 10 / 80 mix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageFilter
import PIL.ImageOps
import torch

from ..characters import find_character_tokens
from ..models.fuser import CLIP_MEAN, CLIP_STD

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
# Story rows -> frame rows
# ----------------------------------------------------------------------------------------------


def frame_features(decode: bool = True) -> datasets.Features:
    """The ``datasets.Features`` of frame rows produced by :func:`story_frames`."""
    return datasets.Features(
        {
            "story_id": datasets.Value("string"),
            "frame_id": datasets.Value("string"),
            "frame_index": datasets.Value("int32"),
            "image": datasets.Image(decode=decode),
            "caption": datasets.Value("string"),
            "referential_caption": datasets.Value("string"),
            "is_referential": datasets.Value("bool"),
            "characters": datasets.List(datasets.Value("string")),
            "boxes": datasets.List(datasets.List(datasets.Value("float32"))),
            "segmentation": datasets.Image(decode=decode),
            "character_labels": datasets.List(datasets.Value("int8")),
            "background": datasets.Value("string"),
            "background_labels": datasets.List(datasets.Value("int8")),
        }
    )


_STORY_TO_FRAME = {
    "frame_ids": "frame_id",
    "images": "image",
    "captions": "caption",
    "referential_captions": "referential_caption",
    "is_referential": "is_referential",
    "characters": "characters",
    "boxes": "boxes",
    "segmentation": "segmentation",
    "character_labels": "character_labels",
    "background": "background",
    "background_labels": "background_labels",
}


def _explode(batch: dict[str, list[Any]], drop_charless_frames: bool = False) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ["story_id", "frame_index", *_STORY_TO_FRAME.values()]}
    for row in range(len(batch["story_id"])):
        for position in range(len(batch["frame_ids"][row])):
            if drop_charless_frames and not batch["characters"][row][position]:
                continue
            out["story_id"].append(batch["story_id"][row])
            out["frame_index"].append(position)
            for story_key, frame_key in _STORY_TO_FRAME.items():
                out[frame_key].append(batch[story_key][row][position])
    return out


def story_frames(
    dataset: datasets.Dataset | datasets.IterableDataset, drop_charless_frames: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """Flatten story rows (common schema) into frame rows, one per frame (see :func:`frame_features`).

    Frame rows have ``story_id``, ``frame_id``, ``frame_index`` (position in the story), ``image``,
    ``caption``, ``referential_caption``, ``is_referential``, ``characters``, ``boxes``,
    ``segmentation``, ``character_labels``, ``background`` and ``background_labels``.
    Images are not decoded and re-encoded on the way (they are copied as bytes).

    Args:
        dataset: a story dataset (``Dataset`` or ``IterableDataset``).
        drop_charless_frames: drop frames without characters (the public code's ``min_num_objects=1``).
    """
    story_columns = list(dataset.features) if dataset.features is not None else None
    fn_kwargs = {"drop_charless_frames": drop_charless_frames}
    if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") == "custom":
        # A lazy dataset (e.g. SynthSV) renders its frames in a format transform, which ``map`` applies
        # to its input: keep the rendered images, and drop the transform from the frame rows.
        frames = dataset.map(
            _explode,
            batched=True,
            remove_columns=story_columns,
            features=frame_features(),
            fn_kwargs=fn_kwargs,
        )
        return frames.with_format(None)
    raw = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    raw = raw.cast_column("segmentation", datasets.List(datasets.Image(decode=False)))
    frames = raw.map(
        _explode,
        batched=True,
        remove_columns=story_columns,
        features=frame_features(decode=False),
        fn_kwargs=fn_kwargs,
    )
    frames = frames.cast_column("image", datasets.Image())
    return frames.cast_column("segmentation", datasets.Image())


# ----------------------------------------------------------------------------------------------
# Target frames and reference crops
# ----------------------------------------------------------------------------------------------


def frame_pixel_values(image: Any, resolution: int, raw: bool = False) -> torch.Tensor:
    """(3, R, R) float VAE input of a frame: RGB, resized (bicubic) to ``resolution``, scaled to [-1, 1].

    The one definition of a target frame's pixels in training (the Char-LDM collator, stage 2's L_img and
    the latent cache of ``train_char_ldm.py --cache_latents`` all use it); no randomness, so a frame's VAE
    posterior can be cached. ``raw=True`` keeps the 0-255 values (stage 2's ``--vae_input_compat``, the
    public code's input). ``image``: a PIL image, an undecoded ``datasets.Image`` value or an array.
    """
    image = _to_pil(image, "RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels if raw else pixels / 127.5 - 1.0


def _to_pil(value: Any, mode: str) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        return value.convert(mode) if value.mode != mode else value
    if isinstance(value, dict):  # an undecoded datasets.Image value
        return datasets.Image().decode_example(value).convert(mode)
    if isinstance(value, np.ndarray):
        return PIL.Image.fromarray(value).convert(mode)
    if isinstance(value, torch.Tensor):
        return PIL.Image.fromarray(value.cpu().numpy()).convert(mode)
    raise TypeError(f"Cannot read an image from a {type(value).__name__}.")


def _valid_box(box: Sequence[float] | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    if box is None or len(box) != 4:
        return None
    x1, y1 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x2, y2 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def make_reference_crop(
    image: np.ndarray,
    mask: np.ndarray,
    box: Sequence[float] | None,
    size: int,
    rng: np.random.Generator,
) -> PIL.Image.Image:
    """A character's reference crop from its own frame (FastComposer style).

    Pixels outside ``mask`` become uniform noise; the image is cropped to ``box`` (the mask's bounding
    box when ``box`` is missing), zero-padded to a centred square and resized to ``size``.

    Args:
        image: the (H, W, 3) uint8 frame.
        mask: the character's (H, W) boolean mask.
        box: ``[x1, y1, x2, y2]`` in pixels, or ``None``/``[]``.
        size: output side (e.g. 224).
        rng: the noise source.
    """
    height, width = mask.shape
    noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    filled = np.where(mask[..., None], image, noise)
    bounds = _valid_box(box, width, height)
    if bounds is None:
        rows, cols = np.nonzero(mask)
        bounds = (
            (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
            if rows.size
            else None
        )
    if bounds is None:
        bounds = (0, 0, width, height)
    x1, y1, x2, y2 = bounds
    crop = filled[y1:y2, x1:x2]
    side = max(crop.shape[0], crop.shape[1])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    result = PIL.Image.fromarray(square, mode="RGB")
    if result.size != (size, size):
        result = result.resize((size, size), PIL.Image.Resampling.BICUBIC)
    return result


def _augment(image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """Reference-crop augmentation with PIL only (a subset of FastComposer's, same probabilities)."""
    size = image.size
    if rng.random() < 0.5:  # zoom in 1-2x
        factor = float(rng.uniform(1.0, 2.0))
        w, h = size[0] / factor, size[1] / factor
        left, top = (size[0] - w) / 2, (size[1] - h) / 2
        image = image.crop((round(left), round(top), round(left + w), round(top + h))).resize(
            size, PIL.Image.Resampling.BICUBIC
        )
    if rng.random() < 0.75:
        image = image.rotate(float(rng.uniform(-30.0, 30.0)), resample=PIL.Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        for enhancer in (PIL.ImageEnhance.Brightness, PIL.ImageEnhance.Contrast, PIL.ImageEnhance.Color):
            image = enhancer(image).enhance(float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        image = image.filter(PIL.ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    if rng.random() < 0.1:
        image = PIL.ImageOps.grayscale(image).convert("RGB")
    if rng.random() < 0.5:
        image = PIL.ImageOps.mirror(image)
    return image


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
        image = _to_pil(frame["image"], "RGB")
        width, height = image.size
        array = np.asarray(image)
        characters = [str(c) for c in (frame.get("characters") or [])]
        boxes = list(frame.get("boxes") or [])
        boxes += [[]] * (len(characters) - len(boxes))
        seg = frame.get("segmentation")
        label = (
            np.asarray(_to_pil(seg, "L")) if seg is not None else np.zeros((height, width), dtype=np.uint8)
        )
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
                    bounds = _valid_box(box, width, height)
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
                    crop = _augment(crop, self.rng)
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
