"""A small Q-Former (BLIP-2's idea, a few layers wide): K learned queries read the encoder tokens by cross-attention.

Unlike the linear/MLP connectors, the prefix length K is a choice, not a function of the encoder's grid: the decoder
sees K positions whatever N is, so a 729-token encoder costs the decoder no more than a 49-token one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefixcap.connectors import QFormerOptions
from prefixcap.interfaces import Connector


class QFormerLayer(nn.Module):
    """Pre-norm: self-attention among the queries, cross-attention to the encoder tokens, MLP; each residual."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))  # fmt: skip
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, tokens: Tensor, weights: list[Tensor] | None = None) -> Tensor:
        """(B, K, W), (B, N, W) -> (B, K, W); appends the cross-attention weights (B, K, N), heads averaged, to
        ``weights`` when given (it costs the fused kernel, so only `prefixcap explain` asks)."""
        x = self.self_norm(queries)
        queries = queries + self.dropout(self.self_attn(x, x, x, need_weights=False)[0])
        x = self.cross_norm(queries)
        read, attn = self.cross_attn(x, tokens, tokens, need_weights=weights is not None)
        if weights is not None:
            weights.append(attn)
        queries = queries + self.dropout(read)
        return queries + self.dropout(self.mlp(self.mlp_norm(queries)))


class QFormerLite(Connector):
    def __init__(self, options: QFormerOptions, *, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__(in_dim, out_dim)
        self.lr = options.lr
        width = options.width
        # BLIP-2 initialises its queries with std 0.02: small enough that the first layers' attention starts
        # close to uniform over the encoder tokens, so early training sees an average of the whole image.
        self.queries = nn.Parameter(torch.randn(options.queries, width) * 0.02)  # (K, W)
        self.proj_in = nn.Linear(in_dim, width)
        # Normalised once, not per layer: the tokens are keys/values only and never change between layers.
        self.norm_in = nn.LayerNorm(width)
        self.layers = nn.ModuleList(QFormerLayer(width, options.heads, options.dropout) for _ in range(options.layers))
        self.norm_out = nn.LayerNorm(width)  # pre-norm layers leave the residual stream unnormalised
        self.proj_out = nn.Linear(width, out_dim)

    def output_tokens(self, in_tokens: int) -> int:
        return self.queries.shape[0]  # cross-attention takes any N

    def forward(self, tokens: Tensor, weights: list[Tensor] | None = None) -> Tensor:
        tokens = self.norm_in(self.proj_in(tokens))  # (B, N, D) -> (B, N, W)
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # (K, W) -> (B, K, W)
        for layer in self.layers:
            queries = layer(queries, tokens, weights)
        return self.proj_out(self.norm_out(queries))  # (B, K, W) -> (B, K, H)

    def source_weights(self, tokens: Tensor) -> Tensor:
        """Each query's cross-attention over the encoder tokens, averaged over heads and layers: (B, K, N)."""
        weights: list[Tensor] = []
        self(tokens, weights)
        return torch.stack(weights).mean(0)
