"""One file over one connection: resumed from its `.partial` with `Range` when the server allows, else restarted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

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
    size_text,
    storage_full,
)
from modal_services.net.transfer.files import CHUNK_SIZE, BackgroundSha256, DownloadedFile, partial_path, sha256_prefix
from modal_services.net.transfer.responses import content_range, filename_from_disposition, safe_url

log = logging.getLogger(__name__)


class SingleConnectionDownload:
    """Attempts over one connection until the file is whole, verified and renamed into place.

    Every failed attempt counts against one `RetryBudget`; a wrong size or
    sha256 (CHECKSUM_MISMATCH) or a full disk (STORAGE_FULL) removes the
    partial. `max_bytes` bounds every transfer: a declared size over it is
    refused before the body is read, a body without one is cut and refused
    past it, and a body longer than its declared size is cut there (the
    declared bytes are then judged by size and sha256 like any others).
    """

    def __init__(self, url: str, dest: Path, opening: dict, report: ThrottledProgress, stall: float,
                 deadline_at: float, *, expected_size: int | None, expected_sha256: str | None, max_bytes: int,
                 retries: int):
        self.url, self.dest, self.opening = url, dest, opening
        self.partial = partial_path(dest)
        self.where = opening["label"] or safe_url(url)
        self.report, self.stall, self.deadline_at = report, stall, deadline_at
        self.expected_size, self.expected_sha256, self.max_bytes = expected_size, expected_sha256, max_bytes
        self.budget = retrying.RetryBudget(self.where, retries, deadline_at, furthest=self._on_disk())
        self.filename: str | None = None
        self.total: int | None = expected_size
        self.done = 0
        self.last_status: int | None = None
        # The hash follows the bytes on disk: a resumed prefix is hashed once, then
        # every new chunk as it arrives (no second read of a multi-GB file).
        self.digest, self.hashed = BackgroundSha256(), 0

    def run(self) -> DownloadedFile:
        import urllib3

        while True:
            self.done = self._on_disk()
            if self.expected_size is not None and self.done > self.expected_size:
                self._discard()  # longer than the file can be: not a prefix of it
                self.done = 0
            watch = TransferWatch(self.report, self.stall, self.deadline_at, self.done, self.total)
            try:
                self._attempt(watch)
                break
            except (TransientFailure, urllib3.exceptions.HTTPError, OSError) as exc:
                cause = watch.reason or exc  # a cut made by the watch: its reason, not the broken read's
                if not isinstance(cause, (TransientFailure, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
                    raise cause from None
                reason, delay = failure_reason(cause), exc.retry_after if isinstance(exc, TransientFailure) else None
            finally:
                watch.stop()
            self._wait_before_retry(reason, delay)
        return self._verified()

    def _on_disk(self) -> int:
        return self.partial.stat().st_size if self.partial.exists() else 0

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)

    def _mismatch(self, message: str) -> ToolboxError:
        self._discard()
        return ToolboxError(ErrorCode.CHECKSUM_MISMATCH, f"{self.dest.name}: {message} The partial download was removed; retry.")

    def _attempt(self, watch: TransferWatch) -> None:
        """One request: returns with the file whole on disk, raises what retries or ends it."""
        headers = {"Accept-Encoding": "identity"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
        with open_url(self.url, headers=headers, watch=watch, **self.opening) as response:
            status = self.last_status = response.status
            if status == 416 and self.done:
                self._accept_whole_partial(response)
                return
            retrying.raise_if_busy(status, response.headers, self.where)
            if status not in (200, 206):
                raise DownloadHTTPError(f"{self.where} answered HTTP {status}.", status)
            mode, declared = self._write_mode(response, watch)
            self._stream(response, mode, declared, watch)
            if self.total is not None and self.done != self.total:
                raise TransientFailure("short body")

    def _accept_whole_partial(self, response) -> None:
        """A 416 to a resume (bytes asked past the end): the partial may already be the whole file."""
        _, server_total = content_range(response.headers.get("Content-Range"))
        if server_total != self.done:
            self._discard()
            raise TransientFailure("HTTP 416 for a partial that is not the file's prefix")
        self.total = self.done

    def _write_mode(self, response, watch: TransferWatch) -> tuple[str, int | None]:
        """("ab" to continue the partial (206) or "wb" to start over (200), the size the server declares),
        once the declared size is checked against the expected one and the cap."""
        if response.status == 206:
            first, server_total = content_range(response.headers.get("Content-Range"))
            if first != self.done:
                self._discard()  # a range we did not ask for: start over cleanly, on the same budget
                raise TransientFailure("a Content-Range that was not asked for")
            mode = "ab"
        else:
            # 200: the whole file, whether or not we asked for a range.
            mode, self.done = "wb", 0
            length = response.headers.get("Content-Length")
            server_total = int(length) if length and length.isdigit() else None
        if server_total is not None:
            if self.expected_size is not None and server_total != self.expected_size:
                raise self._mismatch(f"the server offers {server_total} bytes, {self.expected_size} were expected.")
            if server_total > self.max_bytes:
                self._discard()
                raise over_cap(self.where, server_total, self.max_bytes)
            self.total = watch.total = server_total
        self.filename = self.filename or filename_from_disposition(response.headers.get("Content-Disposition"))
        return mode, server_total

    def _stream(self, response, mode: str, declared: int | None, watch: TransferWatch) -> None:
        """The body into the partial, hashed as it goes, never past the `declared` size (nor, undeclared, past
        the expected size or the cap); fsynced when whole."""
        if mode == "wb" or self.hashed != self.done:
            self.digest.close()
            self.digest = BackgroundSha256(sha256_prefix(self.partial) if mode == "ab" else None)
            self.hashed = self.done
        try:
            with open(self.partial, mode) as out:
                self.report(self.done, self.total, flush=True)
                while (declared is None or self.done < declared) and (chunk := response.read1(CHUNK_SIZE)):
                    if declared is not None:
                        chunk = chunk[: declared - self.done]  # what follows the declared size is not the file's
                    elif self.done + len(chunk) > min(self.max_bytes, self.total or self.max_bytes):
                        raise self._too_long()
                    self.digest.update(chunk)
                    out.write(chunk)
                    self.hashed += len(chunk)
                    self.done += len(chunk)
                    watch.advanced(self.done)
                    watch.check()
                    self.report(self.done, self.total)
                watch.check()
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            if is_disk_full(exc):
                self._discard()
                raise storage_full(self.dest.name) from None
            raise

    def _too_long(self) -> ToolboxError:
        """An undeclared body past the expected size (CHECKSUM_MISMATCH) or the cap: refused, its partial removed."""
        if self.total is not None and self.total < self.max_bytes:
            return self._mismatch(f"the server sent more than the {self.total} bytes expected.")
        self._discard()
        return DownloadError(f"{self.where} sent more than the {size_text(self.max_bytes)} allowed for this kind of "
                             "file; the download was refused.")

    def _wait_before_retry(self, reason: str, delay: float | None) -> None:
        code = ErrorCode.RATE_LIMITED if self.last_status == 429 else ErrorCode.DOWNLOAD_FAILED
        wait = self.budget.next_wait(self.done, reason, delay, self.last_status, code)
        log.info("download of %s: %s; retrying in %.1f s", self.where, reason, wait)
        # The caller's progress raises on Cancel, which ends the pause.
        retrying.wait_before_retry(wait, lambda: self.report(self.done, self.total, flush=True))

    def _verified(self) -> DownloadedFile:
        """The whole partial, checked against the expected size and sha256, renamed to its final name."""
        self.report(self.done, self.total, flush=True)
        if self.expected_size is not None and self.done != self.expected_size:
            raise self._mismatch(f"got {self.done} bytes, {self.expected_size} were expected.")
        if self.hashed != self.done:  # finished by a 416 on a whole partial: nothing streamed this run
            self.digest.close()
            self.digest = BackgroundSha256(sha256_prefix(self.partial))
        sha256 = self.digest.hexdigest()
        if self.expected_sha256 is not None and sha256 != self.expected_sha256:
            raise self._mismatch("the sha256 does not match the published one.")
        os.replace(self.partial, self.dest)
        return DownloadedFile(path=self.dest, size=self.done, sha256=sha256, filename=self.filename)
