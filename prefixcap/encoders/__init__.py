"""Built-in vision encoders. This module is the plugin: it registers options and lazy factories, nothing heavy."""

from pydantic import Field

from prefixcap.hookspecs import hookimpl
from prefixcap.registry import CheckpointOptions


class EncoderOptions(CheckpointOptions):
    # Frozen by default: the prefix recipe trains the connector and LoRA only. Unfreezing the last blocks at a
    # lower learning rate is the usual next step when the domain is far from the encoder's pre-training.
    unfreeze_last: int = Field(0, ge=0, description="train the last N transformer blocks")
    unfreeze_lr: float | None = Field(None, gt=0, description="their learning rate (default: train.lr)")


class SiglipOptions(EncoderOptions):
    checkpoint: str = "google/siglip-base-patch16-224"


class ClipOptions(EncoderOptions):
    model: str = Field("ViT-B-32", description="an open_clip architecture name (open_clip.list_models())")
    # An open_clip pretrained tag of ``model``, "hf-hub:org/name", a local directory in that same layout
    # (open_clip_config.json + open_clip_model.safetensors), a local .safetensors file for ``model``, or "tiny".
    checkpoint: str = "openai"


class VitOptions(EncoderOptions):
    model: str = Field("vit_base_patch16_224", description="a timm model name, optionally with its .tag")
    # None: timm's default weights for ``model``; "hf-hub:org/name"; a local directory in that same layout
    # (config.json + model.safetensors); a local .safetensors file for ``model``; or "tiny".
    checkpoint: str | None = None


@hookimpl
def register_encoders(register):
    register(
        "siglip",
        factory="prefixcap.encoders.siglip:SiglipEncoder",
        options=SiglipOptions,
        description="SigLIP vision tower (transformers SiglipVisionModel), all patch tokens",
    )
    register(
        "clip",
        factory="prefixcap.encoders.clip:ClipEncoder",
        options=ClipOptions,
        description="CLIP vision tower (open_clip VisionTransformer), all patch tokens",
    )
    register(
        "vit",
        factory="prefixcap.encoders.vit:VitEncoder",
        options=VitOptions,
        description="timm Vision Transformer, all patch tokens (class/register tokens dropped)",
    )
