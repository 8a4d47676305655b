"""`download_file`: one URL to one verified file, over several connections or one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from modal_services.net.egress import Credentials, Purpose
from modal_services.net.transfer import deadlines
from modal_services.net.transfer.files import CHECKPOINT_MAX_BYTES, DownloadedFile
from modal_services.net.transfer.parallel import download_in_ranges
from modal_services.net.transfer.single import SingleConnectionDownload

CONNECT_TIMEOUT = 15.0


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
    deadline_at: float | None = None,
    label: str | None = None,
) -> DownloadedFile:
    """Download `url` to `dest` (blocking) under the egress policy, verified, via `<dest>.partial` and an atomic rename.

    - An existing `.partial` (an earlier attempt, or a killed process) is
      resumed with `Range` when the server allows it, otherwise restarted.
    - Every failed attempt counts against one budget of `retries` (429
      honouring `Retry-After`, 408, 5xx, dropped connections, stalls, short
      bodies, a wrong `Content-Range`, a server ignoring `Range`); only an
      attempt that brings the file clearly further than ever before
      (by `STALL_MIN_BYTES`) earns a fresh budget.
    - The file has an overall deadline (`file_deadline`, or the caller's
      `deadline_at` on the monotonic clock when sooner): TIMEOUT past it.
    - `max_bytes` (the cap for this kind of file) bounds every transfer: a
      server declaring more is refused before the body is read; a body
      declaring nothing is cut and refused past it. A body longer than its
      declared size is cut there, and judged by size and sha256 as ever.
    - 401/403/404/410 and other refusals raise `DownloadHTTPError` (with `.status`).
    - Wrong size or sha256: CHECKSUM_MISMATCH; a full disk: STORAGE_FULL.
      Both remove the partial; `dest` is never touched.
    - Whatever `progress` raises (CANCELLED) stops the transfer within
      `WATCH_INTERVAL`, leaving the `.partial` to resume from.
    - A large file (`expected_size`, or else `size_hint`, the source's
      approximate size, from `PARALLEL_MIN_BYTES`) comes over
      `TOOLBOX_DOWNLOAD_CONNECTIONS` connections when the server serves ranges
      (`parallel`), over one otherwise.
    - `label` names the source in every message and log line instead of the
      URL (a signed link must never be shown); by default the URL without
      its query.
    """
    dest = Path(dest)
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    report = deadlines.ThrottledProgress(progress)
    stall = deadlines.stall_seconds()
    file_deadline_at = time.monotonic() + deadlines.file_deadline(expected_size or max_bytes, stall)
    deadline_at = file_deadline_at if deadline_at is None else min(deadline_at, file_deadline_at)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opening = {"purpose": purpose, "credentials": credentials, "trusted": trusted, "timeout": (CONNECT_TIMEOUT, stall),
               "label": label}
    finished = download_in_ranges(url, dest, opening, report, stall, deadline_at, retries, expected_size=expected_size,
                                  size_hint=size_hint, expected_sha256=expected_sha256, max_bytes=max_bytes)
    if finished is not None:
        return finished
    return SingleConnectionDownload(url, dest, opening, report, stall, deadline_at, expected_size=expected_size,
                                    expected_sha256=expected_sha256, max_bytes=max_bytes, retries=retries).run()
