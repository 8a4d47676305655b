"""Named locks in the state store, with heartbeats: one holder at a time, taken over when its holder died.

`lock:<name>` is created with skip-if-exists; the holder refreshes its
heartbeat, and a lock nobody refreshed for `LOCK_STALE_SECONDS` belongs to a
process that died (killed container, closed laptop). A holder on this very
machine (same host and process namespace) is checked by its pid instead: a
killed CLI's lock is taken over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.keys import lock_key
from modal_services.state.store import StateStore

log = logging.getLogger(__name__)


# A lock whose holder has not refreshed it for this long belongs to a process
# that died (killed container, closed laptop): the next comer takes it over.
LOCK_STALE_SECONDS = 120.0
HEARTBEAT_SECONDS = 15.0


def machine_id() -> str:
    """This kernel boot, container and process namespace: where a recorded pid can be checked.

    Two sandboxes may share a host name and even a namespace inode (each
    gVisor sandbox has its own kernel), so the boot id and Modal's container
    id are part of it: a pid is only ever checked where it means the same process.
    """
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"unknown:{os.getpid()}:{_PROCESS_NONCE}"  # matches no other process: heartbeats decide
    return f"{os.uname().nodename}:{os.environ.get('MODAL_TASK_ID', '')}:{boot}:{namespace}"


_PROCESS_NONCE = uuid.uuid4().hex


def holder_alive(value: dict) -> bool | None:
    """Whether the process a record names is alive: None when it ran elsewhere (only its heartbeat can tell)."""
    pid = value.get("pid")
    if value.get("machine") != machine_id() or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def holder_record() -> dict:
    return {"host": os.uname().nodename, "machine": machine_id(), "pid": os.getpid()}


def _lock_is_live(value: dict | None, now: float | None = None) -> bool:
    if not value or holder_alive(value) is False:  # a holder on this machine that died is dead at once
        return False
    return (now or time.time()) - value.get("heartbeat", 0) < LOCK_STALE_SECONDS


async def try_lock(store: StateStore, name: str, owner: str, extra: dict | None = None) -> bool:
    """Take `lock:<name>` if free or stale (its holder stopped refreshing it)."""
    key = lock_key(name)
    value = {"owner": owner, "heartbeat": time.time(), **holder_record(), **(extra or {})}
    if await store.put_if_absent(key, value):
        return True
    current = await store.get(key)
    if _lock_is_live(current):
        return False
    log.warning("taking over the stale lock %s", key)
    # Removing the stale value and creating ours are two steps: two takers at
    # the very same moment could both win. The window is one round trip once
    # per crashed holder, and the loser's files still verify before any manifest.
    await store.pop(key)
    return await store.put_if_absent(key, value)


async def refresh_lock(store: StateStore, name: str, owner: str) -> bool:
    current = await store.get(lock_key(name))
    if not current or current.get("owner") != owner:
        return False
    current["heartbeat"] = time.time()
    await store.put(lock_key(name), current)
    return True


async def release_lock(store: StateStore, name: str, owner: str) -> None:
    current = await store.get(lock_key(name))
    if current and current.get("owner") == owner:
        await store.pop(lock_key(name))



# How often a short change polls for a lock another one holds.
SHORT_LOCK_POLL_SECONDS = 0.05


@contextlib.asynccontextmanager
async def holding(store: StateStore, name: str, busy_message: str, wait_seconds: float = 10.0) -> AsyncIterator[None]:
    """Hold `lock:<name>` for a short read-modify-write (a record two admins may change at once), so
    that neither change is lost; RATE_LIMITED with `busy_message` when another holds it past `wait_seconds`."""
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + wait_seconds
    while not await try_lock(store, name, owner):
        if time.monotonic() > deadline:
            raise ToolboxError(ErrorCode.RATE_LIMITED, busy_message)
        await asyncio.sleep(SHORT_LOCK_POLL_SECONDS)
    try:
        yield
    finally:
        await release_lock(store, name, owner)
