"""Stage-1 (Char-LDM) collator and the story -> frame flattening."""

import warnings

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from storygptv.characters import find_character_tokens
from storygptv.data import story_features
from storygptv.data.collators import CharLDMCollator, frame_pixel_values, story_frames
from storygptv.models.fuser import CLIP_MEAN, CLIP_STD


def _frame(
    caption="Fred and Barney are in the yard.", characters=("Fred", "Barney"), size=16, color=(200, 10, 10)
):
    image = PIL.Image.new("RGB", (size, size), color)
    label = np.zeros((size, size), dtype=np.uint8)
    half = size // 2
    boxes = []
    for index, _ in enumerate(characters):
        if index == 0:
            label[:, :half] = 1  # left half
            boxes.append([0.0, 0.0, float(size), float(size)])  # box larger than the mask
        else:
            label[half:, half:] = index + 1
            boxes.append([float(half), float(half), float(size), float(size)])
    return {
        "frame_id": "f",
        "image": image,
        "caption": caption,
        "characters": list(characters),
        "boxes": boxes,
        "segmentation": PIL.Image.fromarray(label, mode="L"),
    }


def _unnormalise(ref):
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (ref * std + mean) * 255.0


def test_shapes_and_fused_positions(clip_tokenizer):
    collator = CharLDMCollator(
        clip_tokenizer, resolution=32, reference_size=16, uncondition_prob=0.0, text_only_prob=0.0, seed=0
    )
    batch = collator([_frame(), _frame("Wilma waves at Barney.", ("Wilma",))])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids"].dtype == torch.long
    assert (
        batch["character_token_indices"].shape == (2, 4)
        and batch["character_token_indices"].dtype == torch.long
    )
    assert batch["reference_pixel_values"].shape == (2, 4, 3, 16, 16)
    assert batch["character_masks"].shape == (2, 4, 32, 32)
    assert batch["condition"].tolist() == [2, 2]
    expected = [
        m.token_index
        for m in find_character_tokens("Fred and Barney are in the yard.", ["Fred", "Barney"], clip_tokenizer)
    ]
    assert batch["character_token_indices"][0].tolist() == expected + [-1, -1]
    wilma = find_character_tokens("Wilma waves at Barney.", ["Wilma"], clip_tokenizer)[0].token_index
    assert batch["character_token_indices"][1].tolist() == [wilma, -1, -1, -1]
    ids = clip_tokenizer("Fred and Barney are in the yard.", padding="max_length", max_length=77)["input_ids"]
    assert batch["input_ids"][0].tolist() == ids
    # Padding slots are zeros; masks are {0, 1} and follow the label map (left half for Fred).
    assert (
        batch["reference_pixel_values"][0, 2:].abs().sum() == 0 and batch["character_masks"][0, 2:].sum() == 0
    )
    assert set(batch["character_masks"].unique().tolist()) <= {0.0, 1.0}
    assert batch["character_masks"][0, 0, :, :16].all() and batch["character_masks"][0, 0, :, 16:].sum() == 0
    assert batch["character_masks"][0, 1, 16:, 16:].all() and batch["character_masks"][0, 1].sum() == 16 * 16


def test_reference_crop_noise_outside_mask(clip_tokenizer):
    collator = CharLDMCollator(
        clip_tokenizer, resolution=16, reference_size=16, uncondition_prob=0.0, text_only_prob=0.0, seed=1
    )
    ref = _unnormalise(collator([_frame()])["reference_pixel_values"][0, 0])  # Fred: box = whole frame
    inside, outside = ref[:, :, :8], ref[:, :, 8:]
    assert torch.allclose(inside[0], torch.full_like(inside[0], 200.0), atol=1.0)
    assert torch.allclose(inside[1], torch.full_like(inside[1], 10.0), atol=1.0)
    assert outside.std() > 50  # uniform noise
    # Barney: cropped to his box, entirely inside his mask -> the frame's colour everywhere.
    ref = _unnormalise(collator([_frame()])["reference_pixel_values"][0, 1])
    assert torch.allclose(ref[0], torch.full_like(ref[0], 200.0), atol=2.0)


def test_unconditional_text_only_and_mix_frequencies(clip_tokenizer):
    uncond = CharLDMCollator(
        clip_tokenizer, resolution=16, reference_size=8, uncondition_prob=1.0, text_only_prob=0.0
    )
    batch = uncond([_frame()])
    assert batch["condition"].tolist() == [0]
    assert (
        batch["input_ids"][0].tolist() == clip_tokenizer("", padding="max_length", max_length=77)["input_ids"]
    )
    assert (batch["character_token_indices"] == -1).all() and batch["reference_pixel_values"].abs().sum() == 0
    text = CharLDMCollator(
        clip_tokenizer, resolution=16, reference_size=8, uncondition_prob=0.0, text_only_prob=1.0
    )
    batch = text([_frame()])
    assert batch["condition"].tolist() == [1] and (batch["character_token_indices"] == -1).all()

    n = 4000
    ours = CharLDMCollator(clip_tokenizer, seed=123)
    counts = np.bincount([ours.sample_condition(2) for _ in range(n)], minlength=3) / n
    assert np.allclose(counts, [0.1, 0.1, 0.8], atol=0.02)
    public = CharLDMCollator(clip_tokenizer, seed=123, text_only_rule="le1")
    counts = np.bincount([public.sample_condition(2) for _ in range(n)], minlength=3) / n
    assert np.allclose(counts, [0.1, 0.0, 0.9], atol=0.02)  # no text-only with 2 characters
    counts = np.bincount([public.sample_condition(1) for _ in range(n)], minlength=3) / n
    assert np.allclose(counts, [0.1, 0.1, 0.8], atol=0.02)
    # Through __call__, reproducible with a seed.
    frames = [_frame(size=8) for _ in range(300)]
    a = CharLDMCollator(clip_tokenizer, resolution=8, reference_size=8, seed=7)(frames)["condition"]
    b = CharLDMCollator(clip_tokenizer, resolution=8, reference_size=8, seed=7)(frames)["condition"]
    assert torch.equal(a, b)
    rates = np.bincount(a.numpy(), minlength=3) / len(frames)
    assert np.allclose(rates, [0.1, 0.1, 0.8], atol=0.06)
    with pytest.raises(ValueError, match="text_only_rule"):
        CharLDMCollator(clip_tokenizer, text_only_rule="sometimes")


def test_missing_names_drop_charless_and_max_characters(clip_tokenizer):
    kwargs = {
        "resolution": 16,
        "reference_size": 8,
        "uncondition_prob": 0.0,
        "text_only_prob": 0.0,
        "seed": 0,
    }
    collator = CharLDMCollator(clip_tokenizer, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collator(
            [_frame("Wilma is in the yard.", ("Wilma", "Dino")), _frame("Dino sleeps.", ("Pebbles",))]
        )
        collator([_frame("Dino sleeps.", ("Pebbles",))])
    assert sum("not named" in str(w.message) for w in caught) == 1  # warned once
    assert (batch["character_token_indices"][0] >= 0).sum() == 1
    assert batch["condition"].tolist() == [2, 1]  # no named character -> text only in effect
    dropping = CharLDMCollator(clip_tokenizer, drop_charless_frames=True, **kwargs)
    batch = dropping([_frame(), _frame("A car drives by.", ())])
    assert batch["pixel_values"].shape[0] == 1
    assert dropping([_frame("A car.", ())])["input_ids"].shape == (0, 77)
    one = CharLDMCollator(clip_tokenizer, max_characters=1, **kwargs)
    batch = one([_frame()])
    assert batch["character_token_indices"].shape == (1, 1) and batch["character_token_indices"][0, 0] >= 0


def test_image_processor_and_augmentation(clip_tokenizer):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    kwargs = {"resolution": 16, "reference_size": 16, "uncondition_prob": 0.0, "text_only_prob": 0.0}
    with_processor = CharLDMCollator(clip_tokenizer, image_processor=processor, seed=0, **kwargs)
    manual = CharLDMCollator(clip_tokenizer, seed=0, **kwargs)
    a = with_processor([_frame()])["reference_pixel_values"]
    b = manual([_frame()])["reference_pixel_values"]
    assert a.shape == b.shape == (1, 4, 3, 16, 16)
    assert torch.allclose(a[0, 1], b[0, 1], atol=0.05)  # same crop, same normalisation
    augmented = CharLDMCollator(clip_tokenizer, augment=True, seed=0, **kwargs)([_frame() for _ in range(4)])
    assert augmented["reference_pixel_values"].shape == (4, 4, 3, 16, 16)
    assert torch.isfinite(augmented["reference_pixel_values"]).all()


def test_story_frames_flattening(clip_tokenizer):
    def image(color):
        return PIL.Image.new("RGB", (8, 8), color)

    seg = PIL.Image.new("L", (8, 8), 0)
    story = {
        "story_id": ["s"],
        "frame_ids": [["a", "b"]],
        "images": [[image((255, 0, 0)), image((0, 255, 0))]],
        "captions": [["Fred runs.", "A car."]],
        "referential_captions": [["Fred runs.", "A car."]],
        "is_referential": [[False, False]],
        "characters": [[["Fred"], []]],
        "boxes": [[[[0.0, 0.0, 8.0, 8.0]], []]],
        "segmentation": [[seg, seg]],
        "character_labels": [[[0, 1, 0, 0, 0, 0, 0], [0] * 7]],
        "background": [["yard", "street"]],
        "background_labels": [[[], []]],
    }
    ds = datasets.Dataset.from_dict(story, features=story_features())
    frames = story_frames(ds)
    assert len(frames) == 2
    assert frames[1]["frame_id"] == "b" and frames[1]["frame_index"] == 1
    assert frames[1]["image"].getpixel((0, 0)) == (0, 255, 0)
    assert frames[0]["characters"] == ["Fred"] and frames[0]["segmentation"].mode == "L"
    assert len(story_frames(ds, drop_charless_frames=True)) == 1
    batch = CharLDMCollator(
        clip_tokenizer, resolution=8, reference_size=8, uncondition_prob=0.0, text_only_prob=0.0
    )(list(frames))
    assert batch["condition"].tolist() == [2, 1]
    streamed = list(story_frames(ds.to_iterable_dataset()))
    assert [f["frame_id"] for f in streamed] == ["a", "b"]


def test_story_frames_keeps_frames_rendered_by_a_format_transform():
    features = story_features()
    row = {key: [[]] for key in features}
    row.update(
        story_id=["s"],
        frame_ids=[["a"]],
        images=[[None]],
        segmentation=[[None]],
        captions=[["Fred runs."]],
        referential_captions=[["Fred runs."]],
        is_referential=[[False]],
        characters=[[["Fred"]]],
        boxes=[[[[0.0, 0.0, 4.0, 4.0]]]],
        character_labels=[[[0, 1, 0, 0, 0, 0, 0]]],
        background=[["yard"]],
        background_labels=[[[]]],
    )
    lazy = datasets.Dataset.from_dict(row, features=features)

    def render(batch):
        batch["images"] = [
            [PIL.Image.new("RGB", (4, 4), (1, 2, 3)) for _ in ids] for ids in batch["frame_ids"]
        ]
        batch["segmentation"] = [[PIL.Image.new("L", (4, 4), 1) for _ in ids] for ids in batch["frame_ids"]]
        return batch

    lazy.set_transform(render)
    frames = story_frames(lazy)
    assert frames[0]["image"].getpixel((0, 0)) == (1, 2, 3)
    assert frames[0]["background"] == "yard" and frames[0]["characters"] == ["Fred"]


def test_reseed_restarts_the_collators_randomness(clip_tokenizer):
    """After ``reseed(s)`` the collator draws what a collator built with ``seed=s`` draws (mix, crops)."""
    frames = [_frame(), _frame("Wilma waves at Barney.", ("Wilma",))] * 4
    options = {"resolution": 16, "reference_size": 16, "augment": True}
    fresh = CharLDMCollator(clip_tokenizer, seed=123, **options)(frames)
    used = CharLDMCollator(clip_tokenizer, seed=5, **options)
    used(frames)
    used.reseed(123)
    again = used(frames)
    assert used.seed == 123
    for key in ("condition", "reference_pixel_values", "character_token_indices"):
        assert torch.equal(again[key], fresh[key]), key


def test_frame_pixel_values_is_the_collators_target():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    pixels = frame_pixel_values(image, 16)
    resized = np.asarray(image.resize((16, 16), PIL.Image.Resampling.BICUBIC), dtype=np.float32)
    assert torch.equal(pixels, torch.from_numpy(resized).permute(2, 0, 1) / 127.5 - 1.0)
    assert torch.equal(frame_pixel_values(image, 16, raw=True), torch.from_numpy(resized).permute(2, 0, 1))
