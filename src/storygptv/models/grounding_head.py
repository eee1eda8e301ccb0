"""The grounding head of the story model: which characters (and which setting) a frame shows.

StoryGPT-V leaves pronoun resolution implicit in the ``[IMG]`` hidden states, and a linear probe finds the
frame's cast in only a few percent of them (``shared/docs/stage2-diagnosis.md``). This head makes the
resolution explicit and supervised: from the mean of the R ``[IMG]`` hidden states it predicts

- a multi-label vector over ``grounding_characters`` (binary cross-entropy against the dataset's character
  labels), and
- a single label over ``grounding_settings`` (cross-entropy against the dataset's setting label),

so a pipeline can read who "They" are and fuse their reference images instead of trusting the mapper's
memory, and a test can check what the model resolved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StoryGroundingHead"]


class StoryGroundingHead(nn.Module):
    """LayerNorm + Linear on the mean ``[IMG]`` hidden state -> character and setting logits.

    Args:
        hidden_size: width of the LLM hidden states.
        num_characters: size of the character label set (0: no character output).
        num_settings: size of the setting label set (0: no setting output).

    Example:
        >>> head = StoryGroundingHead(hidden_size=16, num_characters=3, num_settings=2)
        >>> chars, settings = head(torch.randn(4, 8, 16))
        >>> chars.shape, settings.shape
        (torch.Size([4, 3]), torch.Size([4, 2]))
    """

    def __init__(self, hidden_size: int, num_characters: int, num_settings: int) -> None:
        super().__init__()
        if num_characters < 0 or num_settings < 0 or num_characters + num_settings == 0:
            raise ValueError(
                f"A grounding head needs characters and / or settings to predict, got {num_characters} and "
                f"{num_settings}."
            )
        self.num_characters, self.num_settings = num_characters, num_settings
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, num_characters + num_settings)

    def forward(self, img_hidden_states: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, R, hidden) -> ``(character_logits (B, C) or None, setting_logits (B, S) or None)``."""
        pooled = img_hidden_states.to(self.proj.weight.dtype).mean(1)
        logits = self.proj(self.norm(pooled))
        characters = logits[:, : self.num_characters] if self.num_characters else None
        settings = logits[:, self.num_characters :] if self.num_settings else None
        return characters, settings

    @staticmethod
    def loss(
        character_logits: torch.Tensor | None,
        setting_logits: torch.Tensor | None,
        character_labels: torch.Tensor | None,
        setting_labels: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """BCE over the character labels (rows of -1 are unlabelled) + CE over the setting labels (-100 ignored).

        Returns None when no label was given.
        """
        terms = []
        if character_logits is not None and character_labels is not None:
            labels = character_labels.to(device=character_logits.device, dtype=torch.float32)
            known = (labels >= 0).all(-1)
            if bool(known.any()):
                terms.append(
                    F.binary_cross_entropy_with_logits(character_logits.float()[known], labels[known])
                )
        if setting_logits is not None and setting_labels is not None:
            labels = setting_labels.to(device=setting_logits.device, dtype=torch.long)
            if bool((labels != -100).any()):
                terms.append(F.cross_entropy(setting_logits.float(), labels, ignore_index=-100))
        return torch.stack(terms).sum() if terms else None
