"""Built-in systems: how an encoder, connector and decoder become one captioner."""

from pydantic import Field

from prefixcap.checkpoints import Need, checkpoint_needs
from prefixcap.decoders import TinySizes
from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions


class PrefixOptions(ComponentOptions):
    pass


class CrossAttnOptions(ComponentOptions):
    # The system owns both models, so they are named here rather than in encoder/decoder sections.
    # A transformers vision model (ViT, SigLIP, ...: hub id or local directory), or "tiny" for a small random ViT.
    encoder: str = "google/vit-base-patch16-224-in21k"
    # A causal LM whose blocks can take cross-attention (the GPT-2 family), or "tiny" for a small random GPT-2.
    decoder: str = "distilbert/distilgpt2"
    # Sizes of the random GPT-2 that `decoder: tiny` builds (None: width 64, 2 layers, 2 heads). GPT-2 has no
    # grouped-query attention, so num_key_value_heads is not used.
    decoder_tiny: TinySizes | None = None
    # Frozen, as the prefix system's encoders are: comparing the two then compares how the image reaches the
    # decoder (cross-attention vs a prefix), not how much of the encoder each one fine-tunes.
    freeze_encoder: bool = True
    lr: float | None = Field(None, gt=0, description="learning rate of what it trains (default: train.lr)")

    def needs(self) -> list[Need]:
        # Both load through transformers' from_pretrained (systems/crossattn.py), as a `checkpoint` option does.
        return checkpoint_needs(self.encoder, "encoder") + checkpoint_needs(self.decoder, "decoder")


@hookimpl
def register_systems(register):
    register("prefix", factory="prefixcap.systems.prefix:PrefixSystem", options=PrefixOptions,
             description="Frozen encoder -> trained connector -> visual tokens as a prefix of a LoRA decoder")
    register("crossattn", factory="prefixcap.systems.crossattn:CrossAttnSystem", options=CrossAttnOptions,
             description="Legacy baseline (distilvit): a GPT-2 cross-attends to ViT tokens (VisionEncoderDecoderModel)")
