"""A state store that forgets as a `modal.Dict` is documented to, on a clock the test moves.

The modal client documents `Dict` (modal/dict.py, modal 1.6.4): "An individual Dict entry will
expire after 7 days of inactivity (no reads or writes)." `ExpiringStore` keeps that rule: every
get, put, pop or contains of a key, and every items() or keys() that lists it, is activity that
restarts its 7 days; an entry left alone longer is gone, as if it had never been written. The clock
stands still until the test calls `advance(days=8)`. `forget_everything()` is a fresh Dict over
the same volumes: every entry gone at once.

Values are kept as JSON text, as the real stores serialise them: a caller never shares an object
with the store, and what cannot be serialised fails at `put`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from modal_services.state.store import StateStore

# The documented lifetime of an entry nobody reads or writes.
INACTIVITY_LIMIT_SECONDS = 7 * 24 * 3600
_MISSING = object()


class ExpiringStore(StateStore):
    def __init__(self) -> None:
        self.now = 0.0  # seconds on this store's own clock
        self._entries: dict[str, tuple[str, float]] = {}  # key -> (JSON text, last activity)
        self._lock = threading.Lock()

    # -------------------------------------------------------------- the test's controls

    def advance(self, days: float = 0, hours: float = 0, seconds: float = 0) -> None:
        """Let time pass with no activity."""
        self.now += days * 24 * 3600 + hours * 3600 + seconds

    def forget_everything(self) -> None:
        """Every entry gone at once, as a new Dict over existing volumes."""
        with self._lock:
            self._entries.clear()

    def remembered(self) -> list[str]:
        """The keys still held, seen without touching them (for assertions only)."""
        with self._lock:
            self._expire()
            return sorted(self._entries)

    # -------------------------------------------------------------- the store

    async def get(self, key: str, default: Any = None) -> Any:
        text = await self._call(self._touch, key)
        return default if text is _MISSING else json.loads(text)

    async def put(self, key: str, value: Any) -> None:
        await self._call(self._write, key, json.dumps(value), False)

    async def put_if_absent(self, key: str, value: Any) -> bool:
        return await self._call(self._write, key, json.dumps(value), True)

    async def pop(self, key: str, default: Any = None) -> Any:
        text = await self._call(self._remove, key)
        return default if text is _MISSING else json.loads(text)

    async def contains(self, key: str) -> bool:
        return await self._call(self._touch, key) is not _MISSING

    async def keys(self, prefix: str = "") -> list[str]:
        return sorted(await self._call(self._listing, prefix))

    async def items(self, prefix: str = "") -> dict[str, Any]:
        listed = await self._call(self._listing, prefix)
        return {key: json.loads(listed[key]) for key in sorted(listed)}

    # -------------------------------------------------------------- under the lock

    async def _call(self, operation, *args):
        await asyncio.sleep(0)  # a Dict call always yields to the event loop
        with self._lock:
            self._expire()
            return operation(*args)

    def _expire(self) -> None:
        idle = [key for key, (_, last) in self._entries.items() if self.now - last >= INACTIVITY_LIMIT_SECONDS]
        for key in idle:
            del self._entries[key]

    def _touch(self, key: str) -> Any:
        found = self._entries.get(key)
        if found is None:
            return _MISSING
        self._entries[key] = (found[0], self.now)
        return found[0]

    def _write(self, key: str, text: str, only_if_absent: bool) -> bool:
        if only_if_absent and key in self._entries:
            # A refused create is not counted as activity: of the two readings, the one that forgets more.
            return False
        self._entries[key] = (text, self.now)
        return True

    def _remove(self, key: str) -> Any:
        found = self._entries.pop(key, None)
        return _MISSING if found is None else found[0]

    def _listing(self, prefix: str) -> dict[str, str]:
        listed = {key: text for key, (text, _) in self._entries.items() if key.startswith(prefix)}
        for key, text in listed.items():
            self._entries[key] = (text, self.now)
        return listed
