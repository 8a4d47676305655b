"""Fitting a result image into the guild's upload limit (Pillow only; blocking: call it in a thread).

PNG when it fits (lossless, what the worker made). Otherwise the best quality
that fits: WebP first (smaller than JPEG at the same quality), searching its
quality, then JPEG; only if even low-quality JPEG is too big is the image
made smaller. The note says what was done, for the line under the result.

The PNG's generation data (its `parameters` text) goes along as EXIF, as
A1111 writes it into JPEG and WebP, so CivitAI and Image info still read it; a
JPEG's EXIF holds at most 64 KB, and the note says when the data was left out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from modal_services.image_info.containers import JPEG_SEGMENT_LIMIT, embedded_metadata, exif_with_user_comment
from modal_services.image_info.reading import PARAMETERS_KEY

# Below this the artefacts are worse than a smaller image.
MIN_QUALITY = 60
MAX_QUALITY = 95
# Room for the multipart framing of the upload.
HEADROOM = 16 * 1024


@dataclass
class FittedImage:
    data: bytes
    filename: str
    note: str | None  # None when the original PNG went out as it was


def _encode(image: Image.Image, fmt: str, quality: int, exif: bytes) -> bytes:
    buffer = io.BytesIO()
    if fmt == "WEBP":
        image.save(buffer, format="WEBP", quality=quality, method=4, exif=exif)
    else:
        image.save(buffer, format="JPEG", quality=quality, optimize=True, subsampling=0 if quality >= 90 else 2, exif=exif)
    return buffer.getvalue()


def _best_quality(image: Image.Image, fmt: str, limit: int, exif: bytes) -> tuple[int, bytes] | None:
    """The highest quality in [MIN_QUALITY, MAX_QUALITY] whose encoding fits, by bisection."""
    low, high, best = MIN_QUALITY, MAX_QUALITY, None
    while low <= high:
        quality = (low + high) // 2
        data = _encode(image, fmt, quality, exif)
        if len(data) <= limit:
            best, low = (quality, data), quality + 1
        else:
            high = quality - 1
    return best


def fit_to_limit(png: bytes, limit: int, stem: str = "upscaled") -> FittedImage:
    """`png` as is if it fits in `limit` bytes, else the best WebP/JPEG (or a smaller image) that does."""
    budget = limit - HEADROOM
    if len(png) <= budget:
        return FittedImage(png, f"{stem}.png", None)
    image = Image.open(io.BytesIO(png))
    image.load()
    image = image.convert("RGB")
    original_size = image.size
    exif = _generation_exif(png)
    while True:
        for fmt, extension in (("WEBP", "webp"), ("JPEG", "jpg")):
            kept = exif if fmt == "WEBP" or len(exif) <= JPEG_SEGMENT_LIMIT else b""
            found = _best_quality(image, fmt, budget, kept)
            if found is not None:
                quality, data = found
                note = (
                    f"The PNG ({len(png) / 2**20:.1f} MiB) is over this server's {limit / 2**20:.0f} MiB upload limit: "
                    f"sent as {fmt.replace('WEBP', 'WebP')} at quality {quality}"
                )
                if image.size != original_size:
                    note += f", scaled down to {image.width}×{image.height}"
                if exif and not kept:
                    note += "; its generation data is too long for a JPEG and was left out"
                return FittedImage(data, f"{stem}.{extension}", note + ".")
        # Even JPEG at the lowest quality is too big: shrink by a quarter per side and try again.
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)), Image.Resampling.LANCZOS)


def _generation_exif(png: bytes) -> bytes:
    """The PNG's generation data as the EXIF block A1111 writes into JPEG and WebP; empty if it has none."""
    text = embedded_metadata(png).texts.get(PARAMETERS_KEY)
    return exif_with_user_comment(text) if text else b""
