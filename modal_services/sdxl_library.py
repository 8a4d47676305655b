"""From library names to an upscale job's LoRA and checkpoint fields (for the bot and the CLI).

Only the state store is read (entries, the active checkpoint), so this works
the same whether the files are local or on the workers' volume; the worker
finds the files by name under its own LoRA volume and injects the trigger
words into the prompt.
"""

from __future__ import annotations

from typing import Any

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.library import Library


async def lora_for_job(library: Library, name: str, weight: float | None = None) -> dict[str, Any]:
    """{name, file, weight, trigger_words} of a library LoRA; its recommended weight unless one is given."""
    entry = await library.find(name, kind="lora")
    if weight is None:
        weight = entry.weight if entry.weight is not None else 1.0
    return {"name": entry.name, "file": entry.file, "weight": weight, "trigger_words": list(entry.trigger_words)}


def parse_lora_option(value: str) -> tuple[str, float | None]:
    """`NAME` or `NAME:WEIGHT` (the CLI's --lora)."""
    name, separator, weight = value.rpartition(":")
    if not separator:
        return value.strip(), None
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"--lora {value!r}: the weight after ':' must be a number.") from None
