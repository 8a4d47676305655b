"""The expiring test store keeps the `modal.Dict` lifetime rule: 7 days without a read or write and
an entry is gone; any activity on a key starts its 7 days again."""

from __future__ import annotations

import pytest

from tests.fakes.expiring_store import ExpiringStore


@pytest.fixture
def store():
    return ExpiringStore()


async def test_an_entry_left_alone_for_7_days_is_gone(store):
    await store.put("a", {"n": 1})
    store.advance(days=6, hours=23)
    assert store.remembered() == ["a"]
    store.advance(hours=1)
    assert store.remembered() == []
    assert await store.get("a", "gone") == "gone" and not await store.contains("a")
    assert await store.keys() == [] and await store.items() == {} and await store.pop("a", "gone") == "gone"


@pytest.mark.parametrize("activity", [
    pytest.param(lambda store: store.get("a"), id="get"),
    pytest.param(lambda store: store.contains("a"), id="contains"),
    pytest.param(lambda store: store.put("a", {"n": 2}), id="put"),
    pytest.param(lambda store: store.keys("a"), id="keys"),
    pytest.param(lambda store: store.items("a"), id="items"),
])
async def test_every_read_or_write_of_a_key_starts_its_7_days_again(store, activity):
    await store.put("a", {"n": 1})
    await store.put("b", {"n": 1})
    for _ in range(6):  # 30 days, with activity every 5
        store.advance(days=5)
        await activity(store)
    assert "a" in store.remembered() and "b" not in store.remembered()


async def test_a_listing_refreshes_only_the_keys_it_lists(store):
    await store.put("job:1", 1)
    await store.put("model:x", 2)
    store.advance(days=5)
    assert await store.keys("model:") == ["model:x"]
    store.advance(days=5)
    assert store.remembered() == ["model:x"]


async def test_a_refused_create_is_not_activity(store):
    assert await store.put_if_absent("lock:a", {"holder": 1})
    store.advance(days=5)
    assert not await store.put_if_absent("lock:a", {"holder": 2})
    store.advance(days=3)
    assert await store.put_if_absent("lock:a", {"holder": 3})
    assert await store.get("lock:a") == {"holder": 3}


async def test_values_are_serialised_copies(store):
    value = {"words": ["a"], "pair": (1, 2)}
    await store.put("k", value)
    value["words"].append("changed after the put")
    read = await store.get("k")
    assert read == {"words": ["a"], "pair": [1, 2]}  # JSON, as the real stores keep it
    read["words"].append("changed after the get")
    assert await store.get("k") == {"words": ["a"], "pair": [1, 2]}
    with pytest.raises(TypeError):
        await store.put("bad", {1, 2})
    assert not await store.contains("bad")


async def test_pop_returns_the_value_and_removes_it(store):
    await store.put("k", [1])
    assert await store.pop("k") == [1] and await store.pop("k", "none") == "none"


async def test_forget_everything_is_a_fresh_dict(store):
    for key in ("a", "b", "model:c"):
        await store.put(key, key)
    store.forget_everything()
    assert await store.items() == {} and store.remembered() == []
    await store.put("a", "again")
    assert await store.get("a") == "again"
