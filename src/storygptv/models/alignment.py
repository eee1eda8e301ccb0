"""L_align of StoryGPT-V stage 2: the distance between the mapped conditioning and the stage-1 target.

- ``"mse"`` (the paper): the mean squared error over all elements.
- ``"l2"`` (GILL's public code): the L2 norm of each row's difference, averaged over rows and batch.

*Identity-weighted* alignment: the identity of a frame lives in a few rows of the target (the fused token of
each character, the setting word), which a plain mean drowns among the others. With ``token_roles`` (0 other,
1 character, 2 setting) and weights w_c, w_s, each row's error e_i (its mean squared error, or its L2 norm)
counts with weight w_i: ``sum_i w_i e_i / sum_i w_i`` per sample, then the mean over the batch. With unit
weights this is exactly the plain loss.
"""

from __future__ import annotations

import torch

__all__ = ["alignment_loss", "alignment_row_weights"]


def alignment_row_weights(
    token_roles: torch.Tensor, character_weight: float = 1.0, setting_weight: float = 1.0
) -> torch.Tensor:
    """(B, L) weight of each conditioning row from its role (0 other, 1 character, 2 setting)."""
    weights = torch.ones(token_roles.shape, dtype=torch.float32, device=token_roles.device)
    weights[token_roles == 1] = float(character_weight)
    weights[token_roles == 2] = float(setting_weight)
    return weights


def alignment_loss(
    conditioning: torch.Tensor,
    target: torch.Tensor,
    token_roles: torch.Tensor | None = None,
    kind: str = "mse",
    character_weight: float = 1.0,
    setting_weight: float = 1.0,
) -> torch.Tensor:
    """L_align between ``conditioning`` and ``target`` (both (B, L, D)); see the module docstring.

    Example:
        >>> cond, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
        >>> float(alignment_loss(cond, target)), float(alignment_loss(cond, target, torch.tensor([[1, 0, 0]]), character_weight=2.0))
        (0.3333333432674408, 0.5)
    """
    target = target.to(device=conditioning.device, dtype=torch.float32)
    if target.shape != conditioning.shape:
        raise ValueError(
            f"`target_conditioning` has shape {tuple(target.shape)}, expected {tuple(conditioning.shape)}."
        )
    diff = conditioning.float() - target
    if token_roles is None or (character_weight == 1.0 and setting_weight == 1.0):
        return diff.pow(2).mean() if kind == "mse" else diff.norm(dim=-1).mean()
    if token_roles.shape != diff.shape[:2]:
        raise ValueError(
            f"`target_token_roles` has shape {tuple(token_roles.shape)}, expected {tuple(diff.shape[:2])}."
        )
    per_row = diff.pow(2).mean(-1) if kind == "mse" else diff.norm(dim=-1)
    weights = alignment_row_weights(token_roles.to(diff.device), character_weight, setting_weight)
    return ((per_row * weights).sum(-1) / weights.sum(-1).clamp_min(1e-12)).mean()
