"""What the older Gradio toolbox left on the volumes: its index files, read with care, and its entries as library entries."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from modal_services.library.entries import (
    SOURCES,
    SUFFIX,
    LibraryEntry,
    clean_name,
    lora_weight,
    parse_trigger_words,
    utc_now,
)

METADATA_FILE = ".metadata.json"
TOKENS_FILE = ".api_tokens.json"
MANIFEST_FILE = ".manifest.json"
PROGRESS_FILE = ".progress.json"
RETIRED_SUFFIX = ".migrated"
# The old toolbox also accepted pickle formats; this project never loads them (they run code).
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
MAX_INDEX_BYTES = 16 * 2**20
TOKEN_FIELDS = {"civitai_token": "civitai", "hf_token": "hf"}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def read_index(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), (None, None) when the file is absent, or (None, why it cannot be read)."""
    try:
        if not path.is_file() or path.is_symlink():
            return None, None
        if path.stat().st_size > MAX_INDEX_BYTES:
            return None, f"larger than {MAX_INDEX_BYTES // 2**20} MiB, not an index of the older toolbox"
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"not readable JSON ({type(exc).__name__})"


def manifest_claims(data: Any) -> list[str]:
    """The keys an old manifest claims complete: `{"models": {key: {"status": "complete"}}}` in the
    volume's file, `{key: {"completed": true}}` in the Dict's whole-manifest key."""
    if not isinstance(data, dict):
        return []
    models = data.get("models") if isinstance(data.get("models"), dict) else data
    return sorted(
        key for key, value in models.items()
        if isinstance(key, str) and isinstance(value, dict)
        and (value.get("status") == "complete" or value.get("completed") is True)
    )


def plain_file_name(name: Any) -> bool:
    return (isinstance(name, str) and name.lower().endswith(SUFFIX) and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name and len(name) <= 255)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def entry_from_metadata(file: str, kind: str, meta: Mapping[str, Any], size: int, sha256: str | None,
                        names: set[str]) -> LibraryEntry:
    """The library entry, to be called `file`, for an entry of `.metadata.json` (a name already in
    `names` gets its file's stem added)."""
    stem = file[: -len(SUFFIX)]
    name = clean_name(str(meta.get("display_name") or meta.get("short_name") or stem)[:100])
    if name.lower() in names:
        name = clean_name(f"{name} ({stem})"[:100])
    weight = meta.get("recommended_weight")
    words = meta.get("trigger_words") if isinstance(meta.get("trigger_words"), (str, list)) else []
    source = meta.get("source") if meta.get("source") in SOURCES else "upload"
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    return LibraryEntry(
        name=name,
        file=file,
        type=kind,
        base_model=str(meta.get("base_model") or "")[:100],
        trigger_words=parse_trigger_words(words if isinstance(words, str) else [str(w) for w in words]),
        weight=(lora_weight(name, weight) if weight is not None else 1.0) if kind == "lora" else None,
        size_bytes=size,
        sha256=sha256,
        source=source,
        civitai_model_id=_int_or_none(meta.get("civitai_model_id")),
        civitai_version_id=_int_or_none(meta.get("civitai_version_id")),
        added_at=str(meta.get("added_at") or utc_now())[:40],
        tags=[str(tag)[:100] for tag in tags[:50]],
    )
