"""Decoding untrusted image bytes safely (Pillow only: the bot uses this too).

Checks, in the order that makes them cheap: non-empty, a known image format
by its magic bytes (not by the name or the claimed content type), a pixel cap
read from the header before any pixel is decoded (Pillow's decompression-bomb
guard is turned into an error), then a full decode so truncated files fail
here rather than in a worker. Animated images give their first frame and EXIF
orientation is applied.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

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

DEFAULT_MAX_PIXELS = 40_000_000


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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "the image") -> DecodedImage:
    """Blocking (decodes pixels): call it in a worker thread from async code."""
    if not data:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is empty (0 bytes).")
    kind = sniff_format(data)
    if kind is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} is not an image I can read ({ACCEPTED_FORMATS}).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixel_count(*image.size, max_pixels, name)
            animated = getattr(image, "is_animated", False)
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ToolboxError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ToolboxError(
            ErrorCode.INVALID_INPUT,
            f"{name} has too many pixels to open safely; the limit is {max_pixels / 1e6:.0f} MP.",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{name} looks corrupt or truncated: it could not be decoded.") from None
    return DecodedImage(image=_to_rgb(image), format=kind, animated=bool(animated))


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


def shrunk_png(data: bytes, max_side: int, name: str = "the image") -> bytes:
    """An uploaded photo decoded (bad files refused), no larger than `max_side` on its long side, as a PNG."""
    image = decode_image(data, name=name).image
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_png(image)
