import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from storygptv import (
    CharacterAttentionProcessor,
    character_attention_loss,
    install_character_attention_processors,
)
from storygptv.attention import DEFAULT_CAPTURE_BLOCKS
from storygptv.testing import tiny_unet


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return tiny_unet().eval()


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([10] * batch),
        torch.randn(batch, 77, 32, generator=g),
    )


def test_install_selects_attn2_of_default_blocks(unet):
    store = install_character_attention_processors(unet)
    processors = unet.attn_processors
    captured = sorted(n for n, p in processors.items() if isinstance(p, CharacterAttentionProcessor))
    assert captured == sorted(
        n
        for n in processors
        if n.endswith("attn2.processor") and n.startswith(tuple(b + "." for b in DEFAULT_CAPTURE_BLOCKS))
    )
    assert all(type(p) is AttnProcessor2_0 for n, p in processors.items() if n not in captured)
    assert not any(n.startswith(("down_blocks.0", "up_blocks.3")) for n in captured)
    assert store.enabled_layers == {n[: -len(".processor")] for n in captured}


def test_install_with_unknown_blocks_lists_available(unet):
    with pytest.raises(ValueError, match="down_blocks.0"):
        install_character_attention_processors(unet, blocks=["down_blocks.9"])


def test_capture_off_is_identical_to_stock(unet):
    inputs = unet_inputs()
    reference = unet(*inputs).sample
    store = install_character_attention_processors(unet)
    out = unet(*inputs).sample
    assert torch.equal(out, reference)
    assert store.maps == {}


def test_capture_on_matches_stock_and_direct_computation(unet):
    inputs = unet_inputs()
    reference = unet(*inputs).sample
    store = install_character_attention_processors(unet, blocks=["down_blocks.1", "up_blocks.2"])
    indices = torch.tensor([[1, 5], [2, -1]])
    # Record the inputs of one captured layer to recompute its attention by hand.
    layer_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(layer_name)
    seen = {}
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(
            h=args[0] if args else kwargs["hidden_states"], e=kwargs["encoder_hidden_states"]
        ),
        with_kwargs=True,
    )
    with store.capture(indices):
        out = unet(*inputs).sample
    hook.remove()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert set(store.maps) == {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    }
    q = attn.to_q(seen["h"])
    k = attn.to_k(seen["e"])
    b, n, _ = q.shape
    d = k.shape[-1] // attn.heads
    q = q.view(b, n, attn.heads, d).transpose(1, 2)
    k = k.view(b, 77, attn.heads, d).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1).mean(1)  # (b, HW, 77)
    expected = torch.stack([probs[0][:, [1, 5]], probs[1][:, [2, 0]]])
    torch.testing.assert_close(store.maps[layer_name], expected)
    # capture is off again after the block
    assert not store.active
    assert torch.equal(unet(*inputs).sample, reference)


def test_capture_batch_mismatch_is_a_clear_error(unet):
    store = install_character_attention_processors(unet)
    with (
        pytest.raises(ValueError, match="one row of token indices per UNet sample"),
        store.capture(torch.zeros(3, 1)),
    ):
        unet(*unet_inputs(batch=2))


def test_loss_sign_follows_where_attention_sits():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :4, :4] = 1.0
    inside = torch.zeros(1, 64, 1)
    inside[0, [r * 8 + c for r in range(4) for c in range(4)], 0] = 1 / 16
    outside = torch.zeros(1, 64, 1)
    outside[0, [r * 8 + c for r in range(4, 8) for c in range(8)], 0] = 1 / 32
    assert character_attention_loss({"a": inside}, masks).item() == pytest.approx(-1 / 16)
    assert character_attention_loss({"a": outside}, masks).item() == pytest.approx(1 / 48)
    uniform = torch.full((1, 64, 1), 1 / 64)
    assert character_attention_loss([uniform], masks).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_resizes_masks_per_layer_and_averages_layers():
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., :16, :] = 1.0  # top half
    top = torch.zeros(1, 16, 1)
    top[0, :8, 0] = 1 / 8  # 4x4 layer: top two rows
    big = torch.zeros(1, 64, 1)
    big[0, 32:, 0] = 1 / 32  # 8x8 layer: bottom half
    loss = character_attention_loss({"small": top, "big": big}, masks)

    def term(attention, side):
        # antialiased bilinear resizing softens the edge rows: the mask is not re-thresholded
        m = torch.nn.functional.interpolate(
            masks, size=(side, side), mode="bilinear", antialias=True
        ).flatten()
        a = attention[0, :, 0]
        return (a * (1 - m)).sum() / (1 - m).sum() - (a * m).sum() / m.sum()

    soft = torch.nn.functional.interpolate(masks, size=(4, 4), mode="bilinear", antialias=True)
    assert ((soft > 0) & (soft < 1)).any()  # really soft at this scale
    assert loss.item() == pytest.approx(((term(top, 4) + term(big, 8)) / 2).item(), rel=1e-6)
    assert loss.item() < 0 and abs(loss.item() - (-1 / 8 + 1 / 32) / 2) < 0.02


def test_loss_ignores_invalid_slots():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2] = 1
    maps = torch.zeros(1, 16, 2)
    maps[0, :8, 0] = 1 / 8
    maps[0, :, 1] = 5.0  # garbage in the empty slot
    assert character_attention_loss([maps], masks).item() == pytest.approx(-1 / 8)
    assert character_attention_loss([maps], torch.zeros(1, 2, 4, 4)).item() == 0.0


def test_loss_gradient_reaches_unet_parameters(unet):
    store = install_character_attention_processors(unet)
    latents, t, text = unet_inputs(batch=1)
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., 4:12, 4:12] = 1
    with store.capture(torch.tensor([[3]])):
        unet(latents, t, text)
    loss = character_attention_loss(store.maps, masks)
    loss.backward()
    grad = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2").to_k.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert unet.conv_in.weight.grad.abs().sum() > 0
