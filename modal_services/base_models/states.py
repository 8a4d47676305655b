"""A base model's state (present, missing, downloading, failed, queued) from its manifest and progress record."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from modal_services.remedies import FrontEnd, render
from modal_services.state.keys import download_key, manifest_key
from modal_services.state.locks import holder_alive
from modal_services.state.store import StateStore

# An active progress record is rewritten every tick: one this old belongs to a download that died.
RECORD_STALE_SECONDS = 15.0


@dataclass(frozen=True)
class ModelState:
    key: str
    name: str
    state: str  # present | missing | downloading | failed | queued
    size_bytes: int  # exact once known (manifest or plan), the registry's estimate before
    bytes_done: int = 0
    rate: float = 0.0
    eta: float | None = None
    detail: str | None = None  # why it failed, what is wrong

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def worded_for(self, front_end: FrontEnd) -> ModelState:
        """This state with its detail (a download's error) in `front_end`'s words."""
        return replace(self, detail=render(self.detail, front_end)) if self.detail else self


ACTIVE_STATES = ("queued", "waiting", "starting", "downloading", "verifying", "converting")


def describe_state(entry, manifest: dict | None, record: dict | None, problems: list[str] | None = None) -> ModelState:
    """A model's state from its manifest and progress record (and disk problems, when checked)."""
    if manifest and manifest.get("complete") and not problems:
        return ModelState(entry.key, entry.name, "present", manifest.get("size_bytes", entry.approx_bytes),
                          manifest.get("size_bytes", 0))
    record = record or {}
    status = record.get("status")
    total = record.get("bytes_total") or entry.approx_bytes
    running = (status in ACTIVE_STATES and time.time() - record.get("updated_at", 0) < RECORD_STALE_SECONDS
               and holder_alive(record) is not False)
    if running:
        return ModelState(entry.key, entry.name, "downloading" if status != "queued" else "queued", total,
                          record.get("bytes_done", 0), record.get("rate", 0.0), record.get("eta"), status)
    if status == "failed":
        return ModelState(entry.key, entry.name, "failed", total, record.get("bytes_done", 0),
                          detail=f"{record.get('error_code')}: {record.get('error')}")
    detail = "; ".join(problems) if problems else None
    return ModelState(entry.key, entry.name, "missing", total, detail=detail)


async def model_states(store: StateStore, entries) -> list[ModelState]:
    """From the state store alone (cheap; what the bot can see without the volume)."""
    states = []
    for entry in entries:
        manifest = await store.get(manifest_key(entry.key))
        record = await store.get(download_key(entry.key))
        states.append(describe_state(entry, manifest, record))
    return states


async def missing_models(store: StateStore, keys) -> list[str]:
    """The keys without a complete manifest: checked by the bot before it spawns GPU work."""
    missing = []
    for key in keys:
        manifest = await store.get(manifest_key(key))
        if not (manifest and manifest.get("complete")):
            missing.append(key)
    return missing
