"""Masked Mutual Self-Attention (MMSA) and Masked Mutual Cross-Attention (MMCA), after DreamStory (arXiv 2407.12899).

While a scene is denoised, every character drawn in it gets a region of the scene (its mask). A pixel belongs to at
most one character: overlapping masks are resolved by coverage (argmax), ties by the characters' order, so
characters never blend.

- **MMSA** (``attn1``): a scene pixel of character ``c`` attends to the scene's own keys *and* to the keys / values
  of ``c``'s region in ``c``'s portrait, taken from the portrait's self-attention at the same layer and timestep.
  It sees nothing of the other characters' portraits. For query ``q_i`` of a pixel owned by ``c``:

  .. math::
      \\mathrm{MMSA}(q_i) = \\mathrm{softmax}\\big(q_i [K_s; K_c^{P_c}]^T / \\sqrt{d}\\big) [V_s; V_c^{P_c}]

  where ``K_s, V_s`` are the scene's keys / values and ``K_c^{P_c}`` the portrait's keys inside the portrait mask
  ``P_c`` (the whole portrait by default). Equivalently, the logits of the joint attention over the scene and all
  portraits are set to ``-inf`` between different characters and between any unowned pixel and every portrait.
- **MMCA** (``attn2``): a scene pixel of character ``c`` attends to the scene's text tokens and to ``c``'s
  description embedding (the prompt embedding of ``c``'s portrait prompt), in the same masked way.

Pixels outside every mask attend exactly as the stock processor. The portraits' keys / values come either from
portrait rows of the same UNet batch (``state.mode == "joint"``: "recompute per step") or from a cache recorded in
a first pass over the portraits (``"record"`` then ``"replay"``: "cache once per story").

Example::

    >>> import torch
    >>> from storygptv.attention import install_mutual_attention_processors, uninstall_mutual_attention_processors
    >>> from storygptv.testing import tiny_unet
    >>> unet = tiny_unet().eval()
    >>> state = install_mutual_attention_processors(unet)
    >>> portrait, scene = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    >>> text = torch.randn(1, 77, 32)
    >>> masks = torch.zeros(1, 1, 16, 16); masks[..., 4:12, 4:12] = 1   # (scenes, characters, H, W)
    >>> state.set_scene(masks, portrait_index=torch.tensor([[0]]))        # character 0 -> cached portrait row 0
    >>> with state.activate("record", step=0):
    ...     _ = unet(portrait, 10, text)
    >>> with state.activate("replay", step=0):
    ...     out = unet(scene, 10, text).sample
    >>> uninstall_mutual_attention_processors(unet)
    20
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .processors import _mask_side

__all__ = [
    "MUTUAL_MODES",
    "MaskedMutualCrossAttnProcessor",
    "MaskedMutualSelfAttnProcessor",
    "MutualAttentionState",
    "install_mutual_attention_processors",
    "owner_map",
    "uninstall_mutual_attention_processors",
]

#: Values of :attr:`MutualAttentionState.mode`.
MUTUAL_MODES: tuple[str, ...] = ("off", "record", "replay", "joint")


def owner_map(masks: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> torch.Tensor:
    """Which character owns each pixel of a ``height`` x ``width`` grid: (S, height * width) long, ``-1`` = none.

    ``masks`` (S, N, H, W) in [0, 1] are resized to the grid (bilinear, antialiased: the coverage of each cell); a
    cell goes to the character with the largest coverage if that is at least ``threshold``, ties to the earlier
    character (the priority order), so no cell belongs to two characters.

    Example:
        >>> m = torch.zeros(1, 2, 4, 4); m[0, 0, :, :2] = 1; m[0, 1, :, 1:] = 1  # overlap in column 1
        >>> owner_map(m, 4, 4).view(4, 4)[0].tolist()
        [0, 0, 1, 1]
    """
    if masks.ndim != 4:
        raise ValueError(f"`masks` must have shape (scenes, characters, H, W), got {tuple(masks.shape)}.")
    masks = masks.float()
    if tuple(masks.shape[-2:]) != (height, width):
        masks = F.interpolate(
            masks, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    if masks.shape[1] == 0:
        return torch.full((masks.shape[0], height * width), -1, dtype=torch.long, device=masks.device)
    coverage, owner = masks.flatten(2).max(dim=1)  # first maximum on ties: the priority order
    return torch.where(coverage >= threshold, owner, torch.full_like(owner, -1))


class MutualAttentionState:
    """Shared state of the mutual-attention processors: the scene's character masks, where the portraits' keys
    come from, the description embeddings and the portrait cache.

    Batch layout: ``scene_rows`` (S,) are the UNet batch rows of the scenes; ``portrait_index`` (S, N) gives, for
    scene ``s`` and character ``n``, the row of ``n``'s portrait (``-1``: none) in the current batch (mode
    ``"joint"``) or in the recorded batch (mode ``"replay"``).

    Attributes:
        mode: ``"off"`` (every processor delegates to the processor it replaced), ``"record"`` (self-attention layers
            store their keys / values per ``(step, layer)`` in ``cache``), ``"replay"`` (scenes use the cache of
            ``step``) or ``"joint"`` (scenes use the portrait rows of the same batch).
        step: the denoising step the cache is read or written at.
        self_attention, cross_attention: switch MMSA / MMCA on or off.
        max_characters: most characters a scene may have (the config limit).
        capture: record the head-averaged probabilities of the masked rows in ``probabilities`` (slower; the
            output is the same up to float rounding).
        extra_weight: how much more an owned pixel attends to its character's extra keys (portrait / description
            tokens) than the softmax alone gives: ``log(extra_weight)`` is added to their logits (1: DreamStory's
            plain joint softmax).
        probabilities: ``{layer: [(tokens, keys) per scene]}`` with keys = the scene's keys followed by every
            character's extra keys (its portrait tokens or description tokens), ``N * extra`` columns.
    """

    def __init__(self, max_characters: int = 4):
        self.mode = "off"
        self.step = 0
        self.self_attention = True
        self.cross_attention = True
        self.max_characters = max_characters
        self.capture = False
        self.extra_weight = 1.0
        self.cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.probabilities: dict[str, list[torch.Tensor]] = {}
        self.clear_scene()

    # ------------------------------------------------------------------ scene
    def clear_scene(self) -> None:
        """Forget the scene (masks, rows, descriptions); the portrait cache stays."""
        self.masks: torch.Tensor | None = None
        self.scene_rows: torch.Tensor | None = None
        self.portrait_index: torch.Tensor | None = None
        self.portrait_masks: torch.Tensor | None = None
        self.description_embeds: torch.Tensor | None = None
        self.description_rows: torch.Tensor | None = None
        self._owners: dict[tuple[int, int], torch.Tensor] = {}
        self._portrait_tokens: dict[tuple[int, int], torch.Tensor] = {}

    def set_scene(
        self,
        masks: torch.Tensor,
        portrait_index: torch.Tensor | None = None,
        scene_rows: torch.Tensor | None = None,
        portrait_masks: torch.Tensor | None = None,
        description_embeds: torch.Tensor | None = None,
        description_rows: torch.Tensor | None = None,
    ) -> None:
        """Set the scenes the next UNet calls denoise.

        Args:
            masks: (S, N, H, W) character masks in [0, 1] of the S scene rows, at any resolution; all-zero masks
                leave the scene stock.
            portrait_index: (S, N) long, the row of each character's portrait (``-1``: none); needed for MMSA.
            scene_rows: (S,) the UNet batch rows of the scenes (default ``0..S-1``).
            portrait_masks: (P, H', W') the character's region in each portrait row (default: whole portraits).
            description_embeds: (S, N, L, D) each character's description embedding, for MMCA (``None``: no MMCA).
            description_rows: (S,) bool, the scenes that use MMCA (default: all).
        """
        if masks.ndim != 4:
            raise ValueError(
                f"`masks` must have shape (scenes, characters, H, W), got {tuple(masks.shape)}; add the missing "
                "dimensions (e.g. masks[None] for one scene)."
            )
        scenes, characters = masks.shape[:2]
        if characters > self.max_characters:
            raise ValueError(
                f"`masks` has {characters} characters per scene but `max_characters` is {self.max_characters}; "
                "pass fewer characters or raise the limit."
            )
        if portrait_index is not None and tuple(portrait_index.shape) != (scenes, characters):
            raise ValueError(
                f"`portrait_index` must have shape (scenes, characters) = {(scenes, characters)}, got "
                f"{tuple(portrait_index.shape)}."
            )
        if scene_rows is not None and tuple(scene_rows.shape) != (scenes,):
            raise ValueError(f"`scene_rows` must have shape ({scenes},), got {tuple(scene_rows.shape)}.")
        if description_embeds is not None and tuple(description_embeds.shape[:2]) != (scenes, characters):
            raise ValueError(
                f"`description_embeds` must have shape (scenes, characters, L, D) with (scenes, characters) = "
                f"{(scenes, characters)}, got {tuple(description_embeds.shape)}."
            )
        if portrait_masks is not None and portrait_masks.ndim != 3:
            raise ValueError(
                f"`portrait_masks` must have shape (portraits, H, W), got {tuple(portrait_masks.shape)}."
            )
        self.clear_scene()
        self.masks = masks.float()
        self.scene_rows = torch.arange(scenes) if scene_rows is None else scene_rows.long().cpu()
        self.portrait_index = None if portrait_index is None else portrait_index.long().cpu()
        self.portrait_masks = None if portrait_masks is None else portrait_masks.float()
        self.description_embeds = description_embeds
        self.description_rows = (
            torch.ones(scenes, dtype=torch.bool)
            if description_rows is None
            else description_rows.bool().cpu()
        )

    def owners(self, num_tokens: int) -> torch.Tensor:
        """(S, num_tokens) owner of each scene position at a layer with ``num_tokens`` positions (cached)."""
        height, width = self.masks.shape[-2:]
        side = _mask_side(num_tokens, height, width)
        if side not in self._owners:
            self._owners[side] = owner_map(self.masks, *side).cpu()
        return self._owners[side]

    def portrait_tokens(self, num_tokens: int) -> torch.Tensor | None:
        """(P, num_tokens) bool: the portrait positions inside each portrait mask (``None``: all of them)."""
        if self.portrait_masks is None:
            return None
        height, width = self.portrait_masks.shape[-2:]
        side = _mask_side(num_tokens, height, width)
        if side not in self._portrait_tokens:
            self._portrait_tokens[side] = owner_map(self.portrait_masks[:, None], *side).cpu() == 0
        return self._portrait_tokens[side]

    # ------------------------------------------------------------------ modes
    @contextmanager
    def activate(self, mode: str, step: int = 0) -> Iterator[MutualAttentionState]:
        """Run UNet calls in ``mode`` at denoising ``step``: ``with state.activate("replay", step=i): unet(...)``."""
        if mode not in MUTUAL_MODES:
            raise ValueError(f"`mode` must be one of {MUTUAL_MODES}, got {mode!r}.")
        previous = self.mode, self.step
        self.mode, self.step = mode, step
        try:
            yield self
        finally:
            self.mode, self.step = previous

    def wants(self, kind: str) -> bool:
        """Whether a processor of ``kind`` (``"self"`` / ``"cross"``) has work to do now."""
        if self.mode == "off":
            return False
        if kind == "self":
            return self.self_attention and (self.mode == "record" or self.masks is not None)
        return (
            self.cross_attention
            and self.mode in ("replay", "joint")
            and self.masks is not None
            and self.description_embeds is not None
        )


class _MaskedMutualAttnProcessor(AttnProcessor2_0):
    """Shared code of :class:`MaskedMutualSelfAttnProcessor` and :class:`MaskedMutualCrossAttnProcessor`."""

    kind = "self"

    def __init__(self, state: MutualAttentionState, name: str, replaced: Any = None):
        super().__init__()
        self.state = state
        self.name = name
        # The processor this one replaced: it runs whenever this one has nothing to do, and comes back on uninstall.
        self.replaced = replaced

    def _delegate(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs):
        if self.replaced is not None:
            return self.replaced(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )

    def extra_keys(
        self, attn: Attention, key: torch.Tensor, value: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per scene and character, the extra keys / values and which of them are allowed:
        ``(S, N, heads, T, d)`` twice and ``(S, N, T)`` bool; ``None`` when there are none."""
        raise NotImplementedError

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
        is_cross = encoder_hidden_states is not None
        if (
            not self.state.wants(self.kind)
            or is_cross != (self.kind == "cross")
            or hidden_states.ndim != 3
            or attention_mask is not None
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or attn.norm_cross
        ):
            return self._delegate(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        state = self.state
        num_tokens = hidden_states.shape[1]
        owners = state.owners(num_tokens) if state.masks is not None else None
        if state.mode != "record" and not (owners >= 0).any():
            return self._delegate(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        residual = hidden_states
        batch_size = hidden_states.shape[0]
        context = encoder_hidden_states if is_cross else hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)  # stock, for every row (batch, heads, HW, d)

        if state.mode == "record":
            state.cache[(state.step, self.name)] = (key.detach(), value.detach())
        else:
            extra = self.extra_keys(attn, key, value, num_tokens)
            if extra is not None:
                out = self._mutual(query, key, value, out, owners, *extra)

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _mutual(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        owners: torch.Tensor,
        extra_key: torch.Tensor,
        extra_value: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """Recompute the rows of owned pixels with their character's extra keys appended."""
        state = self.state
        out = out.clone()
        scale = query.shape[-1] ** -0.5
        bias = math.log(state.extra_weight)
        for s, row in enumerate(state.scene_rows.tolist()):
            if not self.scene_uses_extra(s):
                continue
            owner = owners[s].to(query.device)
            if state.capture:  # explicit joint softmax over the scene and all characters' extra keys, masked
                num_chars, heads, extra_len = extra_key.shape[1], extra_key.shape[2], extra_key.shape[3]
                keys = torch.cat(
                    [key[row], extra_key[s].transpose(0, 1).reshape(heads, -1, key.shape[-1])], 1
                )
                values = torch.cat(
                    [value[row], extra_value[s].transpose(0, 1).reshape(heads, -1, key.shape[-1])], 1
                )
                chars = torch.arange(num_chars, device=owner.device).repeat_interleave(extra_len)
                permitted = (owner[:, None] == chars[None]) & allowed[s].reshape(-1).to(owner.device)[None]
                own = torch.ones(owner.shape[0], key.shape[2], dtype=torch.bool, device=owner.device)
                permitted = torch.cat([own, permitted], 1)
                logits = (query[row] @ keys.transpose(-1, -2)) * scale
                logits[..., key.shape[2] :] += bias
                logits = logits.masked_fill(~permitted.to(logits.device), float("-inf"))
                probabilities = logits.float().softmax(-1).to(values.dtype)
                state.probabilities.setdefault(self.name, []).append(probabilities.mean(0).detach())
                rows = owner >= 0
                out[row][:, rows] = (probabilities @ values)[:, rows]
                continue
            for character in owner[owner >= 0].unique().tolist():
                pixels = (owner == character).nonzero().squeeze(1)
                ok = allowed[s, character].to(key.device)
                keys = torch.cat([key[row], extra_key[s, character][:, ok]], 1)
                values = torch.cat([value[row], extra_value[s, character][:, ok]], 1)
                weights = None
                if bias:
                    weights = torch.zeros(keys.shape[1], dtype=query.dtype, device=query.device)
                    weights[key.shape[2] :] = bias
                out[row][:, pixels] = F.scaled_dot_product_attention(
                    query[row][:, pixels], keys, values, attn_mask=weights
                )
        return out

    def scene_uses_extra(self, scene: int) -> bool:
        return True


class MaskedMutualSelfAttnProcessor(_MaskedMutualAttnProcessor):
    """MMSA on a self-attention (``attn1``) layer: owned scene pixels also attend to their character's portrait.

    Args:
        state: the shared :class:`MutualAttentionState`.
        name: the layer's name, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn1"``.
        replaced: the processor it replaced (runs whenever MMSA has nothing to do; restored on uninstall).
    """

    kind = "self"

    def extra_keys(self, attn, key, value, num_tokens):
        state = self.state
        if state.portrait_index is None:
            return None
        if state.mode == "replay":
            if (state.step, self.name) not in state.cache:
                raise RuntimeError(
                    f"No recorded portrait keys for step {state.step} of layer {self.name!r}: record the portraits "
                    "with `state.activate('record', step)` at the same steps and size as the scene."
                )
            key, value = state.cache[(state.step, self.name)]
        if key.shape[2] != num_tokens:
            raise ValueError(
                f"Layer {self.name!r}: the portraits have {key.shape[2]} positions and the scene {num_tokens}; "
                "portraits must have the scene's height and width."
            )
        index = state.portrait_index.clamp(min=0).to(key.device)  # (S, N)
        extra_key, extra_value = key[index], value[index]  # (S, N, heads, T, d)
        allowed = (state.portrait_index >= 0)[..., None].expand(-1, -1, num_tokens)
        tokens = state.portrait_tokens(num_tokens)
        if tokens is not None:
            allowed = allowed & tokens[state.portrait_index.clamp(min=0)]
        return extra_key, extra_value, allowed


class MaskedMutualCrossAttnProcessor(_MaskedMutualAttnProcessor):
    """MMCA on a cross-attention (``attn2``) layer: owned scene pixels also attend to their character's description.

    Args:
        state: the shared :class:`MutualAttentionState` (its ``description_embeds`` hold the descriptions).
        name: the layer's name, e.g. ``"mid_block.attentions.0.transformer_blocks.0.attn2"``.
        replaced: the processor it replaced (runs whenever MMCA has nothing to do; restored on uninstall).
    """

    kind = "cross"

    def extra_keys(self, attn, key, value, num_tokens):
        embeds = self.state.description_embeds.to(device=key.device, dtype=attn.to_k.weight.dtype)
        scenes, characters, length, _ = embeds.shape
        heads, head_dim = key.shape[1], key.shape[3]
        extra_key = attn.to_k(embeds).view(scenes, characters, length, heads, head_dim).transpose(2, 3)
        extra_value = attn.to_v(embeds).view(scenes, characters, length, heads, head_dim).transpose(2, 3)
        if attn.norm_k is not None:
            extra_key = attn.norm_k(extra_key)
        allowed = torch.ones(scenes, characters, length, dtype=torch.bool)
        return extra_key, extra_value, allowed

    def scene_uses_extra(self, scene: int) -> bool:
        return bool(self.state.description_rows[scene])


def install_mutual_attention_processors(
    unet: torch.nn.Module,
    state: MutualAttentionState | None = None,
    self_attention: bool = True,
    cross_attention: bool = True,
) -> MutualAttentionState:
    """Put MMSA on every ``attn1`` and MMCA on every ``attn2`` layer of ``unet``; return their shared state.

    Works on any SD-1.x-shaped ``UNet2DConditionModel`` (our pipelines' UNets, a plain ``StableDiffusionPipeline``
    UNet). The processors do nothing (they call the processor they replaced, e.g. a
    :class:`~storygptv.attention.CharacterAttentionProcessor`) until ``state.activate(...)`` and a scene with
    non-empty masks, so the UNet's output is unchanged until then. Installing twice keeps the first replaced
    processors and shares the new state.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (anything with ``attn_processors`` and ``set_attn_processor``).
        state: reuse an existing state; a new one is created otherwise.
        self_attention, cross_attention: install MMSA / MMCA (both by default).

    Example:
        >>> from storygptv.testing import tiny_unet
        >>> unet = tiny_unet()
        >>> state = install_mutual_attention_processors(unet, cross_attention=False)
        >>> sorted({type(p).__name__ for p in unet.attn_processors.values()})
        ['AttnProcessor2_0', 'MaskedMutualSelfAttnProcessor']
    """
    if not (self_attention or cross_attention):
        raise ValueError("Pass `self_attention=True` and/or `cross_attention=True`: nothing to install.")
    state = state if state is not None else MutualAttentionState()
    processors = {}
    for name, processor in dict(unet.attn_processors).items():
        layer = name[: -len(".processor")]
        kind = {"attn1": "self", "attn2": "cross"}.get(layer.rsplit(".", 1)[-1])
        wanted = (kind == "self" and self_attention) or (kind == "cross" and cross_attention)
        if wanted:
            cls = MaskedMutualSelfAttnProcessor if kind == "self" else MaskedMutualCrossAttnProcessor
            replaced = processor.replaced if isinstance(processor, _MaskedMutualAttnProcessor) else processor
            processor = cls(state, layer, replaced=replaced)
        processors[name] = processor
    if not any(isinstance(p, _MaskedMutualAttnProcessor) for p in processors.values()):
        raise ValueError("The UNet has no `attn1` / `attn2` attention layers to install mutual attention on.")
    unet.set_attn_processor(processors)
    return state


def uninstall_mutual_attention_processors(unet: torch.nn.Module) -> int:
    """Put back the processors :func:`install_mutual_attention_processors` replaced; return how many layers.

    Example:
        >>> from storygptv.testing import tiny_unet
        >>> unet = tiny_unet()
        >>> before = unet.attn_processors
        >>> _ = install_mutual_attention_processors(unet)
        >>> uninstall_mutual_attention_processors(unet), all(unet.attn_processors[n] is p for n, p in before.items())
        (20, True)
    """
    current = dict(unet.attn_processors)
    count = sum(isinstance(p, _MaskedMutualAttnProcessor) for p in current.values())
    if count:
        unet.set_attn_processor(
            {
                name: (processor.replaced if processor.replaced is not None else AttnProcessor2_0())
                if isinstance(processor, _MaskedMutualAttnProcessor)
                else processor
                for name, processor in current.items()
            }
        )
    return count
