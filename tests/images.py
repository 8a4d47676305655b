"""Small images built in code for tests, and the bad ones users send."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_image(width: int = 96, height: int = 64, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = (np.random.RandomState(seed).rand(height, width, channels) * 255).astype("uint8")
    return Image.fromarray(pixels if channels > 1 else pixels[:, :, 0], mode)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bytes(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    return encode(noise_image(width, height, seed))


def animated_gif(frames: int = 3) -> bytes:
    images = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))[:frames]]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def decompression_bomb(side: int = 20000) -> bytes:
    """A tiny PNG file whose header claims side×side pixels."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def rotated_jpeg() -> bytes:
    """A 60×20 JPEG whose EXIF says to rotate 90°: upright it is 20×60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise_image(60, 20), "JPEG", exif=exif.tobytes())
