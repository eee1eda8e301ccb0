"""FID under named protocols: the Fréchet distance, the FID Inception network's layout and weights file
checks, each protocol's preprocessing and real-frame selection, and the whole computation on a small random
Inception-shaped network (no weights are downloaded)."""

import re

import numpy as np
import PIL.Image
import pytest
import torch

from storygptv.evaluation import (
    FID_PROTOCOLS,
    FIDInceptionV3,
    FIDResult,
    compute_fid,
    fid_features,
    frechet_distance,
    load_fid_inception,
    select_fid_frames,
)
from storygptv.evaluation.fid import IMAGENET_MEAN, IMAGENET_STD, preprocess_for_fid

TINY = 1 / 16  # channel width of the test network: 128-d features, milliseconds per batch


@pytest.fixture(scope="module")
def tiny_inception():
    torch.manual_seed(0)
    model = FIDInceptionV3(width_multiplier=TINY)
    # Random batch-norm statistics, so the test network is not an identity-normalised special case.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(count, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _stories(num_stories, frames_per_story=2, size=48, seed=0):
    frames = _images(num_stories * frames_per_story, size, seed)
    return [frames[i * frames_per_story : (i + 1) * frames_per_story] for i in range(num_stories)]


def _assert_close(actual, expected):
    # NumPy's check: torch.testing costs most of a second to import on first use.
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1.3e-6, atol=1e-5)


def _random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


# --------------------------------------------------------------------------------------------------
# The Fréchet distance
# --------------------------------------------------------------------------------------------------
def test_a_mean_shift_with_equal_covariances_gives_its_squared_norm():
    rng = np.random.default_rng(0)
    sigma = _random_covariance(rng, 6)
    mu = rng.normal(size=6)
    shift = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-9)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # Torch tensors are accepted as well.
    as_torch = [torch.tensor(v) for v in (mu, sigma, mu + shift, sigma)]
    assert frechet_distance(*as_torch) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_diagonal_covariances_match_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_non_commuting_covariances_match_the_2x2_closed_form():
    # For 2x2 matrices with non-negative eigenvalues, tr(M^(1/2)) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.5, -0.4], [-0.4, 0.5]])
    product = s1 @ s2
    trace_root = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance([0.0, 0.0], s1, [1.0, 0.0], s2) == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_are_handled():
    # Fewer samples than dimensions: rank-deficient covariances, as with few frames and 2048-d features.
    rng = np.random.default_rng(2)
    features = rng.normal(size=(3, 8))
    sigma = np.cov(features, rowvar=False)
    assert frechet_distance(features.mean(0), sigma, features.mean(0), sigma) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


# --------------------------------------------------------------------------------------------------
# The network and its weights file
# --------------------------------------------------------------------------------------------------
# Facts of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision Inception-v3 names and shapes).
PYTORCH_FID_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_mean": (192,),
}


def test_full_size_network_has_the_pytorch_fid_layout():
    with torch.device("meta"):  # shapes only, nothing allocated
        model = FIDInceptionV3()
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key, shape in PYTORCH_FID_SHAPES.items():
        assert shapes[key] == shape, key
    assert model.feature_dim == 2048
    # No logits layer and no auxiliary classifier: FID uses pool3 only.
    assert not any(key.startswith(("fc.", "AuxLogits.")) for key in shapes)
    # Inception-v3's 94 convolutions; 21,785,568 parameters (torchvision's 27,161,264 less the auxiliary
    # classifier and the logits), 17,216 batch-norm channels.
    assert sum(key.endswith(".conv.weight") for key in shapes) == 94
    assert sum(p.numel() for p in model.parameters()) == 21_785_568
    assert sum(v.numel() for k, v in model.state_dict().items() if k.endswith("running_mean")) == 17_216


def test_tiny_network_gives_features_of_its_width(tiny_inception):
    features = tiny_inception(torch.rand(2, 3, 75, 75))  # resized to 299 inside
    assert features.shape == (2, tiny_inception.feature_dim)
    assert tiny_inception.feature_dim == 128


def _save(state, path):
    torch.save(state, path)
    return path


def test_weights_load_from_a_local_file(tmp_path, tiny_inception):
    state = dict(tiny_inception.state_dict())
    # The checkpoint also holds the 1008-way logits, and older files lack num_batches_tracked: both are fine.
    state["fc.weight"] = torch.zeros(1008, tiny_inception.feature_dim)
    state["fc.bias"] = torch.zeros(1008)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = _save(state, tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(path, width_multiplier=TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(2, 3, 299, 299)
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny_inception(images))


def test_a_wrong_weights_file_names_the_file_and_the_first_bad_key(tmp_path, tiny_inception):
    state = dict(tiny_inception.state_dict())
    # Another width: the very first key has the wrong shape.
    path = _save(state, tmp_path / "narrow.pth")
    with pytest.raises(
        ValueError, match=r"narrow\.pth.*'Conv2d_1a_3x3\.conv\.weight' has shape \(2, 3, 3, 3\)"
    ):
        load_fid_inception(path, width_multiplier=TINY * 2)
    # A missing key.
    missing = {k: v for k, v in state.items() if k != "Mixed_6c.branch1x1.bn.running_var"}
    path = _save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*'Mixed_6c\.branch1x1\.bn\.running_var' is missing"):
        load_fid_inception(path, width_multiplier=TINY)
    # torchvision's ImageNet Inception (auxiliary classifier) is not the FID network.
    aux = {**state, "AuxLogits.conv0.conv.weight": torch.zeros(1)}
    path = _save(aux, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match=r"imagenet\.pth.*unexpected key 'AuxLogits\.conv0\.conv\.weight'"):
        load_fid_inception(path, width_multiplier=TINY)
    # Not a state dict at all; no file at all.
    path = _save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth"):
        load_fid_inception(path, width_multiplier=TINY)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_fid_inception(tmp_path / "absent.pth")


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
def test_clean_preprocessing_is_unit_range_bilinear_299():
    image = _images(1, size=64)[0]
    tensor = preprocess_for_fid(image, "clean")
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(299, 299), mode="bilinear"
    )[0]
    assert tensor.shape == (3, 299, 299)
    _assert_close(tensor, expected)
    # PIL images, channels-first floats in [0, 1] and tensors are the same frame.
    _assert_close(preprocess_for_fid(PIL.Image.fromarray(image), "clean"), expected)
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    _assert_close(preprocess_for_fid(chw, "clean"), expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_for_fid(chw * 2 - 1, "clean")  # a [-1, 1] image is refused, not guessed


def test_storygptv_preprocessing_reproduces_its_normalised_centre_crop():
    # 299 px high: the short-side resize keeps the image, and the centre crop starts at round(101 / 2) = 50.
    image = np.random.default_rng(3).integers(0, 256, (299, 400, 3), dtype=np.uint8)
    crop = torch.from_numpy(image[:, 50:349]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = ((crop - mean) / std + 1) / 2  # then the network's 2x - 1 gives ImageNet-normalised input
    _assert_close(preprocess_for_fid(image, "storygptv"), expected)
    assert preprocess_for_fid(_images(1, size=512)[0], "storygptv").shape == (3, 299, 299)


def test_arldm64_preprocessing_goes_through_64_pixels():
    image = PIL.Image.fromarray(_images(1, size=256)[0])
    small = image.resize((64, 64), resample=PIL.Image.BILINEAR)
    tensor = preprocess_for_fid(image, "arldm64")
    assert tensor.shape == (3, 299, 299)
    # Only what survives the 64x64 bottleneck matters.
    _assert_close(tensor, preprocess_for_fid(small, "arldm64"))
    assert not torch.allclose(tensor, preprocess_for_fid(image, "clean"), atol=1e-2)


# --------------------------------------------------------------------------------------------------
# Real-frame selection
# --------------------------------------------------------------------------------------------------
def _clip_stories(num_stories, frames_per_story=2, clip_length=5):
    """Real stories whose frames are clips of labelled strings ``"s{story}f{frame}c{k}"``."""
    return [
        [[f"s{s}f{f}c{k}" for k in range(clip_length)] for f in range(frames_per_story)]
        for s in range(num_stories)
    ]


def test_clean_selection_takes_every_real_frame_with_a_fixed_choice():
    generated = [[f"g{s}f{f}" for f in range(2)] for s in range(3)]
    real = _clip_stories(7)  # the whole test split may be longer than what was generated
    frames = select_fid_frames(generated, real, "clean", seed=0)
    assert frames.generated == [f"g{s}f{f}" for s in range(3) for f in range(2)]
    assert frames.real == [f"s{s}f{f}c2" for s in range(7) for f in range(2)]  # the middle frame of a clip
    assert select_fid_frames(generated, real, "clean", seed=5) == frames
    assert (frames.num_stories, frames.num_dropped_stories) == (3, 0)


def test_storygptv_selection_draws_one_seeded_frame_per_clip_and_drops_the_tail_batch():
    generated = [[f"g{s}f{f}" for f in range(2)] for s in range(35)]
    real = _clip_stories(35)
    frames = select_fid_frames(generated, real, "storygptv", seed=0)
    # Batches of 16 stories with drop_last: 32 stories count, the last 3 do not.
    assert (frames.num_stories, frames.num_dropped_stories) == (32, 3)
    assert frames.generated == [f"g{s}f{f}" for s in range(32) for f in range(2)]
    assert len(frames.real) == 64
    assert all(re.fullmatch(f"s{i // 2}f{i % 2}c[0-4]", name) for i, name in enumerate(frames.real))
    assert len({name[-1] for name in frames.real}) > 1  # random, not a fixed index
    assert select_fid_frames(generated, real, "storygptv", seed=0) == frames  # seeded
    assert select_fid_frames(generated, real, "storygptv", seed=1).real != frames.real
    with pytest.raises(ValueError, match="16 stories; 15 stories leave none"):
        select_fid_frames(generated[:15], real[:15], "storygptv")


def test_arldm64_selection_pairs_each_generated_frame_with_its_ground_truth():
    generated = [[f"g{s}f{f}" for f in range(3)] for s in range(5)]
    real = [[f"r{s}f{f}" for f in range(3)] for s in range(5)]
    frames = select_fid_frames(generated, real, "arldm64")
    assert frames.real == [f"r{s}f{f}" for s in range(5) for f in range(3)]
    assert (frames.num_stories, frames.num_dropped_stories) == (5, 0)
    with pytest.raises(ValueError, match="5 generated stories and 4 real stories"):
        select_fid_frames(generated, real[:4], "arldm64")
    with pytest.raises(ValueError, match="story 1 has 3 generated frames and 2 real frames"):
        select_fid_frames(generated, [real[0], real[1][:2], *real[2:]], "arldm64")


def test_an_unknown_protocol_names_the_argument_and_the_choices(tiny_inception):
    message = r"fid_protocol must be one of 'clean', 'storygptv', 'arldm64'; got 'tf'"
    assert FID_PROTOCOLS == ("clean", "storygptv", "arldm64")
    with pytest.raises(ValueError, match=message):
        compute_fid([], [], inception=tiny_inception, fid_protocol="tf")
    with pytest.raises(ValueError, match=message):
        select_fid_frames([], [], "tf")
    with pytest.raises(ValueError, match=message):
        preprocess_for_fid(_images(1)[0], "tf")


def test_a_story_must_be_a_sequence_of_frames(tiny_inception):
    with pytest.raises(ValueError, match=r"generated_stories\[0\] is an image"):
        compute_fid(_images(3), _stories(3), inception=tiny_inception)


# --------------------------------------------------------------------------------------------------
# The whole computation
# --------------------------------------------------------------------------------------------------
def test_identical_frames_give_zero_and_other_frames_do_not(tiny_inception):
    stories = _stories(4, frames_per_story=2)
    result = compute_fid(stories, stories, inception=tiny_inception, batch_size=8, progress=False)
    assert isinstance(result, FIDResult)
    assert (result.fid_protocol, result.num_generated_frames, result.num_real_frames) == ("clean", 8, 8)
    dark = [[frame // 4 for frame in story] for story in _stories(4, frames_per_story=2, seed=1)]
    different = compute_fid(dark, stories, inception=tiny_inception, batch_size=8, progress=False).fid
    assert different > 0
    assert result.fid <= 1e-6 * different


def test_the_protocol_is_printed_next_to_the_number(tiny_inception):
    generated = _stories(17, frames_per_story=1, size=32)
    real = _stories(17, frames_per_story=1, size=32, seed=1)
    result = compute_fid(
        generated, real, inception=tiny_inception, fid_protocol="storygptv", batch_size=16, progress=False
    )
    assert (result.num_generated_frames, result.num_real_frames, result.num_dropped_stories) == (16, 16, 1)
    assert re.fullmatch(
        r"FID \d+\.\d\d \(fid_protocol=storygptv; 16 generated / 16 real frames, 1 tail stories dropped\)",
        str(result),
    )
    assert result.to_dict()["fid_protocol"] == "storygptv"


def test_features_do_not_depend_on_the_batch_size_and_show_progress(tiny_inception, capsys):
    frames = _images(5, size=32)
    one = fid_features(frames, tiny_inception, batch_size=5, progress=False)
    split = fid_features(frames, tiny_inception, batch_size=2, progress=True, desc="FID test")
    np.testing.assert_allclose(one, split, rtol=1e-4, atol=1e-6)
    assert one.shape == (5, tiny_inception.feature_dim) and one.dtype == np.float64
    assert "FID test" in capsys.readouterr().err  # a tqdm bar over more than one batch
