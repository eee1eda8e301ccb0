"""The denoising objective's pieces, shared by stage 1 (``train_char_ldm.py``) and stage 2's L_img.

- :func:`sample_latents`: a draw from the VAE's latent distribution, scaled (and shifted) for the UNet;
- :func:`noisy_latents_and_target`: the noise, timesteps, noisy latents and the target (epsilon or v);
- :func:`denoising_loss`, :func:`min_snr_weights`: the MSE and its min-SNR-gamma weighting;
- :class:`LatentCache`: each frame's latent distribution encoded once, for ``--cache_latents``.

All random draws come from one ``torch.Generator`` in a fixed order (latent sample, noise, timesteps), so a
micro-step's values are a pure function of its generator's seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LatentCache",
    "denoising_loss",
    "min_snr_weights",
    "noisy_latents_and_target",
    "sample_latents",
]


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, vae_config: Any
) -> torch.Tensor:
    """``(mean + std * eps - shift_factor) * scaling_factor`` with ``eps`` drawn from ``generator`` (on the CPU,
    then moved, so the draw is the same on any device): what the UNet sees of a frame whose VAE posterior
    is ``N(mean, std^2)``. ``vae_config`` is ``vae.config`` (``scaling_factor``, optional ``shift_factor``)."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (mean + std * eps - shift) * vae_config.scaling_factor


def noisy_latents_and_target(
    scheduler: Any, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy latents, timesteps, target)`` of a training step of the DDPM ``scheduler``.

    The noise (in ``latents``' dtype) and the timesteps (uniform over ``num_train_timesteps``) are drawn
    from ``generator``; the target is the noise, or the velocity for ``prediction_type="v_prediction"``.
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    steps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(device)
    noisy = scheduler.add_noise(latents, noise, steps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, steps, scheduler.get_velocity(latents, noise, steps)
    return noisy, steps, noise


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE in float32 over all elements; ``mask`` (B, 1, h, w) multiplies both sides first (no area
    normalisation); ``weights`` (B,) are per-sample weights (min-SNR)."""
    pred, target = pred.float(), target.float()
    if mask is not None:
        pred, target = pred * mask, target * mask
    if weights is None:
        return F.mse_loss(pred, target)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon prediction,
    ``min(SNR, gamma) / (SNR + 1)`` for v prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


class LatentCache:
    """Each frame's VAE latent distribution ``(mean, std)``, encoded once and read back per batch.

    The frozen VAE encoder is deterministic, so the posterior of a frame is the same at every step as long
    as the frame itself is: the cache is valid when the **target frame gets no random augmentation**
    (resizing is fine; a random flip or crop of the target is not). Each step still draws a fresh sample
    from the cached posterior (:meth:`sample`), which equals the on-the-fly
    ``vae.encode(pixels).latent_dist.sample(generator)`` draw up to the rounding of the encoder's batch
    composition. The file (``safetensors``, read lazily through a memory map, so a large cache costs no
    RAM) records a fingerprint of what it was built from and is rebuilt when that changes.

    Build it on the main process with :meth:`build` (the others wait), then :meth:`open` it everywhere.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        self._mean, self._std = self._file.get_slice("mean"), self._file.get_slice("std")
        self.num_examples = int(self._mean.get_shape()[0])

    @staticmethod
    def fingerprint_of(path: str | os.PathLike) -> str | None:
        """The fingerprint a cache file was built with (``None`` when there is no readable file)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                return (file.metadata() or {}).get("fingerprint")
        except (OSError, ValueError, RuntimeError):
            return None

    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        vae: Any,
        pixel_values: Callable[[int], torch.Tensor],
        num_examples: int,
        *,
        fingerprint: Mapping[str, Any],
        batch_size: int = 32,
    ) -> bool:
        """Encode examples ``0..num_examples-1`` (``pixel_values(i)``: the (3, H, W) VAE input of example
        ``i``) with ``vae`` and write the cache to ``path``, unless a cache with the same ``fingerprint``
        (what the values depend on: VAE, data, resolution...) is already there. Returns whether it encoded.
        The file is written to a temporary name and renamed, so an interrupted build leaves no cache."""
        from safetensors.torch import save_file

        stamp = json.dumps(dict(fingerprint), sort_keys=True, default=str)
        if cls.fingerprint_of(path) == stamp:
            return False
        device, dtype = vae.device, vae.dtype
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, num_examples, batch_size):
                stop = min(start + batch_size, num_examples)
                batch = torch.stack([pixel_values(i) for i in range(start, stop)]).to(device, dtype)
                dist = vae.encode(batch).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
        save_file(tensors, str(partial), metadata={"fingerprint": stamp})
        os.replace(partial, path)
        return True

    def posterior(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` (B, C, h, w) float32 of the examples ``indices`` (read from the memory map)."""
        rows = [int(i) for i in indices.tolist()]
        bad = [i for i in rows if not 0 <= i < self.num_examples]
        if bad:
            raise IndexError(
                f"Examples {bad} are not in the latent cache of {self.num_examples} ({self.path})."
            )
        mean = torch.cat([self._mean[i : i + 1] for i in rows])
        std = torch.cat([self._std[i : i + 1] for i in rows])
        return mean, std

    def sample(
        self, indices: torch.Tensor, generator: torch.Generator, vae_config: Any, device: torch.device | str
    ) -> torch.Tensor:
        """Scaled latents (float32, on ``device``) of the examples ``indices``: :func:`sample_latents` of
        their cached posteriors with ``generator``."""
        mean, std = self.posterior(indices)
        return sample_latents(mean.to(device), std.to(device), generator, vae_config)
