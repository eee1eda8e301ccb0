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

    @torch.no_grad()
    def extend(self, new_characters: int, new_settings: int) -> None:
        """Add label rows for ``new_characters`` characters (after the known ones) and ``new_settings`` settings.

        The known rows keep their weights. A new row starts with zero weights and the mean bias of its kind, so
        a new label starts at the known labels' prior and learns from there (fine-tuning on a new cast).

        Example:
            >>> head = StoryGroundingHead(hidden_size=16, num_characters=3, num_settings=2)
            >>> head.extend(new_characters=2, new_settings=1)
            >>> [t.shape[-1] for t in head(torch.randn(1, 8, 16))]
            [5, 3]
        """
        if new_characters < 0 or new_settings < 0:
            raise ValueError(
                f"Cannot remove labels: got {new_characters} characters, {new_settings} settings."
            )
        c, weight, bias = self.num_characters, self.proj.weight, self.proj.bias

        def block(rows: slice, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
            w, b = weight[rows], bias[rows]
            prior = b.mean() if b.numel() else bias.new_zeros(())
            return torch.cat([w, w.new_zeros(extra, w.shape[1])]), torch.cat([b, prior.expand(extra)])

        (cw, cb), (sw, sb) = block(slice(0, c), new_characters), block(slice(c, None), new_settings)
        proj = nn.Linear(weight.shape[1], cw.shape[0] + sw.shape[0]).to(
            device=weight.device, dtype=weight.dtype
        )
        proj.weight.copy_(torch.cat([cw, sw]))
        proj.bias.copy_(torch.cat([cb, sb]))
        self.proj = proj
        self.num_characters += new_characters
        self.num_settings += new_settings

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
