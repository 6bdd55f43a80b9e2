"""decode_image: every awkward or broken file gives an upright RGB image or a clear ImageError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from specvlm.data.images import ImageError, decode_image
from tests.badfiles import BOMB, CORPUS_NAMES, header_only_png, write_bad_image_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    directory = tmp_path_factory.mktemp("bad_images")
    return directory, write_bad_image_corpus(directory)


def _decode(corpus, name: str, **kwargs) -> Image.Image:
    directory, _ = corpus
    return decode_image((directory / name).read_bytes(), **kwargs)


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_bad_corpus_case_gives_expected_outcome(corpus, name):
    directory, outcomes = corpus
    data, expected = (directory / name).read_bytes(), outcomes[name]
    assert len(data) < 16_000, "corpus files must stay tiny"
    if expected is None:
        img = decode_image(data)
        assert img.mode == "RGB"
        assert np.asarray(img).shape == (img.height, img.width, 3)
    else:
        with pytest.raises(ImageError, match=expected):
            decode_image(data)


def test_exif_orientation_rotates_pixels_upright(corpus):
    img = _decode(corpus, "exif_rotated.jpg")
    assert img.size == (32, 48)  # stored 48x32
    pixels = np.asarray(img).astype(int)
    # Stored top half red, bottom half blue; rotated 90 degrees clockwise the top goes to the right.
    assert np.abs(pixels[24, 28] - (255, 0, 0)).max() < 10
    assert np.abs(pixels[24, 3] - (0, 0, 255)).max() < 10


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "palette_transparent.png"])
def test_transparent_pixels_become_white_not_black(corpus, name):
    img = _decode(corpus, name)
    assert img.getpixel((2, 2)) == (255, 255, 255)
    assert img.getpixel((30, 2)) == {"la.png": (128, 128, 128)}.get(name, (255, 0, 0))


def test_half_transparent_pixel_is_blended_with_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    r, g, b = decode_image(_png(rgba)).getpixel((0, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_16bit_values_are_scaled_not_clipped(corpus):
    img = _decode(corpus, "gray16.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)  # 65535
    assert img.getpixel((20, 0)) == (0, 0, 0)  # 0
    assert img.getpixel((40, 0)) == (128, 128, 128)  # 32896 = 128 * 257; clipping would give 255


def test_32bit_integer_mode_is_read_as_16bit_range():
    img = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32))
    buffer = io.BytesIO()
    img.save(buffer, "TIFF")
    assert Image.open(buffer).mode == "I"
    assert [p[0] for p in np.asarray(decode_image(buffer.getvalue()))[0]] == [0, 255, 255]


def test_cmyk_converts_to_rgb_colour(corpus):
    r, g, b = _decode(corpus, "cmyk.jpg").getpixel((8, 8))
    assert r < 10 and g > 245 and b > 245


def test_bilevel_image_keeps_black_and_white(corpus):
    img = _decode(corpus, "bilevel.png")
    assert {img.getpixel((0, 0)), img.getpixel((1, 0))} == {(0, 0, 0), (255, 255, 255)}


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp", "animated.png"])
def test_animated_image_gives_first_frame(corpus, name):
    directory, _ = corpus
    assert Image.open(directory / name).n_frames == 2
    assert _decode(corpus, name).getpixel((8, 8)) == (255, 0, 0)  # frame 2 is blue


def test_bomb_rejected_from_header_even_with_pil_limit_disabled(corpus, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match=r"100000x100000.*over compute\.max_pixels"):
        _decode(corpus, "bomb.png")


def test_max_pixels_and_min_side_are_enforced():
    data = _png(Image.new("RGB", (64, 64)))
    assert decode_image(data, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageError, match=BOMB):
        decode_image(data, max_pixels=64 * 64 - 1)
    with pytest.raises(ImageError, match="too small"):
        decode_image(data, min_side=65)


@pytest.mark.parametrize("pil_limit", [3000, 1000])  # PIL warns over its limit, raises over twice it
def test_max_pixels_is_the_one_limit_over_pils_own(pil_limit, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    image = _png(Image.new("RGB", (64, 64)))  # 4096 pixels: over PIL's limit, under max_pixels
    assert decode_image(image, max_pixels=5000).size == (64, 64)
    with pytest.raises(ImageError, match=r"over compute\.max_pixels=4000 .*raise compute\.max_pixels") as refused:
        decode_image(image, max_pixels=4000)
    assert refused.value.kind == "image_too_large"


def test_a_108_megapixel_image_passes_both_limits_when_max_pixels_allows_it(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    header = header_only_png(12_000, 9_000)
    with pytest.raises(ImageError) as default:
        decode_image(header)
    assert default.value.kind == "image_too_large" and "compute.max_pixels=40000000" in str(default.value)
    # Allowed, it gets past PIL's default limit (twice 89 Mpx) to the pixels, which this header does not have.
    with pytest.raises(ImageError, match="corrupt or truncated") as allowed:
        decode_image(header, max_pixels=200_000_000)
    assert allowed.value.kind == "image_unreadable"


def test_truncated_file_fails_and_pil_stays_strict(corpus):
    with pytest.raises(ImageError):
        _decode(corpus, "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
