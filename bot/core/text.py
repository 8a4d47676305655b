"""The words and numbers every front end shows: sizes, durations, plurals."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Bytes in decimal units, as downloads are measured: `335.0 MB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000


def human_seconds(seconds: float | None) -> str:
    """A time to go (`1 min 05 s`), or `–` when unknown."""
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def size_text(n: int | None) -> str:
    """A file's size, or `unknown` when nobody said."""
    return human_bytes(n) if n else "unknown"


def human_duration(seconds: float) -> str:
    """How long ago, coarsely: `5 min`, `3 h 10 min`, `4 days`."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} days"


def plural(count: int, noun: str) -> str:
    """`1 model`, `3 models`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
