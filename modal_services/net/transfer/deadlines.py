"""When a transfer must end: the stall rule, the per-file deadline, paced progress, and the watch that cuts a read.

The watch thread checks, every `WATCH_INTERVAL`, the file's deadline, the
stall rule and the caller's progress callback (which raises CANCELLED on a
cancel request), and cuts the connection on any of them so that a blocked read
returns at once. It holds each connection from the moment it connects (the
requests are opened with `watch=`), so a server still trickling its headers is
cut as surely as one trickling its body.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Mapping

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer.errors import DownloadError, TransientFailure

DEFAULT_STALL_SECONDS = 60.0
# Fewer bytes than this within a stall window is a stall too: a server that
# trickles a byte every few seconds never lets a read time out.
STALL_MIN_BYTES = 64 * 1024
# The overall deadline of a file allows an average this slow (a bad but honest link).
MIN_AVERAGE_RATE = 256 * 1024
WATCH_INTERVAL = 0.2  # how soon a cancel, a stall or the deadline cuts a blocked read
PROGRESS_INTERVAL = 0.1  # callbacks at most ~10 per second, plus the final one


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


def file_deadline(size: int, stall: float) -> float:
    """Seconds one file may take in all, retries included: a slow but honest link fits, a trickle does not."""
    return 4 * stall + size / MIN_AVERAGE_RATE


class ThrottledProgress:
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


class TransferWatch:
    """Ends an attempt that must end, from beside the reading thread.

    Every `WATCH_INTERVAL` it checks the file's deadline, the stall rule (fewer
    than `STALL_MIN_BYTES` in `stall` seconds: silence or a trickle) and the
    caller's progress callback (which raises CANCELLED on a cancel request);
    on any of them it cuts the connections it holds, so a blocked read returns
    at once. The stall rule counts from the attempt's start: an answer whose
    headers take longer than `stall` is a stall too.
    """

    def __init__(self, report: ThrottledProgress, stall: float, deadline_at: float, done: int, total: int | None,
                 stall_ends: bool = True):
        self.report, self.stall, self.deadline_at = report, stall, deadline_at
        # One connection: a stall ends the attempt. Several: it cuts them, each retries on the shared budget.
        self.stall_ends = stall_ends
        self.done, self.total = done, total
        self.mark = (time.monotonic(), done)
        self.reason: BaseException | None = None
        self._lines: set = set()  # the connections to cut (`connections.CutLine`)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-watch", daemon=True)
        self._thread.start()

    def attach(self, line) -> None:
        """A connection, just connected, to cut when the transfer must end (and at once if it already must)."""
        with self._lock:
            self._lines.add(line)
        if self.reason is not None:
            line.abort()

    def detach(self, line) -> None:
        """A connection whose request is closed."""
        with self._lock:
            self._lines.discard(line)

    def advanced(self, done: int) -> None:
        self.done = done
        if done - self.mark[1] >= STALL_MIN_BYTES:
            self.mark = (time.monotonic(), done)

    def end(self, reason: BaseException) -> None:
        """End the transfer for `reason`: every attached connection is cut."""
        if self.reason is None:
            self.reason = reason
        self._cut()

    def _verdict(self) -> BaseException | None:
        now = time.monotonic()
        if now > self.deadline_at:
            return DownloadError("the transfer ran past its time limit.", code=ErrorCode.TIMEOUT)
        if now - self.mark[0] > self.stall:
            return TransientFailure(f"stalled (under {STALL_MIN_BYTES // 1024} KiB in {self.stall:g} s)")
        try:
            self.report(self.done, self.total, flush=True)
        except BaseException as exc:  # the caller's way of saying stop (CANCELLED)
            return exc
        return None

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            reason = self._verdict()
            if isinstance(reason, TransientFailure) and not self.stall_ends:
                self.mark = (time.monotonic(), self.done)
                self._cut()
            elif reason is not None:
                self.end(reason)
                return

    def _cut(self) -> None:
        with self._lock:
            lines = list(self._lines)
        for line in lines:
            line.abort()

    def check(self) -> None:
        if self.reason is not None:
            raise self.reason

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
