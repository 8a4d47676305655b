"""Per-request LoRAs from a URL (`lora_url`): fetched under the egress policy, checked and kept by sha256.

A request may bring its own LoRA as an https link (a presigned storage URL,
say) instead of a library name. The file is fetched through the one egress
policy (public hosts only, redirects checked per hop) with the LoRA size
cap, must be a .safetensors file with finite weights, and is format-normalised
as library imports are (LyCORIS formats converted for diffusers; SD 1.5 or
Flux LoRAs refused). The result is kept under its sha256 for the container's
life, so a request that names `lora_sha256` skips the download, and the URL
never appears in a message or a log line (signed URLs carry credentials).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer.download import download_file
from modal_services.net.transfer.errors import DownloadError
from modal_services.net.transfer.files import LORA_MAX_BYTES
from modal_services.net.transfer.responses import safe_url

log = logging.getLogger(__name__)


class RequestLoras:
    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir

    def cached(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256.lower()}.safetensors"

    def fetch(self, url: str, sha256: str | None, model_layout) -> Path:
        """The checked, normalised LoRA file for `url` (blocking)."""
        if sha256 and self.cached(sha256).is_file():
            return self.cached(sha256)
        from modal_services.net.egress import Purpose
        from modal_services.library.lora_formats.sdxl import normalize_lora
        from modal_services.library.file_checks import check_finite

        incoming = self.cache_dir / ".incoming" / uuid.uuid4().hex
        incoming.mkdir(parents=True, exist_ok=True)
        try:
            try:
                downloaded = download_file(url, incoming / "lora.safetensors", purpose=Purpose.URL,
                                           expected_sha256=sha256, max_bytes=LORA_MAX_BYTES, retries=2)
            except DownloadError as exc:
                log.warning("request LoRA from %s: %s", safe_url(url), exc.code.value)
                status = f" (HTTP {exc.status})" if exc.status else ""
                raise ToolboxError(ErrorCode.LORA_DOWNLOAD_FAILED,
                                   f"The LoRA could not be downloaded{status}: {exc.message}") from None
            converted = incoming / "converted.safetensors"
            try:
                check_finite(downloaded.path)
                report = normalize_lora(downloaded.path, converted, model_layout)
            except ToolboxError as exc:
                raise ToolboxError(ErrorCode.LORA_LOAD_FAILED, f"The LoRA from the URL could not be used: {exc.message}") from None
            final = self.cached(downloaded.sha256)
            os.replace(converted if report.converted else downloaded.path, final)
            return final
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
