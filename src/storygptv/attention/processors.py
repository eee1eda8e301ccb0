"""Cross-attention capture for the Char-LDM localisation loss (L_reg).

Char-LDM pulls each character-name token's cross-attention into the character's segmentation mask.
The loss needs the attention probabilities of a few token columns in a few UNet layers, with
gradients. :class:`CharacterAttentionProcessor` computes them only while capture is switched on for
its layer and otherwise runs the stock fused scaled-dot-product path, so inference pays nothing.

Typical training use::

    store = install_character_attention_processors(unet)
    with store.capture(batch["character_token_indices"]):
        noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    loss = mse + reg_weight * character_attention_loss(store.maps, batch["character_masks"])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

__all__ = [
    "DEFAULT_CAPTURE_BLOCKS",
    "CharacterAttentionProcessor",
    "CharacterAttentionStore",
    "character_attention_loss",
    "install_character_attention_processors",
    "uninstall_character_attention_processors",
]

# The 11 attn2 layers of SD-1.5 whose latent side is 32, 16, 8, 16 and 32 at 512 px.
DEFAULT_CAPTURE_BLOCKS: tuple[str, ...] = (
    "down_blocks.1",
    "down_blocks.2",
    "mid_block",
    "up_blocks.1",
    "up_blocks.2",
)


class CharacterAttentionStore:
    """Shared state of the capture processors: which token columns to keep, and the captured maps.

    Attributes:
        token_indices: (batch, K) long tensor of the token columns to capture (``-1`` = empty slot),
            or ``None`` when capture is off.
        enabled_layers: names of the layers (processor names without the ``.processor`` suffix)
            that capture when capture is on.
        maps: ``{layer name: (batch, H*W, K)}`` head-averaged attention probabilities of the captured
            columns from the latest forward pass (columns of empty slots hold the probabilities of
            token 0 and must be masked out; :func:`character_attention_loss` does).
    """

    def __init__(self, layers: Iterable[str] = ()):
        self.enabled_layers: set[str] = set(layers)
        self.token_indices: torch.Tensor | None = None
        self.maps: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.token_indices is not None

    def is_capturing(self, layer: str) -> bool:
        return self.token_indices is not None and layer in self.enabled_layers

    def enable(self, token_indices: torch.Tensor) -> None:
        """Start capturing the columns ``token_indices`` (batch, K) and clear earlier maps."""
        if token_indices.ndim != 2:
            raise ValueError(f"`token_indices` must have shape (batch, K), got {tuple(token_indices.shape)}.")
        self.token_indices = token_indices.long()
        self.maps = {}

    def disable(self) -> None:
        """Stop capturing; the maps of the last pass stay readable until the next :meth:`enable`."""
        self.token_indices = None

    def clear(self) -> None:
        self.maps = {}

    @contextmanager
    def capture(self, token_indices: torch.Tensor) -> Iterator[CharacterAttentionStore]:
        """Capture inside a ``with`` block: ``with store.capture(indices): unet(...)``."""
        self.enable(token_indices)
        try:
            yield self
        finally:
            self.disable()

    def record(self, layer: str, probabilities: torch.Tensor) -> None:
        """Keep the requested columns of head-averaged probabilities (batch, H*W, seq_len)."""
        indices = self.token_indices
        if indices.shape[0] != probabilities.shape[0]:
            raise ValueError(
                f"Capturing layer {layer!r}: the UNet batch is {probabilities.shape[0]} but `token_indices` "
                f"has {indices.shape[0]} rows; pass one row of token indices per UNet sample."
            )
        index = indices.clamp(min=0).to(probabilities.device)
        index = index.unsqueeze(1).expand(-1, probabilities.shape[1], -1)
        self.maps[layer] = probabilities.gather(2, index)


class CharacterAttentionProcessor(AttnProcessor2_0):
    """Cross-attention processor that can record the attention of chosen tokens for L_reg.

    When its layer is not capturing, or the call is not a plain cross-attention over 3-D hidden
    states (self-attention, spatial norm, ``norm_cross``, an attention mask), it runs the parent's fused
    ``scaled_dot_product_attention`` unchanged. When capturing, it computes
    ``softmax(Q K^T / sqrt(d))`` explicitly (so gradients flow into the probabilities), stores the
    head-mean of the requested token columns in the shared :class:`CharacterAttentionStore`, and
    returns the same output as the fused path (up to float rounding).

    Args:
        store: the shared store.
        name: this layer's name, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
    """

    def __init__(self, store: CharacterAttentionStore, name: str, replaced: Any = None):
        super().__init__()
        self.store = store
        self.name = name
        # The processor this one replaced, restored by `uninstall_character_attention_processors`.
        self.replaced = replaced

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            not self.store.is_capturing(self.name)
            or encoder_hidden_states is None
            or hidden_states.ndim != 3
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.norm_cross
            or attn.group_norm is not None
        ):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            tensor.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for tensor in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Same scaling as scaled_dot_product_attention's default: 1 / sqrt(head_dim).
        scores = torch.matmul(query, key.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
        probabilities = scores.float().softmax(dim=-1).to(value.dtype)  # (batch, heads, HW, seq_len)
        # L_reg is linear in the probabilities, so averaging over heads first is exact.
        self.store.record(self.name, probabilities.mean(dim=1))

        hidden_states = torch.matmul(probabilities, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_character_attention_processors(
    unet: torch.nn.Module,
    blocks: Sequence[str] = DEFAULT_CAPTURE_BLOCKS,
    store: CharacterAttentionStore | None = None,
) -> CharacterAttentionStore:
    """Put :class:`CharacterAttentionProcessor` on the ``attn2`` layers of ``blocks``; keep the rest.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (anything with ``attn_processors`` and
            ``set_attn_processor``).
        blocks: block name prefixes (``"down_blocks.1"``, ``"mid_block"``, ...). The default is the 11
            cross-attention layers of Stable Diffusion 1.5 used by StoryGPT-V.
        store: reuse an existing store; a new one is created otherwise.

    Returns:
        The store whose ``maps`` the processors fill while :meth:`CharacterAttentionStore.capture` is on.

    Processors are not saved with the UNet: install them again after ``from_pretrained``.
    """
    current = dict(unet.attn_processors)
    prefixes = tuple(block.rstrip(".") + "." for block in blocks)
    selected = [
        name[: -len(".processor")]
        for name in current
        if name.startswith(prefixes) and name.endswith("attn2.processor")
    ]
    if not selected:
        available = sorted(
            {
                ".".join(name.split(".")[:2]) if name.startswith(("down", "up")) else name.split(".")[0]
                for name in current
            }
        )
        raise ValueError(
            f"No cross-attention (attn2) layer of the UNet lies under `blocks`={list(blocks)}; "
            f"blocks with attention layers: {available}."
        )
    store = store if store is not None else CharacterAttentionStore()
    store.enabled_layers.update(selected)
    processors = {}
    for name, processor in current.items():
        layer = name[: -len(".processor")]
        if layer in selected and not isinstance(processor, CharacterAttentionProcessor):
            processor = CharacterAttentionProcessor(store, layer, replaced=processor)
        elif layer in selected:  # installed already: share the new store, keep what it replaced
            processor = CharacterAttentionProcessor(store, layer, replaced=processor.replaced)
        processors[name] = processor
    unet.set_attn_processor(processors)
    return store


def uninstall_character_attention_processors(unet: torch.nn.Module) -> int:
    """Put back the processors that :func:`install_character_attention_processors` replaced.

    Every :class:`CharacterAttentionProcessor` of ``unet`` gives way to the processor it replaced (the other
    layers keep theirs), like diffusers' ``unload_ip_adapter``. Returns the number of layers restored.
    """
    current = dict(unet.attn_processors)
    restored = {
        name: (processor.replaced or AttnProcessor2_0())
        if isinstance(processor, CharacterAttentionProcessor)
        else processor
        for name, processor in current.items()
    }
    count = sum(isinstance(p, CharacterAttentionProcessor) for p in current.values())
    if count:
        unet.set_attn_processor(restored)
    return count


def _mask_side(num_pixels: int, height: int, width: int) -> tuple[int, int]:
    """Latent (h, w) of a layer with ``num_pixels`` positions for masks of aspect ``height/width``."""
    h = round(math.sqrt(num_pixels * height / width))
    w = num_pixels // max(h, 1)
    if h * w != num_pixels:
        raise ValueError(
            f"Cannot lay out {num_pixels} attention positions with the masks' aspect ratio {height}x{width}."
        )
    return h, w


def character_attention_loss(
    maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    masks: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    r"""L_reg: mean attention outside each character's mask minus mean attention inside it.

    For character k with captured probabilities :math:`A_k` (over the H*W positions of a layer) and
    its mask :math:`m_k` resized to that layer (bilinear, antialiased, not re-thresholded):

    .. math::
        \ell_k = \frac{\sum A_k (1 - m_k)}{\sum (1 - m_k)} - \frac{\sum A_k m_k}{\sum m_k}

    averaged over the valid characters of the batch, then over layers. It is negative when attention
    sits inside the masks.

    Args:
        maps: ``{layer: (batch, H*W, K)}`` (e.g. ``store.maps``) or a list of such tensors.
        masks: (batch, K, H, W) character masks in [0, 1] at any resolution.
        valid: (batch, K) bool of the slots to use; defaults to slots whose mask is not empty.
        eps: guards the divisions for empty or full masks.

    Returns:
        A scalar tensor (zero when no slot is valid).
    """
    layers = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not layers:
        raise ValueError(
            "`maps` is empty: no attention was captured. Run the UNet inside `store.capture(...)`."
        )
    masks = masks.float()
    if masks.ndim != 4:
        raise ValueError(f"`masks` must have shape (batch, K, H, W), got {tuple(masks.shape)}.")
    if valid is None:
        valid = masks.flatten(2).amax(-1) > 0
    valid = valid.to(masks.device).bool()
    if not valid.any():
        return sum(layer.sum() for layer in layers) * 0.0
    height, width = masks.shape[-2:]
    terms = []
    for attention in layers:
        batch, num_pixels, num_slots = attention.shape
        if (batch, num_slots) != tuple(masks.shape[:2]):
            raise ValueError(
                f"Attention maps hold {batch}x{num_slots} (batch x characters) but `masks` has "
                f"{tuple(masks.shape[:2])}; pass one mask per captured token column."
            )
        h, w = _mask_side(num_pixels, height, width)
        resized = F.interpolate(masks, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        inside = resized.flatten(2).to(attention.device)  # (batch, K, HW)
        probs = attention.float().transpose(1, 2)  # (batch, K, HW)
        foreground = (probs * inside).sum(-1) / inside.sum(-1).clamp_min(eps)
        background = (probs * (1 - inside)).sum(-1) / (1 - inside).sum(-1).clamp_min(eps)
        terms.append((background - foreground)[valid.to(attention.device)].mean())
    return torch.stack(terms).mean()
