"""Weights published as a PyTorch pickle, turned into safetensors once, when they are downloaded.

A pickle can run code as it loads. `torch.load(..., weights_only=True)`
unpickles only tensors and plain containers and refuses anything else, so a
file that carries code is refused here without running it; what it holds is
written as a safetensors file and the pickle is deleted. Nothing reads a
pickle at generation time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)


def flatten_tensors(tree: Any, name: str, prefix: str = "") -> dict:
    """Nested dicts of tensors as one flat `a.b.c` dict; anything but a tensor is refused."""
    import torch

    if isinstance(tree, torch.Tensor):
        return {prefix: tree.contiguous()}
    if not isinstance(tree, dict) or not tree:
        raise ToolboxError(ErrorCode.INCOMPATIBLE_MODEL, f"{name} holds {type(tree).__name__} at {prefix or 'its root'}, not weights.")
    flat: dict = {}
    for key, value in tree.items():
        flat.update(flatten_tensors(value, name, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def convert_pickle(source: Path, target: Path) -> None:
    """`source` (a pickle of nested tensor dicts) as safetensors at `target`; `source` is removed either way."""
    import torch
    from safetensors.torch import save_file

    try:
        try:
            tree = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            # The reason names what the pickle asked for, never running it.
            log.warning("refused the pickle %s: %s", source, exc)
            raise ToolboxError(
                ErrorCode.INCOMPATIBLE_MODEL,
                f"{source.name} is not plain weights (it asks to run code or build other objects); it was refused and deleted.",
            ) from None
        partial = target.with_name(target.name + ".partial")
        save_file(flatten_tensors(tree, source.name), str(partial))
        os.replace(partial, target)
    finally:
        source.unlink(missing_ok=True)
