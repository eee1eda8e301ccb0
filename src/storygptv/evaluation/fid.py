"""Fréchet Inception Distance (FID) under named protocols.

Published FIDs on FlintstonesSV and PororoSV are computed differently from one repository to the next
(different preprocessing, different real frames), so a number means little without the computation that
produced it. Here ``fid_protocol`` names that computation, and :class:`FIDResult` carries the protocol and
prints it next to every number. **Numbers from different protocols are not comparable**; compare a model
with published numbers only under the protocol those numbers used.

Protocols (method notes §7.3):

- ``"clean"`` (default, recommended): the standard pytorch-fid computation. A frame is taken as RGB in
  ``[0, 1]`` at its own size and resized bilinearly to 299x299 (``align_corners=False``, no antialiasing);
  the network scales it to ``[-1, 1]``. Real frames: every frame of every real story (the whole test split,
  which may hold more stories than were generated); a real frame given as a clip contributes its middle
  frame, a fixed choice.
- ``"storygptv"``: StoryGPT-V's ``eval/eval_all.py``, reproduced for comparability with the paper's FIDs
  (its Tables 1 and 5). A frame is resized with PIL bilinear so that its short side is 299, centre-cropped
  to 299, normalised with the ImageNet mean and std (the classifiers' transform), then mapped by
  ``(x + 1) / 2`` before the pytorch-fid network, which applies ``2x - 1``: Inception sees
  ImageNet-normalised input instead of ``[-1, 1]``. Stories go in batches of 16 with ``drop_last``, so only
  the first ``16 * (n // 16)`` stories count, for generated and real frames alike. Real frames are paired
  with the generated ones; a clip contributes one random frame, drawn from a NumPy generator seeded with
  ``seed`` (the original draws with Python's unseeded ``random``, so its own numbers are not exactly
  repeatable). The original's real frames come from the 4x super-resolved 512-px clips; pass those to
  compare with the paper.
- ``"arldm64"``: AR-LDM's ``main.py``. A frame is resized with PIL bilinear to 64x64, then bilinearly back up
  to 299x299: a 64-pixel bottleneck that hides fine detail. Real frames: the ground-truth frames paired
  with the generated ones (same story, same position); a clip contributes a seeded random frame, as
  AR-LDM's loaders draw one at random.

The network is Inception-v3 in the variant of the FID Inception weights ported from TensorFlow
(pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``): its pool3 features (2048-d) after the FID blocks
(average pools that ignore padding, and a max pool in the last block). :func:`load_fid_inception` reads
those weights from a local file you give; nothing is downloaded. ``FIDInceptionV3(width_multiplier=...)``
builds the same network narrower, for tests.

Frames: a PIL image, a ``uint8`` array (0-255) or a float array / tensor in ``[0, 1]``; ``(H, W, C)`` or
``(C, H, W)``; grayscale, RGB or RGBA. A real frame may also be a clip: a list / tuple of frames or a 4-D
array ``(T, H, W, C)`` / ``(T, C, H, W)``. A story is a sequence of frames.

Example:
    >>> frechet_distance([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [3.0, 4.0], [[1.0, 0.0], [0.0, 1.0]])
    25.0
    >>> inception = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")  # doctest: +SKIP
    >>> print(compute_fid(generated_stories, test_stories, inception=inception))  # doctest: +SKIP
    FID ... (fid_protocol=clean; 3200 generated / 9600 real frames)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_PROTOCOLS",
    "FIDFrames",
    "FIDInceptionV3",
    "FIDResult",
    "compute_fid",
    "feature_statistics",
    "fid_features",
    "frechet_distance",
    "load_fid_inception",
    "preprocess_for_fid",
    "select_fid_frames",
]

#: The names ``fid_protocol`` accepts (see the module docstring).
FID_PROTOCOLS: tuple[str, ...] = ("clean", "storygptv", "arldm64")

#: Side of the square images Inception-v3 takes.
INCEPTION_SIZE = 299
#: Stories per batch in StoryGPT-V's evaluation, whose last incomplete batch is dropped.
STORYGPTV_STORY_BATCH = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The checkpoint keeps the TensorFlow graph's 1008-way logits layer (``fc``), which FID does not use.
_CHECKPOINT_CLASSES = 1008
_CHECKPOINT_NAME = "pt_inception-2015-12-05-6726825d.pth"


def _check_protocol(fid_protocol: str) -> str:
    if fid_protocol not in FID_PROTOCOLS:
        allowed = ", ".join(repr(p) for p in FID_PROTOCOLS)
        raise ValueError(f"fid_protocol must be one of {allowed}; got {fid_protocol!r}.")
    return fid_protocol


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
# Module names follow torchvision's Inception3 (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ``conv`` / ``bn``),
# because those are the keys of the checkpoint: the state dict loads without renaming.


class _ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU (submodules ``conv`` and ``bn``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        # TensorFlow's batch-norm epsilon, which the ported weights were trained with.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME-padded average pool divides by the number of real pixels; count_include_pad=False
    # matches it at the borders (the FID variant of the blocks differs from torchvision's here).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """``Mixed_5b`` / ``5c`` / ``5d`` (Inception-A): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int, w: Callable[[int], int]) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(in_channels, w(64), 1)
        self.branch5x5_1 = _ConvBN(in_channels, w(48), 1)
        self.branch5x5_2 = _ConvBN(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, w(64), 1)
        self.branch3x3dbl_2 = _ConvBN(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(w(96), w(96), 3, padding=1)
        self.branch_pool = _ConvBN(in_channels, w(pool_features), 1)
        self.out_channels = w(64) + w(64) + w(96) + w(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, dim=1)


class _MixedB(nn.Module):
    """``Mixed_6a`` (Inception-B): stride-2 reduction, 35x35 -> 17x17."""

    def __init__(self, in_channels: int, w: Callable[[int], int]) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(in_channels, w(384), 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, w(64), 1)
        self.branch3x3dbl_2 = _ConvBN(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(w(96), w(96), 3, stride=2)
        self.out_channels = w(384) + w(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, dim=1)


class _MixedC(nn.Module):
    """``Mixed_6b`` ... ``6e`` (Inception-C): factorised 7x7 branches of ``channels_7x7`` channels."""

    def __init__(self, in_channels: int, channels_7x7: int, w: Callable[[int], int]) -> None:
        super().__init__()
        c7 = w(channels_7x7)
        self.branch1x1 = _ConvBN(in_channels, w(192), 1)
        self.branch7x7_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, w(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, w(192), (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(in_channels, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        branches = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, dim=1)


class _MixedD(nn.Module):
    """``Mixed_7a`` (Inception-D): stride-2 reduction, 17x17 -> 8x8."""

    def __init__(self, in_channels: int, w: Callable[[int], int]) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(in_channels, w(192), 1)
        self.branch3x3_2 = _ConvBN(w(192), w(320), 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(in_channels, w(192), 1)
        self.branch7x7x3_2 = _ConvBN(w(192), w(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(w(192), w(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(w(192), w(192), 3, stride=2)
        self.out_channels = w(320) + w(192) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        branches = [
            self.branch3x3_2(self.branch3x3_1(x)),
            seven,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, dim=1)


class _MixedE(nn.Module):
    """``Mixed_7b`` / ``7c`` (Inception-E): split 1x3 / 3x1 branches.

    ``pool="avg"`` for ``Mixed_7b``; ``pool="max"`` for ``Mixed_7c``, because the TensorFlow graph the FID
    weights come from has a max pool in the last block's pooled branch.
    """

    def __init__(self, in_channels: int, pool: str, w: Callable[[int], int]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(in_channels, w(320), 1)
        self.branch3x3_1 = _ConvBN(in_channels, w(384), 1)
        self.branch3x3_2a = _ConvBN(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(in_channels, w(448), 1)
        self.branch3x3dbl_2 = _ConvBN(w(448), w(384), 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(in_channels, w(192), 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to its pool3 features, in the variant of the FID Inception weights.

    The state dict has the keys and shapes of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
    (torchvision's Inception-v3 names, without the auxiliary classifier and without the ``fc`` logits,
    which FID does not use). Load the real weights with :func:`load_fid_inception`.

    Args:
        width_multiplier: scales every layer's channels (at least one each). ``1.0`` is the real network
            (2048-d features, 21.8M parameters); a small value such as ``1 / 16`` builds a random
            Inception-shaped network that runs in milliseconds, for tests.

    ``forward`` takes ``(N, 3, H, W)`` images in ``[0, 1]``, resizes them bilinearly to 299x299 when they
    are another size, scales them to ``[-1, 1]`` and returns ``(N, feature_dim)`` features.
    """

    def __init__(self, width_multiplier: float = 1.0) -> None:
        super().__init__()
        if not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier}.")
        self.width_multiplier = float(width_multiplier)

        def w(channels: int) -> int:
            return max(1, round(channels * width_multiplier))

        self.Conv2d_1a_3x3 = _ConvBN(3, w(32), 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(w(32), w(32), 3)
        self.Conv2d_2b_3x3 = _ConvBN(w(32), w(64), 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(w(64), w(80), 1)
        self.Conv2d_4a_3x3 = _ConvBN(w(80), w(192), 3)
        self.Mixed_5b = _MixedA(w(192), 32, w)
        self.Mixed_5c = _MixedA(self.Mixed_5b.out_channels, 64, w)
        self.Mixed_5d = _MixedA(self.Mixed_5c.out_channels, 64, w)
        self.Mixed_6a = _MixedB(self.Mixed_5d.out_channels, w)
        self.Mixed_6b = _MixedC(self.Mixed_6a.out_channels, 128, w)
        self.Mixed_6c = _MixedC(self.Mixed_6b.out_channels, 160, w)
        self.Mixed_6d = _MixedC(self.Mixed_6c.out_channels, 160, w)
        self.Mixed_6e = _MixedC(self.Mixed_6d.out_channels, 192, w)
        self.Mixed_7a = _MixedD(self.Mixed_6e.out_channels, w)
        self.Mixed_7b = _MixedE(self.Mixed_7a.out_channels, "avg", w)
        self.Mixed_7c = _MixedE(self.Mixed_7b.out_channels, "max", w)
        #: Size of the pool3 feature vector (2048 at full width).
        self.feature_dim = self.Mixed_7c.out_channels
        # He initialisation keeps a random network's activations at scale through its 94 layers (PyTorch's
        # default shrinks them to ~1e-7, and every FID to ~1e-15); real weights replace it when loaded. Not on
        # the meta device, where there is nothing to fill (and the first meta kernel costs seconds to set up).
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.weight.device.type != "meta":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features ``(N, feature_dim)`` of ``(N, 3, H, W)`` images in ``[0, 1]``."""
        if tuple(images.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            images = F.interpolate(
                images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
            )
        x = 2 * images - 1  # the TensorFlow graph takes [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _read_state_dict(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a .pth file is a pickle, and nothing in it may run.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Could not read Inception weights from {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return state


def _checked_state_dict(
    state: dict[str, Any], model: FIDInceptionV3, source: Path
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` the network takes, after checking every key and shape against it."""
    hint = (
        f"It should be pytorch-fid's FID Inception weights ({_CHECKPOINT_NAME}), the Inception-v3 ported "
        "from TensorFlow."
    )
    checked: dict[str, torch.Tensor] = {}
    for key, reference in model.state_dict().items():
        tensor = state.get(key)
        if tensor is None:
            if key.endswith("num_batches_tracked"):
                # A training counter that evaluation never reads; files saved without it are fine.
                checked[key] = torch.zeros((), dtype=torch.long)
                continue
            raise ValueError(f"Inception weights {source}: key {key!r} is missing. {hint}")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(reference.shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"Inception weights {source}: key {key!r} has shape {shape}, the network expects "
                f"{tuple(reference.shape)}. {hint}"
            )
        # float32 whatever the file stores: the features of different runs must agree.
        checked[key] = tensor.float() if tensor.is_floating_point() else tensor
    extra_shapes = {"fc.weight": (_CHECKPOINT_CLASSES, model.feature_dim), "fc.bias": (_CHECKPOINT_CLASSES,)}
    for key, tensor in state.items():
        if key in checked:
            continue
        if (
            key in extra_shapes
            and isinstance(tensor, torch.Tensor)
            and tuple(tensor.shape) == extra_shapes[key]
        ):
            continue  # the unused 1008-way logits of the checkpoint
        detail = (
            " (torchvision's ImageNet Inception-v3 is a different network for FID)" if "Aux" in key else ""
        )
        raise ValueError(f"Inception weights {source}: unexpected key {key!r}{detail}. {hint}")
    return checked


def load_fid_inception(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    width_multiplier: float = 1.0,
) -> FIDInceptionV3:
    """The FID Inception network with its weights from a local file, in eval mode.

    Args:
        path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the same state dict saved as
            ``.safetensors``). Nothing is downloaded: the file must be on disk.
        device: where to put the network (default: CPU).
        width_multiplier: the width the file was saved at; ``1.0`` for the real weights (other values are
            for tests with small networks).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file cannot be read or is not these weights; the message names the file and the
            first key that is missing, has the wrong shape or is unexpected. All of it is checked before
            any weight is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. FID needs pytorch-fid's {_CHECKPOINT_NAME} as a local file."
        )
    state = _read_state_dict(path)
    # Built on the meta device: the check compares shapes only, and assign=True then adopts the file's
    # tensors, so the weights are never allocated twice.
    with torch.device("meta"):
        model = FIDInceptionV3(width_multiplier)
    model.load_state_dict(_checked_state_dict(state, model, path), strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# --------------------------------------------------------------------------------------------------
# Frames and preprocessing
# --------------------------------------------------------------------------------------------------
def _rgb_array(image: Any) -> np.ndarray:
    """An ``(H, W, 3)`` array: ``uint8`` for PIL and integer input, ``float32`` in ``[0, 1]`` for floats."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu")
        image = image.float().numpy() if image.is_floating_point() else image.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an image (H, W, C) or (C, H, W), got an array of shape {array.shape}.")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        # No guessing of the range: a bright [-1, 1] image looks like a [0, 1] one, and FID would be off.
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"Float images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; convert [-1, 1] "
                "images with (x + 1) / 2, and pass 0-255 images as uint8."
            )
        return np.clip(array, 0.0, 1.0).astype(np.float32)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"Integer images must lie in 0-255, got values in [{array.min()}, {array.max()}].")
    return array.astype(np.uint8)


def _to_pil(image: Any) -> PIL.Image.Image:
    array = _rgb_array(image)
    if array.dtype != np.uint8:
        # The reference protocols read saved PNGs, i.e. 8-bit frames.
        array = np.round(array * 255.0).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _to_unit_tensor(image: Any) -> torch.Tensor:
    """``(3, H, W)`` float32 in ``[0, 1]`` (torchvision's ``ToTensor``)."""
    array = _rgb_array(image)
    # A copy when the array is read-only (PIL's buffers are): torch wants writable memory.
    array = np.array(array, copy=True) if not array.flags.writeable else np.ascontiguousarray(array)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()


def _bilinear_299(tensor: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == (INCEPTION_SIZE, INCEPTION_SIZE):
        return tensor
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    return F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]


def _resize_short_side_center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image (bilinear)."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), resample=PIL.Image.BILINEAR)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess_for_fid(image: Any, fid_protocol: str = "clean") -> torch.Tensor:
    """One frame as the FID network takes it under ``fid_protocol``: a ``(3, 299, 299)`` float32 tensor.

    The network (:class:`FIDInceptionV3`) then applies ``2x - 1``. Under ``"clean"`` and ``"arldm64"`` the
    tensor is in ``[0, 1]``; under ``"storygptv"`` it is ``(ImageNet-normalised + 1) / 2``, as that protocol
    feeds it (see the module docstring).
    """
    _check_protocol(fid_protocol)
    if fid_protocol == "clean":
        return _bilinear_299(_to_unit_tensor(image))
    if fid_protocol == "arldm64":
        small = _to_pil(image).resize((64, 64), resample=PIL.Image.BILINEAR)
        return _bilinear_299(_to_unit_tensor(small))
    # storygptv, reproduced as is for comparability (Inception then sees ImageNet-normalised input).
    tensor = _to_unit_tensor(_resize_short_side_center_crop(_to_pil(image), INCEPTION_SIZE))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((tensor - mean) / std + 1) / 2


# --------------------------------------------------------------------------------------------------
# Which frames count
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FIDFrames:
    """The frames a protocol compares (from :func:`select_fid_frames`).

    Attributes:
        generated: the generated frames, story by story.
        real: the real frames, one image each (clips resolved to one frame).
        num_stories: generated stories used.
        num_dropped_stories: generated (and real) stories left out (``"storygptv"``'s incomplete last batch).
    """

    generated: list[Any]
    real: list[Any]
    num_stories: int
    num_dropped_stories: int = 0


def _is_clip(frame: Any) -> bool:
    if isinstance(frame, (list, tuple)):
        return True
    return not isinstance(frame, PIL.Image.Image) and getattr(frame, "ndim", None) == 4


def _frame_of(frame: Any, rng: np.random.Generator | None) -> Any:
    """A real frame, or one frame of a clip: the middle one without ``rng``, else a random one."""
    if not _is_clip(frame):
        return frame
    count = len(frame)
    if count == 0:
        raise ValueError("A real frame is an empty clip.")
    return frame[count // 2 if rng is None else int(rng.integers(count))]


def _as_stories(stories: Sequence[Any], name: str) -> list[list[Any]]:
    if isinstance(stories, PIL.Image.Image) or getattr(stories, "ndim", 0) in (2, 3):
        raise ValueError(f"{name} must be a sequence of stories (each a sequence of frames), not one image.")
    out = []
    for index, story in enumerate(stories):
        if isinstance(story, PIL.Image.Image) or getattr(story, "ndim", 0) in (2, 3):
            raise ValueError(f"{name}[{index}] is an image; each story must be a sequence of frames.")
        out.append(list(story))
    return out


def select_fid_frames(
    generated_stories: Sequence[Sequence[Any]],
    real_stories: Sequence[Sequence[Any]],
    fid_protocol: str = "clean",
    seed: int = 0,
) -> FIDFrames:
    """The generated and real frames that ``fid_protocol`` compares.

    - ``"clean"``: every generated frame; every frame of every real story (``real_stories`` may be the whole
      test split, longer than ``generated_stories``); a clip gives its middle frame. ``seed`` is unused.
    - ``"storygptv"``: stories are paired (``real_stories[i]`` is the ground truth of
      ``generated_stories[i]``, frame by frame); only the first ``16 * (n // 16)`` pairs count (batches of 16
      stories with ``drop_last``); a clip gives one frame drawn by ``numpy.random.default_rng(seed)``, in
      story and frame order.
    - ``"arldm64"``: paired as above, every pair counts; clips as in ``"storygptv"``.

    Raises:
        ValueError: an unknown protocol; unpaired stories (different numbers of stories, or of frames in a
            story) under a paired protocol; fewer than 16 stories under ``"storygptv"``.
    """
    _check_protocol(fid_protocol)
    generated = _as_stories(generated_stories, "generated_stories")
    real = _as_stories(real_stories, "real_stories")
    if fid_protocol == "clean":
        return FIDFrames(
            generated=[frame for story in generated for frame in story],
            real=[_frame_of(frame, None) for story in real for frame in story],
            num_stories=len(generated),
        )
    # The paired protocols compare each generated frame with its own ground truth.
    if len(generated) != len(real):
        raise ValueError(
            f"fid_protocol={fid_protocol!r} pairs stories: got {len(generated)} generated stories and "
            f"{len(real)} real stories."
        )
    for index, (gen, ref) in enumerate(zip(generated, real)):
        if len(gen) != len(ref):
            raise ValueError(
                f"fid_protocol={fid_protocol!r} pairs frames: story {index} has {len(gen)} generated frames "
                f"and {len(ref)} real frames."
            )
    dropped = 0
    if fid_protocol == "storygptv":
        kept = len(generated) // STORYGPTV_STORY_BATCH * STORYGPTV_STORY_BATCH
        if kept == 0:
            raise ValueError(
                f"fid_protocol='storygptv' drops the last incomplete batch of {STORYGPTV_STORY_BATCH} stories; "
                f"{len(generated)} stories leave none."
            )
        dropped = len(generated) - kept
        generated, real = generated[:kept], real[:kept]
    rng = np.random.default_rng(seed)
    return FIDFrames(
        generated=[frame for story in generated for frame in story],
        real=[_frame_of(frame, rng) for story in real for frame in story],
        num_stories=len(generated),
        num_dropped_stories=dropped,
    )


# --------------------------------------------------------------------------------------------------
# Features, statistics, distance
# --------------------------------------------------------------------------------------------------
def fid_features(
    frames: Sequence[Any],
    inception: nn.Module,
    *,
    fid_protocol: str = "clean",
    batch_size: int = 50,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "FID features",
) -> np.ndarray:
    """Inception pool3 features ``(len(frames), feature_dim)`` (float64) of frames under ``fid_protocol``.

    Keep the real frames' features (or their :func:`feature_statistics`) to score several models against
    the same test set without recomputing them.

    Args:
        frames: images (see the module docstring); clips must already be resolved
            (:func:`select_fid_frames`).
        inception: a :class:`FIDInceptionV3` (it is put in eval mode for the call, and moved to ``device``
            when one is given).
        fid_protocol: the preprocessing, one of :data:`FID_PROTOCOLS`.
        batch_size: frames per forward pass.
        device: where to run (default: where ``inception`` is).
        progress: show a progress bar when there is more than one batch.
        desc: the progress bar's label.
    """
    _check_protocol(fid_protocol)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if device is not None:
        inception.to(device)
    parameter = next(inception.parameters())
    device, dtype = parameter.device, parameter.dtype
    from tqdm.auto import tqdm

    batches = []
    was_training = inception.training
    inception.eval()  # batch norm must use its running statistics
    try:
        with (
            torch.inference_mode(),
            tqdm(
                total=len(frames), desc=desc, unit="frame", disable=not progress or len(frames) <= batch_size
            ) as bar,
        ):
            for start in range(0, len(frames), batch_size):
                chunk = frames[start : start + batch_size]
                images = torch.stack([preprocess_for_fid(frame, fid_protocol) for frame in chunk])
                features = inception(images.to(device=device, dtype=dtype))
                batches.append(features.double().cpu().numpy())
                bar.update(len(chunk))
    finally:
        inception.train(was_training)
    if not batches:
        return np.zeros((0, getattr(inception, "feature_dim", 0)))
    return np.concatenate(batches, axis=0)


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of ``(N, D)`` features, ``N >= 2``."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows (N, D), got shape {array.shape}.")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _float64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=np.float64)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2))``

    The usual form has ``tr((S1 S2)^(1/2))``; ``S1 S2`` is similar to the symmetric positive
    semi-definite ``S1^(1/2) S2 S1^(1/2)`` (by ``S1^(1/2)``; by continuity when ``S1`` is singular), so the
    two traces are equal. The symmetric form needs only two symmetric eigendecompositions (``numpy.linalg
    .eigh``, real arithmetic): there is no general matrix square root, no complex round-off to discard
    and no diagonal offset to add when the covariances are singular (fewer frames than feature
    dimensions). Eigenvalues that round-off makes slightly negative are clipped to 0, and so is the result
    (a squared distance). Inputs are NumPy arrays or tensors, computed in float64.

    Example:
        >>> frechet_distance([1.0], [[4.0]], [1.0], [[1.0]])  # (2 - 1)^2
        1.0
    """
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(
            f"mu1 and mu2 must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}."
        )
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"sigma1 and sigma2 must be ({dim}, {dim}) matrices, got shapes {sigma1.shape} and {sigma2.shape}."
        )
    # Symmetrise first: covariances built in floating point are symmetric only up to round-off.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return max(distance, 0.0)


# --------------------------------------------------------------------------------------------------
# The whole computation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FIDResult:
    """An FID with what it was computed under; ``str()`` prints the protocol next to the number.

    Attributes:
        fid: the Fréchet Inception Distance.
        fid_protocol: the protocol (numbers of different protocols are not comparable).
        num_generated_frames / num_real_frames: frames on each side.
        num_stories: generated stories used.
        num_dropped_stories: stories left out by the protocol (``"storygptv"``'s incomplete last batch).
        seed: the seed of the real-frame draws (used by ``"storygptv"`` and ``"arldm64"`` for clips).
    """

    fid: float
    fid_protocol: str
    num_generated_frames: int
    num_real_frames: int
    num_stories: int
    num_dropped_stories: int = 0
    seed: int = 0

    def __str__(self) -> str:
        dropped = f", {self.num_dropped_stories} tail stories dropped" if self.num_dropped_stories else ""
        return (
            f"FID {self.fid:.2f} (fid_protocol={self.fid_protocol}; {self.num_generated_frames} generated / "
            f"{self.num_real_frames} real frames{dropped})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def compute_fid(
    generated_stories: Sequence[Sequence[Any]],
    real_stories: Sequence[Sequence[Any]],
    *,
    inception: nn.Module | str | os.PathLike[str],
    fid_protocol: str = "clean",
    batch_size: int = 50,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FIDResult:
    """FID of generated stories against real ones under a named protocol (see the module docstring).

    Args:
        generated_stories: the generated stories, each a sequence of frames.
        real_stories: the real stories: the whole test split under ``"clean"``; under ``"storygptv"`` and
            ``"arldm64"`` the ground truth of each generated story, in the same order and with the same
            number of frames. A real frame may be a clip (see :func:`select_fid_frames`).
        inception: a :class:`FIDInceptionV3` with the FID weights, or the path of the weights file
            (:func:`load_fid_inception`).
        fid_protocol: one of :data:`FID_PROTOCOLS`.
        batch_size: frames per forward pass (not the protocol's 16 stories, which only decide the frames).
        device: where to run the network (default: where it is; CPU for a path).
        seed: seed of the random frame of a real clip (``"storygptv"``, ``"arldm64"``).
        progress: progress bars over the feature extraction.

    Returns:
        :class:`FIDResult`; ``print`` it to show the protocol and frame counts with the number.

    Raises:
        ValueError / FileNotFoundError: an unknown protocol, unpaired stories, too few frames or stories, or
            an unusable weights file, all found before any feature is computed.
    """
    # 1. Check the protocol and choose the frames it compares (cheap; catches unpaired input early).
    _check_protocol(fid_protocol)
    frames = select_fid_frames(generated_stories, real_stories, fid_protocol, seed=seed)
    for side, chosen in (("generated", frames.generated), ("real", frames.real)):
        if len(chosen) < 2:
            raise ValueError(f"FID needs at least 2 {side} frames, got {len(chosen)}.")
    # 2. The network (reading a file checks every key and shape before anything runs).
    if isinstance(inception, (str, os.PathLike)):
        inception = load_fid_inception(inception, device=device)
    # 3. Features of both sides.
    options = {"fid_protocol": fid_protocol, "batch_size": batch_size, "device": device, "progress": progress}
    real_features = fid_features(frames.real, inception, desc=f"FID real ({fid_protocol})", **options)
    generated_features = fid_features(
        frames.generated, inception, desc=f"FID generated ({fid_protocol})", **options
    )
    # 4. Gaussian statistics and their distance.
    mu_real, sigma_real = feature_statistics(real_features)
    mu_generated, sigma_generated = feature_statistics(generated_features)
    return FIDResult(
        fid=frechet_distance(mu_generated, sigma_generated, mu_real, sigma_real),
        fid_protocol=fid_protocol,
        num_generated_frames=len(frames.generated),
        num_real_frames=len(frames.real),
        num_stories=frames.num_stories,
        num_dropped_stories=frames.num_dropped_stories,
        seed=seed,
    )
