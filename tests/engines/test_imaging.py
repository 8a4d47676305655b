"""Decoding untrusted images: every bad input is a clear INVALID_INPUT."""

from __future__ import annotations

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image, sniff_format
from tests.images import animated_gif, decompression_bomb, encode, noise_image, png_bytes, rotated_jpeg


def rejected(data: bytes, **kwargs) -> str:
    with pytest.raises(ToolboxError) as caught:
        decode_image(data, **kwargs)
    assert caught.value.code is ErrorCode.INVALID_INPUT
    return caught.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_accepted_formats(fmt):
    decoded = decode_image(encode(noise_image(50, 40), fmt))
    assert decoded.format == fmt and decoded.size == (50, 40) and decoded.image.mode == "RGB"


def test_empty_file():
    assert "empty" in rejected(b"")


def test_not_an_image():
    assert "not an image" in rejected(b"%PDF-1.7 this is a document")
    assert "not an image" in rejected(b"<svg xmlns='http://www.w3.org/2000/svg'/>")


def test_corrupt_bytes():
    data = png_bytes()
    assert "corrupt" in rejected(data[: len(data) // 2])
    assert "corrupt" in rejected(data[:8] + b"\x00" * 200)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = decompression_bomb()
    assert len(bomb) < 100_000
    message = rejected(bomb)
    assert "too many pixels" in message and "limit" in message


def test_pixel_cap_is_configurable():
    assert "limit" in rejected(png_bytes(100, 100), max_pixels=5000)
    assert decode_image(png_bytes(100, 100), max_pixels=10_000).size == (100, 100)


def test_animated_gif_gives_its_first_frame():
    decoded = decode_image(animated_gif())
    assert decoded.animated
    assert decoded.image.getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    assert decode_image(rotated_jpeg()).size == (20, 60)


def test_transparency_becomes_white():
    image = noise_image(10, 10, mode="RGBA")
    image.putalpha(0)
    decoded = decode_image(encode(image))
    assert decoded.image.getpixel((3, 3)) == (255, 255, 255)


def test_sniffing_ignores_the_name():
    assert sniff_format(encode(noise_image(), "WEBP")) == "WEBP"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
