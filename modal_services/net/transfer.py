"""The HTTP transfer primitive: the one place that moves a file's bytes.

`download_file` is blocking (worker threads call it): bounded-memory streaming
into `<dest>.partial`, resume with `Range`, retries with backoff, size and
sha256 checks, then an atomic rename. Nothing half-written is ever left under
the final name. Every request goes through the egress policy (`egress.py`).

Every transfer ends: a stall rule (`TOOLBOX_STALL_SECONDS`), a per-file
deadline, one retry budget for every kind of failure, size caps, and the
caller's progress callback (which raises on Cancel) checked between reads and
by a watch thread that cuts a blocked read. Large files come over several
connections on byte ranges (`_RangedDownload`) when the server serves them.
"""

from __future__ import annotations

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

from modal_services.net.egress import Credentials, Purpose, open_url
from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # bounded memory: one chunk in flight, whatever the file size
CONNECT_TIMEOUT = 15.0
DEFAULT_STALL_SECONDS = 60.0
# Fewer bytes than this within a stall window is a stall too: a server that
# trickles a byte every few seconds never lets a read time out.
STALL_MIN_BYTES = 64 * 1024
# The overall deadline of a file allows an average this slow (a bad but honest link).
MIN_AVERAGE_RATE = 256 * 1024
WATCH_INTERVAL = 0.2  # how soon a cancel, a stall or the deadline cuts a blocked read
# Files at least this large are fetched over several connections when the server serves ranges.
PARALLEL_MIN_BYTES = 64 << 20
DEFAULT_CONNECTIONS = 4
MAX_CONNECTIONS = 16
RANGES_SUFFIX = ".ranges"  # beside a parallel `.partial`: how far each range got, to resume each
RANGES_SAVE_INTERVAL = 1.0
HASH_POLL_SECONDS = 0.02  # how often the in-order hash looks for a longer finished prefix
# What a body may bring when the server declares no size, by kind of file.
LORA_MAX_BYTES = 2 << 30
CHECKPOINT_MAX_BYTES = 16 << 30
RETRY_BASE_DELAY = 1.0
RETRY_MAX_DELAY = 30.0
# A server asking for a longer pause than this is treated as "not now": the
# job fails with RATE_LIMITED instead of holding a worker for an hour.
MAX_RETRY_AFTER = 300.0
PROGRESS_INTERVAL = 0.1  # callbacks at most ~10 per second, plus the final one
PARTIAL_SUFFIX = ".partial"


def _sleep(seconds: float, interrupt: Callable[[], object] | None = None) -> None:
    """The pause before a retry. `interrupt` is called every WATCH_INTERVAL meanwhile: a true
    answer ends the pause early, and what it raises (a Cancel) stops it, so that a stop never
    waits out a long back-off. Tests replace this to run retries without waiting."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if interrupt is not None and interrupt():
            return
        time.sleep(min(left, WATCH_INTERVAL))

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


def max_bytes_for(kind: str) -> int:
    """The most a file of this library type may weigh when its server declares no size."""
    return LORA_MAX_BYTES if kind == "lora" else CHECKPOINT_MAX_BYTES


def stall_seconds(environ: Mapping[str, str] | None = None) -> float:
    """`TOOLBOX_STALL_SECONDS`: how long a transfer may bring (almost) nothing before the attempt fails."""
    value = (os.environ if environ is None else environ).get("TOOLBOX_STALL_SECONDS", "").strip()
    try:
        seconds = float(value) if value else DEFAULT_STALL_SECONDS
    except ValueError:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "TOOLBOX_STALL_SECONDS must be a number of seconds.") from None
    if not 0 < seconds <= 3600:
        raise ToolboxError(ErrorCode.INVALID_INPUT, "TOOLBOX_STALL_SECONDS must be between 0 and 3600.")
    return seconds


def download_connections(environ: Mapping[str, str] | None = None) -> int:
    """`TOOLBOX_DOWNLOAD_CONNECTIONS`: connections per large file (1 turns parallel ranges off)."""
    value = (os.environ if environ is None else environ).get("TOOLBOX_DOWNLOAD_CONNECTIONS", "").strip()
    if not value:
        return DEFAULT_CONNECTIONS
    if not value.isdigit() or not 1 <= int(value) <= MAX_CONNECTIONS:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"TOOLBOX_DOWNLOAD_CONNECTIONS must be a whole number from 1 to {MAX_CONNECTIONS}.")
    return int(value)


def file_deadline(size: int, stall: float) -> float:
    """Seconds one file may take in all, retries included: a slow but honest link fits, a trickle does not."""
    return 4 * stall + size / MIN_AVERAGE_RATE


class _Watch:
    """Ends an attempt that must end, from beside the reading thread.

    Every `WATCH_INTERVAL` it checks the file's deadline, the stall rule (fewer
    than `STALL_MIN_BYTES` in `stall` seconds: silence or a trickle) and the
    caller's progress callback (which raises CANCELLED on a cancel request);
    on any of them it cuts the connection, so a blocked read returns at once.
    """

    def __init__(self, report: "_Throttled", stall: float, deadline_at: float, done: int, total: int | None,
                 stall_ends: bool = True):
        self.report, self.stall, self.deadline_at = report, stall, deadline_at
        # One connection: a stall ends the attempt. Several: it cuts them, each retries on the shared budget.
        self.stall_ends = stall_ends
        self.done, self.total = done, total
        self.mark = (time.monotonic(), done)
        self.reason: BaseException | None = None
        self._responses: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-watch", daemon=True)
        self._thread.start()

    def attach(self, response) -> None:
        """A response to cut when the transfer must end (and at once if it already must)."""
        with self._lock:
            self._responses.add(response)
        if self.reason is not None:
            response.abort()

    def detach(self, response) -> None:
        with self._lock:
            self._responses.discard(response)

    def advanced(self, done: int) -> None:
        self.done = done
        if done - self.mark[1] >= STALL_MIN_BYTES:
            self.mark = (time.monotonic(), done)

    def end(self, reason: BaseException) -> None:
        """End the transfer for `reason`: every attached response is cut."""
        if self.reason is None:
            self.reason = reason
        self._cut()

    def _verdict(self) -> BaseException | None:
        now = time.monotonic()
        if now > self.deadline_at:
            return DownloadError("the transfer ran past its time limit.", code=ErrorCode.TIMEOUT)
        if now - self.mark[0] > self.stall:
            return _Transient(f"stalled (under {STALL_MIN_BYTES // 1024} KiB in {self.stall:g} s)")
        try:
            self.report(self.done, self.total, flush=True)
        except BaseException as exc:  # the caller's way of saying stop (CANCELLED)
            return exc
        return None

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            reason = self._verdict()
            if isinstance(reason, _Transient) and not self.stall_ends:
                self.mark = (time.monotonic(), self.done)
                self._cut()
            elif reason is not None:
                self.end(reason)
                return

    def _cut(self) -> None:
        with self._lock:
            responses = list(self._responses)
        for response in responses:
            response.abort()

    def check(self) -> None:
        if self.reason is not None:
            raise self.reason

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def download_file(
    url: str,
    dest: Path,
    *,
    purpose: Purpose = Purpose.URL,
    credentials: Credentials | None = None,
    trusted: tuple[str, ...] = (),
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    max_bytes: int = CHECKPOINT_MAX_BYTES,
    size_hint: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    retries: int = 5,
) -> DownloadedFile:
    """Download `url` to `dest` (blocking) under the egress policy, verified, via `<dest>.partial` and an atomic rename.

    - An existing `.partial` (an earlier attempt, or a killed process) is
      resumed with `Range` when the server allows it, otherwise restarted.
    - Every failed attempt counts against one budget of `retries` (429
      honouring `Retry-After`, 408, 5xx, dropped connections, stalls, short
      bodies, a wrong `Content-Range`, a server ignoring `Range`); only an
      attempt that brings the file clearly further than ever before
      (by `STALL_MIN_BYTES`) earns a fresh budget.
    - The file has an overall deadline (`file_deadline`): TIMEOUT past it.
    - A body longer than declared, or than `max_bytes` when nothing is
      declared, is cut and refused.
    - 401/403/404/410 and other refusals raise `DownloadHTTPError` (with `.status`).
    - Wrong size or sha256: CHECKSUM_MISMATCH; a full disk: STORAGE_FULL.
      Both remove the partial; `dest` is never touched.
    - Whatever `progress` raises (CANCELLED) stops the transfer within
      `WATCH_INTERVAL`, leaving the `.partial` to resume from.
    - A large file (`expected_size`, or else `size_hint`, the source's
      approximate size, from `PARALLEL_MIN_BYTES`) comes over
      `TOOLBOX_DOWNLOAD_CONNECTIONS` connections when the server serves ranges
      (`_RangedDownload`), over one otherwise.
    """
    import urllib3

    dest = Path(dest)
    partial = partial_path(dest)
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    where = safe_url(url)
    report = _Throttled(progress)
    stall = stall_seconds()
    deadline_at = time.monotonic() + file_deadline(expected_size or max_bytes, stall)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def discard() -> None:
        partial.unlink(missing_ok=True)

    def mismatch(message: str) -> ToolboxError:
        discard()
        return ToolboxError(ErrorCode.CHECKSUM_MISMATCH, f"{dest.name}: {message} The partial download was removed; retry.")

    opening = {"purpose": purpose, "credentials": credentials, "trusted": trusted, "timeout": (CONNECT_TIMEOUT, stall)}
    connections = download_connections()
    if connections > 1 and (expected_size or size_hint or 0) >= PARALLEL_MIN_BYTES:
        ranged = _RangedDownload(url, dest, opening, report, stall, deadline_at, retries, connections)
        finished = ranged.run(expected_size, expected_sha256)
        if finished is not None:
            return finished

    def too_long(limit: int, declared: bool) -> DownloadError:
        discard()
        what = "more than it declared" if declared else f"more than the {limit / 2**30:.0f} GiB allowed for this kind of file"
        return DownloadError(f"{where} sent {what}; the download was refused.")

    filename: str | None = None
    total: int | None = expected_size
    # The hash follows the bytes on disk: a resumed prefix is hashed once, then
    # every new chunk as it arrives (no second read of a multi-GB file).
    digest, hashed = _BackgroundSha256(), 0
    failures = 0
    furthest = partial.stat().st_size if partial.exists() else 0
    last_status: int | None = None
    while True:
        done = partial.stat().st_size if partial.exists() else 0
        if expected_size is not None and done > expected_size:
            discard()  # longer than the file can be: not a prefix of it
            done = 0
        request_headers = {"Accept-Encoding": "identity"}
        if done:
            request_headers["Range"] = f"bytes={done}-"
        delay: float | None = None
        watch = _Watch(report, stall, deadline_at, done, total)
        try:
            with open_url(url, headers=request_headers, **opening) as response:
                watch.attach(response)
                status = last_status = response.status
                if status == 416 and done:
                    # Asked for bytes past the end: the partial may already be whole.
                    _, server_total = _total_from_content_range(response.headers.get("Content-Range"))
                    if server_total == done:
                        total = done
                        break
                    discard()
                    raise _Transient("HTTP 416 for a partial that is not the file's prefix")
                if status in (408, 429) or status >= 500:
                    delay = retry_after_seconds(response.headers.get("Retry-After"))
                    if delay is not None and delay > MAX_RETRY_AFTER:
                        raise DownloadError(
                            f"{where} asked to wait {delay:.0f} s before retrying.", status, ErrorCode.RATE_LIMITED
                        )
                    raise _Transient(f"HTTP {status}")
                if status not in (200, 206):
                    raise DownloadHTTPError(f"{where} answered HTTP {status}.", status)

                mode = "ab"
                if status == 206:
                    first, server_total = _total_from_content_range(response.headers.get("Content-Range"))
                    if first != done:
                        discard()  # a range we did not ask for: start over cleanly, on the same budget
                        raise _Transient("a Content-Range that was not asked for")
                else:
                    # 200: the whole file, whether or not we asked for a range.
                    mode, done = "wb", 0
                    length = response.headers.get("Content-Length")
                    server_total = int(length) if length and length.isdigit() else None
                if server_total is not None:
                    if expected_size is not None and server_total != expected_size:
                        raise mismatch(f"the server offers {server_total} bytes, {expected_size} were expected.")
                    total = watch.total = server_total
                limit = total if total is not None else max_bytes
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
                        while chunk := response.read1(CHUNK_SIZE):
                            if done + len(chunk) > limit:
                                raise too_long(limit, total is not None)
                            digest.update(chunk)
                            out.write(chunk)
                            hashed += len(chunk)
                            done += len(chunk)
                            watch.advanced(done)
                            watch.check()
                            report(done, total)
                        watch.check()
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
        except (_Transient, urllib3.exceptions.HTTPError, OSError) as exc:
            cause = watch.reason or exc  # a cut made by the watch: its reason, not the broken read's
            if not isinstance(cause, (_Transient, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
                raise cause from None
            reason = _failure_reason(cause)
        finally:
            watch.stop()
        if done >= furthest + STALL_MIN_BYTES:  # worth a fresh budget; a few bytes more are not
            furthest, failures = done, 1
        else:
            failures += 1
        if failures > retries:
            code = ErrorCode.RATE_LIMITED if last_status == 429 else ErrorCode.DOWNLOAD_FAILED
            raise DownloadError(f"{where} kept failing ({reason}) after {retries} retries.", last_status, code)
        wait = delay if delay is not None else backoff_delay(failures)
        if time.monotonic() + wait > deadline_at:
            raise DownloadError(f"{where} kept failing ({reason}) until its time limit.", last_status, ErrorCode.TIMEOUT)
        log.info("download of %s: %s; retrying in %.1f s", where, reason, wait)
        _sleep(wait, lambda: report(done, total, flush=True))  # the caller's progress raises on Cancel

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


@dataclass
class _Range:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes of it on disk

    @property
    def next(self) -> int:
        return self.start + self.done

    @property
    def finished(self) -> bool:
        return self.next >= self.end


class _RangesRefused(Exception):
    """The server answered a range request with the whole file: one connection it is."""


class _RangedDownload:
    """One large file over several connections, each on its own byte range.

    The `.partial` is allocated at full size and each range written at its
    offset; `.partial.ranges` records how far each got, so a killed run resumes
    every range where it stopped. The sha256 is computed in file order as the
    prefix completes (read back from the page cache). One watch covers all
    connections (deadline, cancel; a stall cuts them), and every failed
    attempt of any range counts against one shared budget. A server that does
    not serve ranges gets `None` back from `run`: the caller's one connection.
    """

    def __init__(self, url: str, dest: Path, opening: dict, report: "_Throttled", stall: float, deadline_at: float,
                 retries: int, connections: int):
        self.url, self.dest, self.opening = url, dest, opening
        self.partial = partial_path(dest)
        self.ledger = self.partial.with_name(self.partial.name + RANGES_SUFFIX)
        self.where = safe_url(url)
        self.report, self.stall, self.deadline_at = report, stall, deadline_at
        self.retries, self.connections = retries, connections
        self.ranges: list[_Range] = []
        self.total = 0
        self._budget = threading.Lock()
        self._failures = 0
        self._furthest = 0
        self.watch: _Watch | None = None

    # -- plan -------------------------------------------------------------------
    def run(self, expected_size: int | None, expected_sha256: str | None) -> DownloadedFile | None:
        filename = None
        if self._resume() and expected_size is not None and self.total != expected_size:
            self._discard()  # an earlier run of another file under this name
        if not self.ledger.exists():
            if self.partial.exists():
                return None  # a one-connection partial: resumed as such
            offer = self._probe()
            if offer is None:
                return None
            self.total, filename = offer
            if self.total < PARALLEL_MIN_BYTES:
                return None
            if expected_size is not None and self.total != expected_size:
                raise ToolboxError(ErrorCode.CHECKSUM_MISMATCH,
                                   f"{self.dest.name}: the server offers {self.total} bytes, {expected_size} were expected.")
            size = -(-self.total // self.connections)
            self.ranges = [_Range(start, min(start + size, self.total)) for start in range(0, self.total, size)]
            try:
                with open(self.partial, "wb") as out:
                    out.truncate(self.total)
                self._save()
            except OSError as exc:
                self._discard()
                if is_disk_full(exc):
                    raise storage_full(self.dest.name) from None
                raise
        try:
            sha256 = self._transfer()
        except _RangesRefused:
            self._discard()
            return None
        if expected_sha256 is not None and sha256 != expected_sha256:
            self._discard()
            raise ToolboxError(ErrorCode.CHECKSUM_MISMATCH,
                               f"{self.dest.name}: the sha256 does not match the published one. The partial download was removed; retry.")
        self.ledger.unlink(missing_ok=True)
        os.replace(self.partial, self.dest)
        return DownloadedFile(path=self.dest, size=self.total, sha256=sha256, filename=filename)

    def _resume(self) -> bool:
        """The ranges of an earlier run, when its ledger and partial agree."""
        import json

        try:
            ledger = json.loads(self.ledger.read_text())
            total = int(ledger["total"])
            ranges = [_Range(int(a), int(b), int(d)) for a, b, d in ledger["ranges"]]
        except (OSError, ValueError, KeyError, TypeError):
            self.ledger.unlink(missing_ok=True)
            return False
        sound = (self.partial.exists() and self.partial.stat().st_size == total and ranges
                 and ranges[0].start == 0 and ranges[-1].end == total
                 and all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
                 and all(0 <= r.done <= r.end - r.start for r in ranges))
        if not sound:
            self._discard()
            return False
        self.total, self.ranges = total, ranges
        return True

    def _save(self) -> None:
        import json

        tmp = self.ledger.with_name(self.ledger.name + ".tmp")
        tmp.write_text(json.dumps({"total": self.total, "ranges": [[r.start, r.end, r.done] for r in self.ranges]}))
        os.replace(tmp, self.ledger)

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.ledger.unlink(missing_ok=True)

    def _probe(self) -> tuple[int, str | None] | None:
        """(total, file name) when the server serves ranges; None sends the caller to one connection."""
        import urllib3

        try:
            with open_url(self.url, headers={"Accept-Encoding": "identity", "Range": "bytes=0-0"}, **self.opening) as response:
                if response.status != 206:
                    return None
                first, total = _total_from_content_range(response.headers.get("Content-Range"))
                if first != 0 or total is None:
                    return None
                return total, filename_from_disposition(response.headers.get("Content-Disposition"))
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError):
            return None  # the one-connection path retries, with its budget

    # -- transfer ---------------------------------------------------------------
    def _done(self) -> int:
        return sum(r.done for r in self.ranges)

    def _prefix(self) -> int:
        """How many bytes from the start are on disk without a gap."""
        end = 0
        for r in self.ranges:
            end = r.next
            if not r.finished:
                break
        return end

    def _transfer(self) -> str:
        self.watch = watch = _Watch(self.report, self.stall, self.deadline_at, self._done(), self.total, stall_ends=False)
        self._furthest = self._done()
        workers = [threading.Thread(target=self._fetch, args=(r,), name="range", daemon=True)
                   for r in self.ranges if not r.finished]
        digest, hashed = hashlib.sha256(), 0
        saved_at = time.monotonic()
        try:
            for worker in workers:
                worker.start()
            with open(self.partial, "rb") as disk:
                while True:
                    running = any(worker.is_alive() for worker in workers)
                    prefix = self._prefix()
                    while hashed < prefix:
                        chunk = os.pread(disk.fileno(), min(CHUNK_SIZE * 8, prefix - hashed), hashed)
                        digest.update(chunk)
                        hashed += len(chunk)
                    try:
                        self.report(self._done(), self.total)
                    except BaseException as exc:  # the caller's way of saying stop (CANCELLED)
                        watch.end(exc)
                    if time.monotonic() - saved_at >= RANGES_SAVE_INTERVAL:
                        self._save()
                        saved_at = time.monotonic()
                    if not running:
                        break
                    time.sleep(HASH_POLL_SECONDS)
        except BaseException as exc:  # Ctrl-C in this thread: the ranges stop too
            watch.end(exc)
            raise
        finally:
            for worker in workers:
                worker.join()
            watch.stop()
            self._save()
        if watch.reason is not None:
            raise watch.reason
        with open(self.partial, "rb+") as out:
            os.fsync(out.fileno())
        self.report(self.total, self.total, flush=True)
        return digest.hexdigest()

    def _fetch(self, r: _Range) -> None:
        import urllib3

        watch = self.watch
        with open(self.partial, "rb+") as out:
            while not r.finished and watch.reason is None:
                try:
                    headers = {"Accept-Encoding": "identity", "Range": f"bytes={r.next}-{r.end - 1}"}
                    with open_url(self.url, headers=headers, **self.opening) as response:
                        watch.attach(response)
                        try:
                            self._check(response, r)
                            while not r.finished and (chunk := response.read1(CHUNK_SIZE)):
                                piece = chunk[: r.end - r.next]  # never past the range asked for
                                os.pwrite(out.fileno(), piece, r.next)
                                r.done += len(piece)
                                watch.advanced(self._done())
                        finally:
                            watch.detach(response)
                    if not r.finished:
                        raise _Transient("short body")
                except (_Transient, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
                    delay = getattr(exc, "retry_after", None)
                    if watch.reason is None and not self._failed(_failure_reason(exc), delay):
                        return
                except OSError as exc:
                    watch.end(storage_full(self.dest.name) if is_disk_full(exc) else exc)
                except Exception as exc:  # refusals (egress, HTTP 4xx), _RangesRefused: the whole file stops
                    watch.end(exc)

    def _check(self, response, r: _Range) -> None:
        """Raise unless the response is this range (a retryable refusal carries its Retry-After)."""
        status = response.status
        if status == 200:
            raise _RangesRefused()
        if status in (408, 429) or status >= 500:
            delay = retry_after_seconds(response.headers.get("Retry-After"))
            if delay is not None and delay > MAX_RETRY_AFTER:
                raise DownloadError(f"{self.where} asked to wait {delay:.0f} s before retrying.", status, ErrorCode.RATE_LIMITED)
            transient = _Transient(f"HTTP {status}")
            transient.retry_after = delay
            raise transient
        if status != 206:
            raise DownloadHTTPError(f"{self.where} answered HTTP {status}.", status)
        first, total = _total_from_content_range(response.headers.get("Content-Range"))
        if first != r.next or total != self.total:
            raise _Transient("a Content-Range that was not asked for")

    def _failed(self, reason: str, delay: float | None) -> bool:
        """Count a failed attempt against the shared budget; False (and the transfer ended) when it is spent."""
        with self._budget:
            done = self._done()
            if done >= self._furthest + STALL_MIN_BYTES:
                self._furthest, self._failures = done, 1
            else:
                self._failures += 1
            failures = self._failures
        if failures > self.retries:
            self.watch.end(DownloadError(f"{self.where} kept failing ({reason}) after {self.retries} retries."))
            return False
        wait = delay if delay is not None else backoff_delay(failures)
        if time.monotonic() + wait > self.deadline_at:
            self.watch.end(DownloadError(f"{self.where} kept failing ({reason}) until its time limit.", code=ErrorCode.TIMEOUT))
            return False
        log.info("range of %s: %s; retrying in %.1f s", self.where, reason, wait)
        _sleep(wait, lambda: self.watch.reason is not None)  # the watch has ended the transfer (a Cancel)
        return self.watch.reason is None


def _failure_reason(exc: BaseException) -> str:
    import urllib3

    if isinstance(exc, _Transient):
        return str(exc)
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection cut"
    if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return "timed out"
    return type(exc).__name__


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

