"""Images in: reading one safely, then preprocessing it for an encoder.

Reading (``open_image``, ``to_rgb``): image files in, RGB PIL images out, what a viewer of the page would see, or an
ImageError saying why not. Training and captioning read every image here, with the same limits.

Preprocessing (``to_rgb_tensor``, ``ImageProcessor``): any image in, normalised (B, 3, S, S) float tensor out. Each
encoder builds an ImageProcessor from its own checkpoint's config (size, mean, std, resize mode), so the same numbers
can be written to an export manifest and replayed outside Python.

Importing this module does not import torch (only preprocessing does, when first called): `prefixcap caption --onnx`
and the ONNX captioner read their images here and must not pull torch in.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prefixcap.errors import ImageError, summary

if TYPE_CHECKING:
    import torch


# --- reading ------------------------------------------------------------------------------------------------------

# A small file can decode to gigabytes (a decompression bomb), so larger images are refused before decoding. PIL's
# own default; a module constant so that tests (or a service with less memory) can lower it.
MAX_IMAGE_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

_WIDE_GREY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})  # how PIL opens 16-bit greyscale files
_ALPHA = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_PAGE = (255, 255, 255, 255)  # the white page transparent pixels show


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """The image file at ``path`` (or an open binary stream) as RGB: its first frame, upright as its EXIF orientation
    says; see ``to_rgb``."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice that; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS:,} "
                                     "(a possible decompression bomb)", path)  # fmt: skip
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        empty = Path(path).is_file() and Path(path).stat().st_size == 0 if isinstance(path, (str, Path)) else False
        raise ImageError("empty file" if empty else "not an image in a format PIL can read", path) from None
    except OSError as e:
        if e.strerror:  # from the operating system (no such file, permission denied, ...), not from a decoder
            raise ImageError(e.strerror, path) from None
        raise ImageError(f"cannot decode image: {summary(e)}", path) from e
    except Exception as e:  # decoders of malformed files raise all sorts: ValueError, SyntaxError, struct.error, ...
        raise ImageError(f"cannot decode image: {summary(e)}", path) from e


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB (``image`` itself if it already is): 16-bit greyscale scaled to 8 bits, transparent pixels
    composited over white."""
    if image.mode in _WIDE_GREY:
        # PIL's convert clips 16-bit values at 255, turning all but the darkest pixels white, instead of scaling.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA or "transparency" in image.info:
        # Alt text describes what a viewer sees: the page behind transparent pixels, not whatever colour the file
        # keeps under alpha 0.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _PAGE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# --- preprocessing ------------------------------------------------------------------------------------------------


def to_rgb_tensor(image: Any) -> torch.Tensor:
    """PIL image, path, encoded bytes or stream, HxW/HxWxC array or CxHxW tensor -> float (3, H, W) in [0, 1]."""
    import torch

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
        import torch

        if isinstance(images, (Image.Image, np.ndarray, str, Path)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3
        ):
            images = [images]
        return torch.stack([self.one(im) for im in images])

    def one(self, image: Any) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

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
