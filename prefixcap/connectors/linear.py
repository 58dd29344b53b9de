"""Linear and MLP connectors, with optional token reduction on the square patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefixcap.connectors import LinearOptions, MLPOptions
from prefixcap.errors import CompositionError
from prefixcap.interfaces import Connector


class TokenReducer(nn.Module):
    """(B, N, D) -> (B, N / f^2, D') on a sqrt(N) x sqrt(N) grid; D' = D (avg) or D * f^2 (pixel-shuffle)."""

    def __init__(self, mode: str, factor: int, in_tokens: int, in_dim: int):
        super().__init__()
        self.mode, self.factor = mode, factor
        side = math.isqrt(in_tokens)
        if mode != "none" and (side * side != in_tokens or side % factor):
            raise CompositionError(
                f"pool={mode} factor={factor} needs a square token grid divisible by {factor}; "
                f"the encoder gives {in_tokens} tokens"
            )
        self.side = side
        self.out_tokens = in_tokens if mode == "none" else (side // factor) ** 2
        self.out_dim = in_dim * factor * factor if mode == "pixel-shuffle" else in_dim

    def source_weights(self) -> Tensor:
        """(out_tokens, in_tokens): 1/f^2 from each output token to each of the f x f patches it pools or stacks."""
        n = self.side * self.side if self.mode != "none" else self.out_tokens
        if self.mode == "none":
            return torch.eye(n)
        rows = torch.arange(n) // self.side // self.factor  # each input token's output row and column
        cols = torch.arange(n) % self.side // self.factor
        owner = rows * (self.side // self.factor) + cols  # (N,) the output token each patch goes to
        return (owner[None] == torch.arange(self.out_tokens)[:, None]).float() / self.factor**2

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        b, n, d = x.shape
        f, s = self.factor, self.side
        if self.mode == "avg":
            grid = x.transpose(1, 2).reshape(b, d, s, s)
            return F.avg_pool2d(grid, f).flatten(2).transpose(1, 2)
        # pixel-shuffle: each f x f block of patches becomes one token with f*f*D channels
        x = x.reshape(b, s // f, f, s // f, f, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (s // f) ** 2, f * f * d)


class LinearConnector(Connector):
    def __init__(self, options: LinearOptions, *, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__(in_dim, out_dim)
        self.lr = options.lr
        self.reduce = TokenReducer(options.pool, options.factor, in_tokens, in_dim)
        self._in_tokens = in_tokens
        self.proj = self._projection(options, self.reduce.out_dim, out_dim)

    def _projection(self, options: LinearOptions, d: int, h: int) -> nn.Module:
        return nn.Linear(d, h)

    def output_tokens(self, in_tokens: int) -> int:
        if in_tokens != self._in_tokens:
            raise CompositionError(f"this connector was built for {self._in_tokens} tokens, not {in_tokens}")
        return self.reduce.out_tokens

    def source_weights(self, tokens: Tensor) -> Tensor:
        weights = self.reduce.source_weights().to(tokens.device)  # the same for every image
        return weights.expand(tokens.shape[0], -1, -1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.reduce(tokens))  # (B, N, D) -> (B, K, D') -> (B, K, H)


class MLPConnector(LinearConnector):
    def _projection(self, options: MLPOptions, d: int, h: int) -> nn.Module:
        act = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}[options.activation]
        return nn.Sequential(nn.Linear(d, options.hidden), act(), nn.Dropout(options.dropout),
                             nn.Linear(options.hidden, h))  # fmt: skip
