"""The LDM mapper of StoryGPT-V stage 2 (GILL-style "GenCap" translator).

It turns the R ``[IMG]`` token representations of the LLM into the 77 x 768 conditioning sequence that the
(Char-)LDM cross-attends to:

    x (B, R, in_dim) -> Linear(in_dim -> d_model) -> nn.Transformer encoder (the R tokens)
    77 learned queries -> nn.Transformer decoder (cross-attending to the encoded tokens)
    -> Linear(d_model -> ldm_hidden_size) -> (B, 77, ldm_hidden_size)

The paper's sizes are d_model 512, 4 heads, 4 encoder + 4 decoder layers, feed-forward 2048, dropout 0 and
pre-norm blocks.

*Caption-anchored* mode (``anchored=True``): the decoder queries are the learned queries **plus** a projection
of an anchor conditioning (the frame's own caption encoding, 77 x 768), and the output is that anchor plus the
decoder's residual. The residual's output projection starts at zero, so an untrained anchored mapper returns
its anchor exactly::

    out = anchor + Linear_0(decoder(queries + Linear(anchor), encoder(x))) The module is a plain ``nn.Module``; it is owned by
:class:`~storygptv.models.modeling_storygptv.StoryGPTVForConditionalGeneration` as ``ldm_mapper`` and saved
inside its ``model.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StoryLDMMapper"]


class StoryLDMMapper(nn.Module):
    """Map ``[IMG]`` token features to an LDM text-conditioning sequence.

    Args:
        in_dim: width of the incoming token features (the LLM input-embedding width).
        d_model: the transformer width.
        num_heads: attention heads of every block.
        num_encoder_layers: encoder blocks (over the R ``[IMG]`` tokens).
        num_decoder_layers: decoder blocks (over the learned queries).
        ffn_dim: feed-forward width.
        num_queries: number of learned queries, i.e. the output length (77 for CLIP text conditioning).
        out_dim: output width (768 for SD-1.5).
        dropout: dropout of every block (0 in the paper).
        norm_first: pre-norm blocks (True in the paper).
        anchored: caption-anchored mode (see the module docstring); ``forward`` then needs ``anchor``.

    Example:
        >>> import torch
        >>> mapper = StoryLDMMapper(in_dim=64, d_model=32, num_heads=2, num_encoder_layers=1,
        ...                         num_decoder_layers=1, ffn_dim=64, num_queries=77, out_dim=48)
        >>> mapper(torch.randn(2, 8, 64)).shape
        torch.Size([2, 77, 48])
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ffn_dim: int = 2048,
        num_queries: int = 77,
        out_dim: int = 768,
        dropout: float = 0.0,
        norm_first: bool = True,
        anchored: bool = False,
    ) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads}).")
        self.in_dim, self.d_model, self.num_queries, self.out_dim = in_dim, d_model, num_queries, out_dim
        self.in_proj = nn.Linear(in_dim, d_model)
        # The encoder is built explicitly only to switch off the nested-tensor fast path, which pre-norm
        # layers cannot use anyway (nn.Transformer would warn about it); the maths is nn.Transformer's.
        encoder_layer = nn.TransformerEncoderLayer(
            d_model, num_heads, ffn_dim, dropout, batch_first=True, norm_first=norm_first
        )
        encoder = nn.TransformerEncoder(
            encoder_layer, num_encoder_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.transformer = nn.Transformer(
            d_model=d_model,
            nhead=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=norm_first,
            custom_encoder=encoder,
        )
        self.queries = nn.Parameter(torch.zeros(1, num_queries, d_model))
        self.out_proj = nn.Linear(d_model, out_dim)
        self.anchored = anchored
        self.anchor_proj = nn.Linear(out_dim, d_model) if anchored else None
        nn.init.normal_(self.queries, std=0.02)
        if anchored:
            self.zero_residual_()

    @torch.no_grad()
    def zero_residual_(self) -> None:
        """Zero the output projection: an anchored mapper then returns its anchor exactly."""
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, img_features: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Map ``img_features`` (B, R, in_dim) to (B, num_queries, out_dim).

        ``anchor`` (B, num_queries, out_dim) is required in anchored mode and refused otherwise.
        """
        if img_features.ndim != 3 or img_features.shape[-1] != self.in_dim:
            raise ValueError(
                f"`img_features` must have shape (batch, num_img_tokens, {self.in_dim}), got {tuple(img_features.shape)}."
            )
        dtype = self.in_proj.weight.dtype
        x = self.in_proj(img_features.to(dtype))
        queries = self.queries.expand(x.shape[0], -1, -1)
        if not self.anchored:
            if anchor is not None:
                raise ValueError(
                    "This mapper uses learned queries (mapper_queries='learned'); it takes no `anchor` "
                    "(caption_conditioning)."
                )
            return self.out_proj(self.transformer(x, queries))
        expected = (x.shape[0], self.num_queries, self.out_dim)
        if anchor is None or tuple(anchor.shape) != expected:
            got = None if anchor is None else tuple(anchor.shape)
            raise ValueError(
                f"A caption-anchored mapper (mapper_queries='caption') needs `caption_conditioning` of shape "
                f"{expected} (the frame's Char-LDM caption encoding), got {got}."
            )
        anchor = anchor.to(dtype)
        residual = self.out_proj(self.transformer(x, queries + self.anchor_proj(anchor)))
        return anchor + residual
