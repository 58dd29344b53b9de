"""SigLIP vision tower: every patch token (no pooling head), so the connector sees the whole image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from prefixcap.checkpoints import TINY, fetch, load_config, resolve
from prefixcap.encoders import SiglipOptions
from prefixcap.images import ImageProcessor
from prefixcap.interfaces import Encoder, vision_rollout
from prefixcap.weights import refuse_pickle_weights

# Same class as siglip-base, scaled down: 32x32 images, 8x8 patches -> 16 tokens of width 64.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8, vision_use_head=False)  # fmt: skip


class SiglipEncoder(Encoder):
    def __init__(self, options: SiglipOptions, *, pretrained: bool = True):
        super().__init__()
        self.options = options
        self.lr = options.unfreeze_lr
        checkpoint = resolve(options.checkpoint)
        config = load_config(checkpoint, SiglipVisionConfig, TINY_CONFIG)
        config.vision_use_head = False  # the pooled vector is unused; its weights would only cost memory
        if pretrained and checkpoint != TINY:
            refuse_pickle_weights(checkpoint, beside_safetensors_ok=True)  # say why, before transformers fails
            # safetensors only: transformers would otherwise unpickle a pytorch_model.bin
            self.model = fetch(lambda: SiglipVisionModel.from_pretrained(checkpoint, config=config,
                                                                         use_safetensors=True),
                               checkpoint, "SigLIP weights")  # fmt: skip
        else:
            self.model = SiglipVisionModel(config)
            self.random_init = checkpoint == TINY
        self.config = config
        tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests the tower; 5 does not
        self.freeze(tower.encoder.layers, tower.post_layernorm, options.unfreeze_last)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_tokens(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def image_processor(self) -> ImageProcessor:
        # SigLIP squashes to a square and normalises to [-1, 1].
        return ImageProcessor(self.config.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="squash")

    def token_sources(self, pixel_values: Tensor) -> Tensor:
        return vision_rollout(self.model, pixel_values)  # SigLIP has no class token: N patches in, N tokens out

    def forward(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # (B, N, D)

    @classmethod
    def write_tiny_checkpoint(cls, directory: Path, options: SiglipOptions | None = None) -> dict[str, Any]:
        """Save a tiny random SiglipModel the way google's checkpoints hold one (the whole model: vision with its
        pooling head, and text) with save_pretrained; the returned options load it through from_pretrained."""
        vision = {**TINY_CONFIG, "vision_use_head": True}
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=300)
        SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(directory)
        return {"checkpoint": str(directory)}
