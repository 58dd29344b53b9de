"""Images in: reading one safely, then preprocessing it for an encoder.

Reading (``open_image``, ``to_rgb``): image files in, RGB PIL images out, what a viewer of the page would see, or an
ImageError saying why not. Training and captioning read every image here, with the same limits.

Preprocessing (``to_rgb_tensor``, ``ImageProcessor``): any image in, normalised (B, 3, S, S) float tensor out. Each
encoder builds an ImageProcessor from its own checkpoint's config (size, mean, std, resize mode), so the same numbers
can be written to an export manifest and replayed outside Python; a recipe's ``image`` section may pick another resize
mode (squash, crop, letterbox) for any encoder (Encoder.preprocessing).

Importing this module does not import torch (only preprocessing does, when first called): `prefixcap caption --onnx`
and the ONNX captioner read their images here and must not pull torch in.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ContextManager, Literal, Sequence

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


def open_image(path: str | Path | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """The image file at ``path`` (or an open binary stream) as RGB: its first frame, upright as its EXIF orientation
    says; see ``to_rgb``. With ``max_pixels``, a larger image is shrunk by a whole factor to at most that many pixels
    as it is read (see ``_shrunk``). Anything but a regular file (a FIFO, a device, a directory) is refused unread."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice that; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _regular_file(path) as file, Image.open(file) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS:,} "
                                     "(a possible decompression bomb)", path)  # fmt: skip
                factor = _shrink_factor(image.size, max_pixels)
                if factor > 1:
                    image.draft(None, (width // factor, height // factor))  # a JPEG decodes at 1/2, 1/4 or 1/8 size
                image.load()
                # Shrunk before anything else copies it: the full-size pixels are then only ever held once.
                return to_rgb(ImageOps.exif_transpose(_shrunk(image, max_pixels)))
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


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs to wait on
_NOT_REGULAR = ((stat.S_ISDIR, "Is a directory"), (stat.S_ISFIFO, "a FIFO (named pipe), not a regular file"),
                (stat.S_ISCHR, "a character device, not a regular file"),
                (stat.S_ISBLK, "a block device, not a regular file"), (stat.S_ISSOCK, "a socket, not a regular file"))  # fmt: skip


def _regular_file(path: str | Path | BinaryIO) -> ContextManager[BinaryIO]:
    """``path`` opened for reading if it is a regular file, else an ImageError saying what it is (a stream is passed
    through). Reading a FIFO waits for a writer that may never come, and a device may never end."""
    if not isinstance(path, (str, Path)):
        return contextlib.nullcontext(path)
    _refuse_unless_regular(os.stat(path).st_mode, path)  # a clear reason, before anything is opened
    # Opened without waiting, and checked again: a FIFO put there since the stat must not hang us either.
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    try:
        _refuse_unless_regular(os.fstat(fd).st_mode, path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_unless_regular(mode: int, path: str | Path) -> None:
    if not stat.S_ISREG(mode):
        raise ImageError(next((why for test, why in _NOT_REGULAR if test(mode)), "not a regular file"), path)


def _shrink_factor(size: tuple[int, int], max_pixels: int | None) -> int:
    """The smallest whole factor that brings an image of ``size`` to at most ``max_pixels`` (PIL rounds up)."""
    width, height = size
    if max_pixels is None or width * height <= max_pixels:
        return 1
    factor = max(2, math.floor(math.sqrt(width * height / max_pixels)))
    while -(-width // factor) * -(-height // factor) > max_pixels:
        factor += 1
    return factor


_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F"})  # not palette indices


def _shrunk(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """``image`` box-averaged down by a whole factor to at most ``max_pixels``; a JPEG may already be smaller (draft).
    A caller that keeps many images (a batch waiting for the model) then keeps small ones."""
    factor = _shrink_factor(image.size, max_pixels)
    if factor == 1:
        return image
    if image.mode not in _REDUCIBLE:  # palette indices, 16-bit grey: averaged only once they are colours
        image = to_rgb(image)
    return image.reduce(factor)


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


_MAX_RESIZED = 4  # images resized whole to at most this many times the model's pixels; larger, the kept window alone


def _kept_window(length: int, resized: int, keep: int) -> tuple[int, int, int]:
    """For an axis of ``length`` pixels resized to ``resized``, of which the centre ``keep`` are kept: the source
    window (start, stop) that holds them with a margin for the bicubic kernel, and where the kept pixels start once
    the window is resized at the same scale. The start is picked so that it falls on (or nearest to) an output pixel
    edge: the kept pixels then match those of the whole image resized, to float rounding where it falls on one."""
    scale = resized / length
    first = (resized - keep) // 2
    margin = math.ceil(3 * max(1.0, 1 / scale))  # bicubic reads 2 pixels each side, more when it shrinks (antialias)
    latest = max(0, math.floor(first / scale) - margin)
    start = min(range(max(0, latest - 64), latest + 1), key=lambda s: (abs(s * scale - round(s * scale)), -s))
    stop = min(length, math.ceil((first + keep) / scale) + margin)
    return start, stop, round(first - start * scale)


RESIZE_MODES = ("squash", "crop", "letterbox")


@dataclass(frozen=True)
class _Plan:
    """How ``ImageProcessor.one`` makes an image of ``h`` x ``w`` pixels into its input: resized whole to ``nh`` x
    ``nw`` (or, for a very long crop, only the source ``window`` rows top:bottom, columns left:right, at the whole
    image's scale), then the ``size`` x ``size`` input taken from it at ``(top, left)`` (crop, squash) or the resized
    image pasted into the input at ``(top, left)`` (letterbox)."""

    nh: int
    nw: int
    top: int
    left: int
    window: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) of the source; None: the whole image


@dataclass(frozen=True)
class ImageProcessor:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "squash": resize straight to size x size (SigLIP); "crop": shortest edge to size, then centre crop (CLIP, ViT);
    # "letterbox": longest edge to size, aspect kept and nothing cropped, the rest of the square filled with ``fill``
    # (LLaVA's expand2square); the image is centred, and where the padding cannot split evenly the odd pixel goes to
    # the bottom (right).
    resize: Literal["squash", "crop", "letterbox"] = "squash"
    # timm's eval transform resizes to size / crop_pct, then keeps the central size x size: ViTs were trained to
    # see objects that large (0.9 cuts a 5% border off each side; 1.0 cuts no border). Letterbox ignores it: it cuts
    # nothing off.
    crop_pct: float = 1.0
    # Letterbox's padding, RGB in [0, 1]; None: ``mean``, so that the padding is exactly 0 once normalised. The padding
    # pixels are this colour exactly (never resampled). The other modes pad nothing and ignore it.
    fill: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        if self.fill is not None:
            fill = tuple(self.fill)
            if len(fill) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                                         for v in fill):  # fmt: skip
                raise ValueError(f"fill is three numbers in [0, 1] (red, green, blue), not {self.fill!r}")
            object.__setattr__(self, "fill", tuple(float(v) for v in fill))  # a list given: the same repr as a tuple

    @property
    def padding(self) -> tuple[float, float, float]:
        """Letterbox's padding colour, RGB in [0, 1]: ``fill``, or ``mean`` when it is None."""
        return self.fill if self.fill is not None else tuple(float(v) for v in self.mean)

    def _plan(self, h: int, w: int) -> _Plan:
        if self.resize == "letterbox":
            scale = self.size / max(h, w)
            nh, nw = max(1, min(self.size, round(h * scale))), max(1, min(self.size, round(w * scale)))
            return _Plan(nh, nw, (self.size - nh) // 2, (self.size - nw) // 2)  # floor: the odd pixel below, right
        scaled = math.floor(self.size / self.crop_pct)  # the edge before the centre crop (timm rounds down)
        if self.resize == "squash":
            nh = nw = scaled
        else:
            scale = scaled / min(h, w)
            nh, nw = max(scaled, round(h * scale)), max(scaled, round(w * scale))
        if nh * nw > _MAX_RESIZED * scaled * scaled:
            # A 10000x10 image would be made 224x224000 only to keep its middle 224x224: resize that middle alone, at
            # the whole image's scale (given, not recomputed from the window's size, which would shift its pixels).
            top, bottom, crop_top = _kept_window(h, nh, self.size)
            left, right, crop_left = _kept_window(w, nw, self.size)
            return _Plan(nh, nw, crop_top, crop_left, (top, bottom, left, right))
        return _Plan(nh, nw, (nh - self.size) // 2, (nw - self.size) // 2)

    def placement(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Where an image of ``width`` x ``height`` pixels lands in the input's pixel frame [0, size] x [0, size]:
        (x0, y0, x1, y1), so that the point (x, y) of the original (pixel edges, 0..width, 0..height) lands at
        ``(x0 + x * (x1 - x0) / width, y0 + y * (y1 - y0) / height)``. Squash (crop_pct 1): the whole frame; crop: a
        rectangle reaching past the frame where it was cut (x0 < 0, ...); letterbox: inside the frame, the padding
        around it. Exactly what ``one`` does, the long crops it resizes in part included."""
        plan = self._plan(height, width)
        if plan.window is None:
            if self.resize == "letterbox":
                return float(plan.left), float(plan.top), float(plan.left + plan.nw), float(plan.top + plan.nh)
            return float(-plan.left), float(-plan.top), float(plan.nw - plan.left), float(plan.nh - plan.top)
        # The window [top:bottom, left:right] is resized at the whole image's scale, so its first source edge lands
        # at 0 and the original's edge 0 at -start * scale before the crop.
        top, _, left, _ = plan.window
        sy, sx = plan.nh / height, plan.nw / width
        x0, y0 = -left * sx - plan.left, -top * sy - plan.top
        return x0, y0, x0 + width * sx, y0 + height * sy

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
        plan = self._plan(h, w)
        nh, nw = plan.nh, plan.nw
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        if plan.window is not None:
            top, bottom, left, right = plan.window
            x = F.interpolate(x[..., top:bottom, left:right], scale_factor=(nh / h, nw / w), mode="bicubic",
                              antialias=True, align_corners=False, recompute_scale_factor=False)  # fmt: skip
        else:  # resized whole, as the ONNX and browser captioners resize it, so their pixels match these
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        if self.resize == "letterbox":  # never larger than size x size: nothing to guard against
            canvas = torch.tensor(self.padding, dtype=x.dtype).view(1, 3, 1, 1).repeat(1, 1, self.size, self.size)
            canvas[..., plan.top : plan.top + nh, plan.left : plan.left + nw] = x.clamp(0, 1)
            return ((canvas - mean) / std)[0]
        x = x[..., plan.top : plan.top + self.size, plan.left : plan.left + self.size]  # (1, 3, size, size)
        return ((x.clamp(0, 1) - mean) / std)[0]
