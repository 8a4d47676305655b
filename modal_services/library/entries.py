"""The model library: one `model:<file>` entry per LoRA or checkpoint, and the active checkpoint.

Entries live in the state store (one key each, so two admins editing two
models never rewrite each other's), files on the LoRA volume (under
`loras/` and `checkpoints/`). The two never disagree silently:

- an import renames its file into place *before* writing the entry;
- delete removes the entry first, then the file (a crash in between leaves
  an untracked file, which `scan` lists and `adopt` takes back);
- the active checkpoint cannot be deleted;
- entries whose file is gone are flagged `missing`.

`files_visible` says whether this process sees the files (a worker, or the
bot with the local backend). The bot of a Modal deployment does not: it reads
entries only and trusts the `missing` flags the workers keep.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.base_models.registry import BASE_MODELS
from modal_services.jobs.requests import LoraRef
from modal_services.jobs.samplers import NO_SAMPLER, sampler_named, unknown_sampler
from modal_services.state.keys import ACTIVE_CHECKPOINT_KEY, ENTRY_PREFIX, entry_key, file_lock_name
from modal_services.state.locks import holding
from modal_services.library.file_names import SUFFIX
from modal_services.layout import CHECKPOINTS_SUBDIR, ILLUSTRIOUS_CHECKPOINT, LORAS_MOUNT, LORAS_SUBDIR, MODELS_MOUNT
from modal_services.state.durable import DurableStore, record_kind
from modal_services.state.reconcile import refreshed_records
from modal_services.state.store import StateStore

DEFAULT_CHECKPOINT = "illustrious-xl"
DEFAULT_CHECKPOINT_NAME = "Illustrious-XL v2.0 (default)"
TYPES = ("lora", "checkpoint")
SOURCES = ("civitai", "upload", "huggingface", "adopted")
MAX_NAME = 100
MAX_TRIGGER_WORDS = 50
MAX_TRIGGER_CHARS = 200
# Where converted LoRAs keep the file they were made from, inside the LoRA folder.
ORIGINALS_DIR = ".original"
AUTOCOMPLETE_LIMIT = 25
# How long an edit waits for another change of the same model (an edit, an import) before giving up.
EDIT_LOCK_WAIT_SECONDS = 10.0


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class LibraryEntry:
    name: str
    file: str
    type: str  # lora | checkpoint
    base_model: str = ""
    trigger_words: list[str] = field(default_factory=list)
    weight: float | None = None  # recommended LoRA weight; None for checkpoints
    size_bytes: int = 0
    sha256: str | None = None
    source: str = "upload"
    civitai_model_id: int | None = None
    civitai_version_id: int | None = None
    added_at: str = field(default_factory=utc_now)
    format: str | None = None  # LoRA format (lora_formats), "checkpoint" for checkpoints
    tags: list[str] = field(default_factory=list)
    nsfw: bool = False
    thumbnail_url: str | None = None
    # A converted LoRA's original file, relative to its folder (kept, never loaded).
    original_file: str | None = None
    missing: bool = False
    # The base-model family a LoRA works with: sdxl | flux (entries from before families read as sdxl).
    family: str = "sdxl"
    # The server whose admins imported it, who may edit and delete it (every server may use it);
    # None: shared, changed by the bot's operators only.
    imported_by_guild: int | None = None
    # A checkpoint's sampler for jobs that name none (`modal_services.jobs.samplers`); None: the base checkpoint's.
    sampler: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LibraryEntry":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    @property
    def label(self) -> str:
        return f"{self.name} ({self.type})"


@dataclass
class ScanReport:
    untracked: list[dict[str, Any]]  # {"file", "type", "size_bytes"}
    missing: list[str]  # files of entries whose file is gone
    restored: int = 0  # entries the store's cache had forgotten, read back from their sidecars

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_name(value: str) -> str:
    name = " ".join("".join(ch for ch in (value or "") if ch.isprintable()).split())
    if not name:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "A model name cannot be empty.")
    if len(name) > MAX_NAME:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"A model name is at most {MAX_NAME} characters.")
    return name


def parse_trigger_words(value: str | list[str]) -> list[str]:
    """`"a, b"` or a list, trimmed and deduplicated; bounded so one entry cannot grow without end."""
    parts = value.split(",") if isinstance(value, str) else [p for item in value for p in str(item).split(",")]
    seen: dict[str, str] = {}
    for part in parts:
        word = " ".join("".join(ch for ch in part if ch.isprintable()).split())
        if not word:
            continue
        if len(word) > MAX_TRIGGER_CHARS:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"A trigger word is at most {MAX_TRIGGER_CHARS} characters.")
        seen.setdefault(word.lower(), word)
    if len(seen) > MAX_TRIGGER_WORDS:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"At most {MAX_TRIGGER_WORDS} trigger words.")
    return list(seen.values())


def lora_weight(name: str, value: Any) -> float:
    """A recommended weight within the range every LoRA reference allows (INVALID_INPUT otherwise)."""
    return round(LoraRef.parse({"name": name, "weight": value}).weight, 3)


def checkpoint_sampler(value: str) -> str | None:
    """A checkpoint's sampler as an edit gives it: a sampler's name (INVALID_INPUT for any other), or
    `NO_SAMPLER` for None."""
    if value.strip().lower() == NO_SAMPLER:
        return None
    name = sampler_named(value)
    if name is None:
        raise ToolboxError(ErrorCode.INVALID_INPUT, unknown_sampler(value))
    return name


class Library:
    def __init__(self, store: StateStore, loras_dir: Path, models_dir: Path, files_visible: bool = True):
        self.store = store
        self.loras_dir = Path(loras_dir)
        self.models_dir = Path(models_dir)
        self.files_visible = files_visible

    @classmethod
    def for_backend(cls, store: StateStore, local: bool, data_loras_dir: Path, data_models_dir: Path) -> "Library":
        """The bot's and the CLI's view: the data dir's folders locally; on Modal the volume paths, unseen."""
        if local:
            return cls(store, data_loras_dir, data_models_dir, files_visible=True)
        return cls(store, LORAS_MOUNT, MODELS_MOUNT, files_visible=False)

    # ------------------------------------------------------------ paths

    def folder(self, kind: str) -> Path:
        if kind not in TYPES:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"A model type is one of {', '.join(TYPES)}, not {kind!r}.")
        return self.loras_dir / (LORAS_SUBDIR if kind == "lora" else CHECKPOINTS_SUBDIR)

    def path_of(self, entry: LibraryEntry) -> Path:
        return self.folder(entry.type) / entry.file

    def original_path(self, entry: LibraryEntry) -> Path | None:
        return self.folder(entry.type) / entry.original_file if entry.original_file else None

    def default_checkpoint_path(self) -> Path:
        return self.models_dir / ILLUSTRIOUS_CHECKPOINT

    def to_json(self, entry: LibraryEntry) -> dict[str, Any]:
        """The library entry as `--json` prints it: the stored fields plus the file's absolute path."""
        return {**entry.to_dict(), "path": str(self.path_of(entry))}

    # ------------------------------------------------------------ reading

    async def entries(self, kind: str | None = None) -> list[LibraryEntry]:
        found = [LibraryEntry.from_dict(value) for value in (await self.store.items(ENTRY_PREFIX)).values()]
        if kind is not None:
            self.folder(kind)  # validates the type
            found = [entry for entry in found if entry.type == kind]
        if self.files_visible and found:
            exists = await asyncio.to_thread(lambda: [self.path_of(e).is_file() for e in found])
            for entry, present in zip(found, exists):
                entry.missing = not present
        return sorted(found, key=lambda entry: (entry.name.lower(), entry.file.lower()))

    async def get(self, file: str) -> LibraryEntry | None:
        value = await self.store.get(entry_key(file))
        if value is None:
            return None
        entry = LibraryEntry.from_dict(value)
        if self.files_visible:
            entry.missing = not await asyncio.to_thread(self.path_of(entry).is_file)
        return entry

    async def find(self, name: str, kind: str | None = None) -> LibraryEntry:
        """By file name, else by display name or file stem (case-insensitive); INVALID_INPUT if ambiguous."""
        wanted = (name or "").strip()
        if not wanted:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"Name a model ({remedies.list_library()}).")
        exact = await self.get(wanted)
        if exact is not None and (kind is None or exact.type == kind):
            return exact
        lowered = wanted.lower()
        candidates = await self.entries(kind)
        for test in (
            lambda e: e.file.lower() == lowered,
            lambda e: e.name.lower() == lowered,
            lambda e: e.file.lower().removesuffix(SUFFIX) == lowered.removesuffix(SUFFIX),
        ):
            matches = [entry for entry in candidates if test(entry)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                files = ", ".join(entry.file for entry in matches[:10])
                raise ToolboxError(ErrorCode.INVALID_INPUT, f"Several models are called {wanted!r}: use the file name ({files}).")
        what = f"{kind} " if kind else "model "
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"No {what}named {wanted!r} in the library ({remedies.list_library()}).")

    async def search(self, query: str | None = None, kind: str | None = None) -> list[LibraryEntry]:
        """Entries whose name, file, tags, trigger words or base model contain `query`; name matches first."""
        found = await self.entries(kind)
        words = (query or "").strip().lower()
        if not words:
            return found

        def rank(entry: LibraryEntry) -> int | None:
            if words in entry.name.lower() or words in entry.file.lower().removesuffix(SUFFIX):
                return 0
            if any(words in word.lower() for word in entry.trigger_words):
                return 1
            if any(words in tag.lower() for tag in entry.tags) or words in entry.base_model.lower():
                return 2
            return None

        ranked = [(rank(entry), entry) for entry in found]
        return [entry for score, entry in sorted((r for r in ranked if r[0] is not None), key=lambda r: r[0])]

    async def by_version(self, version_id: int) -> LibraryEntry | None:
        for entry in await self.entries():
            if entry.civitai_version_id == version_id:
                return entry
        return None

    async def by_model(self, model_id: int) -> LibraryEntry | None:
        """An entry of any version of CivitAI model `model_id` whose file is there."""
        for entry in await self.entries():
            if entry.civitai_model_id == model_id and not entry.missing:
                return entry
        return None

    async def by_sha256(self, sha256: str) -> LibraryEntry | None:
        for entry in await self.entries():
            if entry.sha256 and entry.sha256 == sha256.lower():
                return entry
        return None

    async def choices(self, current: str, kind: str | None = None, limit: int = AUTOCOMPLETE_LIMIT,
                      family: str | None = None) -> list[tuple[str, str]]:
        """Autocomplete: (label, file) pairs from the store only, so it answers in milliseconds."""
        entries = [LibraryEntry.from_dict(v) for v in (await self.store.items(ENTRY_PREFIX)).values()]
        if kind is not None:
            entries = [entry for entry in entries if entry.type == kind]
        if family is not None:
            entries = [entry for entry in entries if entry.family == family]
        text = (current or "").strip().lower()
        matches = [e for e in entries if not text or text in e.name.lower() or text in e.file.lower().removesuffix(SUFFIX)
                   or any(text in w.lower() for w in e.trigger_words)]
        matches.sort(key=lambda e: (not e.name.lower().startswith(text), e.name.lower()))
        return [(_choice_label(entry), entry.file) for entry in matches[:limit]]

    async def taken_names(self) -> set[str]:
        """File names in use anywhere in the library: entry keys and (when visible) files on disk."""
        taken = {key[len(ENTRY_PREFIX):] for key in await self.store.keys(ENTRY_PREFIX)}
        if self.files_visible:
            taken |= await asyncio.to_thread(self._files_on_disk)
        return taken

    def _files_on_disk(self) -> set[str]:
        names: set[str] = set()
        for kind in TYPES:
            folder = self.folder(kind)
            if folder.is_dir():
                names |= {path.name for path in folder.iterdir()}
        return names

    # ------------------------------------------------------------ writing entries

    async def add(self, entry: LibraryEntry) -> LibraryEntry:
        """Write an entry whose file is already in place."""
        if entry.type not in TYPES:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"Unknown model type {entry.type!r}.")
        if self.files_visible and not await asyncio.to_thread(self.path_of(entry).is_file):
            raise ToolboxError(ErrorCode.INTERNAL, f"{entry.file} is not in place; its entry was not written.")
        entry.missing = False
        await self.store.put(entry_key(entry.file), entry.to_dict())
        return entry

    async def edit(
        self,
        name: str,
        display_name: str | None = None,
        trigger_words: str | list[str] | None = None,
        weight: float | None = None,
        sampler: str | None = None,
    ) -> LibraryEntry:
        """Change what is given (a checkpoint's `sampler`: a name, or `NO_SAMPLER`); the entry is read and written holding its file's lock, so two admins
        editing one model at once (or an edit during its re-import) keep both changes."""
        found = await self.find(name)
        busy = f"{found.name} is being changed by someone else (an edit or an import); try again in a moment."
        async with holding(self.store, file_lock_name(found.file), busy, EDIT_LOCK_WAIT_SECONDS):
            return await self._edit(found.file, display_name, trigger_words, weight, sampler)

    async def _edit(self, file: str, display_name: str | None, trigger_words: str | list[str] | None,
                    weight: float | None, sampler: str | None) -> LibraryEntry:
        entry = await self.get(file)
        if entry is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{file} was removed from the library meanwhile.")
        # Everything is checked before anything is written.
        new_name = clean_name(display_name) if display_name is not None else entry.name
        new_words = parse_trigger_words(trigger_words) if trigger_words is not None else entry.trigger_words
        new_weight = entry.weight
        if weight is not None:
            if entry.type != "lora":
                raise ToolboxError(ErrorCode.INVALID_INPUT, "Only LoRAs have a weight.")
            # Within the range every job accepts, checked as a job would check it.
            new_weight = lora_weight(entry.name, weight)
        new_sampler = entry.sampler
        if sampler is not None:
            if entry.type != "checkpoint":
                raise ToolboxError(ErrorCode.INVALID_INPUT, "Only checkpoints have a sampler.")
            new_sampler = checkpoint_sampler(sampler)
        if display_name is None and trigger_words is None and weight is None and sampler is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT,
                               "Nothing to change: give a new name, trigger words, weight or sampler.")
        entry.name, entry.trigger_words, entry.weight, entry.sampler = new_name, new_words, new_weight, new_sampler
        await self.store.put(entry_key(entry.file), entry.to_dict())
        return entry

    # ------------------------------------------------------------ the active checkpoint

    async def active_checkpoint(self) -> dict[str, Any]:
        """{"key", "name", "file", "path", "default", "sampler"}: the stored choice, or Illustrious-XL; its
        sampler for jobs that name none is its own, else the base checkpoint's (the registry's)."""
        key = await self.store.get(ACTIVE_CHECKPOINT_KEY) or DEFAULT_CHECKPOINT
        base_sampler = BASE_MODELS[DEFAULT_CHECKPOINT].sampler
        if key != DEFAULT_CHECKPOINT:
            value = await self.store.get(entry_key(key))
            if value is not None and value.get("type") == "checkpoint":
                return self.checkpoint_record(LibraryEntry.from_dict(value))
        return {"key": DEFAULT_CHECKPOINT, "name": DEFAULT_CHECKPOINT_NAME, "file": None,
                "path": str(self.default_checkpoint_path()), "default": True, "sampler": base_sampler}

    def checkpoint_record(self, entry: LibraryEntry) -> dict[str, Any]:
        """A library checkpoint as `active_checkpoint` describes one; its sampler its own, else the base's."""
        return {"key": entry.file, "name": entry.name, "file": entry.file, "path": str(self.path_of(entry)),
                "default": False, "sampler": entry.sampler or BASE_MODELS[DEFAULT_CHECKPOINT].sampler}

    async def set_active_checkpoint(self, name: str | None) -> dict[str, Any]:
        wanted = (name or "").strip()
        if not wanted or wanted.lower() in (DEFAULT_CHECKPOINT, "default", DEFAULT_CHECKPOINT_NAME.lower()):
            await self._require_default_checkpoint()
            await self.store.put(ACTIVE_CHECKPOINT_KEY, DEFAULT_CHECKPOINT)
            return await self.active_checkpoint()
        entry = await self.find(wanted, kind="checkpoint")
        if entry.missing:
            raise ToolboxError(ErrorCode.MODELS_MISSING, f"The file of {entry.name} ({entry.file}) is missing; re-import it first.")
        await self.store.put(ACTIVE_CHECKPOINT_KEY, entry.file)
        return await self.active_checkpoint()

    async def _require_default_checkpoint(self) -> None:
        """MODELS_MISSING unless the base checkpoint is installed: its file where it is seen, else its manifest."""
        from modal_services.base_models.states import missing_models

        if self.files_visible:
            installed = await asyncio.to_thread(self.default_checkpoint_path().is_file)
        else:
            installed = not await missing_models(self.store, [DEFAULT_CHECKPOINT])
        if not installed:
            raise ToolboxError(ErrorCode.MODELS_MISSING, f"{DEFAULT_CHECKPOINT_NAME} is not installed: "
                               f"{remedies.download(DEFAULT_CHECKPOINT)}.")

    async def checkpoint_choices(self, current: str) -> list[tuple[str, str]]:
        default = (DEFAULT_CHECKPOINT_NAME, DEFAULT_CHECKPOINT)
        text = (current or "").strip().lower()
        head = [default] if not text or text in DEFAULT_CHECKPOINT_NAME.lower() else []
        return (head + await self.choices(current, kind="checkpoint"))[:AUTOCOMPLETE_LIMIT]

    # ------------------------------------------------------------ files (workers, or the local backend)

    def _require_files(self) -> None:
        if not self.files_visible:
            raise ToolboxError(ErrorCode.INTERNAL, "The model files are on the workers' volume, not visible here.")

    async def delete(self, name: str) -> LibraryEntry:
        """Entry first, then the file (and a converted LoRA's original). The active checkpoint is refused."""
        self._require_files()
        entry = await self.find(name)
        active = await self.active_checkpoint()
        if entry.type == "checkpoint" and active["file"] == entry.file:
            raise ToolboxError(
                ErrorCode.INVALID_INPUT,
                f"{entry.name} is the active checkpoint: {remedies.switch_checkpoint()} first.",
            )
        await self.store.pop(entry_key(entry.file))
        paths = [self.path_of(entry), self.original_path(entry)]
        await asyncio.to_thread(lambda: [p.unlink(missing_ok=True) for p in paths if p is not None])
        return entry

    async def scan(self) -> ScanReport:
        """Untracked files and entries whose file is gone; the `missing` flags are brought up to date."""
        self._require_files()
        report = ScanReport(untracked=[], missing=[])
        if isinstance(self.store, DurableStore):  # the sidecars are the library; the cache may have forgotten some
            report.restored = len((await refreshed_records(self.store, record_kind(ENTRY_PREFIX))).warmed)
        entries = await self.entries()
        for entry in entries:
            stored = await self.store.get(entry_key(entry.file))
            if stored is not None and bool(stored.get("missing")) != entry.missing:
                await self.store.put(entry_key(entry.file), {**stored, "missing": entry.missing})
            if entry.missing:
                report.missing.append(entry.file)
        known = {(entry.type, entry.file) for entry in entries}
        known |= {(entry.type, entry.original_file) for entry in entries if entry.original_file}
        for kind in TYPES:
            for path, size in await asyncio.to_thread(self._model_files, kind):
                if (kind, path.name) not in known:
                    report.untracked.append({"file": path.name, "type": kind, "size_bytes": size})
        return report

    def _model_files(self, kind: str) -> list[tuple[Path, int]]:
        folder = self.folder(kind)
        if not folder.is_dir():
            return []
        return sorted((p, p.stat().st_size) for p in folder.iterdir() if p.is_file() and p.suffix == SUFFIX)


def _choice_label(entry: LibraryEntry) -> str:
    # Discord caps a choice's name at 100 characters.
    label = f"{entry.name} · {entry.type}" + (" (missing)" if entry.missing else "")
    return label if len(label) <= 100 else label[:99] + "…"
