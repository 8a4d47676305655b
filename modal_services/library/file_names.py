"""Library file names: one plain file in one folder, bounded, and not one the library already holds."""

from __future__ import annotations

import re
import unicodedata

from modal_services.errors import ErrorCode, ToolboxError

SUFFIX = ".safetensors"
# In UTF-8 bytes (what file systems count): room left under 255 for `-NNNN`, `.partial`, `.converted`.
MAX_FILE_NAME_BYTES = 200


def safe_file_name(name: str, fallback: str = "model") -> str:
    """A name that is one plain file in one folder: no separators, no `..`, no control characters, bounded."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join("_" if (unicodedata.category(ch)[0] == "C" or ch in '<>:"|?*') else ch for ch in name)
    name = re.sub(r"\s+", " ", name).strip(" .")
    stem = name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name
    stem = stem.strip(" .").replace("..", "_")
    if not stem:
        stem = fallback
    return _clip_utf8(stem, MAX_FILE_NAME_BYTES - len(SUFFIX)).rstrip(" .") + SUFFIX


def _clip_utf8(text: str, max_bytes: int) -> str:
    """At most `max_bytes` of UTF-8, never cutting a character in two."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def unique_file_name(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`… when a file or entry already has it (compared case-insensitively)."""
    lowered = {item.lower() for item in taken}
    if name.lower() not in lowered:
        return name
    stem = name[: -len(SUFFIX)]
    for number in range(2, 10_000):
        tail = f"-{number}"
        candidate = _clip_utf8(stem, MAX_FILE_NAME_BYTES - len(SUFFIX) - len(tail)) + tail + SUFFIX
        if candidate.lower() not in lowered:
            return candidate
    raise ToolboxError(ErrorCode.INVALID_INPUT, f"Too many files named like {name}.")
