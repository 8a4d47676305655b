"""What a file must pass before it joins the library: finite tensors, an SDXL single-file checkpoint, a LoRA
that fits its family's model (an SDXL one converted when diffusers cannot load it as it is)."""

from __future__ import annotations

from pathlib import Path

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.library.entries import LibraryEntry
from modal_services.library.lora_formats.files import LoraReport, lora_family
from modal_services.library.lora_formats.flux import check_flux_lora
from modal_services.library.lora_formats.sdxl import normalize_lora

# An SDXL UNet in the original single-file layout has the size-conditioning MLP; SD 1.x has not.
SDXL_CHECKPOINT_KEYS = ("model.diffusion_model.label_emb.0.0.weight",)


def check_finite(path: Path) -> None:
    """Every tensor (alphas too) is finite, read one tensor at a time: never the whole file in memory.

    A NaN or infinite weight makes every image it touches black (or noise), and
    would be reported as a success: such a file is refused, naming the tensor.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if not tensor.is_floating_point():
                    continue
                try:
                    finite = bool(torch.isfinite(tensor).all())
                except (RuntimeError, TypeError):  # dtypes without isfinite (fp8): check them widened
                    finite = bool(torch.isfinite(tensor.float()).all())
                if not finite:
                    raise ToolboxError(
                        ErrorCode.INCOMPATIBLE_MODEL,
                        f"{path.name} is damaged: its tensor `{key[:120]}` holds NaN or infinite values, so it would "
                        "only produce black or noisy images. It was not added.",
                    )
    except (SafetensorError, ValueError) as exc:
        raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED, f"{path.name} is not a readable .safetensors file ({type(exc).__name__}).") from None


def check_checkpoint(path: Path) -> None:
    """A single-file SDXL checkpoint: safetensors, with SDXL's UNet keys (read from the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ToolboxError(ErrorCode.MODEL_LOAD_FAILED, f"{path.name} is not a readable .safetensors file ({type(exc).__name__}).") from None
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise ToolboxError(
            ErrorCode.INCOMPATIBLE_MODEL,
            "This file is not a single-file Stable Diffusion checkpoint (no `model.diffusion_model.` weights).",
        )
    if not all(key in keys for key in SDXL_CHECKPOINT_KEYS):
        raise ToolboxError(ErrorCode.INCOMPATIBLE_MODEL, "This checkpoint is not SDXL (it looks like SD 1.x or 2.x).")


def check_lora(incoming: Path, converted: Path, entry: LibraryEntry, model_layout=None, flux_layout=None) -> LoraReport:
    """The LoRA checked (and for SDXL converted to `converted` when needed) against its family's model
    (None: SDXL's, FLUX.1-dev's). A file CivitAI does not know is taken for the family its layer names say."""
    if entry.civitai_version_id is None:
        entry.family = lora_family(incoming)
    if entry.family == "flux":
        return check_flux_lora(incoming, flux_layout)
    return normalize_lora(incoming, converted, model_layout)
