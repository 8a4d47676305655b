"""LoRA files: reading and writing them, which model family one is for, and the report of a check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer.errors import is_disk_full, storage_full

DORA = "dora_scale"  # LyCORIS' DoRA magnitude, per layer
# Keys only Flux LoRAs have, in one of their layouts.
FLUX_KEY_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks", "transformer.transformer_blocks",
                    "lora_transformer_")


@dataclass
class LoraReport:
    format: str
    converted: bool
    layers: int
    rank: int | None
    components: dict[str, int] = field(default_factory=dict)  # unet / text_encoder / text_encoder_2 → layers
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_load_failed(message: str) -> ToolboxError:
    return ToolboxError(ErrorCode.LORA_LOAD_FAILED, message)


def incompatible_model(message: str) -> ToolboxError:
    return ToolboxError(ErrorCode.INCOMPATIBLE_MODEL, message)


def read_lora(path: Path) -> dict:
    """All tensors of a .safetensors file; anything else is refused (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise lora_load_failed(f"{path.name} is not a readable .safetensors file ({type(exc).__name__}).") from None
    if not state:
        raise lora_load_failed(f"{path.name} holds no tensors.")
    return state


def lora_family(path: Path) -> str:
    """"flux" when the file's layer names are a Flux LoRA's, else "sdxl" (read from the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise lora_load_failed(f"{Path(path).name} is not a readable .safetensors file ({type(exc).__name__}).") from None
    return "flux" if is_flux_layout(keys) else "sdxl"


def is_flux_layout(keys) -> bool:
    return any(marker in key for key in keys for marker in FLUX_KEY_MARKERS)


def save_converted(state: dict, dst: Path, fmt: str) -> None:
    """A converted LoRA to `dst`, noting the format it came from; nothing half-written stays behind."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(state, str(dst), metadata={"format": "pt", "converted_from": fmt, "converted_by": "ai-toolbox"})
    except OSError as exc:
        dst.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise storage_full(dst.name) from None
        raise
    except SafetensorError as exc:
        # safetensors reports its write errors in its own type, with the OS's words in the text.
        dst.unlink(missing_ok=True)
        if "No space left" in str(exc) or "os error 28" in str(exc) or "Disk quota" in str(exc):
            raise storage_full(dst.name) from None
        raise
