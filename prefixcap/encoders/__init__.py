"""Built-in vision encoders. This module is the plugin: it registers options and lazy factories, nothing heavy."""

from pydantic import Field

from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions


class EncoderOptions(ComponentOptions):
    # Frozen by default: the prefix recipe trains the connector and LoRA only. Unfreezing the last blocks at a
    # lower learning rate is the usual next step when the domain is far from the encoder's pre-training.
    unfreeze_last: int = Field(0, ge=0, description="train the last N transformer blocks")
    unfreeze_lr: float | None = Field(None, gt=0, description="their learning rate (default: train.lr)")


class SiglipOptions(EncoderOptions):
    checkpoint: str = "google/siglip-base-patch16-224"


@hookimpl
def register_encoders(register):
    register(
        "siglip",
        factory="prefixcap.encoders.siglip:SiglipEncoder",
        options=SiglipOptions,
        description="SigLIP vision tower (transformers SiglipVisionModel), all patch tokens",
    )
