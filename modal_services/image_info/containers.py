"""Metadata blocks of PNG, JPEG and WebP files, read and written without decoding a pixel.

Reading walks the file's own structure (PNG chunks, JPEG segments up to the
image data, RIFF chunks) and keeps only text chunks and EXIF, each within
`MAX_BLOCK_BYTES` (compressed PNG text is inflated no further than that); a
malformed file gives what was read before the damage. Writing adds a text
chunk to PNG bytes as they are, and builds the EXIF block A1111 writes into
JPEG and WebP files: its text as the UserComment, UTF-16 big-endian after the
`UNICODE\\0` prefix (piexif's "unicode" encoding, which A1111 and CivitAI read).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from PIL import Image

from modal_services.imaging import sniff_format

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_BLOCK_BYTES = 1024 * 1024
# Text chunks kept per file: a file of thousands of tiny chunks says nothing more.
MAX_TEXT_CHUNKS = 64
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"
ASCII_PREFIX = b"ASCII\x00\x00\x00"
# A JPEG's APP1 segment holds at most this much (its length field is 16 bits, itself included).
JPEG_SEGMENT_LIMIT = 65_533


@dataclass
class EmbeddedMetadata:
    """A file's text chunks by keyword (the first of each), and its EXIF block (TIFF bytes) if any."""

    texts: dict[str, str] = field(default_factory=dict)
    exif: bytes | None = None


def embedded_metadata(data: bytes) -> EmbeddedMetadata:
    """The metadata of a PNG, JPEG or WebP file; nothing for other formats."""
    kind = sniff_format(data)
    if kind == "PNG":
        return _png_metadata(data)
    if kind == "JPEG":
        return EmbeddedMetadata(exif=_jpeg_exif(data))
    if kind == "WEBP":
        return EmbeddedMetadata(exif=_webp_exif(data))
    return EmbeddedMetadata()


# ------------------------------------------------------------------ PNG


def _png_chunks(data: bytes):
    """(offset, type, data) of each chunk, stopping at IEND or where the file stops making sense."""
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 8 + length
        if end + 4 > len(data):
            return
        yield offset, kind, data[offset + 8 : end]
        if kind == b"IEND":
            return
        offset = end + 4


def _png_metadata(data: bytes) -> EmbeddedMetadata:
    found = EmbeddedMetadata()
    for _, kind, body in _png_chunks(data):
        if kind == b"eXIf" and found.exif is None and len(body) <= MAX_BLOCK_BYTES:
            found.exif = body
        elif kind in (b"tEXt", b"zTXt", b"iTXt") and len(found.texts) < MAX_TEXT_CHUNKS and len(body) <= MAX_BLOCK_BYTES:
            text = _png_text(kind, body)
            if text is not None:
                found.texts.setdefault(*text)
    return found


def _png_text(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk; None for one that is malformed."""
    keyword, separator, rest = body.partition(b"\x00")
    if not separator:
        return None
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        text = _inflated(rest[1:]) if rest[:1] == b"\x00" else None
        return (name, text.decode("latin-1")) if text is not None else None
    if len(rest) < 2:
        return None
    compressed, method, rest = rest[0], rest[1], rest[2:]
    _language, _, rest = rest.partition(b"\x00")
    _translated, _, text = rest.partition(b"\x00")
    if compressed:
        text = _inflated(text) if method == 0 else None
        if text is None:
            return None
    return name, text.decode("utf-8", "replace")


def _inflated(data: bytes) -> bytes | None:
    """zlib data inflated to at most MAX_BLOCK_BYTES; None when it is corrupt or inflates to more."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_BLOCK_BYTES + 1)
    except zlib.error:
        return None
    return out if len(out) <= MAX_BLOCK_BYTES else None


def with_png_text(png: bytes, keyword: str, text: str) -> bytes:
    """`png` with a `keyword` text chunk before its image data, as Pillow writes one: tEXt when the text is
    Latin-1, else uncompressed UTF-8 iTXt. The pixels and every other chunk are left as they are."""
    try:
        body = keyword.encode("latin-1") + b"\x00" + text.encode("latin-1")
        kind = b"tEXt"
    except UnicodeEncodeError:
        body = keyword.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8")
        kind = b"iTXt"
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    position = next((offset for offset, name, _ in _png_chunks(png) if name == b"IDAT"), None)
    if not png.startswith(PNG_SIGNATURE) or position is None:
        raise ValueError("not a PNG with image data")
    return png[:position] + chunk + png[position:]


# ------------------------------------------------------------------ JPEG and WebP


def _jpeg_exif(data: bytes) -> bytes | None:
    """The EXIF of a JPEG's first `Exif` APP1 segment, looked for up to the image data."""
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return None
        length = struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        segment = data[offset + 4 : offset + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            return segment[6:]
        offset += 2 + length
    return None


def _webp_exif(data: bytes) -> bytes | None:
    """The body of a WebP's EXIF chunk (some writers keep the `Exif\\0\\0` prefix; it is dropped)."""
    offset = 12
    while offset + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[offset : offset + 8])
        if kind == b"EXIF":
            body = data[offset + 8 : offset + 8 + min(length, MAX_BLOCK_BYTES)]
            return body[6:] if body.startswith(b"Exif\x00\x00") else body
        offset += 8 + length + (length & 1)
    return None


# ------------------------------------------------------------------ EXIF UserComment


def user_comment(exif: bytes) -> str | None:
    """The EXIF UserComment as text: A1111's UTF-16 (big-endian, or little-endian as some tools write it),
    ASCII, or undeclared bytes read as UTF-8; None when there is none."""
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        raw = parsed.get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # Pillow's TIFF parser on a stranger's bytes: any failure means no comment
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or not raw:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == UNICODE_PREFIX:
        return body.decode(_utf16_order(body), "replace")
    if prefix == ASCII_PREFIX:
        return body.decode("ascii", "replace")
    return (body if len(raw) > 8 and prefix.strip(b"\x00") == b"" else raw).decode("utf-8", "replace")


def _utf16_order(body: bytes) -> str:
    """UTF-16's byte order by where the zero bytes of Latin text fall (A1111 writes big-endian)."""
    even = body[0:200:2].count(0)
    odd = body[1:200:2].count(0)
    return "utf-16-le" if odd > even else "utf-16-be"


def exif_with_user_comment(text: str) -> bytes:
    """An EXIF block (with its `Exif\\0\\0` header, as Pillow's `exif=` takes it) holding `text` as A1111 does."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + text.encode("utf-16-be")
    return exif.tobytes()
