"""One large file over several connections, each on its own byte range, resumable range by range.

The `.partial` is allocated at full size and each range written at its
offset; `.partial.ranges` (the ledger) records how far each got, so a killed
run resumes every range where it stopped. The sha256 is computed in file order
as the prefix completes (read back from the page cache). One watch covers all
connections (deadline, cancel; a stall cuts them), and every failed attempt of
any range counts against one shared budget. A server that does not serve
ranges sends the caller back to one connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.egress import open_url
from modal_services.net.transfer import retrying
from modal_services.net.transfer.deadlines import ThrottledProgress, TransferWatch
from modal_services.net.transfer.errors import (
    DownloadError,
    DownloadHTTPError,
    TransientFailure,
    failure_reason,
    is_disk_full,
    over_cap,
    storage_full,
)
from modal_services.net.transfer.files import CHUNK_SIZE, DownloadedFile, partial_path
from modal_services.net.transfer.responses import content_range, filename_from_disposition, safe_url

log = logging.getLogger(__name__)

# Files at least this large are fetched over several connections when the server serves ranges.
PARALLEL_MIN_BYTES = 64 << 20
DEFAULT_CONNECTIONS = 4
MAX_CONNECTIONS = 16
RANGES_SUFFIX = ".ranges"  # beside a parallel `.partial`: how far each range got, to resume each
RANGES_SAVE_INTERVAL = 1.0
HASH_POLL_SECONDS = 0.02  # how often the in-order hash looks for a longer finished prefix


def download_connections(environ: Mapping[str, str] | None = None) -> int:
    """`TOOLBOX_DOWNLOAD_CONNECTIONS`: connections per large file (1 turns parallel ranges off)."""
    value = (os.environ if environ is None else environ).get("TOOLBOX_DOWNLOAD_CONNECTIONS", "").strip()
    if not value:
        return DEFAULT_CONNECTIONS
    if not value.isdigit() or not 1 <= int(value) <= MAX_CONNECTIONS:
        raise ToolboxError(ErrorCode.INVALID_INPUT, f"TOOLBOX_DOWNLOAD_CONNECTIONS must be a whole number from 1 to {MAX_CONNECTIONS}.")
    return int(value)


def download_in_ranges(url: str, dest: Path, opening: dict, report: ThrottledProgress, stall: float,
                       deadline_at: float, retries: int, *, expected_size: int | None, size_hint: int | None,
                       expected_sha256: str | None, max_bytes: int) -> DownloadedFile | None:
    """The file over `TOOLBOX_DOWNLOAD_CONNECTIONS` connections when it is large (`expected_size`, or else
    the source's approximate `size_hint`) and the server serves ranges; None leaves it to one connection.
    A file the server offers larger than `max_bytes` is refused before any range is fetched."""
    connections = download_connections()
    if connections <= 1 or (expected_size or size_hint or 0) < PARALLEL_MIN_BYTES:
        return None
    ranged = RangedDownload(url, dest, opening, report, stall, deadline_at, retries, connections)
    return ranged.run(expected_size, expected_sha256, max_bytes)


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


class RangedDownload:
    """One file's ranges, their ledger, their connections and the in-order hash (see the module)."""

    def __init__(self, url: str, dest: Path, opening: dict, report: ThrottledProgress, stall: float,
                 deadline_at: float, retries: int, connections: int):
        self.url, self.dest, self.opening = url, dest, opening
        self.partial = partial_path(dest)
        self.ledger = self.partial.with_name(self.partial.name + RANGES_SUFFIX)
        self.where = opening["label"] or safe_url(url)
        self.report, self.stall, self.deadline_at = report, stall, deadline_at
        self.retries, self.connections = retries, connections
        self.ranges: list[_Range] = []
        self.total = 0
        self.budget: retrying.RetryBudget | None = None
        self.watch: TransferWatch | None = None

    # -- plan -------------------------------------------------------------------
    def run(self, expected_size: int | None, expected_sha256: str | None, max_bytes: int) -> DownloadedFile | None:
        """The verified file in place, or None when the server (or an earlier one-connection partial)
        leaves it to one connection."""
        filename = None
        if self._resume() and ((expected_size is not None and self.total != expected_size) or self.total > max_bytes):
            self._discard()  # an earlier run of another file under this name
        if not self.ledger.exists():
            if self.partial.exists():
                return None  # a one-connection partial: resumed as such
            offer = self._probe()
            if offer is None or offer[0] < PARALLEL_MIN_BYTES:
                return None
            self.total, filename = offer
            if expected_size is not None and self.total != expected_size:
                raise ToolboxError(ErrorCode.CHECKSUM_MISMATCH,
                                   f"{self.dest.name}: the server offers {self.total} bytes, {expected_size} were expected.")
            if self.total > max_bytes:
                raise over_cap(self.where, self.total, max_bytes)
            self._allocate()
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

    def _allocate(self) -> None:
        """Split the file into one range per connection and reserve the whole partial on disk."""
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

    def _resume(self) -> bool:
        """The ranges of an earlier run, when its ledger and partial agree."""
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
        tmp = self.ledger.with_name(self.ledger.name + ".tmp")
        tmp.write_text(json.dumps({"total": self.total, "ranges": [[r.start, r.end, r.done] for r in self.ranges]}))
        os.replace(tmp, self.ledger)

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.ledger.unlink(missing_ok=True)

    def _probe(self) -> tuple[int, str | None] | None:
        """(total, file name) when the server serves ranges; None sends the caller to one connection.
        Cancel and the file's deadline end the probe too."""
        import urllib3

        watch = TransferWatch(self.report, self.stall, self.deadline_at, 0, None)
        headers = {"Accept-Encoding": "identity", "Range": "bytes=0-0"}
        try:
            with open_url(self.url, headers=headers, watch=watch, **self.opening) as response:
                if response.status != 206:
                    return None
                first, total = content_range(response.headers.get("Content-Range"))
                if first != 0 or total is None:
                    return None
                return total, filename_from_disposition(response.headers.get("Content-Disposition"))
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError):
            if watch.reason is not None and not isinstance(watch.reason, TransientFailure):
                raise watch.reason from None
            return None  # the one-connection path retries, with its budget
        finally:
            watch.stop()

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
        """Every unfinished range on its own thread while this one hashes the finished prefix; the sha256."""
        self.watch = watch = TransferWatch(self.report, self.stall, self.deadline_at, self._done(), self.total,
                                           stall_ends=False)
        self.budget = retrying.RetryBudget(self.where, self.retries, self.deadline_at, furthest=self._done())
        workers = [threading.Thread(target=self._fetch, args=(r,), name="range", daemon=True)
                   for r in self.ranges if not r.finished]
        try:
            for worker in workers:
                worker.start()
            digest = self._hash_while_running(workers)
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

    def _hash_while_running(self, workers: list[threading.Thread]):
        """Hash the gapless prefix as it grows, report progress and save the ledger, until the workers end."""
        digest, hashed = hashlib.sha256(), 0
        saved_at = time.monotonic()
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
                    self.watch.end(exc)
                if time.monotonic() - saved_at >= RANGES_SAVE_INTERVAL:
                    self._save()
                    saved_at = time.monotonic()
                if not running:
                    return digest
                time.sleep(HASH_POLL_SECONDS)

    def _fetch(self, r: _Range) -> None:
        """One range's thread: attempts until the range is whole or the transfer ends."""
        import urllib3

        watch = self.watch
        with open(self.partial, "rb+") as out:
            while not r.finished and watch.reason is None:
                try:
                    self._fetch_once(r, out)
                except (TransientFailure, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
                    delay = getattr(exc, "retry_after", None)
                    if watch.reason is None and not self._wait_before_retry(failure_reason(exc), delay):
                        return
                except OSError as exc:
                    watch.end(storage_full(self.dest.name) if is_disk_full(exc) else exc)
                except Exception as exc:  # refusals (egress, HTTP 4xx), _RangesRefused: the whole file stops
                    watch.end(exc)

    def _fetch_once(self, r: _Range, out) -> None:
        """One request for what the range still lacks, written at its offset."""
        watch = self.watch
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={r.next}-{r.end - 1}"}
        with open_url(self.url, headers=headers, watch=watch, **self.opening) as response:
            self._check(response, r)
            while not r.finished and (chunk := response.read1(CHUNK_SIZE)):
                piece = chunk[: r.end - r.next]  # never past the range asked for
                os.pwrite(out.fileno(), piece, r.next)
                r.done += len(piece)
                watch.advanced(self._done())
        if not r.finished:
            raise TransientFailure("short body")

    def _check(self, response, r: _Range) -> None:
        """Raise unless the response is this range (a retryable refusal carries its Retry-After)."""
        status = response.status
        if status == 200:
            raise _RangesRefused()
        retrying.raise_if_busy(status, response.headers, self.where)
        if status != 206:
            raise DownloadHTTPError(f"{self.where} answered HTTP {status}.", status)
        first, total = content_range(response.headers.get("Content-Range"))
        if first != r.next or total != self.total:
            raise TransientFailure("a Content-Range that was not asked for")

    def _wait_before_retry(self, reason: str, delay: float | None) -> bool:
        """Count a failed attempt against the shared budget and wait; False (and the transfer ended) when it is spent."""
        try:
            wait = self.budget.next_wait(self._done(), reason, delay)
        except DownloadError as exc:
            self.watch.end(exc)
            return False
        log.info("range of %s: %s; retrying in %.1f s", self.where, reason, wait)
        retrying.wait_before_retry(wait, lambda: self.watch.reason is not None)  # the watch has ended the transfer (a Cancel)
        return self.watch.reason is None
