"""Image files a folder of web images holds: every kind of input that reading, captioning and training must
survive (used by tests/test_caption.py and tests/reliability/)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def sixteen_bit_png(path: Path) -> Path:
    Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.uint16)).save(path)  # 16-bit greyscale PNG
    return path


def palette_png(path: Path) -> Path:
    image = Image.frombytes("P", (2, 1), bytes([0, 1]))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.save(path, transparency=0)  # index 0 (black) is transparent
    return path


def rgba_png(path: Path) -> Path:
    pixels = np.array([[[0, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # red in ink
    return path


def animated_gif(path: Path) -> Path:
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    return path


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def saved_image(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def write_inputs(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files that caption, files that cannot): every kind of input this command must survive."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [
        saved_image(folder / "red.png", Image.new("RGB", (40, 40), "red")),
        saved_image(folder / "grey.png", Image.new("L", (40, 40), 90)),
        rgba_png(folder / "rgba.png"),
        palette_png(folder / "palette.png"),
        sixteen_bit_png(folder / "sixteen.png"),
        cmyk_jpeg(folder / "cmyk.jpg"),
        animated_gif(folder / "animated.gif"),
        saved_image(folder / "one-pixel.png", Image.new("RGB", (1, 1), "red")),
        saved_image(folder / "wide.png", Image.new("RGB", (10000, 10), "red")),
    ]
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image, whatever its name says\n")
    bad = [
        truncated_jpeg(folder / "truncated.jpg"),
        folder / "empty.png",
        folder / "text.png",
        saved_image(folder / "bomb.png", Image.new("RGB", (500, 500), "red")),  # over the limit the tests set
        folder / "missing.jpg",
    ]
    return good, bad


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A 68-byte PNG that claims 10 gigapixels: decoding it would take 30 GB. Only its header is real."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path
