"""Bringing an install of the older Gradio toolbox into this project's layout.

Such an install has, on the LoRA volume (or `<data dir>/loras`):

- LoRA files flat at the root (`lora_929497.safetensors`, uploads);
- `.metadata.json`: `{"active_checkpoint", "models": {file: {type, display_name, trigger_words,
  recommended_weight, civitai_model_id, civitai_version_id, sha256, ...}}}`;
- `.api_tokens.json`: `{"civitai_token", "hf_token"}`;

and on the models volume (or `<data dir>/models`) the base models in the folders this project
uses too, with `.manifest.json` / `.progress.json` at the root, plus the whole-manifest
`"manifest"` key of its `ai-toolbox-model-metadata` Dict on Modal.

The rules:

- files are moved (renamed), never copied, into `loras/` or `checkpoints/`;
- nothing is overwritten: a name already taken keeps both files, the newcomer under a free
  name, and the report says so; a token already set is kept;
- a library entry is written only once its file is in place (and the volume committed), with
  the sha256 computed (streamed, in a thread) when the index has none or a stale one, and
  after the importer's own checks: an SDXL checkpoint, a LoRA that fits SDXL (converted when
  diffusers cannot load its format, the original kept under `.original/`);
- a claimed base model gets its manifest only after its files check out against the source;
- tokens go into the state store, and the old file is removed once every token in it is there;
- every move is journalled in the state store before it happens, so a run killed at any point
  can be run again and finishes the same way; the old index files are retired (renamed
  `*.migrated`) last, which makes a second run a no-op;
- a dry run reads, plans and reports, and changes nothing.

Reading the older toolbox's files is `old_toolbox`; the report is `migration_report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from modal_services.base_models.downloads import fetch_context
from modal_services.base_models.manifests import planned_manifest
from modal_services.base_models.registry import BASE_MODELS
from modal_services.base_models.tokens import LABELS, clean_token, mask
from modal_services.errors import ToolboxError
from modal_services.layout import Layout
from modal_services.library.entries import (
    DEFAULT_CHECKPOINT,
    ORIGINALS_DIR,
    SUFFIX,
    TYPES,
    LibraryEntry,
)
from modal_services.library.file_names import safe_file_name, unique_file_name
from modal_services.library.imports import ModelEngine
from modal_services.library.migration_report import Item, MigrationReport
from modal_services.library.old_toolbox import (
    MANIFEST_FILE,
    METADATA_FILE,
    PICKLE_SUFFIXES,
    PROGRESS_FILE,
    RETIRED_SUFFIX,
    SHA256_HEX,
    TOKEN_FIELDS,
    TOKENS_FILE,
    entry_from_metadata,
    manifest_claims,
    plain_file_name,
    read_index,
)
from modal_services.net.fetchers import fetcher_for
from modal_services.net.transfer.files import sha256_file
from modal_services.state.keys import (
    ACTIVE_CHECKPOINT_KEY,
    MIGRATION_JOURNAL_PREFIX,
    entry_key,
    manifest_key,
    migration_journal_key,
    secret_key,
)

# Where a file is now, and where it is (or, in a dry run, would be) in the library.
Placement = tuple[Path, Path]


def _retire(path: Path) -> Path:
    """Rename an old index to `<name>.migrated` (or `.migrated-2`...): kept for reference, never read again."""
    target = path.with_name(path.name + RETIRED_SUFFIX)
    number = 2
    while target.exists():
        target = path.with_name(f"{path.name}{RETIRED_SUFFIX}-{number}")
        number += 1
    os.replace(path, target)
    return target


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def _move(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # chosen free a moment ago: never replace what appeared since
        raise FileExistsError(dest)
    os.replace(source, dest)


class Migration:
    def __init__(
        self,
        layout: Layout,
        *,
        dict_manifest: Any = None,
        commit: Callable[[], object] | None = None,
        dry_run: bool = False,
        on_step: Callable[[str], None] | None = None,
    ):
        self.models_dir = Path(layout.models_dir)
        self.loras_dir = Path(layout.loras_dir)
        self.store = layout.store
        self.dict_manifest = dict_manifest
        self.commit_hook = commit
        self.dry_run = dry_run
        self.on_step = on_step or (lambda text: None)
        self.installer = ModelEngine(layout, commit=commit)
        self.library = self.installer.library
        self.report = MigrationReport(dry_run)

    async def run(self) -> MigrationReport:
        await self._tokens()
        metadata, problem = await asyncio.to_thread(read_index, self.loras_dir / METADATA_FILE)
        if problem:
            self.report.add("index", METADATA_FILE, "skipped", f"{problem}: left as it is", retry=True)
        index = metadata if isinstance(metadata, dict) else {}
        models = index.get("models") if isinstance(index.get("models"), dict) else {}
        locations = await self._move_root_files(models)
        if any(item.outcome == "moved" for item in self.report.items):
            await self._commit()
        migrated = await self._entries(models, locations)
        await self._active_checkpoint(index.get("active_checkpoint"), migrated)
        await self._manifests()
        # A file that could not be moved is moved by the next run, which still needs its index entry.
        unfinished = problem or any(item.retry for item in self.report.items if item.kind in ("file", "entry"))
        if not unfinished:
            if metadata is not None:
                await self._retire_index(self.loras_dir / METADATA_FILE, "its entries are in the library now")
            if not self.dry_run:
                for key in await self.store.keys(MIGRATION_JOURNAL_PREFIX):
                    await self.store.pop(key)
        if self.report.changed:
            await self._commit()
        return self.report

    async def _commit(self) -> None:
        if self.commit_hook is not None and not self.dry_run:
            await asyncio.to_thread(self.commit_hook)

    # ------------------------------------------------------------ tokens

    async def _tokens(self) -> None:
        path = self.loras_dir / TOKENS_FILE
        data, problem = await asyncio.to_thread(read_index, path)
        if problem or (data is not None and not isinstance(data, dict)):
            self.report.add("token", TOKENS_FILE, "skipped", f"{problem or 'not a JSON object'}: left as it is")
            return
        if data is None:
            return
        settled = True  # every token in the file is in the store (or unusable): the file can go
        for name, value in data.items():
            service = TOKEN_FIELDS.get(name)
            if service is None or not value:
                continue
            label = LABELS[service]
            try:
                token = clean_token(service, str(value))
            except ToolboxError:
                self.report.add("token", label, "skipped", f"the value in {TOKENS_FILE} does not look like a token; dropped")
                continue
            current = await self.store.get(secret_key(service))
            if current and current.get("token"):
                if current["token"] == token:
                    self.report.add("token", label, "skipped", f"{mask(token)} is already set here")
                else:
                    settled = False
                    self.report.add("token", label, "kept", f"{mask(current['token'])} is set here and stays; "
                                    f"{TOKENS_FILE} (with {mask(token)}) is left in place until one of them is removed")
                continue
            if not self.dry_run:
                await self.store.put(secret_key(service), {"token": token, "user": None, "set_at": time.time()})
            self.report.add("token", label, "moved", f"{mask(token)} into the state store")
        if settled:
            if not self.dry_run:
                await asyncio.to_thread(path.unlink, missing_ok=True)
            self.report.add("token", TOKENS_FILE, "removed", "its tokens are in the state store")

    # ------------------------------------------------------------ files at the LoRA volume's root

    async def _move_root_files(self, models: Mapping[str, Any]) -> dict[str, Placement]:
        """Move the root's model files into their folders; returns old name → its placement."""
        root_files = await asyncio.to_thread(self._root_files)
        taken = await self.library.taken_names()
        locations: dict[str, Placement] = {}
        for path in root_files:
            name = path.name
            if path.is_symlink():
                self.report.add("file", name, "skipped", "a symbolic link, not a file: left where it is")
                continue
            if name.lower().endswith(PICKLE_SUFFIXES):
                self.report.add("file", name, "skipped",
                                "not .safetensors (pickle formats run code when loaded): left where it is")
                continue
            meta = models.get(name) if isinstance(models.get(name), dict) else {}
            kind = meta.get("type", "lora")
            if kind not in TYPES:
                self.report.add("file", name, "skipped", f"{METADATA_FILE} calls it a {kind!r}; only LoRAs and "
                                "checkpoints are kept in the library: left where it is")
                continue
            location = await self._move_one(path, kind, taken)
            if location is not None:
                locations[name] = location
        return locations

    def _root_files(self) -> list[Path]:
        if not self.loras_dir.is_dir():
            return []
        return sorted(
            p for p in self.loras_dir.iterdir()
            if (p.is_file() or p.is_symlink()) and p.name.lower().endswith((SUFFIX, *PICKLE_SUFFIXES))
        )

    async def _move_one(self, path: Path, kind: str, taken: set[str]) -> Placement | None:
        name = path.name
        folder = self.library.folder(kind)
        journal = await self.store.get(migration_journal_key(name))
        if journal:  # an interrupted run chose this file's place already
            dest = self.loras_dir / journal["dest"]
            if not dest.exists():
                taken.add(dest.name)
                async with self._claimed_name(dest.name, exact=True):
                    return await self._do_move(path, dest, f"into {journal['dest']} (resuming an interrupted run)")
        wanted = safe_file_name(name)
        dest = folder / wanted
        if wanted.lower() in {t.lower() for t in taken} and dest.is_file() and await asyncio.to_thread(_same_bytes, path, dest):
            self.report.add("file", name, "skipped", f"the same bytes are already at {dest.relative_to(self.loras_dir)}: "
                            "left where it is (delete it when you like)")
            return dest, dest
        async with self._claimed_name(unique_file_name(wanted, taken)) as chosen:
            taken.add(chosen)
            relative = str((folder / chosen).relative_to(self.loras_dir))
            if not self.dry_run:
                await self.store.put(migration_journal_key(name), {"dest": relative, "at": time.time()})
            moved = await self._do_move(path, folder / chosen, f"into {relative}")
        if moved is not None and chosen.lower() != wanted.lower():
            self.report.add("file", name, "kept", f"{folder.name}/{wanted} is taken (a file, an entry or an import "
                            f"under way): both kept, this one as {relative}")
        return moved

    @contextlib.asynccontextmanager
    async def _claimed_name(self, wanted: str, exact: bool = False):
        """A library file name held under the lock every install takes, so no import lands on it meanwhile
        (a dry run takes none)."""
        if self.dry_run:
            yield wanted
            return
        async with self.installer.claimed_file_name(wanted, exact) as chosen:
            yield chosen

    async def _do_move(self, path: Path, dest: Path, detail: str) -> Placement | None:
        if not self.dry_run:
            try:
                await asyncio.to_thread(_move, path, dest)
            except OSError as exc:
                self.report.add("file", path.name, "skipped", f"could not be moved ({exc.strerror or type(exc).__name__})",
                                retry=True)
                return None
        self.report.add("file", path.name, "moved", detail)
        return (path, dest) if self.dry_run else (dest, dest)

    # ------------------------------------------------------------ library entries from .metadata.json

    async def _entries(self, models: Mapping[str, Any], locations: Mapping[str, Placement]) -> dict[str, str]:
        """One library entry per usable index entry; returns old name → file name in the library."""
        migrated: dict[str, str] = {}
        names = {entry.name.lower() for entry in await self.library.entries()}
        for old_name, meta in models.items():
            if not plain_file_name(old_name) or not isinstance(meta, dict):
                self.report.add("entry", str(old_name)[:120], "skipped", "not a plain .safetensors file name")
                continue
            kind = meta.get("type", "lora")
            if kind not in TYPES:
                self.report.add("entry", old_name, "skipped", f"type {kind!r} is neither a LoRA nor a checkpoint")
                continue
            placement = await self._locate(old_name, kind, locations)
            if placement is None:
                self.report.add("entry", old_name, "skipped", "its file is not on the volume (not at the root, "
                                f"nor in {self.library.folder(kind).name}/)")
                continue
            path, final = placement
            if await self.store.contains(entry_key(final.name)):
                self.report.add("entry", final.name, "skipped", "already in the library")
                migrated[old_name] = final.name
                continue
            try:
                entry = await self._entry_for(path, final.name, kind, meta, names)
            except ToolboxError as error:
                self.report.add("entry", old_name, "skipped", f"{error.message} (the file stays; `toolbox models "
                                "scan --adopt` can add it)")
                continue
            if not self.dry_run:
                try:
                    # The importer's own checks: an SDXL checkpoint, a LoRA that fits SDXL (converted to a
                    # format diffusers loads when it is not one, the original kept).
                    entry = await self.installer.install_in_place(path, entry)
                except ToolboxError as error:
                    self.report.add("entry", old_name, "skipped", f"{error.message} (the file stays in "
                                    f"{path.parent.name}/, outside the library)")
                    continue
            names.add(entry.name.lower())
            migrated[old_name] = entry.file
            words = ", ".join(entry.trigger_words) or "no trigger words"
            form = f"{entry.format} " if entry.format and entry.format != entry.type else ""
            self.report.add("entry", entry.file, "added", f"{entry.name} ({form}{entry.type}; {words})")
        return migrated

    async def _locate(self, old_name: str, kind: str, locations: Mapping[str, Placement]) -> Placement | None:
        if old_name in locations:
            return locations[old_name]
        journal = await self.store.get(migration_journal_key(old_name))
        candidates = [self.loras_dir / journal["dest"]] if journal else []
        candidates.append(self.library.folder(kind) / old_name)  # already in the newer layout
        for candidate in candidates:
            # A run killed while converting this LoRA set its original aside (and perhaps put the
            # conversion in place) but wrote no entry: it is converted again from the original.
            original = candidate.parent / ORIGINALS_DIR / candidate.name
            if await asyncio.to_thread(original.is_file) and not await self.store.contains(entry_key(candidate.name)):
                if not self.dry_run:
                    await asyncio.to_thread(candidate.unlink, missing_ok=True)
                return await self._do_move(original, candidate, f"back into {candidate.parent.name}/ (resuming an "
                                           "interrupted conversion)")
        for candidate in candidates:
            if await asyncio.to_thread(candidate.is_file):
                return candidate, candidate
        return None

    async def _entry_for(self, path: Path, file: str, kind: str, meta: Mapping[str, Any], names: set[str]) -> LibraryEntry:
        """The entry for the file now at `path`, to be called `file` in the library."""
        size = (await asyncio.to_thread(path.stat)).st_size
        sha256 = str(meta.get("sha256") or "").lower()
        if not SHA256_HEX.fullmatch(sha256) or meta.get("file_size_bytes") not in (None, size):
            if self.dry_run:
                sha256 = None
            else:
                self.on_step(f"computing the sha256 of {path.name}")
                sha256 = await asyncio.to_thread(sha256_file, path)
        return entry_from_metadata(file, kind, meta, size, sha256, names)

    async def _active_checkpoint(self, wanted: Any, migrated: Mapping[str, str]) -> None:
        if not isinstance(wanted, str) or wanted in ("", DEFAULT_CHECKPOINT) or wanted not in migrated:
            return
        if await self.store.contains(ACTIVE_CHECKPOINT_KEY):
            self.report.add("entry", "active checkpoint", "skipped", "one is already chosen here; it stays")
            return
        file = migrated[wanted]
        if not self.dry_run:
            await self.library.set_active_checkpoint(file)
        self.report.add("entry", "active checkpoint", "recorded", file)

    # ------------------------------------------------------------ base-model manifests

    async def _manifests(self) -> None:
        path = self.models_dir / MANIFEST_FILE
        data, problem = await asyncio.to_thread(read_index, path)
        if problem:
            self.report.add("index", MANIFEST_FILE, "skipped", f"{problem}: left as it is", retry=True)
        claims = {key: "the old metadata Dict" for key in manifest_claims(self.dict_manifest)}
        claims.update({key: MANIFEST_FILE for key in manifest_claims(data)})
        file_items = [await self._claim(key, where) for key, where in sorted(claims.items())]
        if data is not None and not problem and not any(item.retry for item in file_items):
            await self._retire_index(path, "its claims were checked")
        progress = self.models_dir / PROGRESS_FILE
        if await asyncio.to_thread(progress.is_file):
            if not self.dry_run:
                await asyncio.to_thread(progress.unlink, missing_ok=True)
            self.report.add("index", PROGRESS_FILE, "removed", "progress of the older toolbox's downloads, not used here")

    async def _claim(self, key: str, where: str) -> Item:
        entry = BASE_MODELS.get(key)
        if entry is None:
            return self.report.add("manifest", key, "skipped", "not a base model here (the older toolbox's LoRAs "
                                   "are migrated from the LoRA volume)")
        existing = await self.store.get(manifest_key(key))
        if existing and existing.get("complete"):
            return self.report.add("manifest", key, "skipped", "already recorded here")
        folder = self.models_dir / entry.folder
        if not await asyncio.to_thread(lambda: folder.is_dir() and any(folder.iterdir())):
            return self.report.add("manifest", key, "skipped", f"{where} claims it complete, but its files are not "
                                   f"on the volume: `toolbox setup --only {key}` downloads it")
        if self.dry_run:
            return self.report.add("manifest", key, "recorded", "once its files check out against the source")
        self.on_step(f"checking {entry.name} against its source")
        try:
            plan = await asyncio.to_thread(fetcher_for(entry).plan, entry, await fetch_context(self.store))
        except ToolboxError as error:
            return self.report.add("manifest", key, "skipped", f"its files could not be listed at the source "
                                   f"({error.code.value}: {error.message})", retry=True)
        manifest, wrong = await asyncio.to_thread(planned_manifest, entry, plan, folder)
        if wrong:
            return self.report.add("manifest", key, "skipped", "missing or not matching the source: "
                                   f"{', '.join(wrong[:5])}; `toolbox setup --only {key}` fetches them again")
        await self.store.put(manifest_key(key), {**manifest, "migrated_from": where})
        return self.report.add("manifest", key, "recorded", "its files match the source")

    async def _retire_index(self, path: Path, why: str) -> None:
        if self.dry_run:
            self.report.add("index", path.name, "retired", f"as {path.name}{RETIRED_SUFFIX}: {why}")
            return
        target = await asyncio.to_thread(_retire, path)
        self.report.add("index", path.name, "retired", f"as {target.name}: {why}")
