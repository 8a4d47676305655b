"""The model library's file work as jobs: import from CivitAI, upload, delete, scan and adopt.

Job kinds (services.py): `model_import`, `model_upload`, `model_delete`,
`model_scan`, all on one `ModelEngine`. Like the download engine, each method
is blocking (it runs in the job's worker thread) and drives the async state
store from an event loop of its own; transfers and tensor work run in threads.

An import, step by step:

1. metadata from CivitAI and the importer's rules (`civitai_plans.plan_import`);
2. already installed (same version, file present)? Then nothing is fetched;
3. `lock:civitai:<version>` (atomic create, heartbeat-refreshed): a second
   import of the same version waits for the first and then finds it installed;
4. the download redirect is resolved and the file fetched by `download_file`
   into `.incoming/` (resume, retries, sha256 against CivitAI's hash);
5. every tensor is checked finite (one at a time); an SDXL LoRA is checked
   against SDXL's layout (and must go beyond what SD 1.5 has) and converted when
   diffusers cannot load it (the original kept under `.original/`), a Flux LoRA
   against FLUX.1's transformer through diffusers' own converters; a checkpoint
   must be an SDXL single-file checkpoint;
6. under `lock:file:<name>` the library file name is chosen (a free one: two
   models whose files share a name both keep theirs), the file renamed into
   place, the volume committed, *then* the entry written.

Anything that fails leaves nothing behind: the incoming files are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from modal_services.library.civitai import CivitaiClient, parse_reference
from modal_services.library.civitai_plans import ImportPlan, plan_from_metadata, plan_import
from modal_services.net.egress import Purpose
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import (
    ModelDeleteRequest,
    ModelImportRequest,
    ModelScanRequest,
    ModelUploadRequest,
)
from modal_services.jobs.records import ProgressFn
from modal_services.state.keys import civitai_lock_name, file_lock_name
from modal_services.layout import Layout
from modal_services.library.entries import (
    ORIGINALS_DIR,
    SUFFIX,
    Library,
    LibraryEntry,
    clean_name,
    parse_trigger_words,
)
from modal_services.library.file_names import safe_file_name, unique_file_name
from modal_services.library.file_checks import check_checkpoint, check_finite, check_lora
from modal_services.state.locks import HEARTBEAT_SECONDS, refresh_lock, release_lock, try_lock
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.errors import DownloadError, DownloadHTTPError, is_disk_full, storage_full
from modal_services.net.transfer.files import max_bytes_for, sha256_file

log = logging.getLogger(__name__)

INCOMING_DIR = ".incoming"
WAIT_POLL_SECONDS = 1.0
Hook = Callable[[], object]


class ModelEngine:
    def __init__(self, layout: Layout, commit: Hook | None = None, reload: Hook | None = None, model_layout=None,
                 flux_layout=None):
        self.loras_dir = layout.loras_dir
        self.models_dir = layout.models_dir
        self.store = layout.store
        self.commit_hook = commit
        self.reload_hook = reload
        self.model_layout = model_layout  # None: SDXL's (lora_formats.layouts.ModelLayout.sdxl)
        self.flux_layout = flux_layout  # None: FLUX.1-dev's (lora_formats.layouts.FluxLayout.flux1_dev)
        self.library = Library(self.store, self.loras_dir, self.models_dir)
        self.wait_poll = WAIT_POLL_SECONDS
        self.loaded = False

    def load(self) -> None:
        for kind in ("lora", "checkpoint"):
            self.library.folder(kind).mkdir(parents=True, exist_ok=True)
        self.loaded = True

    # ------------------------------------------------------------ job methods (blocking)

    def import_model(self, request: ModelImportRequest, progress: ProgressFn) -> dict[str, Any]:
        """Import the CivitAI model `request.ref` names; returns {"entry", "already_installed", "format"}."""
        return asyncio.run(self._import(parse_reference(request.ref), request.api_base, progress, request.guild_id))

    def upload_model(self, request: ModelUploadRequest, progress: ProgressFn) -> dict[str, Any]:
        """Add a file from a URL (a Discord attachment); CivitAI's metadata is looked up by its sha256."""
        return asyncio.run(self._upload(request.url, request.filename, request.type, request.size_bytes, request.name,
                                        request.trigger_words, request.api_base, progress, request.guild_id))

    def delete_model(self, request: ModelDeleteRequest, progress: ProgressFn) -> dict[str, Any]:
        return asyncio.run(self._delete(request.name, progress))

    def scan_library(self, request: ModelScanRequest, progress: ProgressFn) -> dict[str, Any]:
        """Untracked files and missing entries; with `request.adopt`, untracked files become entries."""
        return asyncio.run(self._scan(request.adopt, request.api_base, progress))

    # ------------------------------------------------------------ import

    async def _client(self, api_base: str) -> CivitaiClient:
        from modal_services.base_models.tokens import get_token

        return CivitaiClient(api_base, await get_token(self.store, "civitai"))

    async def _import(self, ref, api_base: str, progress: ProgressFn, guild_id: int | None = None) -> dict[str, Any]:
        progress(0.0, "reading CivitAI")
        client = await self._client(api_base)
        try:
            plan = await asyncio.to_thread(plan_import, client, ref)
            existing = await self.library.by_version(plan.version_id)
            if existing is not None and not existing.missing:
                return self._result(existing, already=True)
            owner = uuid.uuid4().hex
            async with self._locked(civitai_lock_name(plan.version_id), owner, progress):
                existing = await self.library.by_version(plan.version_id)
                if existing is not None and not existing.missing:
                    return self._result(existing, already=True)
                entry = await self._fetch_and_install(client, plan, existing, owner, progress, guild_id)
        finally:
            client.close()
        return self._result(entry, already=False)

    @contextlib.asynccontextmanager
    async def _locked(self, name: str, owner: str, progress: ProgressFn):
        while not await try_lock(self.store, name, owner):
            progress(0.02, "waiting for another import of this version")
            await asyncio.sleep(self.wait_poll)
        beat = asyncio.create_task(self._heartbeat(name, owner))
        try:
            yield
        finally:
            beat.cancel()
            await release_lock(self.store, name, owner)

    @contextlib.asynccontextmanager
    async def _claimed_file_name(self, wanted: str, owner: str, progress: ProgressFn, exact: bool):
        """Hold `lock:file:<name>` on a library file name that no entry, file or other install has.

        Choosing the name, moving the file into place and writing the entry all
        happen while it is held, so two models whose files share a name (bot
        and CLI at once, two containers) get distinct names: never an
        overwrite. `exact`: this very name (a re-import of a missing file, an
        adopted file), waiting for whoever installs it now.
        """
        skipped: set[str] = set()
        while True:
            taken = await self.library.taken_names()
            name = wanted if exact else unique_file_name(wanted, taken | skipped)
            if await try_lock(self.store, file_lock_name(name), owner):
                # Installed by someone between our look and our lock: that name is theirs.
                if exact or name.lower() not in {item.lower() for item in await self.library.taken_names()}:
                    break
                await release_lock(self.store, file_lock_name(name), owner)
            elif exact:
                progress(0.9, f"waiting for another install of {name}")
                await asyncio.sleep(self.wait_poll)
                continue
            skipped.add(name)
        beat = asyncio.create_task(self._heartbeat(file_lock_name(name), owner))
        try:
            yield name
        finally:
            beat.cancel()
            await release_lock(self.store, file_lock_name(name), owner)

    async def _heartbeat(self, name: str, owner: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await refresh_lock(self.store, name, owner)

    async def _fetch_and_install(self, client: CivitaiClient, plan: ImportPlan, existing: LibraryEntry | None,
                                 owner: str, progress: ProgressFn, guild_id: int | None) -> LibraryEntry:
        if existing is not None:
            file_name = existing.file  # re-import of an entry whose file went missing
        else:
            file_name = safe_file_name(plan.file_name, f"civitai-{plan.version_id}")  # the final name is claimed at install
        incoming = self.loras_dir / INCOMING_DIR / owner / file_name
        try:
            progress(0.03, f"downloading {file_name}")
            resolved = await asyncio.to_thread(client.resolve_download, plan.download_url, plan.name)

            def on_bytes(done: int, total: int | None) -> None:
                total = total or plan.size_bytes or None
                fraction = min(done / total, 1.0) if total else 0.0
                progress(0.03 + 0.85 * fraction, f"downloading {file_name} · {_mib(done)}" + (f" / {_mib(total)}" if total else ""))

            try:
                downloaded = await asyncio.to_thread(
                    download_file, resolved.url, incoming, purpose=Purpose.CIVITAI, credentials=resolved.credentials,
                    trusted=(client.api_base,), expected_sha256=plan.sha256, max_bytes=max_bytes_for(plan.type),
                    size_hint=plan.size_bytes, progress=on_bytes,
                )
            except DownloadError as error:
                raise _civitai_error(error, plan) from None
            entry = LibraryEntry(
                name=await self._free_name(plan.name, plan.version_name) if existing is None else existing.name,
                file=file_name, type=plan.type, base_model=plan.base_model, trigger_words=plan.trigger_words,
                weight=1.0 if plan.type == "lora" else None, size_bytes=downloaded.size, sha256=downloaded.sha256,
                source="civitai", civitai_model_id=plan.model_id, civitai_version_id=plan.version_id,
                tags=plan.tags, nsfw=plan.nsfw, thumbnail_url=plan.thumbnail(age_restricted_channel=False),
                family=plan.family, imported_by_guild=guild_id,
            )
            if existing is not None:  # its file back: the entry stays whose it was
                entry.trigger_words, entry.weight, entry.added_at = existing.trigger_words, existing.weight, existing.added_at
                entry.imported_by_guild = existing.imported_by_guild
            return await self._install(incoming, entry, progress, owner, exact=existing is not None)
        finally:
            _discard_incoming(incoming)

    async def _install(self, incoming: Path, entry: LibraryEntry, progress: ProgressFn, owner: str,
                       exact: bool = False) -> LibraryEntry:
        """Check (and convert) the file in `.incoming/`; then, under its name's lock, rename it into place,
        commit and write the entry (`entry.file` is the wanted name; the one given is what it gets)."""
        progress(0.9, "checking the file")
        folder = self.library.folder(entry.type)
        converted = incoming.with_name(incoming.name + ".converted")
        try:
            await asyncio.to_thread(check_finite, incoming)
            if entry.type == "lora":
                report = await asyncio.to_thread(check_lora, incoming, converted, entry, self.model_layout, self.flux_layout)
                entry.format = report.format
            else:
                await asyncio.to_thread(check_checkpoint, incoming)
                report, entry.format = None, "checkpoint"
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            async with self._claimed_file_name(entry.file, owner, progress, exact) as file_name:
                entry.file = file_name
                final = folder / file_name
                if report is not None and report.converted:
                    original = folder / ORIGINALS_DIR / file_name
                    await asyncio.to_thread(original.parent.mkdir, exist_ok=True)
                    await asyncio.to_thread(os.replace, incoming, original)
                    await asyncio.to_thread(os.replace, converted, final)
                    entry.original_file = f"{ORIGINALS_DIR}/{file_name}"
                else:
                    await asyncio.to_thread(os.replace, incoming, final)
                await self._commit()
                progress(0.98, "adding to the library")
                return await self.library.add(entry)
        except OSError as exc:
            if is_disk_full(exc):
                raise storage_full(entry.file) from None
            raise
        finally:
            converted.unlink(missing_ok=True)

    async def _free_name(self, name: str, version_name: str) -> str:
        """The model's name, with its version when another entry already has that name."""
        taken = {entry.name.lower() for entry in await self.library.entries()}
        if name.lower() not in taken:
            return name
        return clean_name(f"{name} {version_name}".strip()[:100])

    def _result(self, entry: LibraryEntry, already: bool) -> dict[str, Any]:
        return {"entry": self.library.to_json(entry), "already_installed": already}

    async def _commit(self) -> None:
        if self.commit_hook is not None:
            await asyncio.to_thread(self.commit_hook)

    # ------------------------------------------------------------ upload and adopt

    async def _upload(self, url, filename, kind, size_bytes, name, trigger_words, api_base, progress,
                      guild_id: int | None = None) -> dict[str, Any]:
        self.library.folder(kind)  # validates the type before any transfer
        if not filename.lower().endswith(SUFFIX):
            raise ToolboxError(ErrorCode.INVALID_INPUT, "Only .safetensors files can be added (other formats run code when loaded).")
        display = clean_name(name) if name else None
        words = parse_trigger_words(trigger_words) if trigger_words else None
        file_name = safe_file_name(filename)  # the final name is claimed at install
        owner = uuid.uuid4().hex
        incoming = self.loras_dir / INCOMING_DIR / owner / file_name
        try:
            progress(0.0, f"receiving {file_name}")
            try:
                downloaded = await asyncio.to_thread(
                    download_file, url, incoming, purpose=Purpose.ATTACHMENT, expected_size=size_bytes,
                    max_bytes=max_bytes_for(kind),
                    progress=lambda done, total: progress(0.6 * done / total if total else 0.0, f"receiving {file_name}"),
                )
            except DownloadError as error:
                raise ToolboxError(ErrorCode.INVALID_INPUT, f"The attachment could not be fetched ({error.message})") from None
            same = await self.library.by_sha256(downloaded.sha256)
            if same is not None and not same.missing:
                return self._result(same, already=True)
            entry = await self._describe(file_name, kind, downloaded.size, downloaded.sha256, api_base, progress)
            if display:
                entry.name = display
            if words is not None:
                entry.trigger_words = words
            entry.imported_by_guild = guild_id
            return self._result(await self._install(incoming, entry, progress, owner), already=False)
        finally:
            _discard_incoming(incoming)

    async def _describe(self, file_name: str, kind: str, size: int, sha256: str, api_base: str,
                        progress: ProgressFn) -> LibraryEntry:
        """An entry for a file, filled from CivitAI when it knows the hash (and agrees on the type)."""
        progress(0.65, "looking the file up on CivitAI")
        entry = LibraryEntry(name=file_name.removesuffix(SUFFIX), file=file_name, type=kind, size_bytes=size,
                             sha256=sha256, source="upload", weight=1.0 if kind == "lora" else None)
        client = await self._client(api_base)
        try:
            version = await asyncio.to_thread(client.version_by_hash, sha256)
            model = await asyncio.to_thread(client.model, version["modelId"]) if version and version.get("modelId") else {}
        except ToolboxError as error:
            if error.code not in (ErrorCode.CIVITAI_UNAVAILABLE, ErrorCode.CIVITAI_AUTH_REQUIRED, ErrorCode.CIVITAI_NOT_FOUND):
                raise
            log.info("by-hash lookup skipped: %s", error.code.value)
            return entry
        finally:
            client.close()
        if not version:
            return entry
        plan = plan_from_metadata(version, model)  # SD 1.5, Flux checkpoints, other types: refused here
        if plan.type != kind:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"CivitAI knows this file as a {plan.civitai_type} ({plan.name}), not a {kind}.")
        entry.name = await self._free_name(plan.name, plan.version_name)
        entry.base_model, entry.trigger_words, entry.tags, entry.nsfw = plan.base_model, plan.trigger_words, plan.tags, plan.nsfw
        entry.family = plan.family
        entry.civitai_model_id, entry.civitai_version_id = plan.model_id, plan.version_id
        entry.thumbnail_url = plan.thumbnail(age_restricted_channel=False)
        return entry

    async def _scan(self, adopt: bool, api_base: str, progress: ProgressFn) -> dict[str, Any]:
        if self.reload_hook is not None:
            await asyncio.to_thread(self.reload_hook)
        progress(0.0, "scanning the library")
        report = await self.library.scan()
        adopted, failed = [], []
        if adopt:
            for index, item in enumerate(report.untracked):
                progress(index / max(len(report.untracked), 1), f"adopting {item['file']}")
                try:
                    adopted.append(self.library.to_json(await self._adopt(item["file"], item["type"], api_base, progress)))
                except ToolboxError as error:
                    failed.append({"file": item["file"], "type": item["type"], **error.to_dict()})
        return {**report.to_dict(), "adopted": adopted, "failed": failed}

    async def _adopt(self, file_name: str, kind: str, api_base: str, progress: ProgressFn) -> LibraryEntry:
        path = self.library.folder(kind) / file_name
        owner = uuid.uuid4().hex
        incoming = self.loras_dir / INCOMING_DIR / owner / file_name
        await asyncio.to_thread(incoming.parent.mkdir, parents=True, exist_ok=True)
        # Moved aside while it is checked: a file that fails goes back untouched.
        await asyncio.to_thread(os.replace, path, incoming)
        try:
            sha256 = await asyncio.to_thread(sha256_file, incoming)
            entry = await self._describe(file_name, kind, incoming.stat().st_size, sha256, api_base, progress)
            if entry.civitai_version_id is not None:
                entry.source = "civitai"
            return await self._install(incoming, entry, progress, owner, exact=True)
        finally:
            if incoming.exists():
                await asyncio.to_thread(os.replace, incoming, path)
            _discard_incoming(incoming)

    # ------------------------------------------------------------ delete

    async def _delete(self, name: str, progress: ProgressFn) -> dict[str, Any]:
        progress(0.0, "deleting")
        entry = await self.library.delete(name)
        await self._commit()
        return {"entry": self.library.to_json(entry)}

    # ------------------------------------------------------------ a file already in its folder

    def claimed_file_name(self, wanted: str, exact: bool = False):
        """`lock:file:<name>` on a free library file name (or, `exact`, this very one), held for the block:
        for whoever else puts files into the library's folders."""
        return self._claimed_file_name(wanted, uuid.uuid4().hex, lambda fraction, stage: None, exact)

    async def install_in_place(self, path: Path, entry: LibraryEntry) -> LibraryEntry:
        """An import's checks (and LoRA conversion, the original kept) for a file already where `entry`
        puts it (one the migration moved in), then its entry, under that very name."""
        return await self._install(path, entry, lambda fraction, stage: None, uuid.uuid4().hex, exact=True)


def _civitai_error(error: DownloadError, plan: ImportPlan) -> ToolboxError:
    """The downloader's failure in CivitAI's terms (its CHECKSUM_MISMATCH, STORAGE_FULL and TIMEOUT stay as they are)."""
    if isinstance(error, DownloadHTTPError) and error.status in (401, 403):
        return ToolboxError(ErrorCode.CIVITAI_AUTH_REQUIRED,
                            f"CivitAI's storage refused the download of {plan.name} (HTTP {error.status}). "
                            f"If the model needs an account, {remedies.set_token('civitai')}; then retry.")
    if isinstance(error, DownloadHTTPError) and error.status in (404, 410):
        return ToolboxError(ErrorCode.CIVITAI_NOT_FOUND, f"The file of {plan.name} is gone from CivitAI's storage.")
    if error.code in (ErrorCode.CHECKSUM_MISMATCH, ErrorCode.STORAGE_FULL, ErrorCode.TIMEOUT):
        return error
    return ToolboxError(ErrorCode.CIVITAI_UNAVAILABLE, f"Downloading {plan.name} failed: {error.message} Try again later.")


def _discard_incoming(path: Path) -> None:
    """Remove a job's staging folder (`.incoming/<job>/`) with whatever is left in it, then `.incoming/` if empty."""
    shutil.rmtree(path.parent, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.parent.rmdir()  # only when empty: another job may be using `.incoming/`


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

