"""One conformance suite for both StateStore implementations."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from modal_services.state.keys import RETIRED_SLOT_PREFIX, SLOT_PREFIX
from modal_services.jobs.slots import Scope, SlotTable
from modal_services.state.store import ModalDictStore, SqliteStore
from tests.fakes.modal_fakes import FakeModalDict


@pytest.fixture(params=["sqlite", "modal"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "state.sqlite3")
    else:
        store = ModalDictStore(FakeModalDict())
    yield store
    await store.close()


async def test_get_put_round_trip(store):
    assert await store.get("job:1") is None
    assert await store.get("job:1", "fallback") == "fallback"
    record = {"status": "running", "progress": 0.5, "tags": ["a", "b"], "owner": {"user_id": 7}, "none": None}
    await store.put("job:1", record)
    assert await store.get("job:1") == record
    await store.put("job:1", {"status": "done"})
    assert await store.get("job:1") == {"status": "done"}


async def test_values_are_copies(store):
    record = {"items": [1]}
    await store.put("k", record)
    record["items"].append(2)
    fetched = await store.get("k")
    fetched["items"].append(3)
    assert await store.get("k") == {"items": [1]}


async def test_put_if_absent_is_a_create(store):
    assert await store.put_if_absent("lock:x", {"owner": "a"}) is True
    assert await store.put_if_absent("lock:x", {"owner": "b"}) is False
    assert await store.get("lock:x") == {"owner": "a"}


async def test_pop_and_contains(store):
    await store.put("a", 1)
    assert await store.contains("a")
    assert await store.pop("a") == 1
    assert not await store.contains("a")
    assert await store.pop("a") is None
    assert await store.pop("a", "gone") == "gone"
    assert await store.put_if_absent("a", 2) is True


async def test_keys_and_items_by_prefix(store):
    for key in ("job:2", "job:1", "model:x.safetensors", "jobs-not-a-job", "j"):
        await store.put(key, key.upper())
    assert await store.keys("job:") == ["job:1", "job:2"]
    assert await store.items("model:") == {"model:x.safetensors": "MODEL:X.SAFETENSORS"}
    assert len(await store.keys()) == 5


async def test_concurrent_creates_have_one_winner(store):
    results = await asyncio.gather(*(store.put_if_absent("lock:download", i) for i in range(20)))
    assert results.count(True) == 1
    assert await store.get("lock:download") == results.index(True)


def test_sqlite_threads_share_one_file(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")

    def create(i):
        return asyncio.run(store.put_if_absent("lock:t", i))

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(create, range(32)))
    assert outcomes.count(True) == 1


def _create_in_process(path, barrier, results, index):
    store = SqliteStore(path)
    barrier.wait()
    results[index] = asyncio.run(store.put_if_absent("lock:p", index))


@pytest.mark.slow
def test_sqlite_processes_share_one_file(tmp_path):
    path = tmp_path / "state.sqlite3"
    SqliteStore(path)  # create the table first, as the bot does at start
    context = multiprocessing.get_context("spawn")
    count = 4
    barrier = context.Barrier(count)
    results = context.Array("b", count)
    workers = [context.Process(target=_create_in_process, args=(path, barrier, results, i)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sum(results[:]) == 1
    assert asyncio.run(SqliteStore(path).get("lock:p")) in range(count)


async def test_modal_store_uses_aio_only():
    fake = FakeModalDict()
    store = ModalDictStore(fake)
    await store.put("a", 1)
    await store.get("a")
    await store.put_if_absent("a", 2)
    await store.contains("a")
    await store.pop("a")
    assert fake.calls == ["put", "get", "put", "contains", "pop"]


def test_the_local_state_is_private_to_its_user(tmp_path):
    """It holds the API tokens: folder 0700, file 0600 (with SQLite's -wal and -shm), fixed for an existing install."""
    import stat

    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    path = folder / "state.sqlite3"
    path.touch(mode=0o644)
    os.chmod(folder, 0o755)
    os.chmod(path, 0o644)

    async def use():
        store = SqliteStore(path)
        await store.put("secret:civitai", {"token": "t"})
        await store.close()

    asyncio.run(use())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for file in folder.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


# -- job slots: caps that hold on both stores ------------------------------------------


def _slot_table(store, stale_holders=()):
    async def is_stale(claim):
        return claim["holder"] in stale_holders

    return SlotTable(store, "this-session", is_stale)


async def _holders(store) -> list[str]:
    return sorted(claim["holder"] for claim in (await store.items(SLOT_PREFIX)).values())


async def test_a_burst_of_claims_fills_a_scope_exactly(store):
    slots = _slot_table(store)
    claimed = await asyncio.gather(*(slots.claim(f"job{i}", Scope("user:7", 3)) for i in range(40)))
    winners = [key for key in claimed if key is not None]
    assert sorted(winners) == ["slot:user:7:0", "slot:user:7:1", "slot:user:7:2"]
    assert len(await _holders(store)) == 3


async def test_claim_all_takes_every_scope_or_none(store):
    slots = _slot_table(store)
    assert (await slots.claim_all("a", [Scope("user:1", 2), Scope("global", 1)]))[1] is None
    keys, full = await slots.claim_all("b", [Scope("user:2", 2), Scope("global", 1)])
    assert keys == [] and full == Scope("global", 1)
    assert await _holders(store) == ["a", "a"]  # b's user slot was let go


async def test_released_slots_are_reused_and_a_second_release_is_harmless(store):
    slots = _slot_table(store)
    first = await slots.claim("a", Scope("user:1", 1))
    assert await slots.claim("b", Scope("user:1", 1)) is None
    await slots.release("a", [first])
    assert await slots.claim("b", Scope("user:1", 1)) == first
    await slots.release("a", [first])  # late or repeated: must not free b's slot
    assert await _holders(store) == ["b"]


async def test_stale_slots_are_reclaimed_once(store):
    slots = _slot_table(store)
    await slots.claim("gone", Scope("user:1", 1))
    reclaimers = _slot_table(store, stale_holders={"gone"})
    claimed = await asyncio.gather(*(reclaimers.claim(f"new{i}", Scope("user:1", 1)) for i in range(10)))
    assert [key for key in claimed if key] == ["slot:user:1:0"]
    assert len(await _holders(store)) == 1
    await slots.release("gone", ["slot:user:1:0"])  # the stale holder's own late release changes nothing
    assert len(await _holders(store)) == 1


async def test_releases_racing_reclaims_never_overfill(store):
    """Holders let go while others reclaim the same (finished) holders' slots: at most `cap` holders."""
    cap = 3
    holders = [f"old{i}" for i in range(cap)]
    claimed = {holder: await _slot_table(store).claim(holder, Scope("global", cap)) for holder in holders}
    reclaimers = _slot_table(store, stale_holders=set(holders))

    async def release(holder):
        await reclaimers.release(holder, [claimed[holder]])

    results = await asyncio.gather(
        *(release(holder) for holder in holders),
        *(reclaimers.claim(f"new{i}", Scope("global", cap)) for i in range(12)),
    )
    winners = [key for key in results[cap:] if key]
    assert len(winners) == len(set(winners)) <= cap
    assert sorted(await _holders(store)) == sorted(f"new{i}" for i, key in enumerate(results[cap:]) if key)


async def test_forget_drops_the_retirement_markers(store):
    slots = _slot_table(store)
    key = await slots.claim("a", Scope("user:1", 1))
    await slots.release("a", [key])
    assert await store.keys(RETIRED_SLOT_PREFIX) != []
    await slots.forget("a", [key])
    assert await store.keys(RETIRED_SLOT_PREFIX) == []
