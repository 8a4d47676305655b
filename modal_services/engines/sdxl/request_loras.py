"""Per-request LoRAs from a URL (`lora_url`): fetched under the egress policy, checked and kept by sha256.

A request may bring its own LoRA as an https link (a presigned storage URL,
say; plain http only to a host in TOOLBOX_ALLOWED_HOSTS) instead of a library
name. The file is fetched through the one egress policy (public hosts only,
redirects checked per hop) with the LoRA size cap, must be a .safetensors
file with finite weights, and is format-normalised as library imports are
(LyCORIS formats converted for diffusers; SD 1.5 or Flux LoRAs refused).

The fetch is the job's: it ends at the request's deadline (TIMEOUT) and on
Cancel (the job's progress callback raises CANCELLED; the transfer's watch
calls it several times a second, and cuts the connection even before the
server has sent its headers). Messages and log lines call the link only
"the LoRA URL": signed URLs carry credentials in their path or query, and
even the host is not shown.

The result is kept under its sha256 for the worker's life, so a request that
names `lora_sha256` skips the download. The files live in a scratch folder
made at the first fetch and removed when the worker lets go of it (the
engine collected, or the process exiting): nothing outlives the worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.files import LORA_MAX_BYTES

log = logging.getLogger(__name__)

# What every message and log line calls the request's link.
URL_LABEL = "the LoRA URL"
SCRATCH_PREFIX = "request-loras-"


class RequestLoras:
    def __init__(self, parent: Path | None = None):
        """`parent`: where the scratch folder is made (the system's temporary folder when None)."""
        self._parent = parent
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._lock = threading.Lock()

    def _folder(self) -> Path:
        """The scratch folder, made on first use; removed with this object or at exit (TemporaryDirectory's finalizer)."""
        with self._lock:
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=self._parent)
            return Path(self._scratch.name)

    def cached(self, sha256: str) -> Path | None:
        """The kept file of this sha256, if an earlier request of this worker fetched it."""
        if self._scratch is None:
            return None
        path = Path(self._scratch.name) / f"{sha256.lower()}.safetensors"
        return path if path.is_file() else None

    def fetch(self, url: str, sha256: str | None, model_layout,
              progress: Callable[[int, int | None], None] | None = None, deadline_at: float | None = None) -> Path:
        """The checked, normalised LoRA file for `url` (blocking).

        `progress(done, total)` is called as the bytes come and between reads; what it raises (CANCELLED)
        ends the fetch. Past `deadline_at` (time.monotonic) the fetch ends as TIMEOUT.
        """
        kept = self.cached(sha256) if sha256 else None
        if kept is not None:
            return kept
        from modal_services.library.file_checks import check_finite
        from modal_services.library.lora_formats.sdxl import normalize_lora
        from modal_services.net.egress import Purpose

        folder = self._folder()
        incoming = folder / ".incoming" / uuid.uuid4().hex
        incoming.mkdir(parents=True, exist_ok=True)
        try:
            try:
                downloaded = download_file(url, incoming / "lora.safetensors", purpose=Purpose.URL,
                                           expected_sha256=sha256, max_bytes=LORA_MAX_BYTES, retries=2,
                                           progress=progress, deadline_at=deadline_at, label=URL_LABEL)
            except ToolboxError as exc:
                log.warning("request LoRA: the download failed: %s", exc.code.value)
                raise _fetch_failure(exc) from None
            converted = incoming / "converted.safetensors"
            try:
                check_finite(downloaded.path)
                report = normalize_lora(downloaded.path, converted, model_layout)
            except ToolboxError as exc:
                raise ToolboxError(ErrorCode.LORA_LOAD_FAILED, f"The LoRA from the URL could not be used: {exc.message}") from None
            final = folder / f"{downloaded.sha256}.safetensors"
            os.replace(converted if report.converted else downloaded.path, final)
            return final
        finally:
            shutil.rmtree(incoming, ignore_errors=True)


def _fetch_failure(error: ToolboxError) -> ToolboxError:
    """What the request is told of a failed fetch. Every message the transfer builds names the link by its
    label only, so refusals (INVALID_INPUT), Cancel, a wrong sha256 and a full disk pass as they are."""
    if error.code is ErrorCode.TIMEOUT:
        return ToolboxError(ErrorCode.TIMEOUT, "Fetching the LoRA took longer than the request's timeout and was stopped.")
    if error.code in (ErrorCode.DOWNLOAD_FAILED, ErrorCode.RATE_LIMITED):
        status = getattr(error, "status", None)
        return ToolboxError(ErrorCode.LORA_DOWNLOAD_FAILED,
                            f"The LoRA could not be downloaded{f' (HTTP {status})' if status else ''}: {error.message}")
    return error
