"""Built-in vision encoders. This module is the plugin: it registers options and lazy factories, nothing heavy."""

from pathlib import Path

from pydantic import Field

from prefixcap.errors import CompositionError
from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions

# Weights files in pickle formats: loading one runs whatever code it names (torch's weights_only unpickler refuses
# most of it, as an UnpicklingError, but prefixcap reads no pickle at all from a checkpoint).
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")


def refuse_pickle_weights(checkpoint: str | None, *, beside_safetensors_ok: bool = False) -> None:
    """Weights are read from safetensors files only. A local weights file must be .safetensors; a local directory
    must hold no pickle weights its loader could read: timm and open_clip may prefer a .bin over a .safetensors beside
    it, while transformers told ``use_safetensors=True`` reads none (``beside_safetensors_ok``: refuse only a
    directory with no safetensors weights, to say why it fails). Hub ids and "tiny" pass."""
    if not checkpoint:
        return
    path = Path(checkpoint)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CompositionError(f"{checkpoint}: prefixcap reads weights from .safetensors files only (a "
                                   f"pickle-based file can run code when loaded); convert it with "
                                   f"safetensors.torch.save_file")
        return
    if not path.is_dir():
        return
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    pickled = [f for f in files if f.lower().endswith(PICKLE_WEIGHTS)]
    if not pickled or (beside_safetensors_ok and any(f.endswith((".safetensors", ".safetensors.index.json"))
                                                     for f in files)):  # fmt: skip
        return
    raise CompositionError(f"{checkpoint}: holds pickle-based weights ({', '.join(pickled[:5])}); prefixcap reads "
                           f"weights from .safetensors files only (pickle can run code when loaded): convert them "
                           f"(safetensors.torch.save_file) or remove them")


class EncoderOptions(ComponentOptions):
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
