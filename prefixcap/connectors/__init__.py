"""Built-in connectors: visual tokens (B, N, D) -> decoder-width prefix (B, K, H)."""

from typing import Literal

from pydantic import Field, model_validator

from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions


class LinearOptions(ComponentOptions):
    # Token reduction before projecting: "avg" pools factor x factor patches, "pixel-shuffle" stacks them into the
    # channel dimension (keeps all information, multiplies D by factor^2). 196 tokens -> 49 with factor 2.
    pool: Literal["none", "avg", "pixel-shuffle"] = "none"
    factor: int = Field(1, ge=1, le=16)
    lr: float | None = Field(None, gt=0, description="learning rate (default: train.lr)")

    @model_validator(mode="after")
    def _factor_needs_pool(self):
        if self.factor > 1 and self.pool == "none":
            raise ValueError("factor > 1 needs pool: avg or pool: pixel-shuffle")
        return self


class MLPOptions(LinearOptions):
    # distilvit2's projection: 2048 hidden, GELU, dropout 0.1.
    hidden: int = Field(2048, ge=1, le=65536)  # bounded: a typo of extra zeros should not ask torch for petabytes
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    dropout: float = Field(0.1, ge=0, lt=1)


class QFormerOptions(ComponentOptions):
    # BLIP-2's Q-Former idea at a fraction of its size: K learned queries read the encoder tokens through
    # cross-attention, so the prefix length is K whatever N is (196 SigLIP tokens -> 32 decoder positions).
    queries: int = Field(32, ge=1, le=1024, description="prefix length K")
    layers: int = Field(2, ge=1, le=4)
    width: int = Field(256, ge=8, le=16384, description="internal width the queries and encoder tokens are projected to")
    heads: int = Field(4, ge=1, le=256)
    dropout: float = Field(0.0, ge=0, lt=1)
    lr: float | None = Field(None, gt=0, description="learning rate (default: train.lr)")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        return self


@hookimpl
def register_connectors(register):
    register("linear", factory="prefixcap.connectors.linear:LinearConnector", options=LinearOptions,
             description="One linear projection to decoder width, optional avg/pixel-shuffle token reduction")
    register("mlp", factory="prefixcap.connectors.linear:MLPConnector", options=MLPOptions,
             description="Two-layer MLP projection (distilvit2's), optional avg/pixel-shuffle token reduction")
    register("qformer-lite", factory="prefixcap.connectors.qformer:QFormerLite", options=QFormerOptions,
             description="K learned queries cross-attending to the encoder tokens (a small Q-Former); K tokens out")
