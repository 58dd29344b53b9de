"""Built-in training losses."""

from pydantic import Field

from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions


class LossOptions(ComponentOptions):
    weight: float = Field(1.0, ge=0)


class CaptionLossOptions(LossOptions):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@hookimpl
def register_losses(register):
    register("caption-ce", factory="prefixcap.losses.caption:CaptionLoss", options=CaptionLossOptions,
             description="Next-token cross-entropy on caption tokens only (prefix and padding are never targets)")
