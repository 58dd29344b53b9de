"""Built-in training losses."""

from pydantic import Field

from prefixcap.checkpoints import Need
from prefixcap.encoders import open_clip_needs
from prefixcap.hookspecs import hookimpl
from prefixcap.registry import CheckpointOptions, ComponentOptions


class LossOptions(ComponentOptions):
    weight: float = Field(1.0, ge=0)


class CaptionLossOptions(LossOptions):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class ClipAlignOptions(LossOptions, CheckpointOptions):
    # An auxiliary loss: a small weight keeps it from pulling against the caption cross-entropy.
    weight: float = Field(0.1, ge=0)
    model: str = Field("ViT-B-32", description="open_clip architecture of the text tower")
    # As the clip encoder's checkpoint: an open_clip pretrained tag of ``model``, "hf-hub:org/name", a local
    # directory in that layout, a local weights file for ``model``, or "tiny".
    checkpoint: str = "openai"
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature (CLIP's initial value)")
    lr: float | None = Field(None, gt=0, description="learning rate of the projection head (default: train.lr)")

    def needs(self) -> list[Need]:
        return open_clip_needs(self.model, self.checkpoint)  # read by the clip encoder's open_clip loader


class ItcOptions(LossOptions):
    # Beside caption-ce, not instead of it: at 0.5 the captions stay as good (tests/losses/test_itc.py trains both).
    weight: float = Field(0.5, ge=0)
    dim: int = Field(128, ge=1, le=4096, description="width E of the shared image-text space")
    temperature: float = Field(0.07, gt=0, le=1, description="InfoNCE temperature at the start (it is learnt)")
    lr: float | None = Field(None, gt=0, description="learning rate of the pool and heads (default: train.lr)")


@hookimpl
def register_losses(register):
    register("caption-ce", factory="prefixcap.losses.caption:CaptionLoss", options=CaptionLossOptions,
             description="Next-token cross-entropy on caption tokens only (prefix and padding are never targets)")
    register("clip-align", factory="prefixcap.losses.clip_align:ClipAlignLoss", options=ClipAlignOptions,
             description="InfoNCE between the pooled decoder state and the frozen CLIP text embedding of the caption")
    register("itc", factory="prefixcap.losses.itc:ItcLoss", options=ItcOptions,
             description="Image-text contrastive: a shared space of pooled visual tokens and text-alone decoder states, "
                         "for `prefixcap score`, reranking and retrieval")
