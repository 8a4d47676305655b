"""The reconcile: every durable record read from its file, the live cache re-warmed, drift reported.

The files are the truth and every read already falls back to them (`durable.py`), so nothing
depends on this running. It keeps the cache warm on a deployment nobody uses, and it is how an
admin learns where the files disagree with one another:

- a library entry (a sidecar) whose model file is gone;
- a model file in `loras/` or `checkpoints/` that no sidecar describes;
- a record file that is not readable JSON (it reads as absent);

and it removes the temporary files that killed writes left behind.

On Modal it runs daily (a scheduled function of the app); locally when the backend starts. The
last report is kept in the live store under `RECONCILE_KEY`, for `/status` (admins) and
`toolbox status`. A report holds counts and file paths, never a record's value (tokens among them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from modal_services.state.durable import (
    ABSENT,
    MODEL_SUFFIX,
    RECORD_KINDS,
    RECORD_SUFFIX,
    DurableStore,
    JsonRecords,
    LibrarySidecars,
)
from modal_services.state.keys import RECONCILE_KEY
from modal_services.state.record_files import RecordFiles

log = logging.getLogger(__name__)

# How many file names a drift line shows before it says how many more there are.
NAMES_SHOWN = 5
# A starting local backend reconciles unless the last reconcile is younger than this: a command
# run every minute must not read every record file each time (some thousands take a second).
START_RECONCILE_AFTER = 3600.0


@dataclass
class Refreshed:
    """One kind's records as their files list them, and what listing them did to the live cache."""

    records: dict[str, Any]
    warmed: list[str]  # read from their files into the cache
    dropped: list[str]  # cache entries whose file is gone, removed


async def refreshed_records(store: DurableStore, kind: JsonRecords) -> Refreshed:
    """List `kind`'s records through the store (which reads the files the cache misses, caches them
    and drops cache entries without a file), telling what the cache held before from what it holds now."""
    before = await store.live.items(kind.prefix)
    cached = {key for key, value in before.items() if kind.owns(key) and value != ABSENT}
    records = await store.items(kind.prefix)
    return Refreshed(records, sorted(set(records) - cached), sorted(cached - set(records)))


@dataclass
class ReconcileReport:
    ran_at: float
    records: dict[str, int] = field(default_factory=dict)  # per kind (its key prefix): records with a file
    warmed: int = 0  # records read from their files into the live cache
    dropped: int = 0  # cache entries whose file was gone, removed
    entries_without_file: list[str] = field(default_factory=list)  # the missing model files: `loras/a.safetensors`
    files_without_entry: list[str] = field(default_factory=list)  # model files without a sidecar
    unreadable: list[str] = field(default_factory=list)  # `<home>/<path>` of files that are not readable JSON
    leftovers_removed: list[str] = field(default_factory=list)  # `<home>/<path>` of killed writes' temporary files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReconcileReport":
        return cls(**{item.name: data[item.name] for item in fields(cls) if item.name in data})

    def drift(self) -> list[str]:
        """One phrase per kind of disagreement found, e.g. `1 file without an entry (loras/b.safetensors)`."""
        kinds = ((self.entries_without_file, "entry without a file", "entries without a file"),
                 (self.files_without_entry, "file without an entry", "files without an entry"),
                 (self.unreadable, "unreadable record file", "unreadable record files"))
        return [f"{len(paths)} {one if len(paths) == 1 else many} ({_shown(paths)})" for paths, one, many in kinds if paths]

    def describe(self, ago: str) -> str:
        """What `/status` and `toolbox status` say of the records; `ago` is how long ago this ran, in words."""
        drift = self.drift()
        return f"checked {ago} ago" + (" · " + " · ".join(drift) if drift else ", all in order")

    def summary(self) -> str:
        """The log's line: counts and file paths only."""
        drift = self.drift()
        return (f"records reconciled: {sum(self.records.values())} with a file, {self.warmed} warmed into the cache, "
                f"{self.dropped} dropped from it, {len(self.leftovers_removed)} leftover temporary files removed; "
                + ("; ".join(drift) if drift else "all in order"))


def _shown(paths: list[str]) -> str:
    more = len(paths) - NAMES_SHOWN
    return ", ".join(paths[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


async def reconcile(store: DurableStore) -> ReconcileReport:
    """Every durable kind listed from its files (warming the cache), the drift found, the report kept
    under `RECONCILE_KEY` and logged in one line."""
    report = ReconcileReport(ran_at=time.time())
    report.leftovers_removed = await store.remove_leftovers()
    for kind in RECORD_KINDS:
        files = store.homes[kind.home]
        refreshed = await refreshed_records(store, kind)
        report.records[kind.prefix] = len(refreshed.records)
        report.warmed += len(refreshed.warmed)
        report.dropped += len(refreshed.dropped)
        # A record just warmed was read and parsed; every other one is read here.
        report.unreadable += await _unreadable_files(kind, files, skip=set(refreshed.warmed))
        if isinstance(kind, LibrarySidecars):
            await _library_drift(kind, files, refreshed.records, report)
    await store.put(RECONCILE_KEY, report.to_dict())
    log.info(report.summary())
    return report


async def reconcile_at_start(store: DurableStore) -> ReconcileReport | None:
    """The reconcile of a starting backend, unless a recent one ran. Never fatal: a failure is logged
    and the start goes on (every read falls back to the files anyway)."""
    try:
        last = await last_report(store)
        if last is not None and time.time() - last.ran_at < START_RECONCILE_AFTER:
            return None
        return await reconcile(store)
    except Exception:
        log.warning("the records reconcile failed; starting anyway", exc_info=True)
        return None


async def last_report(store: DurableStore) -> ReconcileReport | None:
    """The last reconcile's report, or None when none ran (or the live store has forgotten it)."""
    data = await store.get(RECONCILE_KEY)
    return ReconcileReport.from_dict(data) if isinstance(data, dict) else None


async def _unreadable_files(kind: JsonRecords, files: RecordFiles, skip: set[str]) -> list[str]:
    """`<home>/<path>` of the files of `kind` whose bytes do not parse (the file a read would pick)."""
    unreadable = []
    for key in await kind.listed_keys(files):
        try:
            paths = [] if key in skip else kind.paths(key)
        except ValueError:
            continue  # a file name no record can have (the store skips it too)
        for path in paths:
            data = await files.read(path)
            if data is None:
                continue
            try:
                kind.decode(key, data)
            except (ValueError, UnicodeDecodeError):
                unreadable.append(f"{kind.home}/{path}")
            break
    return unreadable


async def _library_drift(kind: LibrarySidecars, files: RecordFiles, entries: dict[str, Any],
                         report: ReconcileReport) -> None:
    """Sidecars whose model file is not beside them, and model files without an entry."""
    for folder in kind.folders:
        names = set(await files.names(folder))
        models = {name for name in names if name.endswith(MODEL_SUFFIX)}
        for name in sorted(names):
            model = name[: -len(RECORD_SUFFIX)] + MODEL_SUFFIX
            if name.endswith(RECORD_SUFFIX) and kind.prefix + model in entries and model not in models:
                report.entries_without_file.append(f"{folder}/{model}")
        report.files_without_entry += [f"{folder}/{model}" for model in sorted(models) if kind.prefix + model not in entries]

