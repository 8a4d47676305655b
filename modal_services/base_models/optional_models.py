"""Optional base models: the ones a setup leaves out until an admin enables them.

A model with `Terms` in the registry (large, gated or restrictively licensed:
what one feature needs, not every server) is enabled by an admin in /setup
or with `toolbox setup --enable`, which records who accepted its terms and
when under `optional:<model>`. From then on "Download missing" fetches it and
the feature that needs it may run; disabling it stops both and leaves its
files where they are. One key per model, so two admins toggling different
models never overwrite each other.
"""

from __future__ import annotations

import time
from typing import Mapping

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.keys import manifest_key, optional_model_key
from modal_services.base_models.registry import ModelEntry, get_entry, optional_entries, resolve_keys
from modal_services.state.store import StateStore


def optional_entry(key: str, registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """The optional model `key`; a base-set or unknown key is refused."""
    entry = get_entry(key, registry)
    if entry.optional is None:
        known = ", ".join(e.key for e in optional_entries(registry)) or "none"
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"{entry.name} is part of the base set, not optional. Optional: {known}.")
    return entry


async def enabled_models(store: StateStore, registry: Mapping[str, ModelEntry] | None = None) -> set[str]:
    """The keys of the optional models an admin has enabled."""
    return {entry.key for entry in optional_entries(registry) if await store.get(optional_model_key(entry.key))}


async def enabled_record(store: StateStore, key: str) -> dict | None:
    """Who enabled `key` and when ({"by", "at"}), None while it is not enabled."""
    return await store.get(optional_model_key(key))


async def set_enabled(store: StateStore, key: str, enabled: bool, by: str,
                      registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """Enable (recording `by`, who accepts the terms) or disable an optional model; returns its entry."""
    entry = optional_entry(key, registry)
    if enabled:
        await store.put(optional_model_key(key), {"by": by, "at": time.time()})
    else:
        await store.pop(optional_model_key(key))
    return entry


async def require_enabled(store: StateStore, key: str, registry: Mapping[str, ModelEntry] | None = None) -> None:
    """Refuse work that needs optional model `key` unless it is enabled and downloaded."""
    entry = optional_entry(key, registry)
    if not await store.get(optional_model_key(key)):
        raise ToolboxError(ErrorCode.MODELS_MISSING,
                           f"{entry.name} is not enabled: {remedies.enable(key)}.")
    manifest = await store.get(manifest_key(key))
    if not (manifest and manifest.get("complete")):
        raise ToolboxError(ErrorCode.MODELS_MISSING,
                           f"{entry.name} is enabled but not downloaded yet: {remedies.download(key)}.")


def gated_refusal(entry: ModelEntry, token_set: bool) -> ToolboxError:
    """What a 401/403 from the hub means for a gated model, and what the admin does about it."""
    url = entry.optional.url
    if not token_set:
        return ToolboxError(ErrorCode.DOWNLOAD_FAILED, (
            f"{entry.name} is gated on Hugging Face and no Hugging Face token is set: accept its licence at <{url}> "
            f"with your account, then give that account's token ({remedies.set_token('hf')})."))
    return ToolboxError(ErrorCode.DOWNLOAD_FAILED, (
        f"{entry.name} is gated on Hugging Face and the hub refused the token that is set: accept its licence "
        f"at <{url}> with the account whose token is set (or give a valid token: {remedies.set_token('hf')}), "
        "then download again."))


async def setup_entries(store: StateStore, registry: Mapping[str, ModelEntry] | None = None) -> list[ModelEntry]:
    """What a setup covers (downloads, verifies, counts): the base set and the enabled optional models."""
    return resolve_keys((), registry, await enabled_models(store, registry))
