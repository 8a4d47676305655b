"""Named locks: a holder on this machine that died is let go at once; one elsewhere only by its heartbeat."""

from __future__ import annotations

import os
import time

from modal_services.state.keys import lock_key
from modal_services.state.locks import LOCK_STALE_SECONDS, holder_alive, holder_record, try_lock
from modal_services.state.store import SqliteStore
from tests.processes import dead_pid


def test_holder_alive_checks_pids_only_where_they_mean_the_same_process():
    here = holder_record()
    assert holder_alive(here) is True
    assert holder_alive({**here, "pid": dead_pid()}) is False
    assert holder_alive({**here, "machine": "another-container:x:y:1", "pid": dead_pid()}) is None
    assert holder_alive({"heartbeat": time.time()}) is None  # an old record without a machine


async def test_a_lock_whose_holder_died_here_is_taken_over_at_once(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    fresh = time.time()
    await store.put(lock_key("x"), {"owner": "dead", "heartbeat": fresh, **holder_record(), "pid": dead_pid()})
    assert await try_lock(store, "x", "me")
    assert (await store.get(lock_key("x")))["owner"] == "me"
    # Elsewhere, with a fresh heartbeat: still held; with an old one: taken over.
    elsewhere = {**holder_record(), "machine": "another-container:x:y:1", "pid": os.getpid()}
    await store.put(lock_key("y"), {"owner": "them", "heartbeat": fresh, **elsewhere})
    assert not await try_lock(store, "y", "me")
    await store.put(lock_key("y"), {"owner": "them", "heartbeat": fresh - LOCK_STALE_SECONDS - 1, **elsewhere})
    assert await try_lock(store, "y", "me")
    await store.close()
