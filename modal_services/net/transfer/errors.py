"""How a transfer fails: the errors callers see, the failure worth another attempt, and a full disk."""

from __future__ import annotations

import errno

from modal_services.errors import ErrorCode, ToolboxError


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


def size_text(n: int) -> str:
    """A byte count for a message: MiB below one GiB, GiB from there."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def over_cap(where: str, size: int, cap: int) -> DownloadError:
    """A server offering more than this kind of file may weigh: refused before its body is read."""
    return DownloadError(f"{where} offers {size_text(size)}, more than the {size_text(cap)} allowed for this kind "
                         "of file; the download was refused.")


class TransientFailure(Exception):
    """A failure worth retrying (server busy, connection cut)."""

    status: int | None = None
    retry_after: float | None = None
    # For a failure unlikely to pass soon (a refused connection): fewer retries than the caller allows,
    # and the error to end with once they are spent.
    max_retries: int | None = None
    give_up: ToolboxError | None = None


def failure_reason(exc: BaseException) -> str:
    """A failed attempt in a few words, for the retry log and the final message."""
    import urllib3

    if isinstance(exc, TransientFailure):
        return str(exc)
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection cut"
    if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return "timed out"
    return type(exc).__name__


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_full(what: str) -> ToolboxError:
    return ToolboxError(ErrorCode.STORAGE_FULL, f"The disk ran out of space while writing {what}. Free some space and retry.")
