"""Shared state: one key per thing (`job:<id>`, `download:<model>`, `model:<file>`, ...).

Two implementations of one async interface:

- `SqliteStore`, the local backend's: one SQLite file in WAL mode, safe for
  several threads and processes. Calls run in a worker thread so the event
  loop never waits on the disk.
- `ModalDictStore`, over a `modal.Dict`, always through the `.aio` forms.

Values are JSON-compatible (dicts, lists, strings, numbers, bools, None):
that is what both stores keep faithfully.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class StateStore(ABC):
    @abstractmethod
    async def get(self, key: str, default: Any = None) -> Any: ...

    @abstractmethod
    async def put(self, key: str, value: Any) -> None: ...

    @abstractmethod
    async def put_if_absent(self, key: str, value: Any) -> bool:
        """Atomic create: True if this call stored the value, False if the key existed."""

    @abstractmethod
    async def pop(self, key: str, default: Any = None) -> Any: ...

    @abstractmethod
    async def contains(self, key: str) -> bool: ...

    @abstractmethod
    async def keys(self, prefix: str = "") -> list[str]: ...

    @abstractmethod
    async def items(self, prefix: str = "") -> dict[str, Any]: ...

    async def close(self) -> None:
        """Release resources; the default store holds none."""


def _make_private(path: Path) -> None:
    """The folder 0700 and the file 0600, created so or fixed (an install from before this rule).

    SQLite creates its -wal and -shm files with the database file's mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion.exists():
            os.chmod(companion, 0o600)


class SqliteStore(StateStore):
    """The local state: one SQLite file, private to its user (it holds the API tokens)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _make_private(self.path)
        # One connection per thread: sqlite3 connections must not be shared
        # across threads, and WAL lets them (and other processes) work together.
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        with self._connection() as db:
            db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _get(self, key: str, default: Any) -> Any:
        row = self._connection().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _put(self, key: str, value: Any) -> None:
        self._connection().execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def _put_if_absent(self, key: str, value: Any) -> bool:
        cursor = self._connection().execute(
            "INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)", (key, json.dumps(value))
        )
        return cursor.rowcount == 1

    def _pop(self, key: str, default: Any) -> Any:
        row = self._connection().execute("DELETE FROM kv WHERE key = ? RETURNING value", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _keys(self, prefix: str) -> list[str]:
        rows = self._connection().execute(
            "SELECT key FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
        ).fetchall()
        return [row[0] for row in rows]

    def _items(self, prefix: str) -> dict[str, Any]:
        rows = self._connection().execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
        ).fetchall()
        return {key: json.loads(value) for key, value in rows}

    async def get(self, key: str, default: Any = None) -> Any:
        return await asyncio.to_thread(self._get, key, default)

    async def put(self, key: str, value: Any) -> None:
        await asyncio.to_thread(self._put, key, value)

    async def put_if_absent(self, key: str, value: Any) -> bool:
        return await asyncio.to_thread(self._put_if_absent, key, value)

    async def pop(self, key: str, default: Any = None) -> Any:
        return await asyncio.to_thread(self._pop, key, default)

    async def contains(self, key: str) -> bool:
        sentinel = object()
        return await asyncio.to_thread(self._get, key, sentinel) is not sentinel

    async def keys(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._keys, prefix)

    async def items(self, prefix: str = "") -> dict[str, Any]:
        return await asyncio.to_thread(self._items, prefix)

    async def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()


class ModalDictStore(StateStore):
    """A `modal.Dict` seen through the store interface; every call is `.aio`."""

    def __init__(self, modal_dict):
        self._dict = modal_dict

    @classmethod
    def from_name(cls, name: str) -> "ModalDictStore":
        import modal

        return cls(modal.Dict.from_name(name, create_if_missing=True))

    async def get(self, key: str, default: Any = None) -> Any:
        return await self._dict.get.aio(key, default)

    async def put(self, key: str, value: Any) -> None:
        await self._dict.put.aio(key, value)

    async def put_if_absent(self, key: str, value: Any) -> bool:
        return await self._dict.put.aio(key, value, skip_if_exists=True)

    async def pop(self, key: str, default: Any = None) -> Any:
        return await self._dict.pop.aio(key, default)

    async def contains(self, key: str) -> bool:
        return await self._dict.contains.aio(key)

    async def keys(self, prefix: str = "") -> list[str]:
        found = [key async for key in self._dict.keys.aio() if isinstance(key, str) and key.startswith(prefix)]
        return sorted(found)

    async def items(self, prefix: str = "") -> dict[str, Any]:
        found = {
            key: value
            async for key, value in self._dict.items.aio()
            if isinstance(key, str) and key.startswith(prefix)
        }
        return dict(sorted(found.items()))
