"""The download engine: base models onto the volumes, with progress records and manifests.

One job ("download") fetches the models a setup asks for, one model at a time
under its `lock:download:<key>`; progress goes to `download:<key>` and the job
record; a verified model gets `manifest:<key>` (`manifests`). The transfers
themselves are `net/fetchers.py` (by source kind) over the `transfer` package.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Callable

from modal_services.base_models.manifests import check_files, convert_pickles, file_problems, verified_manifest
from modal_services.base_models.optional_models import enabled_models, gated_refusal, setup_entries
from modal_services.base_models.states import ACTIVE_STATES, describe_state
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import ProgressFn
from modal_services.jobs.requests import DownloadRequest, VerifyRequest
from modal_services.layout import Layout
from modal_services.net.egress import HostUnreachable
from modal_services.net.fetchers import FetchContext, fetcher_for
from modal_services.net.transfer.errors import DownloadHTTPError, is_disk_full, storage_full
from modal_services.state.keys import download_key, manifest_key
from modal_services.state.locks import HEARTBEAT_SECONDS, holder_record, refresh_lock, release_lock, try_lock
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # progress records are written at most once per tick
LOCK_POLL_SECONDS = 1.0
RATE_SMOOTHING = 0.3  # weight of the newest sample in the moving average of bytes/s


async def fetch_context(store: StateStore) -> FetchContext:
    """What the fetchers need: the hub endpoint and the tokens (/setup's, else the environment's)."""
    from modal_services.base_models.tokens import get_token

    return FetchContext(
        hf_endpoint=os.environ.get("HF_ENDPOINT") or None,
        hf_token=await get_token(store, "hf"),
        civitai_token=await get_token(store, "civitai"),
    )


class _Live:
    """One model in this run. Worker threads add bytes; the event loop writes the record."""

    def __init__(self, entry):
        self.entry = entry
        self.status = "queued"
        self.owned = False  # only the lock holder writes `download:<key>`
        self.total = entry.approx_bytes
        self.finished_bytes = 0  # files done
        self.current = 0  # bytes of the file in flight
        self.file: str | None = None
        self.error: ToolboxError | None = None
        self.started_at: float | None = None
        self.rate = 0.0
        self._sample: tuple[float, int] | None = None
        self.stopped: ToolboxError | None = None  # a cancel for this run: the transfer threads raise it

    @property
    def done(self) -> int:
        return self.finished_bytes + self.current

    def on_bytes(self, n: int) -> None:
        """Called from the transfer threads (often): where a cancel reaches them."""
        if self.stopped is not None:
            raise self.stopped
        self.current = n  # an int store is atomic: no lock needed between one writer and one reader

    def sample_rate(self, now: float) -> None:
        if self._sample is not None:
            then, before = self._sample
            if now > then:
                instant = max(0.0, (self.done - before) / (now - then))
                self.rate = instant if self.rate == 0 else (1 - RATE_SMOOTHING) * self.rate + RATE_SMOOTHING * instant
        self._sample = (now, self.done)

    def record(self) -> dict:
        remaining = max(self.total - self.done, 0)
        return {
            "key": self.entry.key,
            "name": self.entry.name,
            "status": self.status,
            "bytes_done": self.done,
            "bytes_total": self.total,
            "rate": round(self.rate, 1),
            "eta": round(remaining / self.rate, 1) if self.rate > 0 and self.status == "downloading" else None,
            "file": self.file,
            "error_code": self.error.code.value if self.error else None,
            "error": self.error.message if self.error else None,
            "started_at": self.started_at,
            "updated_at": time.time(),
            **holder_record(),
        }


Hook = Callable[[], object]


class DownloadEngine:
    """Downloads base models onto the volumes; job kind "download" (and "verify").

    `store` holds locks, progress records, manifests and tokens. `commit` /
    `reload` are the volume hooks (Modal: `volume.commit` / `volume.reload`;
    local folders: none). Methods are blocking and run in a worker thread;
    inside, one event loop of their own drives the store while the transfers
    run in threads.
    """

    def __init__(self, layout: Layout, commit: Hook | None = None, reload: Hook | None = None, registry=None):
        self.roots = {"models": layout.models_dir, "loras": layout.loras_dir}
        self.store = layout.store
        self.commit_hook = commit
        self.reload_hook = reload
        self.registry = registry
        self.loaded = False

    def load(self) -> None:
        if self.store is None:
            raise ToolboxError(ErrorCode.INTERNAL, "The download engine has no state store.")
        self.loaded = True

    def folder(self, entry) -> Path:
        root = self.roots.get(entry.volume)
        if root is None:
            raise ToolboxError(ErrorCode.INVALID_INPUT, f"{entry.key} belongs on the {entry.volume} volume, which is not mounted here.")
        return root / entry.folder

    # -- job methods (blocking) --------------------------------------------------
    def download(self, request: DownloadRequest, progress: ProgressFn) -> dict[str, str]:
        """Download every model of `request.keys` (all when empty) that is not present; returns key → state."""
        return asyncio.run(self._download(request.keys, progress))

    def verify(self, request: VerifyRequest, progress: ProgressFn) -> dict[str, dict]:
        """Re-check files on disk (sizes and hashes); fix manifests. Returns key → state dict."""
        return asyncio.run(self._verify(request.keys, progress))

    # -- helpers -------------------------------------------------------------------
    async def _hook(self, hook: Hook | None) -> None:
        if hook is not None:
            await asyncio.to_thread(hook)

    async def present(self, entry) -> bool:
        """A complete manifest *and* the files on disk (sizes, published hashes); a wrong file is removed for a re-fetch."""
        manifest = await self.store.get(manifest_key(entry.key))
        if not (manifest and manifest.get("complete")):
            return False
        folder = self.folder(entry)
        problems = await asyncio.to_thread(file_problems, folder, manifest, published=entry.published)
        for name, problem in problems.items():
            if problem != "is missing":  # same size but wrong bytes would otherwise be kept as finished
                await asyncio.to_thread((folder / name).unlink, missing_ok=True)
        return not problems

    async def _write(self, live: _Live) -> None:
        if live.owned:
            await self.store.put(download_key(live.entry.key), live.record())

    async def _tick(self, lives: list[_Live], progress, owner: str) -> None:
        """Writes progress records and the job's overall progress; refreshes held locks."""
        last_beat = time.monotonic()
        while True:
            now = time.monotonic()
            for live in lives:
                live.sample_rate(now)
                if live.status in ACTIVE_STATES:
                    await self._write(live)
            total = sum(live.total for live in lives) or 1
            done = sum(live.total if live.status == "complete" else min(live.done, live.total) for live in lives)
            current = next((live for live in lives if live.status in ACTIVE_STATES[1:]), None)
            stage = f"{current.status} {current.entry.name}" if current else "downloading"
            try:
                progress(done / total, stage)
            except ToolboxError as error:  # a cancel: every transfer of this run stops at its next read
                for live in lives:
                    live.stopped = error
                return
            if now - last_beat >= HEARTBEAT_SECONDS:
                last_beat = now
                for live in lives:
                    if live.owned:
                        await refresh_lock(self.store, download_key(live.entry.key), owner)
            await asyncio.sleep(TICK_SECONDS)

    async def _acquire(self, live: _Live, owner: str) -> None:
        """Wait for this model's lock: someone else downloading it is a reason to wait, not to download twice."""
        name = download_key(live.entry.key)
        live.status = "waiting"
        while not await try_lock(self.store, name, owner):
            await asyncio.sleep(LOCK_POLL_SECONDS)
        live.owned = True

    async def _download(self, keys: list[str], progress) -> dict[str, str]:
        from modal_services.base_models.registry import resolve_keys

        enabled = await enabled_models(self.store, self.registry)
        entries = resolve_keys(keys, self.registry, enabled)
        for entry in entries:
            if entry.optional is not None and entry.key not in enabled:
                raise ToolboxError(ErrorCode.INVALID_INPUT, (
                    f"{entry.name} is optional and not enabled, so it is not downloaded: "
                    f"{remedies.enable(entry.key)}."))
        owner = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
        await self._hook(self.reload_hook)
        ctx = await fetch_context(self.store)
        lives = [_Live(entry) for entry in entries]
        ticker = asyncio.create_task(self._tick(lives, progress, owner))
        results: dict[str, str] = {}
        try:
            for live in lives:
                if await self.present(live.entry):
                    live.status = "complete"
                    results[live.entry.key] = "present"
                    continue
                try:
                    await self._acquire(live, owner)
                    try:
                        results[live.entry.key] = await self._download_one(live, ctx)
                    finally:
                        live.owned = live.status in ("complete", "failed")  # the final record is ours to write
                        await self._write(live)
                        live.owned = False
                        await release_lock(self.store, download_key(live.entry.key), owner)
                except ToolboxError as error:
                    results[live.entry.key] = "failed"
                    if error.code in (ErrorCode.STORAGE_FULL, ErrorCode.CANCELLED) or isinstance(error, HostUnreachable):
                        raise  # every later model would fail the same way, or was not wanted any more
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        failed = [live for live in lives if live.status == "failed"]
        if failed:
            first = failed[0].error
            names = ", ".join(live.entry.key for live in failed)
            raise ToolboxError(first.code, f"{len(failed)} of {len(lives)} models failed ({names}). {first.message}")
        progress(1.0, "done")
        return results

    async def _download_one(self, live: _Live, ctx: FetchContext) -> str:
        entry = live.entry
        if await self.present(entry):  # finished by whoever held the lock before us
            live.status = "complete"
            return "present"
        folder = self.folder(entry)
        live.status, live.started_at = "starting", time.time()
        await self._write(live)
        fetcher = fetcher_for(entry)
        try:
            await asyncio.to_thread(_discard_orphans, folder)
            plan = await asyncio.to_thread(fetcher.plan, entry, ctx)
            live.total = plan.total or entry.approx_bytes
            live.status = "downloading"
            for file in plan.files:
                live.file, live.current = file.dest, 0
                target = folder / file.dest
                if not (file.size is not None and target.is_file() and target.stat().st_size == file.size):
                    await asyncio.to_thread(fetcher.fetch, entry, plan, file, folder, ctx, live.on_bytes)
                live.current = 0
                live.finished_bytes += file.size or target.stat().st_size
            live.status, live.file = "verifying", None
            manifest = await asyncio.to_thread(verified_manifest, entry, plan, folder)
            if entry.converted:
                live.status = "converting"
                manifest = await asyncio.to_thread(convert_pickles, entry, folder, manifest)
            await self._hook(self.commit_hook)
            await self.store.put(manifest_key(entry.key), manifest)
        except ToolboxError as error:
            if isinstance(error, DownloadHTTPError) and error.status in (401, 403) and entry.optional and entry.optional.gated:
                error = gated_refusal(entry, token_set=ctx.hf_token is not None)
            live.status, live.error = "failed", error
            log.warning("download of %s failed: %s: %s", entry.key, error.code.value, error.message)
            raise error
        except OSError as exc:
            error = storage_full(entry.name) if is_disk_full(exc) else ToolboxError(
                ErrorCode.DOWNLOAD_FAILED, f"Writing {entry.name} failed ({exc.strerror or type(exc).__name__}).")
            live.status, live.error = "failed", error
            raise error from exc
        except Exception as exc:
            # Logged in full here; the record says only that something broke.
            log.exception("download of %s failed unexpectedly", entry.key)
            error = ToolboxError(ErrorCode.INTERNAL, f"Downloading {entry.name} failed unexpectedly; it has been logged.")
            live.status, live.error = "failed", error
            raise error from exc
        live.status = "complete"
        return "downloaded"

    async def _verify(self, keys: list[str], progress) -> dict[str, dict]:
        from modal_services.base_models.registry import resolve_keys

        entries = resolve_keys(keys, self.registry) if keys else await setup_entries(self.store, self.registry)
        await self._hook(self.reload_hook)
        manifests = {e.key: await self.store.get(manifest_key(e.key)) for e in entries}
        total = sum((m or {}).get("size_bytes", 0) for m in manifests.values()) or 1
        checked = 0
        results = {}
        for entry in entries:
            manifest = manifests[entry.key]
            problems: list[str] = []
            if manifest and manifest.get("complete"):
                base = checked
                progress(checked / total, f"verifying {entry.name}")
                problems = await asyncio.to_thread(
                    check_files, self.folder(entry), manifest, True,
                    lambda n, base=base: progress(min((base + n) / total, 1.0), f"verifying {entry.name}"))
                checked += manifest.get("size_bytes", 0)
                if problems:
                    log.warning("verify: %s is damaged (%d problems); manifest removed", entry.key, len(problems))
                    await self.store.pop(manifest_key(entry.key))
                    await self.store.put(download_key(entry.key), {
                        "key": entry.key, "name": entry.name, "status": "failed", "bytes_done": 0,
                        "bytes_total": manifest.get("size_bytes", 0), "error_code": ErrorCode.CHECKSUM_MISMATCH.value,
                        "error": "Verify found: " + "; ".join(problems[:3]) + ". Download it again.",
                        "updated_at": time.time(),
                    })
                else:
                    await self.store.put(manifest_key(entry.key), {**manifest, "verified_at": time.time()})
            record = await self.store.get(download_key(entry.key))
            state = describe_state(entry, None if problems else manifest, record, problems or None)
            results[entry.key] = state.to_dict()
        progress(1.0, "verified")
        return results


def _discard_orphans(folder: Path) -> None:
    """Temp files of a killed run are never resumed as if whole: huggingface_hub's are per-process."""
    cache = folder / ".cache" / "huggingface" / "download"
    if cache.is_dir():
        for orphan in cache.rglob("*.incomplete"):
            orphan.unlink(missing_ok=True)
