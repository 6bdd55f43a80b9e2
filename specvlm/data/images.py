"""Decode untrusted image bytes into an upright, fully loaded 8-bit RGB image, or raise ImageError."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(ValueError):
    """An image that cannot be used. The message says what is wrong and what to do about it; `kind` is its class
    (specvlm.data.error_kinds)."""

    def __init__(self, message: str, kind: str = "image_unreadable"):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, min_side: int = 1) -> Image.Image:
    """Decode `data` (any format PIL reads) to an RGB image with its pixels loaded.

    Animated images give their first frame; EXIF orientation is applied; transparency is
    composited onto white; 16-bit and float images are scaled to 8 bits.
    The size limit, `max_pixels` (a job's `compute.max_pixels`), is checked from the header, before any pixel is
    decoded; it is the one limit: PIL's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is raised to
    allow it where it is lower.
    """
    if not data:
        raise ImageError("empty image data (0 bytes): the source file is empty; re-export or drop it")
    try:
        img = _open(data, max_pixels)
        _check_size(img.size, max_pixels, min_side)
        # load() decodes every pixel now, so a truncated file fails here rather than in a later stage.
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Exception as e:  # PIL's decoders signal bad data with many types: OSError, SyntaxError, struct.error, ...
        raise ImageError(
            f"corrupt or truncated image data ({type(e).__name__}: {e}); re-download or re-encode the file"
        ) from e


def _open(data: bytes, max_pixels: int) -> Image.Image:
    # Image.open reads only the header. PIL warns of an image over its limit and raises over twice it. The warning
    # is ignored, since _check_size refuses by max_pixels next; the limit is raised (process-wide, and only ever
    # upwards) so that PIL's error can never refuse an image max_pixels allows: users raise compute.max_pixels for
    # large scans and panoramas (a 108 Mpx photo is over PIL's default of twice 89 Mpx).
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise ImageError(
                f"not a recognised image (unknown format or corrupt header; starts with {data[:8]!r}); "
                "check that the file really is a jpg/png/webp/gif/bmp/tiff image"
            ) from e
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"image over compute.max_pixels={max_pixels} (possible decompression bomb; {e}); raise "
                "compute.max_pixels if images this large are expected",
                "image_too_large",
            ) from e


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    # Checked here rather than left to PIL, because PIL's limit is a process-wide global that other code
    # (often ML code) sets to None.
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over compute.max_pixels={max_pixels} "
            "(possible decompression bomb); raise compute.max_pixels if images this large are expected",
            "image_too_large",
        )
    if min(width, height) < min_side:
        raise ImageError(
            f"image is {width}x{height}, too small (min_side={min_side}); drop it or lower min_side", "image_too_small"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Pixels under full transparency often hold black or leftover colours the viewer never sees;
        # dropping alpha would show them to the model. White matches how a browser shows the image.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    # PIL's convert("L") clips these modes at 255 instead of scaling, which turns most of a 16-bit image white.
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        # Float images have no fixed white point: stretch their own range.
        low, high = float(values.min()), float(values.max())
        values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    else:
        # "I" is how PIL opens most 16-bit files (and TIFFs), so it is read as a 16-bit range.
        values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(values).astype(np.uint8))  # a 2-D uint8 array gives mode "L"
