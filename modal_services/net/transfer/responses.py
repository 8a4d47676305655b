"""What a server's answer says: its Content-Range, Content-Disposition and Retry-After, and a URL fit for messages."""

from __future__ import annotations

import email.utils
import re
import time
from urllib.parse import unquote, urlsplit


def safe_url(url: str) -> str:
    """The URL without credentials or query string (signed URLs and `?token=` stay out of messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


_FILENAME_STAR = re.compile(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", re.IGNORECASE)
_FILENAME = re.compile(r'filename\s*=\s*(?:"([^"]*)"|([^;]+))', re.IGNORECASE)


def filename_from_disposition(header: str | None) -> str | None:
    """The file name a `Content-Disposition` header offers, reduced to a safe base name."""
    if not header:
        return None
    match = _FILENAME_STAR.search(header)
    if match:
        name = unquote(match.group(2).strip().strip('"'), encoding=match.group(1) or "utf-8", errors="replace")
    else:
        match = _FILENAME.search(header)
        if not match:
            return None
        name = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
    # A server must not be able to pick a path: keep only the last component.
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name if name not in ("", ".", "..") else None


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) from `Content-Range: bytes a-b/total` or `bytes */total`."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total
