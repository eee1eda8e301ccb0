"""Stage-2 training collator (storygptv.data.collators_story)."""

import numpy as np
import pytest
import torch

from storygptv.data.collators_story import StoryGPTVCollator
from storygptv.models.story_inputs import IGNORE_INDEX, StoryTokens, build_story_sequence, encode_caption
from storygptv.testing.story_model import tiny_story_model_config, tiny_story_tokenizer

CAPTIONS = [
    "Fred and Wilma are in the kitchen.",
    "Fred is in the yard.",
    "Fred talks to Barney.",
    "Wilma is laughing.",
]
REF = [
    "Fred and Wilma are in the kitchen.",
    "He is in the yard.",
    "He talks to Barney.",
    "She is laughing.",
]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_story_tokenizer()
    return tok, tiny_story_model_config(tok)


def make_row(n=4, dim=32, seed=0, as_lists=False):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g)
    cond = torch.randn(n, 77, 32, generator=g)
    row = {
        "captions": CAPTIONS[:n],
        "referential_captions": REF[:n],
        "image_embeds": [e.tolist() for e in emb] if as_lists else emb,
        "target_conditioning": [c.numpy() for c in cond] if as_lists else cond,
    }
    return row, emb, cond


def test_fixed_target_layout_labels_and_tensors(setup):
    tok, cfg = setup
    row, emb, cond = make_row()
    batch = StoryGPTVCollator(tok, cfg, target_frame=2)([row])
    st = StoryTokens.from_config(cfg)
    seq = build_story_sequence(
        st, [encode_caption(tok, c) for c in REF[:2]], encode_caption(tok, REF[2]), max_length=160
    )
    assert batch["input_ids"][0].tolist() == seq.input_ids
    assert batch["labels"][0].tolist() == seq.labels
    assert batch["attention_mask"].all()
    assert torch.equal(batch["image_embeds"], emb[:2])
    # target = conditioning of the (non-referential) target frame
    assert torch.equal(batch["target_conditioning"][0], cond[2])
    assert batch["target_frame"].tolist() == [2]
    # the referential target caption is in the sequence, not the original one
    assert encode_caption(tok, "She") != encode_caption(tok, "Fred")
    decoded = tok.decode(batch["input_ids"][0])
    assert "He talks to Barney" in decoded.replace(" .", ".")


def test_padding_and_flattened_images(setup):
    tok, cfg = setup
    rows = [make_row(4, seed=0)[0], make_row(2, seed=1)[0]]
    coll = StoryGPTVCollator(tok, cfg, target_frame=-1, pad_to_multiple_of=8)
    batch = coll(rows)
    assert batch["target_frame"].tolist() == [3, 1]
    assert batch["input_ids"].shape[1] % 8 == 0
    n0 = int(batch["attention_mask"][1].sum())
    assert (batch["input_ids"][1, n0:] == tok.pad_token_id).all()
    assert (batch["labels"][1, n0:] == IGNORE_INDEX).all()
    # 3 context images of story 0, then 1 of story 1, in placeholder order
    assert batch["image_embeds"].shape == (4, 32)
    assert torch.equal(batch["image_embeds"][3], torch.as_tensor(rows[1]["image_embeds"][0]))
    placeholders = (batch["input_ids"] == cfg.image_token_id).sum().item()
    assert placeholders == 4 * cfg.num_visual_tokens
    assert batch["target_conditioning"].shape == (2, 77, 32)


def test_random_target_never_frame_zero_and_seeded(setup):
    tok, cfg = setup
    row = make_row(as_lists=True)[0]
    picks = [StoryGPTVCollator(tok, cfg, seed=3)([row] * 8)["target_frame"].tolist() for _ in range(2)]
    assert picks[0] == picks[1]  # deterministic for a seed
    coll = StoryGPTVCollator(tok, cfg, seed=0)
    seen = set()
    for _ in range(20):
        seen.update(coll([row])["target_frame"].tolist())
    assert seen == {1, 2, 3}
    single = make_row(1)[0]
    batch = coll([single])
    assert batch["target_frame"].tolist() == [0] and batch["image_embeds"].shape == (0, 32)


def test_reseed_restarts_the_random_targets(setup):
    tok, cfg = setup
    row = make_row(as_lists=True)[0]
    fresh = StoryGPTVCollator(tok, cfg, seed=11)([row] * 8)["target_frame"]
    used = StoryGPTVCollator(tok, cfg, seed=2)
    used([row] * 5)
    used.reseed(11)
    assert torch.equal(used([row] * 8)["target_frame"], fresh)


def test_truncation_keeps_recent_frames(setup):
    tok, cfg = setup
    n = 12
    row = {
        "captions": [f"Fred and Wilma are in the kitchen {i}." for i in range(n)],
        "image_embeds": np.arange(n * 32, dtype=np.float32).reshape(n, 32),
        "target_conditioning": np.zeros((n, 77, 32), dtype=np.float32),
    }  # no referential captions: falls back to `captions`
    batch = StoryGPTVCollator(tok, cfg, target_frame=-1, max_length=160)([row])
    assert batch["input_ids"].shape[1] <= 160
    k = batch["image_embeds"].shape[0]
    assert 0 < k < n - 1
    assert torch.equal(batch["image_embeds"], torch.as_tensor(row["image_embeds"][n - 1 - k : n - 1]))


def test_errors(setup):
    tok, cfg = setup
    row = make_row()[0]
    with pytest.raises(KeyError, match="target_conditioning"):
        StoryGPTVCollator(tok, cfg)([{k: v for k, v in row.items() if k != "target_conditioning"}])
    with pytest.raises(ValueError, match="out of range"):
        StoryGPTVCollator(tok, cfg, target_frame=7)([row])
    bad = dict(row, image_embeds=row["image_embeds"][:3])
    with pytest.raises(ValueError, match="3 image embeddings"):
        StoryGPTVCollator(tok, cfg, target_frame=1)([bad])
