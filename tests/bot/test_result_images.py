"""Fitting results into the upload limit."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bot.result_images import HEADROOM, MAX_QUALITY, fit_to_limit
from modal_services.imaging import encode_png


def noisy_png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x % 256, y % 256, (x * y) % 256], -1) + rng.normal(0, 20, (height, width, 3))
    return encode_png(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)))


def test_a_png_that_fits_goes_out_unchanged():
    png = noisy_png(64, 64)
    fitted = fit_to_limit(png, len(png) + HEADROOM)
    assert fitted.data == png and fitted.filename == "upscaled.png" and fitted.note is None


def test_a_png_over_the_limit_becomes_the_best_webp_that_fits():
    png = noisy_png(256, 256)
    limit = len(png) // 3
    fitted = fit_to_limit(png, limit, stem="result")
    assert len(fitted.data) <= limit - HEADROOM
    assert fitted.filename == "result.webp" and "WebP at quality" in fitted.note
    image = Image.open(io.BytesIO(fitted.data))
    assert image.format == "WEBP" and image.size == (256, 256)
    quality = int(fitted.note.split("quality ")[1].split()[0].rstrip(".,"))
    if quality < MAX_QUALITY:
        # One step better would not have fitted: it is the best quality that does.
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="WEBP", quality=quality + 1, method=4)
        assert len(buffer.getvalue()) > limit - HEADROOM


def test_a_tiny_limit_scales_the_image_down_and_says_so():
    png = noisy_png(256, 256)
    fitted = fit_to_limit(png, HEADROOM + 3000)
    assert len(fitted.data) <= 3000
    assert "scaled down" in fitted.note
    assert Image.open(io.BytesIO(fitted.data)).width < 256
