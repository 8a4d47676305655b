"""Durable records: files are their home, the live store is only their cache.

A Modal Dict forgets an entry after 7 days without a read or write, so what must last (the
library, base-model manifests, settings, tokens, optional-model acceptances, the active checkpoint,
the parameters result buttons reuse) is kept as one small JSON file per record, in one of four
homes: the models volume, the LoRA volume, the records volume and the tokens volume (folders of the
data dir locally). `RECORD_KINDS` says which keys are durable and where each one's file is.

`DurableStore` is the store every part of the toolbox uses. Live keys (jobs, previews, locks,
slots, download progress) pass straight to the live store. For a durable key:

- `put` drops the cache entry, writes the file (atomically, see `record_files`), then caches the
  value: a writer killed between the file and the cache leaves a miss, never a stale value, and a
  write that fails leaves the record (file and cache) as it was;
- `get` answers from the cache; on a miss it reads the file and warms the cache (remembering
  "no file" too, as `ABSENT`, for kinds read on every command, so that a server without settings
  costs one read a week). The warming value only fills an empty entry: a reader that read the
  file just before a writer replaced it never overwrites the writer's newer value;
- `pop` drops the cache entry, removes the file, and drops the entry again (a reader may have
  warmed it from the file in between);
- `items` / `keys` list the files, so a forgotten cache entry never hides a record, and drop cache
  entries whose file is gone.

So a Dict that forgot everything, or a fresh Dict over existing volumes, answers as before.

The cache is trusted while it holds a key. A file changed without going through this store (a
backup restored, a sidecar edited by hand, a writer with a cache of its own) is seen when the
cache forgets the key (7 days without a read or write on Modal) or when something re-reads the
files and re-warms the cache, as the daily reconcile does; a listing refreshes only a key cached
as `ABSENT` and drops one whose file is gone. Two writers of one record at once are ordered by the
callers' locks: the last file written wins, and its cache may briefly hold the other's value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
from modal_services.state.record_files import FolderFiles, RecordFiles, VolumeFiles, is_plain_name
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
# What `copy_cached_records` copied, on the records home; once there, it copies nothing again.
UPGRADE_JOURNAL = "upgrade/records-from-state-store.json"


@dataclass(frozen=True)
class JsonRecords:
    """Records `<prefix><name>`, each the file `<folder>/<name>.json` in `home`."""

    prefix: str
    home: str
    folder: str
    # Remember in the cache that a record has no file (kinds read on every command). Off where
    # the names come from what people type, so a stream of bad names cannot fill the cache.
    cache_absence: bool = True
    # A write keeps what other programs wrote in the file (so it reads the file first).
    shares_its_files: bool = False

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix)

    def name_of(self, key: str) -> str:
        """The record's name in `key`: one plain file name (see `checked_path`), ValueError otherwise."""
        name = key[len(self.prefix):]
        if not is_plain_name(name):
            raise ValueError(f"{key!r} names no record file: after {self.prefix!r} it needs one plain file name")
        return name

    def paths(self, key: str) -> list[str]:
        """Where the record's file may be, first match wins."""
        return [self._join(self.name_of(key) + RECORD_SUFFIX)]

    def path_for(self, key: str, value: Any) -> str:
        return self.paths(key)[0]

    def encode(self, key: str, value: Any, previous: bytes | None = None) -> bytes:
        """The file's bytes for `value`; `previous`, the file's bytes before (for `shares_its_files`)."""
        return json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")

    def decode(self, key: str, data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))

    def record_folders(self) -> tuple[str, ...]:
        """The folders of the home this kind's files are in ("" for the home itself)."""
        return (self.folder,)

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
    weight, sd version) and the whole entry under `toolbox`; what else A1111 or a person wrote in
    it (notes, negative text, their description) is kept. The file name is the truth: an entry
    read from `loras/x.json` is the entry of `loras/x.safetensors`, whatever it says inside.
    """

    folders: tuple[str, ...] = (LORAS_SUBDIR, CHECKPOINTS_SUBDIR)

    def _stem(self, key: str) -> str:
        name = self.name_of(key)
        if not name.endswith(MODEL_SUFFIX) or len(name) == len(MODEL_SUFFIX):
            raise ValueError(f"not a model file: {name!r}")
        return name[: -len(MODEL_SUFFIX)]

    def record_folders(self) -> tuple[str, ...]:
        return self.folders

    def paths(self, key: str) -> list[str]:
        stem = self._stem(key)
        return [f"{folder}/{stem}{RECORD_SUFFIX}" for folder in self.folders]

    def path_for(self, key: str, value: Any) -> str:
        folder = CHECKPOINTS_SUBDIR if value.get("type") == "checkpoint" else LORAS_SUBDIR
        return f"{folder}/{self._stem(key)}{RECORD_SUFFIX}"

    def encode(self, key: str, value: Any, previous: bytes | None = None) -> bytes:
        sidecar = _json_object(previous)
        sidecar.setdefault("description", value.get("name", ""))
        sidecar.update({
            "sd version": {"sdxl": "SDXL", "flux": "Flux"}.get(value.get("family", ""), "Unknown"),
            "activation text": ", ".join(value.get("trigger_words") or []),
            "preferred weight": value.get("weight") or 0,
            "toolbox": value,
        })
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
            stems = [name[: -len(RECORD_SUFFIX)] for name in names if name.endswith(RECORD_SUFFIX)]
            keys += [self.prefix + stem + MODEL_SUFFIX for stem in stems]
        return sorted(set(keys))


def _json_object(data: bytes | None) -> dict[str, Any]:
    """`data` as a JSON object, or an empty one (no data, not JSON, not an object)."""
    try:
        found = json.loads(data.decode("utf-8")) if data is not None else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


RECORD_KINDS: tuple[JsonRecords, ...] = (
    LibrarySidecars(ENTRY_PREFIX, LORAS_HOME, "", cache_absence=False, shares_its_files=True),
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
    """Live keys in `live`; durable keys in their files (`homes`), cached in `live`.

    `keys` / `items` list one durable kind when `prefix` starts with its prefix (`model:`,
    `settings:`...), from its files; any other prefix lists live keys only.
    """

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
            return default  # a key no file could have (a name with a `/`, say): nothing is cached
        if value is not None:
            await self.live.put_if_absent(key, value)
            return value
        if kind.cache_absence:
            await self.live.put_if_absent(key, ABSENT)
        return default

    async def read_record(self, kind: JsonRecords, key: str) -> Any:
        """The record as its file says, or None; an unreadable file is logged and reads as none.
        ValueError when `key` names no file."""
        files = self.homes[kind.home]
        for path in kind.paths(key):
            data = await files.read(path)
            if data is None:
                continue
            try:
                value = kind.decode(key, data)
            except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                log.warning("durable record %s (%s) is not readable JSON; it reads as absent", key, path)
                continue
            if value is not None:
                return value
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
                    read = await self.read_record(kind, key)
                except ValueError:
                    continue  # a file whose name no key may have
                if read is None:
                    continue
                if value is _MISSING:
                    await self.live.put_if_absent(key, read)
                else:
                    await self.live.put(key, read)  # the file came after the cache noted none
                value = read
            found[key] = value
        for stale in set(cached) - set(listed):
            if stale.startswith(prefix) and cached[stale] != ABSENT:
                await self.live.pop(stale)
        return dict(sorted(found.items()))

    # -------------------------------------------------------------- writing

    async def put(self, key: str, value: Any) -> None:
        """A durable record's file, then its cache; ValueError when `key` names no file."""
        kind = record_kind(key)
        if kind is not None:
            path, data = await self._file_for(kind, key, value)
            await self.live.pop(key)
            await self.homes[kind.home].write(path, data)
        await self.live.put(key, value)

    async def _file_for(self, kind: JsonRecords, key: str, value: Any) -> tuple[str, bytes]:
        """Where `value` goes and the bytes to write there; ValueError when `key` names no file."""
        path = kind.path_for(key, value)
        previous = await self.homes[kind.home].read(path) if kind.shares_its_files else None
        return path, kind.encode(key, value, previous)

    async def put_if_absent(self, key: str, value: Any) -> bool:
        if record_kind(key) is not None:
            raise TypeError(f"{key} is a durable record: write it with put")
        return await self.live.put_if_absent(key, value)

    async def pop(self, key: str, default: Any = None) -> Any:
        kind = record_kind(key)
        if kind is None:
            return await self.live.pop(key, default)
        # The cache forgets first and again last: a reader may warm it from the file in between.
        cached = await self.live.pop(key, ABSENT)
        try:
            value = await self.read_record(kind, key) if cached == ABSENT else cached
            paths = kind.paths(key)
        except ValueError:
            return default  # no file can have that key
        for path in paths:
            await self.homes[kind.home].remove(path)
        await self.live.pop(key)
        return default if value is None else value

    async def close(self) -> None:
        await self.live.close()

    # -------------------------------------------------------------- upgrading, tidying

    async def copy_cached_records(self, journal_path: str = UPGRADE_JOURNAL) -> list[str]:
        """Once per deployment: every durable record the live store still holds that has no file
        yet gets one (what an earlier version kept only in the Dict). The journal file says what was
        copied and when; once it exists this does nothing, so a record deleted since is never
        brought back. A start killed midway copies the rest the next time. Returns the keys copied."""
        records = self.homes[RECORDS_HOME]
        if await records.read(journal_path) is not None:
            return []
        copied: list[str] = []
        # One pass over the live store: a Modal Dict lists every key whatever the prefix.
        for key, value in (await self.live.items()).items():
            kind = record_kind(key)
            if kind is None or value == ABSENT or value is None:
                continue
            try:
                if await self.read_record(kind, key) is not None:
                    continue  # the file is the truth
                path, data = await self._file_for(kind, key, value)
            except (ValueError, AttributeError):
                log.warning("upgrade: %s cannot be kept as a file; left in the live store only", key)
                continue
            await self.homes[kind.home].write(path, data)
            copied.append(key)
        journal = {"copied_at": time.time(), "copied": copied}
        await records.write(journal_path, json.dumps(journal, indent=1).encode("utf-8"))
        if copied:
            log.info("upgrade: %d durable records copied from the state store to their files", len(copied))
        return copied

    async def remove_leftovers(self) -> list[str]:
        """The temporary files that killed writers left in the record folders of the homes on this
        machine's disk (a volume's client API leaves none), older than a minute. Returns their paths."""
        folders = {(kind.home, folder) for kind in RECORD_KINDS for folder in kind.record_folders()}
        folders.add((RECORDS_HOME, str(PurePosixPath(UPGRADE_JOURNAL).parent)))
        removed: list[str] = []
        for home, folder in sorted(folders):
            files = self.homes[home]
            if isinstance(files, FolderFiles):
                names = await asyncio.to_thread(files.remove_leftovers, folder)
                removed += [f"{home}/{folder}/{name}" if folder else f"{home}/{name}" for name in names]
        if removed:
            log.info("removed %d temporary files of unfinished record writes", len(removed))
        return removed


def local_homes(data_dir: Path) -> dict[str, RecordFiles]:
    """The local backend's homes: folders of the data dir (records and tokens private to its user)."""
    return {
        MODELS_HOME: FolderFiles(local_models_dir(data_dir)),
        LORAS_HOME: FolderFiles(local_loras_dir(data_dir)),
        RECORDS_HOME: FolderFiles(local_records_dir(data_dir), private=True),
        TOKENS_HOME: FolderFiles(local_tokens_dir(data_dir), private=True),
    }


# Each home's Modal volume.
HOME_VOLUMES = {
    MODELS_HOME: MODELS_VOLUME, LORAS_HOME: LORAS_VOLUME, RECORDS_HOME: RECORDS_VOLUME, TOKENS_HOME: TOKENS_VOLUME,
}


def volume_homes() -> dict[str, RecordFiles]:
    """The homes as a process that mounts no volume reaches them: the Modal volumes' client API."""
    return {home: VolumeFiles.from_name(volume) for home, volume in HOME_VOLUMES.items()}
