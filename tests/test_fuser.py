import warnings

import numpy as np
import pytest
import torch

from storygptv import CharacterFuser, encode_fused_prompt
from storygptv.testing import tiny_char_ldm_components


@pytest.fixture(scope="module")
def components():
    return tiny_char_ldm_components()


def encoder_kwargs(components):
    keys = ("tokenizer", "text_encoder", "image_encoder", "fuser", "feature_extractor")
    return {k: components[k] for k in keys}


def solid(value):
    return np.full((24, 24, 3), value, dtype=np.uint8)


def test_fuser_formula_matches_definition():
    torch.manual_seed(0)
    fuser = CharacterFuser(text_embed_dim=8, image_embed_dim=6, hidden_dim=10).eval()
    h, v = torch.randn(3, 8), torch.randn(3, 6)
    mlp1, mlp2 = fuser.mlp1, fuser.mlp2

    def mlp(m, x):
        norm, lin1, act, lin2 = m
        return lin2(torch.nn.functional.gelu(lin1(norm(x))))

    f = mlp(mlp1, torch.cat([h, v], -1)) + h
    f = f + mlp(mlp2, f)
    expected = fuser.layer_norm(f)
    torch.testing.assert_close(fuser.fuse(h, v), expected)
    assert isinstance(mlp1[0], torch.nn.LayerNorm) and isinstance(mlp1[2], torch.nn.GELU)
    assert mlp1[1].in_features == 14 and mlp1[1].out_features == 10 and mlp1[3].out_features == 8


def test_fuser_changes_only_fused_positions():
    torch.manual_seed(0)
    fuser = CharacterFuser(text_embed_dim=16, image_embed_dim=8).eval()
    text = torch.randn(2, 77, 16)
    indices = torch.tensor([[3, 7, -1, -1], [-1, -1, -1, -1]])
    out = fuser(text, torch.randn(2, 4, 8), indices)
    changed = (out != text).any(-1)
    expected = torch.zeros(2, 77, dtype=torch.bool)
    expected[0, 3] = expected[0, 7] = True
    assert torch.equal(changed, expected)


def test_fuser_gradient_reaches_text_and_image():
    fuser = CharacterFuser(text_embed_dim=16, image_embed_dim=8)
    text = torch.randn(1, 10, 16, requires_grad=True)
    image = torch.randn(1, 2, 8, requires_grad=True)
    # a random projection: the plain sum of a LayerNorm output is constant
    (fuser(text, image, torch.tensor([[2, 5]])) * torch.randn(1, 10, 16)).sum().backward()
    assert image.grad.abs().sum() > 0 and text.grad[0, 2].abs().sum() > 0
    assert all(p.grad is not None for p in fuser.parameters())


def test_fuser_rejects_mismatched_slots():
    fuser = CharacterFuser(text_embed_dim=4, image_embed_dim=4)
    with pytest.raises(ValueError, match="token_indices"):
        fuser(torch.randn(1, 5, 4), torch.randn(1, 2, 4), torch.tensor([[1]]))


def test_encode_fused_prompt_positions_and_plain_embeds(components):
    out = encode_fused_prompt(
        ["Fred and Barney are in the yard.", "Barney's dog."],
        {"Fred": solid(200), "Barney": solid(20)},
        **encoder_kwargs(components),
    )
    assert out.prompt_embeds.shape == (2, 77, 32) and out.text_embeds.shape == (2, 77, 32)
    assert out.character_names == [["Fred", "Barney"], ["Barney"]]
    assert out.character_token_indices.tolist() == [[1, 3, -1, -1], [1, -1, -1, -1]]
    changed = (out.prompt_embeds != out.text_embeds).any(-1)
    assert changed.nonzero().tolist() == [[0, 1], [0, 3], [1, 1]]
    # the plain embedding is the CLIP text encoder output
    plain = components["text_encoder"](out.input_ids)[0]
    torch.testing.assert_close(out.text_embeds, plain)


def test_encode_fused_prompt_image_changes_embedding(components):
    kwargs = encoder_kwargs(components)
    a = encode_fused_prompt("Fred waves.", {"Fred": solid(255)}, **kwargs).prompt_embeds
    b = encode_fused_prompt("Fred waves.", {"Fred": solid(0)}, **kwargs).prompt_embeds
    assert not torch.allclose(a[0, 1], b[0, 1])
    torch.testing.assert_close(a[0, 2:], b[0, 2:])


def test_shared_dict_warns_only_for_names_never_used(components):
    kwargs = encoder_kwargs(components)
    cast = {"Fred": solid(1), "Barney": solid(2), "Dino": solid(3)}
    with pytest.warns(UserWarning, match=r"\['Dino'\] are not named") as record:
        encode_fused_prompt(["Fred is here.", "Barney is here."], cast, **kwargs)
    assert len(record) == 1
    with pytest.warns(UserWarning, match=r"\['Barney', 'Dino'\] are not named"):
        encode_fused_prompt(["Fred is here."], [cast], **kwargs)


def test_no_characters_means_plain_embedding(components):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = encode_fused_prompt("They argue.", None, **encoder_kwargs(components))
    assert torch.equal(out.prompt_embeds, out.text_embeds)
    assert (out.character_token_indices == -1).all()


def test_fuser_save_load_round_trip(tmp_path, components):
    fuser = components["fuser"]
    fuser.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = CharacterFuser.from_pretrained(tmp_path)
    assert loaded.config.max_characters == fuser.config.max_characters
    text, image = torch.randn(1, 77, 32), torch.randn(1, 4, 32)
    idx = torch.tensor([[1, 2, 3, -1]])
    assert torch.equal(fuser(text, image, idx), loaded(text, image, idx))
