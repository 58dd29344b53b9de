"""Built-in vision encoders. This module is the plugin: it registers options and lazy factories, nothing heavy."""

from pathlib import Path

from pydantic import Field

from prefixcap.checkpoints import TINY, Need, hub_id
from prefixcap.hookspecs import hookimpl
from prefixcap.registry import CheckpointOptions

HF_HUB = "hf-hub:"


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

    def needs(self) -> list[Need]:
        return open_clip_needs(self.model, self.checkpoint)


class VitOptions(EncoderOptions):
    model: str = Field("vit_base_patch16_224", description="a timm model name, optionally with its .tag")
    # None: timm's default weights for ``model``; "hf-hub:org/name"; a local directory in that same layout
    # (config.json + model.safetensors); a local .safetensors file for ``model``; or "tiny".
    checkpoint: str | None = None

    def needs(self) -> list[Need]:
        return timm_needs(self.model, self.checkpoint)


# What open_clip and timm read, as prefixcap.encoders.clip.load_open_clip and encoders.vit.load_timm_vit ask them:
# safetensors only (the pickled .bin beside them is never what prefixcap wants read).
OPEN_CLIP_REPO = (("open_clip_config.json",), ("open_clip_model.safetensors",))
TIMM_REPO = (("config.json",), ("model.safetensors",))


def safe_weights_name(filename: str) -> str:
    """The safetensors file open_clip and timm try before a pickled ``filename`` in a hub repository."""
    known = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    return known.get(filename, filename.removesuffix(".bin") + ".safetensors")


def open_clip_needs(model: str, checkpoint: str, option: str = "checkpoint") -> list[Need]:
    """What open_clip reads for ``model`` and ``checkpoint`` (a pretrained tag, hf-hub:id, local path or tiny)."""
    if checkpoint == TINY:
        return [Need("nothing", checkpoint, option, note="a small random model: nothing to load")]
    if checkpoint.startswith(HF_HUB):
        repo = checkpoint[len(HF_HUB):]
        return [Need("hub-model", repo, option, files=OPEN_CLIP_REPO, download=tuple(f for f, in OPEN_CLIP_REPO))]
    if Path(checkpoint).exists() or not hub_id(checkpoint) or "/" in checkpoint:
        return [Need("path", checkpoint, option)]
    import open_clip  # a pretrained tag: the tag's own config says where its weights live

    tag = open_clip.get_pretrained_cfg(model, checkpoint)
    if tag.get("hf_hub"):
        repo, filename = tag["hf_hub"].rstrip("/"), "open_clip_pytorch_model.bin"
        if tag["hf_hub"].count("/") > 1 and not tag["hf_hub"].endswith("/"):
            repo, filename = tag["hf_hub"].rsplit("/", 1)
        safe = safe_weights_name(filename)
        return [Need("hub-model", repo, option, files=((safe,),), download=(safe,))]
    where = f"from {tag['url']}" if tag.get("url") else f"(not a pretrained tag of {model!r})"
    return [Need("unchecked", checkpoint, option, note=f"open_clip fetches {model} weights {where} itself")]


def timm_needs(model: str, checkpoint: str | None, option: str = "checkpoint") -> list[Need]:
    """What timm reads for ``model`` and ``checkpoint`` (None: timm's default weights for the name)."""
    if checkpoint == TINY:
        return [Need("nothing", checkpoint, option, note="a small random model: nothing to load")]
    if checkpoint is not None and checkpoint.startswith(HF_HUB):
        repo = checkpoint[len(HF_HUB):]
        return [Need("hub-model", repo, option, files=TIMM_REPO, download=tuple(f for f, in TIMM_REPO))]
    if checkpoint is not None:
        return [Need("path", checkpoint, option)]
    import timm  # timm's default weights for the name: its pretrained config says which hub repository holds them

    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except (RuntimeError, ValueError):
        cfg = None
    if cfg is not None and cfg.hf_hub_id:
        safe = safe_weights_name(cfg.hf_hub_filename or "pytorch_model.bin")
        return [Need("hub-model", cfg.hf_hub_id, option, files=((safe,),), download=(safe,))]
    where = f"from {cfg.url}" if cfg is not None and cfg.url else "(no pretrained weights known to timm)"
    return [Need("unchecked", model, "model", note=f"timm fetches {model} weights {where} itself")]


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
