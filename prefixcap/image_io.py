"""Image files in, RGB PIL images out: what a viewer of the page would see, or an ImageError saying why not.

PIL and numpy only: the ONNX captioner reads its images here too, and must not pull torch in.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prefixcap.errors import ImageError, summary

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
