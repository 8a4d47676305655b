"""Durable records: files are their home, the live store is only their cache.

A Modal Dict forgets an entry after 7 days without a read or write, so what must last (the
library, base-model manifests, settings, tokens, optional-model acceptances, the active checkpoint,
the parameters result buttons reuse) is kept as one small JSON file per record, in one of four
homes: the models volume, the LoRA volume, the records volume and the tokens volume (folders of the
data dir locally). `RECORD_KINDS` says which keys are durable and where each one's file is.

`DurableStore` is the store every part of the toolbox uses. Live keys (jobs, previews, locks,
slots, download progress) pass straight to the live store. For a durable key:

- `put` writes the file first (atomically, see `record_files`), then the cache;
- `get` answers from the cache; on a miss it reads the file and warms the cache (remembering
  "no file" too, for kinds read on every command, so that a server without settings costs one
  read a week);
- `pop` removes the file, then the cache entry;
- `items` / `keys` list the files, so a forgotten cache entry never hides a record.

So a Dict that forgot everything, or a fresh Dict over existing volumes, answers as before.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from modal_services.layout import (
    CHECKPOINTS_SUBDIR,
    LORAS_SUBDIR,
    local_loras_dir,
    local_models_dir,
    local_records_dir,
    local_tokens_dir,
    LORAS_VOLUME,
    MODELS_VOLUME,
    RECORDS_VOLUME,
    TOKENS_VOLUME,
)
from modal_services.state.keys import (
    ACTIVE_CHECKPOINT_KEY,
    ENTRY_PREFIX,
    RESULT_PARAMS_PREFIXES,
)
from modal_services.state.record_files import FolderFiles, RecordFiles, VolumeFiles, checked_path
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)

# The four homes of durable records (volumes on Modal, folders of the data dir locally).
MODELS_HOME = "models"
LORAS_HOME = "loras"
RECORDS_HOME = "records"
TOKENS_HOME = "tokens"
HOMES = (MODELS_HOME, LORAS_HOME, RECORDS_HOME, TOKENS_HOME)

# What the cache holds for a key whose record has no file.
ABSENT = {"absent": "no durable record"}
_MISSING = object()
MODEL_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".json"


@dataclass(frozen=True)
class JsonRecords:
    """Records `<prefix><name>`, each the file `<folder>/<name>.json` in `home`."""

    prefix: str
    home: str
    folder: str
    # Remember in the cache that a record has no file (kinds read on every command). Off where
    # the names come from what people type, so a stream of bad names cannot fill the cache.
    cache_absence: bool = True

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix)

    def name_of(self, key: str) -> str:
        name = key[len(self.prefix):]
        checked_path(name)  # one plain name: ValueError otherwise
        if "/" in name:
            raise ValueError(f"not a record name: {name!r}")
        return name

    def paths(self, key: str) -> list[str]:
        """Where the record's file may be, first match wins."""
        return [self._join(self.name_of(key) + RECORD_SUFFIX)]

    def path_for(self, key: str, value: Any) -> str:
        return self.paths(key)[0]

    def encode(self, key: str, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")

    def decode(self, key: str, data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))

    async def listed_keys(self, files: RecordFiles) -> list[str]:
        names = await files.names(self.folder)
        return [self.prefix + name[: -len(RECORD_SUFFIX)] for name in names if name.endswith(RECORD_SUFFIX)]

    def _join(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name


@dataclass(frozen=True)
class SingleRecord(JsonRecords):
    """One record whose key is `prefix` itself, kept as `folder/<file>`."""

    file: str = ""

    def owns(self, key: str) -> bool:
        return key == self.prefix

    def paths(self, key: str) -> list[str]:
        return [self._join(self.file)]

    async def listed_keys(self, files: RecordFiles) -> list[str]:
        return [self.prefix] if self.file in await files.names(self.folder) else []


@dataclass(frozen=True)
class LibrarySidecars(JsonRecords):
    """A library entry `model:<name>.safetensors` as the sidecar `<name>.json` beside its model file.

    The sidecar carries the fields A1111 reads from such a file (activation text, preferred
    weight, sd version) and the whole entry under `toolbox`. The file name is the truth: an entry
    read from `loras/x.json` is the entry of `loras/x.safetensors`, whatever it says inside.
    """

    folders: tuple[str, ...] = (LORAS_SUBDIR, CHECKPOINTS_SUBDIR)

    def _stem(self, key: str) -> str:
        name = self.name_of(key)
        if not name.endswith(MODEL_SUFFIX) or len(name) == len(MODEL_SUFFIX):
            raise ValueError(f"not a model file: {name!r}")
        return name[: -len(MODEL_SUFFIX)]

    def paths(self, key: str) -> list[str]:
        stem = self._stem(key)
        return [f"{folder}/{stem}{RECORD_SUFFIX}" for folder in self.folders]

    def path_for(self, key: str, value: Any) -> str:
        folder = CHECKPOINTS_SUBDIR if value.get("type") == "checkpoint" else LORAS_SUBDIR
        return f"{folder}/{self._stem(key)}{RECORD_SUFFIX}"

    def encode(self, key: str, value: Any) -> bytes:
        sidecar = {
            "description": value.get("name", ""),
            "sd version": {"sdxl": "SDXL", "flux": "Flux"}.get(value.get("family", ""), "Unknown"),
            "activation text": ", ".join(value.get("trigger_words") or []),
            "preferred weight": value.get("weight") or 0,
            "toolbox": value,
        }
        return super().encode(key, sidecar)

    def decode(self, key: str, data: bytes) -> Any:
        sidecar = super().decode(key, data)
        entry = sidecar.get("toolbox") if isinstance(sidecar, dict) else None
        if not isinstance(entry, dict):
            return None  # an A1111 sidecar of a file the toolbox never took in: the file reads as untracked
        return {**entry, "file": self.name_of(key)}

    async def listed_keys(self, files: RecordFiles) -> list[str]:
        keys = []
        for folder in self.folders:
            names = await files.names(folder)
            keys += [self.prefix + name[: -len(RECORD_SUFFIX)] + MODEL_SUFFIX for name in names if name.endswith(RECORD_SUFFIX)]
        return sorted(set(keys))


RECORD_KINDS: tuple[JsonRecords, ...] = (
    LibrarySidecars(ENTRY_PREFIX, LORAS_HOME, "", cache_absence=False),
    JsonRecords("manifest:", MODELS_HOME, "toolbox-manifests"),
    JsonRecords("settings:", RECORDS_HOME, "settings"),
    JsonRecords("optional:", RECORDS_HOME, "optional-models"),
    SingleRecord(ACTIVE_CHECKPOINT_KEY, RECORDS_HOME, "", file="active-checkpoint.json"),
    JsonRecords("secret:", TOKENS_HOME, ""),
    *(JsonRecords(prefix, RECORDS_HOME, f"results/{prefix.rstrip(':')}") for prefix in RESULT_PARAMS_PREFIXES),
)


def record_kind(key: str) -> JsonRecords | None:
    """The durable kind a key belongs to, or None for a live key."""
    for kind in RECORD_KINDS:
        if kind.owns(key):
            return kind
    return None


def _kind_listed_by(prefix: str) -> JsonRecords | None:
    """The durable kind a listing of `prefix` is about: one whose every key starts with `prefix`'s
    start (`model:` lists the library, `model:a` the entries whose file starts with `a`)."""
    for kind in RECORD_KINDS:
        if prefix.startswith(kind.prefix):
            return kind
    return None


class DurableStore(StateStore):
    """Live keys in `live`; durable keys in their files (`homes`), cached in `live`."""

    def __init__(self, live: StateStore, homes: Mapping[str, RecordFiles]):
        missing = set(HOMES) - set(homes)
        if missing:
            raise ValueError(f"durable homes missing: {sorted(missing)}")
        self.live = live
        self.homes = dict(homes)

    # -------------------------------------------------------------- reading

    async def get(self, key: str, default: Any = None) -> Any:
        kind = record_kind(key)
        if kind is None:
            return await self.live.get(key, default)
        cached = await self.live.get(key, _MISSING)
        if cached is not _MISSING:
            return default if cached == ABSENT else cached
        try:
            value = await self.read_record(kind, key)
        except ValueError:
            return default  # a key no file could have (a name with a `/`, say)
        if value is not None:
            await self.live.put(key, value)
            return value
        if kind.cache_absence:
            await self.live.put(key, ABSENT)
        return default

    async def read_record(self, kind: JsonRecords, key: str) -> Any:
        """The record as its file says, or None; an unreadable file is logged and reads as none."""
        files = self.homes[kind.home]
        for path in kind.paths(key):
            data = await files.read(path)
            if data is None:
                continue
            try:
                return kind.decode(key, data)
            except (ValueError, UnicodeDecodeError):
                log.warning("durable record %s (%s) is not readable JSON; it reads as absent", key, path)
                return None
        return None

    async def contains(self, key: str) -> bool:
        return await self.get(key, _MISSING) is not _MISSING

    async def keys(self, prefix: str = "") -> list[str]:
        kind = _kind_listed_by(prefix)
        if kind is None:
            return [key for key in await self.live.keys(prefix) if record_kind(key) is None]
        return sorted((await self._durable_items(kind, prefix)).keys())

    async def items(self, prefix: str = "") -> dict[str, Any]:
        kind = _kind_listed_by(prefix)
        if kind is None:
            return {key: value for key, value in (await self.live.items(prefix)).items() if record_kind(key) is None}
        return await self._durable_items(kind, prefix)

    async def _durable_items(self, kind: JsonRecords, prefix: str) -> dict[str, Any]:
        """Every record of `kind` that has a file: cached values where the cache has them, the
        rest read from their files (and cached). Cache entries without a file are dropped."""
        listed = [key for key in await kind.listed_keys(self.homes[kind.home]) if key.startswith(prefix)]
        cached = await self.live.items(kind.prefix)
        found: dict[str, Any] = {}
        for key in listed:
            value = cached.get(key, _MISSING)
            if value is _MISSING or value == ABSENT:
                try:
                    value = await self.read_record(kind, key)
                except ValueError:
                    continue
                if value is None:
                    continue
                await self.live.put(key, value)
            found[key] = value
        for stale in set(cached) - set(listed):
            if stale.startswith(prefix) and cached[stale] != ABSENT:
                await self.live.pop(stale)
        return dict(sorted(found.items()))

    # -------------------------------------------------------------- writing

    async def put(self, key: str, value: Any) -> None:
        kind = record_kind(key)
        if kind is not None:
            await self.homes[kind.home].write(kind.path_for(key, value), kind.encode(key, value))
        await self.live.put(key, value)

    async def put_if_absent(self, key: str, value: Any) -> bool:
        if record_kind(key) is not None:
            raise TypeError(f"{key} is a durable record: write it with put")
        return await self.live.put_if_absent(key, value)

    async def pop(self, key: str, default: Any = None) -> Any:
        kind = record_kind(key)
        if kind is None:
            return await self.live.pop(key, default)
        value = await self.get(key, _MISSING)
        try:
            paths = kind.paths(key)
        except ValueError:
            paths = []
        for path in paths:
            await self.homes[kind.home].remove(path)
        await self.live.pop(key)
        return default if value is _MISSING else value

    async def close(self) -> None:
        await self.live.close()

    # -------------------------------------------------------------- upgrading

    async def copy_cached_records(self, journal_path: str = "upgrade/records-from-state-store.json") -> list[str]:
        """Once per deployment: every durable record the live store still holds that has no file
        yet gets one (what an earlier version kept only in the Dict). The journal file says what was
        copied and when; once it exists this does nothing, so a record deleted since is never
        brought back. Returns the keys copied."""
        records = self.homes[RECORDS_HOME]
        if await records.read(journal_path) is not None:
            return []
        copied: list[str] = []
        for kind in RECORD_KINDS:
            files = self.homes[kind.home]
            for key, value in (await self.live.items(kind.prefix)).items():
                if not kind.owns(key) or value == ABSENT or value is None:
                    continue
                try:
                    exists = [await files.read(path) for path in kind.paths(key)]
                    path = kind.path_for(key, value)
                except (ValueError, AttributeError):
                    log.warning("upgrade: %s cannot be kept as a file; left in the live store only", key)
                    continue
                if any(data is not None for data in exists):
                    continue
                await files.write(path, kind.encode(key, value))
                copied.append(key)
        journal = {"copied_at": time.time(), "copied": copied}
        await records.write(journal_path, json.dumps(journal, indent=1).encode("utf-8"))
        if copied:
            log.info("upgrade: %d durable records copied from the state store to their files", len(copied))
        return copied



def local_homes(data_dir: Path) -> dict[str, RecordFiles]:
    """The local backend's homes: folders of the data dir (records and tokens private to its user)."""
    return {
        MODELS_HOME: FolderFiles(local_models_dir(data_dir)),
        LORAS_HOME: FolderFiles(local_loras_dir(data_dir)),
        RECORDS_HOME: FolderFiles(local_records_dir(data_dir), private=True),
        TOKENS_HOME: FolderFiles(local_tokens_dir(data_dir), private=True),
    }


# Each home's Modal volume.
HOME_VOLUMES = {MODELS_HOME: MODELS_VOLUME, LORAS_HOME: LORAS_VOLUME, RECORDS_HOME: RECORDS_VOLUME, TOKENS_HOME: TOKENS_VOLUME}


def volume_homes() -> dict[str, RecordFiles]:
    """The homes as a process that mounts no volume reaches them: the Modal volumes' client API."""
    return {home: VolumeFiles.from_name(volume) for home, volume in HOME_VOLUMES.items()}
