"""Decoding untrusted image bytes safely (Pillow only: the bot uses this too).

Checks, in the order that makes them cheap: non-empty, a known image format
by its magic bytes (not by the name or the claimed content type), a pixel cap
read from the header before any pixel is decoded (Pillow's decompression-bomb
guard is turned into an error), then a full decode so truncated files fail
here rather than in a worker. Animated images give their first frame and EXIF
orientation is applied. `image_size` is the header check alone, for a caller
with cheaper checks of its own to make before it decodes anything.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from modal_services.errors import ErrorCode, ToolboxError

# Formats we accept, by their leading bytes.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
ACCEPTED_FORMATS = "PNG, JPEG, WebP, GIF or BMP"

# A 24-megapixel camera's photo passes. Every use shrinks an upload far below this (a face photo to
# 1536 px, a caption's model reads about one megapixel), while decoding costs about 1.2 s and 200 MB
# per 25 MP: a larger limit would only make a small, highly compressible file a bigger load.
DEFAULT_MAX_PIXELS = 25_000_000
# Decoding is CPU-bound and its memory grows with the pixels: two at a time bound what a burst of large
# uploads takes, and keep them off the default executor the state store's file work runs on.
_DECODERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="image-decode")

T = TypeVar("T")


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, first frame, upright
    format: str
    animated: bool

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def check_pixel_count(width: int, height: int, max_pixels: int, name: str = "the image") -> None:
    if width * height > max_pixels:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"{name} is {width}×{height} ({width * height / 1e6:.1f} MP); the limit is "
            f"{max_pixels / 1e6:.0f} MP. Please send a smaller image.",
        )


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "the image") -> tuple[int, int]:
    """(width, height) from the header alone, INVALID_INPUT when the bytes are no image we take or it has more
    than `max_pixels`: no pixel is decoded, so it is cheap enough to run on the event loop."""
    with _decoding_errors(max_pixels, name):
        with _opened(data, max_pixels, name) as image:
            return image.size


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "the image") -> DecodedImage:
    """Blocking (decodes pixels): call it in a worker thread from async code (`decoded_off_loop`)."""
    with _decoding_errors(max_pixels, name):
        image = _opened(data, max_pixels, name)
        kind = sniff_format(data)
        animated = getattr(image, "is_animated", False)
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    return DecodedImage(image=_to_rgb(image), format=kind, animated=bool(animated))


async def decoded_off_loop(work: Callable[..., T], *args) -> T:
    """`work(*args)` (a decode: `decode_image`, `shrunk_png`...) in the decoders' threads, two at a time."""
    return await asyncio.get_running_loop().run_in_executor(_DECODERS, work, *args)


def _opened(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """The image opened lazily (its header read, no pixel decoded), once its format and size are acceptable."""
    if not data:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is empty (0 bytes).")
    if sniff_format(data) is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is not an image I can read ({ACCEPTED_FORMATS}).")
    image = Image.open(io.BytesIO(data))
    check_pixel_count(*image.size, max_pixels, name)
    return image


@contextmanager
def _decoding_errors(max_pixels: int, name: str) -> Iterator[None]:
    """Pillow's complaints about untrusted bytes as INVALID_INPUT naming the image (its bomb warning an error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ToolboxError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"{name} has too many pixels to open safely; the limit is {max_pixels / 1e6:.0f} MP.",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} looks corrupt or truncated: it could not be decoded.") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white rather than whatever colour hides under the alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: these PNGs are only carried to a worker, so speed beats size.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def clean_png(data: bytes, name: str = "the image", max_pixels: int = DEFAULT_MAX_PIXELS,
              max_side: int | None = None) -> bytes:
    """An uploaded image decoded (bad files refused) and re-encoded as a plain PNG, first shrunk to `max_side`
    on its long side when it is larger: never the sender's own bytes."""
    image = decode_image(data, max_pixels, name).image
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_png(image)


def shrunk_png(data: bytes, max_side: int, name: str = "the image") -> bytes:
    """An uploaded photo as `clean_png` gives it, no larger than `max_side` on its long side."""
    return clean_png(data, name, max_side=max_side)
