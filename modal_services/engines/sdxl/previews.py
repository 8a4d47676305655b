"""Live previews of a running job (SDXL generate and upscale, Flux generate): small JPEGs under
`preview:<job id>` in the state store.

`PreviewSink` is the worker's side: the engine calls it from its worker
thread with JPEG bytes every few seconds; the sink hands the write to the
event loop (never blocking the engine), keeps only the latest image, bounds
its size, and removes the key when the job ends, so nothing is left behind.
`decode_preview` is the reader's side: the bot reads the key with it while
it follows the job.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time

from modal_services.state.keys import preview_key
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)

# Store values are JSON: base64 adds a third, and Modal Dict entries should stay small.
MAX_PREVIEW_BYTES = 48_000


def decode_preview(record) -> bytes | None:
    """The JPEG bytes of a stored preview record, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("jpeg"), str):
        return None
    try:
        return base64.b64decode(record["jpeg"], validate=True)
    except ValueError:
        return None


class PreviewSink:
    """Thread-safe callable for the engine's `preview=`; `await close()` when the job ends."""

    def __init__(self, store: StateStore, job_id: str, loop: asyncio.AbstractEventLoop | None = None):
        self.store = store
        self.key = preview_key(job_id)
        self.loop = loop or asyncio.get_running_loop()
        self.count = 0
        self._pending: asyncio.Future | None = None

    def __call__(self, jpeg: bytes) -> None:
        if len(jpeg) > MAX_PREVIEW_BYTES:
            log.debug("preview of %d bytes dropped", len(jpeg))
            return
        # A write still in flight means the store is slower than the previews: skip this one.
        if self._pending is not None and not self._pending.done():
            return
        self.count += 1
        record = {"jpeg": base64.b64encode(jpeg).decode("ascii"), "at": time.time(), "n": self.count}
        self._pending = asyncio.run_coroutine_threadsafe(self.store.put(self.key, record), self.loop)

    async def close(self) -> None:
        if self._pending is not None:
            try:
                await asyncio.wrap_future(self._pending)
            except Exception:  # a lost preview is not worth failing a finished job
                log.warning("writing a preview for %s failed", self.key, exc_info=True)
        await self.store.pop(self.key, None)
