"""A corpus of awkward and broken image files, for decoder tests now and pipeline tests later.

`write_bad_image_corpus(directory)` writes one small file per case and returns
{file name: expected outcome}: None when the file must decode to an RGB image, else a
substring of the expected ImageError message.

Pixel content that tests rely on (all images are at most 64x64):
- exif_rotated.jpg: stored 48x32, top half red, bottom half blue, EXIF orientation 6
  (display rotated 90 degrees clockwise), so upright it is 32x48 with red on the right.
- rgba.png, la.png, palette_transparent.png: left half fully transparent (black underneath),
  right half opaque red (rgba, palette) or mid grey 128 (la).
- gray16.png: columns 0-15 hold 65535, 16-31 hold 0, 32-47 hold 32896 (128 * 257).
- animated.*: first frame red, second frame blue.
- cmyk.jpg: pure cyan.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EMPTY = "empty image data"
NOT_AN_IMAGE = "not a recognised image"
CORRUPT = "corrupt or truncated"
BOMB = "decompression bomb"


def write_bad_image_corpus(directory: str | Path) -> dict[str, str | None]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases = {name: make() for name, make in _CASES.items()}
    for name, (data, _) in cases.items():
        (directory / name).write_bytes(data)
    return {name: expected for name, (_, expected) in cases.items()}


def _encode(img: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format, **params)
    return buffer.getvalue()


def _noise_rgb(size: int = 64) -> Image.Image:
    # Noise compresses badly, so the file is big enough that cutting it in half cuts pixel data.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _truncated(format: str) -> bytes:
    data = _encode(_noise_rgb(), format)
    return data[: len(data) // 2]


def _halves(mode: str, left, right, size: tuple[int, int] = (32, 32)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 8-bit grey pixels, with almost no pixel data: 69 bytes on disk;
    10 GB at 100000x100000 if a decoder believed it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + _png_chunk(b"IEND", b"")
    )


def _corrupt_header_png() -> bytes:
    data = bytearray(_encode(Image.new("RGB", (8, 8), "green"), "PNG"))
    data[16:24] = b"\xff" * 8  # width and height inside IHDR; the chunk checksum no longer matches
    return bytes(data)


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (48, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 16, 48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(img, "JPEG", quality=95, exif=exif)


def _gray16_png() -> bytes:
    values = np.zeros((16, 48), dtype=np.uint16)
    values[:, :16] = 65535
    values[:, 32:] = 32896
    return _encode(Image.fromarray(values), "PNG")


def _palette_transparent_png() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black, index 1 red
    img.paste(1, (16, 0, 32, 32))
    return _encode(img, "PNG", transparency=0)


def _animated(format: str, **params) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return _encode(frames[0], format, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)


def _bilevel_png() -> bytes:
    checker = (np.indices((16, 16)).sum(axis=0) % 2).astype(bool)
    return _encode(Image.fromarray(checker), "PNG")


_CASES = {
    "zero_bytes.jpg": lambda: (b"", EMPTY),
    "random_bytes.jpg": lambda: (random.Random(0).randbytes(512), NOT_AN_IMAGE),
    "text_file.jpg": lambda: (b"this is a caption, not an image\n", NOT_AN_IMAGE),
    "truncated.jpg": lambda: (_truncated("JPEG"), CORRUPT),
    "truncated.png": lambda: (_truncated("PNG"), CORRUPT),
    "corrupt_header.png": lambda: (_corrupt_header_png(), NOT_AN_IMAGE),
    "bomb.png": lambda: (header_only_png(100_000, 100_000), BOMB),
    "rgb.bmp": lambda: (_encode(_noise_rgb(16), "BMP"), None),
    "rgb.tiff": lambda: (_encode(_noise_rgb(16), "TIFF"), None),
    "rgb.webp": lambda: (_encode(_noise_rgb(16), "WEBP"), None),
    "grayscale.png": lambda: (_encode(Image.new("L", (16, 16), 100), "PNG"), None),
    "la.png": lambda: (_encode(_halves("LA", (0, 0), (128, 255)), "PNG"), None),
    "rgba.png": lambda: (_encode(_halves("RGBA", (0, 0, 0, 0), (255, 0, 0, 255)), "PNG"), None),
    "cmyk.jpg": lambda: (_encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95), None),
    "gray16.png": lambda: (_gray16_png(), None),
    "palette_transparent.png": lambda: (_palette_transparent_png(), None),
    "bilevel.png": lambda: (_bilevel_png(), None),
    "exif_rotated.jpg": lambda: (_exif_rotated_jpeg(), None),
    "animated.gif": lambda: (_animated("GIF"), None),
    "animated.webp": lambda: (_animated("WEBP", lossless=True), None),
    "animated.png": lambda: (_animated("PNG"), None),
}

CORPUS_NAMES = tuple(sorted(_CASES))
