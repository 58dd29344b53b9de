"""Image preprocessing shared by every encoder: any image in, normalised (B, 3, S, S) float tensor out.

Each encoder builds an ImageProcessor from its own checkpoint's config (size, mean, std, resize mode), so the same
numbers can be written to an export manifest and replayed outside Python.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prefixcap.errors import ImageError
from prefixcap.image_io import open_image, to_rgb


def to_rgb_tensor(image: Any) -> torch.Tensor:
    """PIL image, path, encoded bytes or stream, HxW/HxWxC array or CxHxW tensor -> float (3, H, W) in [0, 1]."""
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    if isinstance(image, (str, Path)) or hasattr(image, "read"):
        image = open_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ImageError(f"expected an HxW or HxWxC array, got shape {image.shape}")
        scale = 65535.0 if array.dtype == np.uint16 else 255.0 if array.dtype.kind in "ui" else 1.0
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1) / scale
    elif isinstance(image, torch.Tensor):
        tensor = image.float() if image.is_floating_point() else image.float() / 255.0
        if tensor.ndim == 2:
            tensor = tensor[None]
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}")
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:  # drop alpha
        tensor = tensor[:3]
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ImageError(f"expected 1, 3 or 4 channels, got shape {tuple(tensor.shape)}")
    return tensor.clamp(0, 1)


@dataclass(frozen=True)
class ImageProcessor:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "squash": resize straight to size x size (SigLIP); "crop": shortest edge to size, then centre crop (CLIP, ViT)
    resize: Literal["squash", "crop"] = "squash"
    # timm's eval transform resizes to size / crop_pct, then keeps the central size x size: ViTs were trained to
    # see objects that large (0.9 cuts a 5% border off each side; 1.0 cuts no border).
    crop_pct: float = 1.0

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if isinstance(images, (Image.Image, np.ndarray, str, Path)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3
        ):
            images = [images]
        return torch.stack([self.one(im) for im in images])

    def one(self, image: Any) -> torch.Tensor:
        x = to_rgb_tensor(image)[None]  # (1, 3, H, W)
        h, w = x.shape[-2:]
        scaled = math.floor(self.size / self.crop_pct)  # the edge before the centre crop (timm rounds down)
        if self.resize == "squash":
            nh = nw = scaled
        else:
            scale = scaled / min(h, w)
            nh, nw = max(scaled, round(h * scale)), max(scaled, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]  # (1, 3, size, size)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x.clamp(0, 1) - mean) / std)[0]
