"""Vision Transformer from timm: every patch token after the final norm; class and register tokens dropped."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from prefixcap.checkpoints import TINY
from prefixcap.encoders import VitOptions
from prefixcap.errors import CompositionError, summary
from prefixcap.images import ImageProcessor
from prefixcap.interfaces import Encoder
from prefixcap.weights import refuse_pickle_weights

HF_HUB = "hf-hub:"
# Same class as the named model, scaled down: 32x32 images, 8x8 patches -> 16 tokens of width 64.
TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def load_timm_vit(model: str, checkpoint: str | None, *, pretrained: bool) -> nn.Module:
    """The timm model that ``checkpoint`` names (see VitOptions), without its classifier.

    ``pretrained=False`` builds the architecture only, on the current default device (meta under
    `prefixcap validate`): nothing is downloaded but, for an hf-hub id, its config.json.
    """
    kwargs: dict[str, Any] = dict(num_classes=0)  # no classifier; timm drops it from pretrained weights
    if checkpoint != TINY:
        refuse_pickle_weights(checkpoint)  # timm would read a pytorch_model.bin (even beside a .safetensors)
    if checkpoint == TINY:
        name, pretrained = model, False
        kwargs.update(TINY_ARGS)
    elif checkpoint is None:
        name = model  # timm's default weights for the name (or for its ".tag")
    elif checkpoint.startswith(HF_HUB):
        name = checkpoint  # config.json + weights from the hub; ``model`` plays no part
    elif Path(checkpoint).is_dir():
        name = f"local-dir:{checkpoint}"  # the same layout, copied locally
    elif Path(checkpoint).is_file():
        name = model
        kwargs["pretrained_cfg_overlay"] = dict(file=checkpoint)
    else:
        raise ValueError(f"checkpoint {checkpoint!r} is not {TINY!r}, an {HF_HUB} id, or a local directory or "
                         f"weights file (for one of timm's pretrained tags, name it in model: 'name.tag')")  # fmt: skip
    if name == model and not timm.is_model(model.split(".")[0]):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model {model!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as e:  # failed downloads, missing or mismatched weights
        first = summary(e)
        what = repr(checkpoint) if name != model else f"{model!r} from checkpoint {checkpoint!r}"
        raise CompositionError(
            f"cannot load timm {what} (offline? use a local directory or weights file, or `checkpoint: tiny`"
            f" for a small random model): {first}"
        ) from e


class VitEncoder(Encoder):
    def __init__(self, options: VitOptions, *, pretrained: bool = True):
        super().__init__()
        self.options = options
        self.lr = options.unfreeze_lr
        self.model = load_timm_vit(options.model, options.checkpoint, pretrained=pretrained)
        self.random_init = options.checkpoint == TINY  # random weights cannot be fetched again: save them
        if not all(hasattr(self.model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "norm")):
            raise ValueError(f"{options.model!r} is a timm {type(self.model).__name__}, not a Vision Transformer")
        self.freeze(self.model.blocks, self.model.norm, options.unfreeze_last)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.model.patch_embed.num_patches

    @property
    def image_processor(self) -> ImageProcessor:
        # The checkpoint's eval transform (mean, std, crop_pct, crop mode), at the size the model was built for:
        # the pretrained config still says 224 for a "tiny" model. Interpolation is bicubic, as for timm's ViTs.
        cfg = resolve_model_data_config(self.model)
        height, width = self.model.patch_embed.img_size
        resize = {"center": "crop", "squash": "squash"}.get(cfg.get("crop_mode", "center"))
        if resize is None or height != width:
            raise ValueError(f"unsupported timm preprocessing for a square image processor: {cfg}")
        return ImageProcessor(height, tuple(cfg["mean"]), tuple(cfg["std"]), resize=resize, crop_pct=cfg["crop_pct"])

    def forward(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        tokens = self.model.forward_features(pixel_values.to(dtype))  # (B, P + N, D), after the final norm
        return tokens[:, self.model.num_prefix_tokens :]  # (B, N, D): class and register tokens dropped

    @classmethod
    def write_tiny_checkpoint(cls, directory: Path, options: VitOptions | None = None) -> dict[str, Any]:
        """Save a tiny random ViT of ``options.model``'s class as timm's hub repositories hold one (config.json
        with the model arguments + model.safetensors); the returned options load it from there."""
        tiny = timm.create_model((options or VitOptions()).model, **TINY_ARGS)  # classifier kept, like timm's own
        timm.models.save_for_hf(tiny, str(directory), safe_serialization=True)
        return {"checkpoint": str(directory)}
