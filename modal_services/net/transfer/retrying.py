"""Retrying a transfer: the back-off, a server's Retry-After, and one budget of failed attempts per file."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Mapping, TypeVar

from modal_services.errors import ErrorCode
from modal_services.net.transfer import deadlines
from modal_services.net.transfer.errors import DownloadError, TransientFailure
from modal_services.net.transfer.responses import retry_after_seconds

log = logging.getLogger(__name__)

RETRY_BASE_DELAY = 1.0
RETRY_MAX_DELAY = 30.0
# A server asking for a longer pause than this is treated as "not now": the
# job fails with RATE_LIMITED instead of holding a worker for an hour.
MAX_RETRY_AFTER = 300.0

T = TypeVar("T")


def wait_before_retry(seconds: float, interrupt: Callable[[], object] | None = None) -> None:
    """The pause before a retry. `interrupt` is called every WATCH_INTERVAL meanwhile: a true
    answer ends the pause early, and what it raises (a Cancel) stops it, so that a stop never
    waits out a long back-off. Tests replace this to run retries without waiting."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if interrupt is not None and interrupt():
            return
        time.sleep(min(left, deadlines.WATCH_INTERVAL))


def backoff_delay(failures: int) -> float:
    # Exponential with jitter, so that many clients do not retry in step.
    return min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (failures - 1)) * random.uniform(0.75, 1.25)


def raise_if_busy(status: int, headers: Mapping[str, str], where: str) -> None:
    """A busy server (408, 429, 5xx) is a `TransientFailure` carrying its Retry-After; one asking
    for more than MAX_RETRY_AFTER is a RATE_LIMITED failure."""
    if status in (408, 429) or status >= 500:
        delay = retry_after_seconds(headers.get("Retry-After"))
        if delay is not None and delay > MAX_RETRY_AFTER:
            raise DownloadError(f"{where} asked to wait {delay:.0f} s before retrying.", status, ErrorCode.RATE_LIMITED)
        transient = TransientFailure(f"HTTP {status}")
        transient.retry_after = delay
        raise transient


class RetryBudget:
    """One budget of `retries` failed attempts for a file, shared by all its connections.

    Only an attempt that brings the file clearly further than ever before (by
    `STALL_MIN_BYTES`) earns a fresh budget; a few bytes more do not.
    """

    def __init__(self, where: str, retries: int, deadline_at: float, furthest: int):
        self.where, self.retries, self.deadline_at = where, retries, deadline_at
        self.furthest = furthest
        self.failures = 0
        self._lock = threading.Lock()

    def next_wait(self, done: int, reason: str, delay: float | None, status: int | None = None,
                  code: ErrorCode = ErrorCode.DOWNLOAD_FAILED) -> float:
        """Count a failed attempt with `done` bytes on disk: the pause before the next one (the
        server's `delay` if it named one), or the DownloadError that ends the file."""
        with self._lock:
            if done >= self.furthest + deadlines.STALL_MIN_BYTES:
                self.furthest, self.failures = done, 1
            else:
                self.failures += 1
            failures = self.failures
        if failures > self.retries:
            raise DownloadError(f"{self.where} kept failing ({reason}) after {self.retries} retries.", status, code)
        wait = delay if delay is not None else backoff_delay(failures)
        if time.monotonic() + wait > self.deadline_at:
            raise DownloadError(f"{self.where} kept failing ({reason}) until its time limit.", status, ErrorCode.TIMEOUT)
        return wait


def with_retries(call: Callable[[], T], describe: str, retries: int = 5) -> T:
    """Run `call`, retrying `TransientFailure`s with backoff (and the server's Retry-After), at most `retries`
    times (or the failure's own `max_retries`, then its `give_up` error)."""
    failures = 0
    while True:
        try:
            return call()
        except TransientFailure as exc:
            failures += 1
            status = getattr(exc, "status", None)
            allowed = retries if exc.max_retries is None else min(retries, exc.max_retries)
            if failures > allowed:
                if exc.give_up is not None:
                    raise exc.give_up from None
                code = ErrorCode.RATE_LIMITED if status == 429 else ErrorCode.DOWNLOAD_FAILED
                raise DownloadError(f"{describe} kept failing ({exc}) after {allowed} retries.", status, code) from None
            delay = getattr(exc, "retry_after", None)
            if delay is not None and delay > MAX_RETRY_AFTER:
                raise DownloadError(f"{describe}: the server asked to wait {delay:.0f} s.", status, ErrorCode.RATE_LIMITED) from None
            wait = delay if delay is not None else backoff_delay(failures)
            log.info("%s: %s; retrying in %.1f s", describe, exc, wait)
            wait_before_retry(wait)
