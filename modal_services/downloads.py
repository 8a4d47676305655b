"""Downloads onto the volumes: the one place that moves model bytes.

`download_file` is the blocking primitive for plain URLs (the CivitAI importer
uses it too): bounded-memory streaming into `<dest>.partial`, resume with
`Range`, retries with backoff, size and sha256 checks, then an atomic rename.
Nothing half-written is ever left under the final name.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import hashlib
import logging
import os
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import unquote, urlsplit

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.job_requests import DownloadRequest, VerifyRequest, job_method
from modal_services.keys import download_key, lock_key, manifest_key
from modal_services.layout import Layout
from modal_services.state import StateStore

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # bounded memory: one chunk in flight, whatever the file size
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0
RETRY_BASE_DELAY = 1.0
RETRY_MAX_DELAY = 30.0
# A server asking for a longer pause than this is treated as "not now": the
# job fails with RATE_LIMITED instead of holding a worker for an hour.
MAX_RETRY_AFTER = 300.0
PROGRESS_INTERVAL = 0.1  # callbacks at most ~10 per second, plus the final one
PARTIAL_SUFFIX = ".partial"

# Tests replace this to run retries without waiting.
_sleep = time.sleep

T = TypeVar("T")


@dataclass(frozen=True)
class DownloadedFile:
    path: Path
    size: int
    sha256: str
    filename: str | None  # from Content-Disposition, when the server sent one


class DownloadError(ToolboxError):
    """A download that failed after retries; `status` is the last HTTP status seen, if any."""

    def __init__(self, message: str, status: int | None = None, code: ErrorCode | str = ErrorCode.DOWNLOAD_FAILED):
        super().__init__(code, message)
        self.status = status

    def __reduce__(self):
        return (type(self), (self.message, self.status, self.code.value))


class DownloadHTTPError(DownloadError):
    """The server refused for good (401/403/404/410...): retrying will not help.

    Callers map `status` to their own code (CivitAI: 401/403 →
    CIVITAI_AUTH_REQUIRED, 404 → CIVITAI_NOT_FOUND).
    """


def safe_url(url: str) -> str:
    """The URL without credentials or query string (signed URLs and `?token=` stay out of messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PARTIAL_SUFFIX)


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_full(what: str) -> ToolboxError:
    return ToolboxError(ErrorCode.STORAGE_FULL, f"The disk ran out of space while writing {what}. Free some space and retry.")


def _sha256_prefix(path: Path, progress: Callable[[int], None] | None = None):
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE * 8):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return digest


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in bounded chunks; `progress(bytes_read)` as it goes."""
    return _sha256_prefix(path, progress).hexdigest()


_FILENAME_STAR = re.compile(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", re.IGNORECASE)
_FILENAME = re.compile(r'filename\s*=\s*(?:"([^"]*)"|([^;]+))', re.IGNORECASE)


def filename_from_disposition(header: str | None) -> str | None:
    """The file name a `Content-Disposition` header offers, reduced to a safe base name."""
    if not header:
        return None
    match = _FILENAME_STAR.search(header)
    if match:
        name = unquote(match.group(2).strip().strip('"'), encoding=match.group(1) or "utf-8", errors="replace")
    else:
        match = _FILENAME.search(header)
        if not match:
            return None
        name = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
    # A server must not be able to pick a path: keep only the last component.
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name if name not in ("", ".", "..") else None


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(failures: int) -> float:
    # Exponential with jitter, so that many clients do not retry in step.
    return min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (failures - 1)) * random.uniform(0.75, 1.25)


class _Throttled:
    """Calls `progress(done, total)` at most every PROGRESS_INTERVAL, and always when asked to flush."""

    def __init__(self, progress: Callable[[int, int | None], None] | None):
        self.progress = progress
        self.last = float("-inf")

    def __call__(self, done: int, total: int | None, flush: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if flush or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.progress(done, total)


def _total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) from `Content-Range: bytes a-b/total` or `bytes */total`."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def download_file(
    url: str,
    dest: Path,
    *,
    headers: Mapping[str, str] | None = None,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    retries: int = 5,
) -> DownloadedFile:
    """Download `url` to `dest` (blocking), verified, via `<dest>.partial` and an atomic rename.

    - An existing `.partial` (an earlier attempt, or a killed process) is
      resumed with `Range` when the server allows it, otherwise restarted.
    - 429 (honouring `Retry-After`), 408, 5xx and dropped connections are
      retried with backoff; `retries` counts failures in a row without new bytes.
    - 401/403/404/410 and other refusals raise `DownloadHTTPError` (with `.status`).
    - Wrong size or sha256: CHECKSUM_MISMATCH; a full disk: STORAGE_FULL.
      Both remove the partial; `dest` is never touched.
    """
    import requests

    dest = Path(dest)
    partial = partial_path(dest)
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    where = safe_url(url)
    report = _Throttled(progress)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def discard() -> None:
        partial.unlink(missing_ok=True)

    def mismatch(message: str) -> ToolboxError:
        discard()
        return ToolboxError(ErrorCode.CHECKSUM_MISMATCH, f"{dest.name}: {message} The partial download was removed; retry.")

    filename: str | None = None
    total: int | None = expected_size
    # The hash follows the bytes on disk: a resumed prefix is hashed once, then
    # every new chunk as it arrives (no second read of a multi-GB file).
    digest, hashed = _BackgroundSha256(), 0
    failures = 0
    last_status: int | None = None
    with requests.Session() as session:
        while True:
            done = partial.stat().st_size if partial.exists() else 0
            if expected_size is not None and done > expected_size:
                discard()  # longer than the file can be: not a prefix of it
                done = 0
            request_headers = {"Accept-Encoding": "identity", **(headers or {})}
            if done:
                request_headers["Range"] = f"bytes={done}-"
            progressed = False
            delay: float | None = None
            try:
                with session.get(url, headers=request_headers, stream=True,
                                 timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as response:
                    status = last_status = response.status_code
                    if status == 416 and done:
                        # Asked for bytes past the end: the partial may already be whole.
                        _, server_total = _total_from_content_range(response.headers.get("Content-Range"))
                        if server_total == done:
                            total = done
                            break
                        discard()
                        continue
                    if status in (408, 429) or status >= 500:
                        delay = retry_after_seconds(response.headers.get("Retry-After"))
                        if delay is not None and delay > MAX_RETRY_AFTER:
                            raise DownloadError(
                                f"{where} asked to wait {delay:.0f} s before retrying.", status, ErrorCode.RATE_LIMITED
                            )
                        raise _Transient(f"HTTP {status}")
                    if status >= 400 or status not in (200, 206):
                        raise DownloadHTTPError(f"{where} answered HTTP {status}.", status)

                    mode = "ab"
                    if status == 206:
                        first, server_total = _total_from_content_range(response.headers.get("Content-Range"))
                        if first != done:
                            discard()  # a range we did not ask for: start over cleanly
                            continue
                    else:
                        # 200: the whole file, whether or not we asked for a range.
                        mode, done = "wb", 0
                        length = response.headers.get("Content-Length")
                        server_total = int(length) if length and length.isdigit() else None
                    if server_total is not None:
                        if expected_size is not None and server_total != expected_size:
                            raise mismatch(f"the server offers {server_total} bytes, {expected_size} were expected.")
                        total = server_total
                    filename = filename or filename_from_disposition(response.headers.get("Content-Disposition"))

                    if mode == "wb" or hashed != done:
                        digest.close()
                        digest, hashed = _BackgroundSha256(), 0
                        if mode == "ab":
                            digest = _BackgroundSha256(_sha256_prefix(partial))
                            hashed = done
                    try:
                        with open(partial, mode) as out:
                            report(done, total, flush=True)
                            for chunk in response.iter_content(CHUNK_SIZE):
                                digest.update(chunk)
                                out.write(chunk)
                                hashed += len(chunk)
                                done += len(chunk)
                                progressed = True
                                report(done, total)
                            out.flush()
                            os.fsync(out.fileno())
                    except OSError as exc:
                        if is_disk_full(exc):
                            discard()
                            raise storage_full(dest.name) from None
                        raise
                    if total is not None and done != total:
                        raise _Transient("short body")
                    break
            except _Transient as exc:
                reason = str(exc)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                reason = type(exc).__name__
            failures = 1 if progressed else failures + 1
            if failures > retries:
                code = ErrorCode.RATE_LIMITED if last_status == 429 else ErrorCode.DOWNLOAD_FAILED
                raise DownloadError(f"{where} kept failing ({reason}) after {retries} retries.", last_status, code)
            wait = delay if delay is not None else backoff_delay(failures)
            log.info("download of %s: %s; retrying in %.1f s", where, reason, wait)
            _sleep(wait)

    report(done, total, flush=True)
    if expected_size is not None and done != expected_size:
        raise mismatch(f"got {done} bytes, {expected_size} were expected.")
    if hashed != done:  # finished by a 416 on a whole partial: nothing streamed this run
        digest.close()
        digest = _BackgroundSha256(_sha256_prefix(partial))
    sha256 = digest.hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise mismatch("the sha256 does not match the published one.")
    os.replace(partial, dest)
    return DownloadedFile(path=dest, size=done, sha256=sha256, filename=filename)


class _BackgroundSha256:
    """sha256 computed in a thread beside the transfer.

    hashlib releases the GIL on large buffers, so hashing a chunk overlaps with
    receiving and writing the next one; on a fast link hashing in line would
    halve the throughput. At most a few chunks wait in the queue (bounded memory).
    """

    def __init__(self, digest=None):
        self._digest = digest or hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._hash, name="sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()


class _Transient(Exception):
    """A failure worth retrying (server busy, connection cut)."""

    status: int | None = None
    retry_after: float | None = None


# ---------------------------------------------------------------------------
# Base models: plans, fetchers, locks, progress records and manifests.
# ---------------------------------------------------------------------------

# A lock whose holder has not refreshed it for this long belongs to a process
# that died (killed container, closed laptop): the next comer takes it over.
LOCK_STALE_SECONDS = 120.0
HEARTBEAT_SECONDS = 15.0
TICK_SECONDS = 1.0  # progress records are written at most once per tick
LOCK_POLL_SECONDS = 1.0
RATE_SMOOTHING = 0.3  # weight of the newest sample in the moving average of bytes/s


@dataclass(frozen=True)
class PlannedFile:
    source: str  # the path at the source (repo path, URL file name)
    dest: str  # relative to the model folder
    size: int | None
    sha256: str | None
    git_sha1: str | None = None  # the Hub's blob id for small non-LFS files


@dataclass(frozen=True)
class Plan:
    files: tuple[PlannedFile, ...]
    revision: str | None = None  # the commit the files were listed at

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True)
class FetchContext:
    hf_endpoint: str | None
    hf_token: str | None
    civitai_token: str | None = None


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(entry, dest: str, size: int | None, sha256: str | None) -> tuple[int | None, str | None]:
    """A registry-published value wins over what the source reports; a disagreement is caught at verification."""
    published = entry.published.get(dest)
    if published is None:
        return size, sha256
    return (published.size if published.size is not None else size,
            published.sha256.lower() if published.sha256 else sha256)


class _ByteCounter:
    """What huggingface_hub gets as `tqdm_class`: counts a file's bytes into our progress, draws nothing.

    Having `update_transfer` makes the Xet path treat it as one aggregated bar,
    so file bytes (not network bytes) are what we count there too.
    """

    on_bytes: Callable[[int], None]

    def __init__(self, *args, total: int | None = None, initial: int = 0, **kwargs):
        self.total = total
        self.n = initial
        self.on_bytes(self.n)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.on_bytes(self.n)

    def update_transfer(self, n: int = 1) -> None:
        """Network bytes (compressed, deduplicated): not what the progress bar counts."""

    def set_postfix_str(self, *args, **kwargs) -> None:
        """No bar to label."""

    set_transfer_postfix_str = set_postfix_str

    def refresh(self, *args, **kwargs) -> None:
        """No bar to redraw."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _byte_counter(on_bytes: Callable[[int], None]) -> type:
    return type("ByteCounter", (_ByteCounter,), {"on_bytes": staticmethod(on_bytes)})


def _hf_failure(exc: BaseException, repo_id: str) -> Exception:
    """Turn a huggingface_hub error into ours: a refusal, a retryable `_Transient`, or a clear failure."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return ToolboxError(ErrorCode.DOWNLOAD_FAILED, "HF_HUB_OFFLINE is set, so nothing can be downloaded from Hugging Face.")
    if isinstance(exc, GatedRepoError):
        return DownloadHTTPError(
            f"{repo_id} is gated on Hugging Face: accept its terms on the model page with your account, "
            "then set that account's token in /setup.", 403)
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadHTTPError(
            f"Hugging Face did not give access to {repo_id} (HTTP {status}): it does not exist or needs a token "
            "(set one in /setup).", status)
    if isinstance(exc, (RevisionNotFoundError, RemoteEntryNotFoundError)):
        return DownloadHTTPError(f"A file or revision of {repo_id} was not found on Hugging Face (HTTP {status}).", status or 404)
    if isinstance(exc, HfHubHTTPError):
        if status is not None and (status in (408, 429) or status >= 500):
            transient = _Transient(f"HTTP {status}")
            transient.status = status
            transient.retry_after = retry_after_seconds(exc.response.headers.get("Retry-After"))
            return transient
        if status in (401, 403):
            return DownloadHTTPError(f"Hugging Face refused access to {repo_id} (HTTP {status}): set a valid token in /setup.", status)
        return DownloadHTTPError(f"Hugging Face answered HTTP {status} for {repo_id}.", status)
    if isinstance(exc, (LocalEntryNotFoundError, httpx2.TransportError)):
        return _Transient(type(exc).__name__)
    if isinstance(exc, OSError) and is_disk_full(exc):
        return storage_full(repo_id)
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return _Transient("short body")  # huggingface_hub's own word for a truncated transfer
    return exc


def _with_retries(call: Callable[[], T], describe: str, retries: int = 5) -> T:
    """Run `call`, retrying `_Transient` failures with backoff (and the server's Retry-After)."""
    failures = 0
    while True:
        try:
            return call()
        except _Transient as exc:
            failures += 1
            status = getattr(exc, "status", None)
            if failures > retries:
                code = ErrorCode.RATE_LIMITED if status == 429 else ErrorCode.DOWNLOAD_FAILED
                raise DownloadError(f"{describe} kept failing ({exc}) after {retries} retries.", status, code) from None
            delay = getattr(exc, "retry_after", None)
            if delay is not None and delay > MAX_RETRY_AFTER:
                raise DownloadError(f"{describe}: the server asked to wait {delay:.0f} s.", status, ErrorCode.RATE_LIMITED) from None
            wait = delay if delay is not None else backoff_delay(failures)
            log.info("%s: %s; retrying in %.1f s", describe, exc, wait)
            _sleep(wait)


class HFFetcher:
    """Hugging Face repos through huggingface_hub (HF_ENDPOINT, tokens, Xet, its own in-call resume)."""

    def plan(self, entry, ctx: FetchContext) -> Plan:
        from fnmatch import fnmatchcase

        from huggingface_hub import HfApi

        source = entry.source

        def list_files():
            try:
                api = HfApi(endpoint=ctx.hf_endpoint, token=ctx.hf_token)
                return api.model_info(source.repo_id, revision=source.revision, files_metadata=True)
            except Exception as exc:
                raise _hf_failure(exc, source.repo_id) from None

        info = _with_retries(list_files, f"listing {source.repo_id}")
        siblings = info.siblings or []
        chosen = []
        for sibling in siblings:
            name = sibling.rfilename
            if source.include and not any(fnmatchcase(name, pattern) for pattern in source.include):
                continue
            if any(fnmatchcase(name, pattern) for pattern in source.exclude):
                continue
            chosen.append(sibling)
        for pattern in source.include:
            if not any(fnmatchcase(s.rfilename, pattern) for s in chosen):
                raise DownloadHTTPError(f"{source.repo_id} has no file matching {pattern!r}.", 404)
        if not chosen:
            raise DownloadHTTPError(f"{source.repo_id} lists no files to download.", 404)
        files = []
        for sibling in chosen:
            dest = entry.dest_for(sibling.rfilename)
            size, sha256 = _expected(entry, dest, sibling.size, sibling.lfs.sha256 if sibling.lfs else None)
            files.append(PlannedFile(sibling.rfilename, dest, size, sha256,
                                     None if sibling.lfs else sibling.blob_id))
        return Plan(tuple(files), revision=info.sha)

    def fetch(self, entry, plan: Plan, file: PlannedFile, folder: Path, ctx: FetchContext,
              on_bytes: Callable[[int], None]) -> None:
        from huggingface_hub import hf_hub_download

        def one_try() -> str:
            try:
                return hf_hub_download(
                    entry.source.repo_id, file.source, revision=plan.revision, local_dir=folder,
                    endpoint=ctx.hf_endpoint, token=ctx.hf_token, tqdm_class=_byte_counter(on_bytes),
                )
            except Exception as exc:
                raise _hf_failure(exc, entry.source.repo_id) from None

        path = Path(_with_retries(one_try, f"{entry.source.repo_id}/{file.source}"))
        target = folder / file.dest
        if path != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


class URLFetcher:
    """One file at a plain URL, through `download_file`."""

    def plan(self, entry, ctx: FetchContext) -> Plan:
        size, sha256 = _expected(entry, entry.source.filename, None, None)
        return Plan((PlannedFile(entry.source.url, entry.source.filename, size, sha256),))

    def fetch(self, entry, plan: Plan, file: PlannedFile, folder: Path, ctx: FetchContext,
              on_bytes: Callable[[int], None]) -> None:
        download_file(file.source, folder / file.dest, expected_size=file.size, expected_sha256=file.sha256,
                      progress=lambda done, total: on_bytes(done))


# By source kind (registry.py). The CivitAI importer adds "civitai" here.
FETCHERS: dict[str, object] = {"huggingface": HFFetcher(), "url": URLFetcher()}


def fetcher_for(entry):
    try:
        return FETCHERS[entry.source.kind]
    except KeyError:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"No downloader for {entry.key}'s source ({entry.source.kind}).") from None


# -- status ---------------------------------------------------------------------

def check_files(folder: Path, manifest: dict, deep: bool = False, on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """What is wrong with a model's files on disk against its manifest (empty: all good).

    Shallow: every file exists with its size. Deep: the hashes too (sha256,
    or the git blob id for small files), which reads every byte.
    """
    problems = []
    hashed = 0
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            problems.append(f"{name} has {size} bytes, {expected.get('size')} expected")
            continue
        if deep:
            base = hashed
            report = (lambda n: on_bytes(base + n)) if on_bytes else None
            if expected.get("sha256") and sha256_file(path, report) != expected["sha256"]:
                problems.append(f"{name} does not match its sha256")
            elif not expected.get("sha256") and expected.get("git_sha1") and git_blob_sha1(path) != expected["git_sha1"]:
                problems.append(f"{name} does not match its git blob id")
            hashed += size
    return problems


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


ACTIVE_STATES = ("queued", "waiting", "starting", "downloading", "verifying")


def describe_state(entry, manifest: dict | None, record: dict | None, problems: list[str] | None = None) -> ModelState:
    """A model's state from its manifest and progress record (and disk problems, when checked)."""
    if manifest and manifest.get("complete") and not problems:
        return ModelState(entry.key, entry.name, "present", manifest.get("size_bytes", entry.approx_bytes),
                          manifest.get("size_bytes", 0))
    record = record or {}
    status = record.get("status")
    total = record.get("bytes_total") or entry.approx_bytes
    if status in ACTIVE_STATES and time.time() - record.get("updated_at", 0) < LOCK_STALE_SECONDS:
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


# -- locks ----------------------------------------------------------------------

def _lock_is_live(value: dict | None, now: float | None = None) -> bool:
    return bool(value) and (now or time.time()) - value.get("heartbeat", 0) < LOCK_STALE_SECONDS


async def try_lock(store: StateStore, name: str, owner: str, extra: dict | None = None) -> bool:
    """Take `lock:<name>` if free or stale (its holder stopped refreshing it)."""
    key = lock_key(name)
    value = {"owner": owner, "heartbeat": time.time(), "host": os.uname().nodename, "pid": os.getpid(), **(extra or {})}
    if await store.put_if_absent(key, value):
        return True
    current = await store.get(key)
    if _lock_is_live(current):
        return False
    log.warning("taking over the stale lock %s", key)
    # Removing the stale value and creating ours are two steps: two takers at
    # the very same moment could both win. The window is one round trip once
    # per crashed holder, and the loser's files still verify before any manifest.
    await store.pop(key)
    return await store.put_if_absent(key, value)


async def refresh_lock(store: StateStore, name: str, owner: str) -> bool:
    current = await store.get(lock_key(name))
    if not current or current.get("owner") != owner:
        return False
    current["heartbeat"] = time.time()
    await store.put(lock_key(name), current)
    return True


async def release_lock(store: StateStore, name: str, owner: str) -> None:
    current = await store.get(lock_key(name))
    if current and current.get("owner") == owner:
        await store.pop(lock_key(name))


# -- the engine -----------------------------------------------------------------

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

    @property
    def done(self) -> int:
        return self.finished_bytes + self.current

    def on_bytes(self, n: int) -> None:
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
    @job_method(DownloadRequest)
    def download(self, progress, keys: list[str]) -> dict[str, str]:
        """Download every model of `keys` (all when empty) that is not present; returns key → state."""
        return asyncio.run(self._download(keys, progress))

    @job_method(VerifyRequest)
    def verify(self, progress, keys: list[str]) -> dict[str, dict]:
        """Re-check files on disk (sizes and hashes); fix manifests. Returns key → state dict."""
        return asyncio.run(self._verify(keys, progress))

    # -- helpers -------------------------------------------------------------------
    async def _hook(self, hook: Hook | None) -> None:
        if hook is not None:
            await asyncio.to_thread(hook)

    async def _context(self) -> FetchContext:
        from modal_services.tokens import get_token

        return FetchContext(
            hf_endpoint=os.environ.get("HF_ENDPOINT") or None,
            hf_token=await get_token(self.store, "hf"),
            civitai_token=await get_token(self.store, "civitai"),
        )

    async def present(self, entry) -> bool:
        manifest = await self.store.get(manifest_key(entry.key))
        if not (manifest and manifest.get("complete")):
            return False
        return not await asyncio.to_thread(check_files, self.folder(entry), manifest)

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
            progress(done / total, stage)
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
        from modal_services.registry import resolve_keys

        entries = resolve_keys(keys, self.registry)
        owner = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
        await self._hook(self.reload_hook)
        ctx = await self._context()
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
                    if error.code is ErrorCode.STORAGE_FULL:
                        raise  # every later model would fail the same way
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
            manifest = await asyncio.to_thread(_verify_plan, entry, plan, folder)
            await self._hook(self.commit_hook)
            await self.store.put(manifest_key(entry.key), manifest)
        except ToolboxError as error:
            live.status, live.error = "failed", error
            log.warning("download of %s failed: %s", entry.key, error.code.value)
            raise
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
        from modal_services.registry import resolve_keys

        entries = resolve_keys(keys, self.registry)
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


def _verify_plan(entry, plan: Plan, folder: Path) -> dict:
    """Check every planned file (size, sha256 or git blob id) and build the manifest; a bad file is removed."""
    files = {}
    for file in plan.files:
        path = folder / file.dest
        size = path.stat().st_size
        sha256 = sha256_file(path) if file.sha256 or size > CHUNK_SIZE else None
        wrong = (
            (file.size is not None and size != file.size)
            or (file.sha256 is not None and sha256 != file.sha256)
            or (file.sha256 is None and file.git_sha1 is not None and git_blob_sha1(path) != file.git_sha1)
        )
        if wrong:
            path.unlink(missing_ok=True)
            raise ToolboxError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"{entry.name}: {file.dest} did not match what the source published; it was removed. Download again.",
            )
        files[file.dest] = {"size": size, "sha256": sha256 or file.sha256, "git_sha1": file.git_sha1}
    return {
        "key": entry.key,
        "complete": True,
        "files": files,
        "size_bytes": sum(f["size"] for f in files.values()),
        "source": getattr(entry.source, "repo_id", None) or getattr(entry.source, "url", None),
        "revision": plan.revision,
        "completed_at": time.time(),
    }


# -- one setup download at a time (the bot and the CLI start them here) ---------

SETUP_LOCK = "setup-download"
SUBMIT_GRACE_SECONDS = 30.0  # a lock without a job id yet is someone mid-submit
ATTACH_TIMEOUT = 15.0


async def _setup_job_live(store: StateStore, value: dict) -> bool:
    from modal_services.jobs import load_job

    job_id = value.get("job_id")
    if not job_id:
        return time.time() - value.get("heartbeat", 0) < SUBMIT_GRACE_SECONDS
    job = await load_job(store, job_id)
    if job is None or job.status.finished:
        return False
    # A running download writes its job record every second or so; silence means its worker died.
    return time.time() - (job.updated_at or job.created_at) < LOCK_STALE_SECONDS


async def active_download(store: StateStore) -> str | None:
    """The job id of the setup download in progress, if any."""
    value = await store.get(lock_key(SETUP_LOCK))
    if value and value.get("job_id") and await _setup_job_live(store, value):
        return value["job_id"]
    return None


async def start_or_attach_download(store: StateStore, submit) -> tuple[str, bool]:
    """(job id, started): the running setup download's id, or a new one from `await submit()`.

    Two admins pressing Download at once: one `put_if_absent` wins and
    submits; the other waits for that job id and follows the same job.
    """
    import uuid

    key = lock_key(SETUP_LOCK)
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while True:
        mine = {"owner": uuid.uuid4().hex, "job_id": None, "heartbeat": time.time()}
        if await store.put_if_absent(key, mine):
            try:
                job = await submit()
            except BaseException:
                await store.pop(key)
                raise
            await store.put(key, {**mine, "job_id": job.id})
            return job.id, True
        current = await store.get(key)
        if current is not None:
            if not await _setup_job_live(store, current):
                await store.pop(key)  # finished or dead: the next round takes it
                continue
            if current.get("job_id"):
                return current["job_id"], False
        if time.monotonic() > deadline:
            raise ToolboxError(ErrorCode.INTERNAL, "Another download is starting but did not report its job; try again.")
        await asyncio.sleep(0.2)


async def watch_job(store: StateStore, job_id: str, on_update, poll_interval: float = 1.0, timeout: float | None = None):
    """Poll `job:<id>` (started here or by anyone else) until it ends; `on_update(job)` each time.

    Returns the final job, or the running one when `timeout` runs out.
    """
    from modal_services.jobs import load_job

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = await load_job(store, job_id)
        if job is None:
            raise ToolboxError(ErrorCode.INTERNAL, "That download job has disappeared.")
        await on_update(job)
        if job.status.finished or (deadline is not None and time.monotonic() > deadline):
            return job
        await asyncio.sleep(poll_interval)
