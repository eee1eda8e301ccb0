import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from storygptv.attention import (
    CharacterAttentionProcessor,
    MaskedMutualCrossAttnProcessor,
    MaskedMutualSelfAttnProcessor,
    MutualAttentionState,
    install_character_attention_processors,
    install_mutual_attention_processors,
    owner_map,
    uninstall_character_attention_processors,
    uninstall_mutual_attention_processors,
)
from storygptv.testing import tiny_unet


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return tiny_unet().eval()


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, 32, generator=g)


def box_masks(scenes=1, characters=1, box=(4, 12, 4, 12)):
    masks = torch.zeros(scenes, characters, 16, 16)
    masks[:, 0, box[0] : box[1], box[2] : box[3]] = 1
    return masks


def run_replay(unet, state, scene, text, portraits, portrait_text, t=10):
    with torch.no_grad(), state.activate("record", step=0):
        unet(portraits, t, portrait_text)
    with torch.no_grad(), state.activate("replay", step=0):
        return unet(scene, t, text).sample


def test_owner_map_gives_each_pixel_to_at_most_one_character():
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, :, :5] = 1
    masks[0, 1, :, 3:] = 1  # overlaps character 0 on columns 3-4: priority to the earlier one
    masks[0, 2, 0, 0] = 0.4  # under the threshold
    owner = owner_map(masks, 8, 8).view(8, 8)
    assert owner[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert owner_map(masks, 4, 4).view(4, 4)[0].tolist() == [0, 0, 1, 1]  # coverage argmax at 4x4
    assert (owner_map(torch.zeros(2, 2, 8, 8), 4, 4) == -1).all()


@pytest.mark.parametrize("mode", ["replay", "joint"])
def test_all_zero_masks_give_exactly_the_stock_output(unet, mode):
    scene, text = inputs(seed=0)
    portrait, portrait_text = inputs(seed=1)
    with torch.no_grad():  # the same batch as the mode runs (batching may change float rounding)
        reference = unet(scene, 10, text).sample
        if mode == "joint":
            reference = unet(torch.cat([portrait, scene]), 10, torch.cat([portrait_text, text])).sample[1:]
    state = install_mutual_attention_processors(unet)
    state.set_scene(
        torch.zeros(1, 1, 16, 16),
        portrait_index=torch.tensor([[0]]),
        scene_rows=torch.tensor([0 if mode == "replay" else 1]),
        description_embeds=torch.randn(1, 1, 77, 32),
    )
    if mode == "replay":
        out = run_replay(unet, state, scene, text, portrait, portrait_text)
    else:
        with torch.no_grad(), state.activate("joint"):
            out = unet(torch.cat([portrait, scene]), 10, torch.cat([portrait_text, text])).sample[1:]
    assert torch.equal(out, reference)


def test_masks_change_only_through_the_portrait_and_description(unet):
    scene, text = inputs(seed=0)
    portrait, portrait_text = inputs(seed=1)
    with torch.no_grad():
        reference = unet(scene, 10, text).sample
    state = install_mutual_attention_processors(unet)
    state.set_scene(box_masks(), portrait_index=torch.tensor([[0]]))
    mmsa = run_replay(unet, state, scene, text, portrait, portrait_text)
    assert not torch.allclose(mmsa, reference, atol=1e-4)
    state.set_scene(box_masks(), description_embeds=torch.randn(1, 1, 77, 32))  # MMCA only
    with torch.no_grad(), state.activate("replay"):
        mmca = unet(scene, 10, text).sample
    assert not torch.allclose(mmca, reference, atol=1e-4)


def test_cache_and_recompute_give_the_same_scene(unet):
    scene, text = inputs(seed=0)
    portraits, portrait_text = inputs(batch=2, seed=1)
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :, :8] = 1
    masks[0, 1, :, 8:] = 1
    state = install_mutual_attention_processors(unet)
    description = torch.randn(1, 2, 77, 32)
    state.set_scene(masks, portrait_index=torch.tensor([[0, 1]]), description_embeds=description)
    cached = run_replay(unet, state, scene, text, portraits, portrait_text)
    state.set_scene(
        masks,
        portrait_index=torch.tensor([[0, 1]]),
        scene_rows=torch.tensor([2]),
        description_embeds=description,
    )
    with torch.no_grad(), state.activate("joint"):
        joint = unet(torch.cat([portraits, scene]), 10, torch.cat([portrait_text, text])).sample[2:]
    torch.testing.assert_close(joint, cached, atol=1e-5, rtol=1e-5)


def test_outside_the_mask_nothing_attends_to_the_portrait(unet):
    scene, text = inputs(seed=0)
    portrait, portrait_text = inputs(seed=1)
    state = install_mutual_attention_processors(unet)
    masks = box_masks()
    state.set_scene(masks, portrait_index=torch.tensor([[0]]), description_embeds=torch.randn(1, 1, 77, 32))
    fast = run_replay(unet, state, scene, text, portrait, portrait_text)
    state.capture = True
    captured = run_replay(unet, state, scene, text, portrait, portrait_text)
    # the explicit (capturing) path computes the same attention as the fast one
    torch.testing.assert_close(captured, fast, atol=1e-5, rtol=1e-5)
    assert {name.rsplit(".", 1)[-1] for name in state.probabilities} == {"attn1", "attn2"}
    for name, (probabilities,) in state.probabilities.items():
        tokens = probabilities.shape[0]
        own = tokens if name.endswith("attn1") else 77  # the scene's own keys come first
        inside = state.owners(tokens)[0] == 0
        assert inside.any() and (~inside).any()
        extra = probabilities[:, own:]
        assert torch.equal(extra[~inside], torch.zeros_like(extra[~inside]))  # exactly zero outside the mask
        assert (extra[inside].sum(-1) > 0).all()
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(tokens))


def test_portrait_masks_restrict_the_portrait_keys(unet):
    scene, text = inputs(seed=0)
    portrait, portrait_text = inputs(seed=1)
    state = install_mutual_attention_processors(unet, cross_attention=False)
    portrait_mask = torch.zeros(1, 16, 16)
    portrait_mask[:, :8] = 1  # top half of the portrait
    state.set_scene(box_masks(), portrait_index=torch.tensor([[0]]), portrait_masks=portrait_mask)
    state.capture = True
    run_replay(unet, state, scene, text, portrait, portrait_text)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    (probabilities,) = state.probabilities[name]
    portrait_columns = probabilities[:, 256:]
    assert torch.equal(portrait_columns[:, 128:], torch.zeros_like(portrait_columns[:, 128:]))
    assert portrait_columns[:, :128].sum() > 0


def test_install_then_uninstall_restores_the_processors(unet):
    capture_store = install_character_attention_processors(unet)
    before = dict(unet.attn_processors)
    state = install_mutual_attention_processors(unet)
    processors = unet.attn_processors
    assert all(isinstance(p, MaskedMutualSelfAttnProcessor) for n, p in processors.items() if ".attn1." in n)
    assert all(isinstance(p, MaskedMutualCrossAttnProcessor) for n, p in processors.items() if ".attn2." in n)
    install_mutual_attention_processors(unet, state=state)  # twice: still restores the originals
    assert uninstall_mutual_attention_processors(unet) == len(before)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    assert uninstall_mutual_attention_processors(unet) == 0
    assert any(isinstance(p, CharacterAttentionProcessor) for p in after.values())
    uninstall_character_attention_processors(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert capture_store.maps == {}


def test_capture_processors_still_capture_under_inactive_mutual_attention(unet):
    store = install_character_attention_processors(unet)
    install_mutual_attention_processors(unet)
    scene, text = inputs()
    with torch.no_grad(), store.capture(torch.tensor([[1, 2]])):
        unet(scene, 10, text)
    assert set(store.maps) == store.enabled_layers


def test_bad_scene_inputs_are_clear_errors(unet):
    state = install_mutual_attention_processors(unet, state=MutualAttentionState(max_characters=2))
    with pytest.raises(ValueError, match="`masks` must have shape"):
        state.set_scene(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="max_characters"):
        state.set_scene(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="`portrait_index` must have shape"):
        state.set_scene(torch.zeros(1, 2, 16, 16), portrait_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`description_embeds` must have shape"):
        state.set_scene(torch.zeros(1, 2, 16, 16), description_embeds=torch.zeros(1, 1, 77, 32))
    with pytest.raises(ValueError, match="`mode` must be one of"):
        state.activate("bogus").__enter__()
    state.set_scene(box_masks(characters=1), portrait_index=torch.tensor([[0]]))
    scene, text = inputs()
    with pytest.raises(RuntimeError, match="record the portraits"), state.activate("replay", step=3):
        unet(scene, 10, text)


def test_extra_weight_shifts_attention_towards_the_portrait(unet):
    scene, text = inputs(seed=0)
    portrait, portrait_text = inputs(seed=1)
    state = install_mutual_attention_processors(unet)
    state.set_scene(
        box_masks(), portrait_index=torch.tensor([[0]]), description_embeds=torch.randn(1, 1, 77, 32)
    )
    plain = run_replay(unet, state, scene, text, portrait, portrait_text)
    mass = {}
    for weight in (1.0, 8.0):
        state.extra_weight, state.capture, state.probabilities = weight, True, {}
        captured = run_replay(unet, state, scene, text, portrait, portrait_text)
        state.capture = False
        fast = run_replay(unet, state, scene, text, portrait, portrait_text)
        torch.testing.assert_close(captured, fast, atol=1e-5, rtol=1e-5)  # both paths weigh the same way
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
        (probabilities,) = state.probabilities[name]
        inside = state.owners(probabilities.shape[0])[0] == 0
        mass[weight] = probabilities[inside, probabilities.shape[0] :].sum(-1).mean().item()
        if weight == 1.0:
            assert torch.equal(fast, plain)  # weight 1 is the plain joint softmax
    assert mass[8.0] > mass[1.0] + 0.1
