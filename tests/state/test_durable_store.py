"""DurableStore: live keys stay live, durable records live in their files and the live store only
caches them, on this machine's disk (SQLite + folders) and as on Modal (Dict + volumes)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import pytest

from modal_services.base_models.registry import BASE_MODELS
from modal_services.base_models.tokens import SERVICES
from modal_services.jobs.records import new_job_id
from modal_services.library.file_names import safe_file_name
from modal_services.state.durable import (
    ABSENT,
    HOMES,
    LORAS_HOME,
    MODELS_HOME,
    RECORDS_HOME,
    TOKENS_HOME,
    UPGRADE_JOURNAL,
    DurableStore,
    local_homes,
    record_kind,
)
from modal_services.state.keys import (
    ACTIVE_CHECKPOINT_KEY,
    caption_prompt_key,
    entry_key,
    generate_faces_key,
    generate_params_key,
    manifest_key,
    optional_model_key,
    secret_key,
    settings_key,
    upscale_params_key,
)
from modal_services.state.record_files import FolderFiles, RecordFiles, VolumeFiles
from modal_services.state.store import ModalDictStore, SqliteStore
from tests.fakes.modal_fakes import FakeModalDict, FakeModalVolume

LORA = {"file": "a.safetensors", "name": "A style", "type": "lora", "family": "sdxl",
        "trigger_words": ["a style", "flat colours"], "weight": 0.8}
CHECKPOINT = {"file": "c.safetensors", "name": "C", "type": "checkpoint", "family": "flux"}

# Every durable kind: a key, a value, and where its file must be (home, path).
WHERE = [
    (entry_key("a.safetensors"), LORA, LORAS_HOME, "loras/a.json"),
    (entry_key("c.safetensors"), CHECKPOINT, LORAS_HOME, "checkpoints/c.json"),
    (manifest_key("sdxl-base"), {"complete": True}, MODELS_HOME, "toolbox-manifests/sdxl-base.json"),
    (settings_key(123), {"cap": 2}, RECORDS_HOME, "settings/123.json"),
    (settings_key(None), {"cap": 1}, RECORDS_HOME, "settings/dm.json"),
    (optional_model_key("flux1-dev"), {"by": 7}, RECORDS_HOME, "optional-models/flux1-dev.json"),
    (ACTIVE_CHECKPOINT_KEY, {"file": "c.safetensors"}, RECORDS_HOME, "active-checkpoint.json"),
    (generate_params_key("j1"), {"seed": 1}, RECORDS_HOME, "results/generate/j1.json"),
    (upscale_params_key("j2"), {"scale": 2}, RECORDS_HOME, "results/upscale/j2.json"),
    (generate_faces_key("j3"), {"photos": ["iVBOR"]}, RECORDS_HOME, "results/generate-faces/j3.json"),
    (caption_prompt_key("j4"), {"prompt": "a cat"}, RECORDS_HOME, "results/caption-prompt/j4.json"),
    (secret_key("civitai"), {"token": "t0k3n"}, TOKENS_HOME, "civitai.json"),
]
LIVE_KEYS = ["job:1", "call:1", "cancel:1", "preview:1", "download:sdxl-base", "lock:file:a.safetensors",
             "slot:global:0", "slot-retired:h:slot:global:0", "migration:file:a.safetensors"]
HOSTILE_NAMES = ["../x", "/abs", "a/../../b", ".x", "x\0y", "a\\b", "", "a/b", "line\nbreak"]


class CountingFiles(RecordFiles):
    """A home that counts its reads and can be told to fail its writes or to run a hook as it reads."""

    def __init__(self, inner: RecordFiles):
        self.inner = inner
        self.reads: list[str] = []
        self.broken = False
        self.on_read = None

    async def read(self, path):
        self.reads.append(path)
        data = await self.inner.read(path)
        if self.on_read is not None:
            await self.on_read()
        return data

    async def write(self, path, data):
        if self.broken:
            raise OSError(28, "No space left on device")
        await self.inner.write(path, data)

    async def remove(self, path):
        await self.inner.remove(path)

    async def names(self, folder):
        return await self.inner.names(folder)


def _homes(flavour: str, tmp_path) -> dict[str, RecordFiles]:
    if flavour == "local":
        return local_homes(tmp_path / "data")
    return {home: VolumeFiles(FakeModalVolume()) for home in HOMES}


def _live(flavour: str, tmp_path, name: str = "state"):
    if flavour == "local":
        return SqliteStore(tmp_path / f"{name}.sqlite3")
    return ModalDictStore(FakeModalDict())


@pytest.fixture(params=["local", "modal"])
def flavour(request):
    return request.param


@pytest.fixture
async def homes(flavour, tmp_path):
    return {home: CountingFiles(files) for home, files in _homes(flavour, tmp_path).items()}


@pytest.fixture
async def store(flavour, homes, tmp_path):
    store = DurableStore(_live(flavour, tmp_path), homes)
    yield store
    await store.close()


async def _file(homes, home: str, path: str):
    data = await homes[home].inner.read(path)
    return None if data is None else json.loads(data)


async def _all_files(homes) -> dict[str, list[str]]:
    """Every file of every home, hidden ones too, wherever it is."""
    found = {}
    for home, files in homes.items():
        inner = files.inner
        if isinstance(inner, FolderFiles):
            paths = [path.relative_to(inner.root) for path in inner.root.rglob("*") if path.is_file()]
            found[home] = sorted(str(path) for path in paths)
        else:
            found[home] = sorted(inner.volume.files)
    return found


# ---------------------------------------------------------------- routing


async def test_live_keys_never_become_files(store, homes):
    for key in LIVE_KEYS:
        await store.put(key, {"live": key})
        assert await store.put_if_absent(key, {"again": True}) is False
    assert await _all_files(homes) == {home: [] for home in HOMES}
    assert await store.get("job:1") == {"live": "job:1"}
    assert await store.keys("job:") == ["job:1"]
    assert await store.pop("cancel:1") == {"live": "cancel:1"}
    assert not await store.contains("cancel:1")


@pytest.mark.parametrize("key, value, home, path", WHERE)
async def test_a_durable_record_is_its_file_and_the_live_store_its_cache(store, homes, key, value, home, path):
    await store.put(key, value)
    on_disk = await _file(homes, home, path)
    assert (on_disk["toolbox"] if key.startswith("model:") else on_disk) == value
    assert await store.live.get(key) == value
    assert await store.get(key) == value
    assert record_kind(key) is not None

    assert await store.pop(key) == value
    assert await _file(homes, home, path) is None
    assert await store.live.get(key) is None
    assert await store.get(key, "gone") == "gone"


async def test_a_write_that_fails_leaves_the_record_as_it_was(store, homes):
    await store.put(settings_key(1), {"cap": 1})
    homes[RECORDS_HOME].broken = True
    with pytest.raises(OSError, match="No space"):
        await store.put(settings_key(1), {"cap": 9})
    with pytest.raises(OSError):
        await store.put(settings_key(2), {"cap": 9})
    assert await store.live.get(settings_key(1)) != {"cap": 9}  # the cache never got the new value
    assert await store.live.get(settings_key(2)) is None
    homes[RECORDS_HOME].broken = False
    assert await store.get(settings_key(1)) == {"cap": 1}
    assert await store.get(settings_key(2)) is None


async def test_a_writer_stopped_between_its_file_and_its_cache_leaves_no_stale_value(store, monkeypatch):
    await store.put(settings_key(1), {"cap": 1})

    async def dict_unreachable(key, value):
        raise ConnectionError("the Dict is unreachable")

    monkeypatch.setattr(store.live, "put", dict_unreachable)
    with pytest.raises(ConnectionError):
        await store.put(settings_key(1), {"cap": 2})  # the file is written, the cache is not
    monkeypatch.undo()
    assert await store.get(settings_key(1)) == {"cap": 2}


async def test_put_if_absent_of_a_durable_key_is_refused(store, homes):
    with pytest.raises(TypeError, match="durable record"):
        await store.put_if_absent(settings_key(1), {"cap": 1})
    assert await _all_files(homes) == {home: [] for home in HOMES}


# ---------------------------------------------------------------- the cache


async def test_a_cache_miss_reads_the_file_and_warms_the_cache(store, homes):
    await store.put(settings_key(5), {"cap": 3})
    await store.live.pop(settings_key(5))  # the Dict forgot it
    assert await store.get(settings_key(5)) == {"cap": 3}
    assert await store.live.get(settings_key(5)) == {"cap": 3}
    reads = len(homes[RECORDS_HOME].reads)
    assert await store.get(settings_key(5)) == {"cap": 3}
    assert await store.contains(settings_key(5))
    assert len(homes[RECORDS_HOME].reads) == reads  # answered by the cache


async def test_no_settings_is_cached_but_a_typed_library_name_is_not(store, homes):
    assert await store.get(settings_key(9), {"default": True}) == {"default": True}
    assert await store.live.get(settings_key(9)) == ABSENT
    reads = len(homes[RECORDS_HOME].reads)
    assert await store.get(settings_key(9)) is None
    assert not await store.contains(settings_key(9))
    assert len(homes[RECORDS_HOME].reads) == reads

    for typed in ("nope", "typo", "another typo"):
        assert await store.get(entry_key(f"{typed}.safetensors")) is None
    assert await store.live.keys("model:") == []  # a stream of bad names cannot fill the cache

    await store.put(settings_key(9), {"cap": 4})  # a record made later replaces the absence
    assert await store.get(settings_key(9)) == {"cap": 4}


async def test_a_reader_warming_the_cache_never_overwrites_a_newer_write(store, homes, flavour, tmp_path):
    """The reader reads the old file; before it warms the cache, a writer replaces the record."""
    await store.put(settings_key(1), {"cap": 1})
    await store.live.pop(settings_key(1))

    async def writer_replaces_the_record():
        homes[RECORDS_HOME].on_read = None
        await store.put(settings_key(1), {"cap": 2})

    homes[RECORDS_HOME].on_read = writer_replaces_the_record
    assert await store.get(settings_key(1)) == {"cap": 1}  # what this reader read
    assert await store.live.get(settings_key(1)) == {"cap": 2}  # the cache holds the newer value
    assert await store.get(settings_key(1)) == {"cap": 2}


async def test_listings_come_from_the_files(store, homes):
    for guild in (1, 2, 3):
        await store.put(settings_key(guild), {"cap": guild})
    await store.live.pop(settings_key(1))  # forgotten by the cache
    await store.live.put(settings_key(99), {"cap": 99})  # cached, but no file (deleted behind the cache)
    await store.live.put(settings_key(2), {"cap": 20})  # cached value differs from its file
    await homes[RECORDS_HOME].inner.write("settings/4.json", b'{"cap": 4}')  # file the cache noted as absent
    await store.live.put(settings_key(4), ABSENT)

    assert await store.keys("settings:") == [settings_key(g) for g in (1, 2, 3, 4)]
    items = await store.items("settings:")
    # The cache is trusted for a key it holds (the daily reconcile re-warms those from the files);
    # a forgotten key and one cached as absent are read from their files.
    assert items == {settings_key(1): {"cap": 1}, settings_key(2): {"cap": 20}, settings_key(3): {"cap": 3},
                     settings_key(4): {"cap": 4}}
    assert await store.live.get(settings_key(99)) is None  # dropped: its file is gone
    assert await store.live.get(settings_key(1)) == {"cap": 1}  # re-warmed
    assert await store.live.get(settings_key(4)) == {"cap": 4}
    await store.live.pop(settings_key(2))  # once the cache forgets, the file's value shows
    assert await store.get(settings_key(2)) == {"cap": 2}

    assert await store.keys("settings:1") == [settings_key(1)]
    assert await store.keys("set") == []  # not a kind's prefix: live keys only
    assert list(await store.items("")) == []


# ---------------------------------------------------------------- library sidecars


async def test_a_sidecar_carries_what_a1111_reads_and_the_entry(store, homes):
    await store.put(entry_key("a.safetensors"), LORA)
    sidecar = await _file(homes, LORAS_HOME, "loras/a.json")
    assert sidecar["activation text"] == "a style, flat colours"
    assert sidecar["preferred weight"] == 0.8
    assert sidecar["sd version"] == "SDXL"
    assert sidecar["toolbox"] == LORA
    await store.put(entry_key("c.safetensors"), CHECKPOINT)
    assert (await _file(homes, LORAS_HOME, "checkpoints/c.json"))["sd version"] == "Flux"

    await store.live.pop(entry_key("a.safetensors"))
    assert await store.get(entry_key("a.safetensors")) == LORA
    assert sorted(await store.items("model:")) == [entry_key("a.safetensors"), entry_key("c.safetensors")]


async def test_a_sidecar_names_its_model_file_whatever_it_says_inside(store, homes):
    moved = {**LORA, "file": "old-name.safetensors"}
    await homes[LORAS_HOME].inner.write("loras/renamed.json", json.dumps({"toolbox": moved}).encode())
    assert (await store.get(entry_key("renamed.safetensors")))["file"] == "renamed.safetensors"


async def test_a_sidecar_a1111_wrote_alone_is_no_entry(store, homes):
    a1111 = {"description": "mine", "activation text": "x", "preferred weight": 1, "sd version": "SDXL"}
    await homes[LORAS_HOME].inner.write("loras/theirs.json", json.dumps(a1111).encode())
    await homes[LORAS_HOME].inner.write("loras/list.json", b"[1, 2]")
    assert await store.get(entry_key("theirs.safetensors")) is None
    assert await store.items("model:") == {}
    # ...but an entry beside it in the other folder is found.
    await homes[LORAS_HOME].inner.write("checkpoints/theirs.json", json.dumps({"toolbox": CHECKPOINT}).encode())
    assert (await store.get(entry_key("theirs.safetensors")))["type"] == "checkpoint"


async def test_taking_in_a_model_keeps_what_a1111_wrote_in_its_sidecar(store, homes):
    a1111 = {"description": "my notes on it", "notes": "use at 0.6", "negative text": "blurry",
             "activation text": "old words", "sd version": "SD1"}
    await homes[LORAS_HOME].inner.write("loras/a.json", json.dumps(a1111).encode())
    await store.put(entry_key("a.safetensors"), LORA)
    sidecar = await _file(homes, LORAS_HOME, "loras/a.json")
    assert sidecar == {**a1111, "activation text": "a style, flat colours", "sd version": "SDXL",
                       "preferred weight": 0.8, "toolbox": LORA}
    await homes[LORAS_HOME].inner.write("loras/b.json", b"not json")
    await store.put(entry_key("b.safetensors"), {**LORA, "file": "b.safetensors"})
    assert (await _file(homes, LORAS_HOME, "loras/b.json"))["description"] == LORA["name"]


async def test_an_unreadable_file_reads_as_absent_with_a_warning(store, homes, caplog):
    await homes[RECORDS_HOME].inner.write("settings/7.json", b'{"cap": 1')  # torn by hand
    await homes[RECORDS_HOME].inner.write("settings/8.json", b"\xff\xfe")
    with caplog.at_level(logging.WARNING):
        assert await store.get(settings_key(7), "default") == "default"
        assert await store.get(settings_key(8), "default") == "default"
        assert await store.items("settings:") == {}
    assert "settings:7" in caplog.text and "settings:8" in caplog.text
    await store.put(settings_key(7), {"cap": 2})  # a new write replaces it
    assert await store.get(settings_key(7)) == {"cap": 2}


# ---------------------------------------------------------------- hostile keys


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_a_key_no_file_can_have_reads_as_absent_and_cannot_be_written(store, homes, name):
    for prefix in ("settings:", "secret:", "optional:", "manifest:", "generate:", "model:"):
        key = prefix + name + (".safetensors" if prefix == "model:" else "")
        assert await store.get(key, "default") == "default"
        assert not await store.contains(key)
        with pytest.raises(ValueError, match="names no record file"):
            await store.put(key, {"type": "lora"})
        assert await store.pop(key, "default") == "default"
        assert await store.live.get(key) is None
    assert await _all_files(homes) == {home: [] for home in HOMES}


async def test_every_key_the_callers_make_has_a_file(store, homes):
    """Names the callers' own validation lets through: the library's file names (of any input),
    guild ids, token services, base-model keys and job ids."""
    typed = ["../../etc/passwd", "..", ".hidden", "a\\b", "x" * 500, 'con:<>"|?*', "tab\there", "é" * 300,
             "  .dots.  ", "model.SAFETENSORS", "\u202e evil", "/"]
    keys = [entry_key(safe_file_name(name)) for name in typed]
    keys += [settings_key(guild) for guild in (None, 1, 2**63 - 1)]
    keys += [secret_key(service) for service in SERVICES]
    keys += [manifest_key(model) for model in BASE_MODELS] + [optional_model_key(model) for model in BASE_MODELS]
    keys += [generate_params_key(new_job_id()), generate_faces_key(new_job_id())]
    for key in keys:
        await store.put(key, {"type": "lora", "key": key})
        await store.live.pop(key)
        assert (await store.get(key))["key"] == key
    assert len(sum((await _all_files(homes)).values(), [])) == len(set(keys))


# ---------------------------------------------------------------- upgrading, tidying


async def test_the_upgrade_copies_only_records_without_a_file_once(store, homes):
    await store.live.put(settings_key(1), {"cap": 1})  # an earlier version kept these in the Dict only
    await store.live.put(entry_key("a.safetensors"), LORA)
    await homes[LORAS_HOME].inner.write("loras/a.json", b'{"notes": "from A1111"}')  # not an entry
    await store.live.put(secret_key("hf"), {"token": "hf_x"})
    await homes[RECORDS_HOME].inner.write("settings/2.json", b'{"cap": 2}')
    await store.live.put(settings_key(2), {"cap": "stale"})  # has a file: the file stays
    await store.live.put(settings_key(3), ABSENT)
    await store.live.put("job:1", {"status": "done"})
    await store.live.put(settings_key("a/b"), {"cap": 5})  # no file can hold it

    copied = await store.copy_cached_records()
    assert sorted(copied) == sorted([settings_key(1), entry_key("a.safetensors"), secret_key("hf")])
    assert await _file(homes, RECORDS_HOME, "settings/1.json") == {"cap": 1}
    assert (await _file(homes, LORAS_HOME, "loras/a.json"))["toolbox"] == LORA
    assert (await _file(homes, LORAS_HOME, "loras/a.json"))["notes"] == "from A1111"
    assert await _file(homes, TOKENS_HOME, "hf.json") == {"token": "hf_x"}
    assert await _file(homes, RECORDS_HOME, "settings/2.json") == {"cap": 2}
    assert await _file(homes, RECORDS_HOME, "settings/3.json") is None
    journal = await _file(homes, RECORDS_HOME, UPGRADE_JOURNAL)
    assert sorted(journal["copied"]) == sorted(copied) and journal["copied_at"] <= time.time()

    await store.pop(settings_key(1))  # deleted since; a Dict elsewhere still remembers it
    await store.live.put(settings_key(1), {"cap": 1})
    await store.live.put(settings_key(6), {"cap": 6})
    assert await store.copy_cached_records() == []
    assert await _file(homes, RECORDS_HOME, "settings/1.json") is None
    assert await _file(homes, RECORDS_HOME, "settings/6.json") is None


async def test_leftover_temp_files_are_removed_from_the_folders_on_disk(tmp_path):
    store = DurableStore(SqliteStore(tmp_path / "state.sqlite3"), local_homes(tmp_path / "data"))
    await store.put(settings_key(1), {"cap": 1})
    await store.put(secret_key("hf"), {"token": "x"})
    settings = tmp_path / "data" / "records" / "settings"
    leftovers = [settings / ".1.json.abcd1234.tmp", tmp_path / "data" / "tokens" / ".hf.json.wxyz9876.tmp"]
    young = settings / ".1.json.young123.tmp"
    for path in (*leftovers, young):
        path.write_bytes(b"{")
    for path in leftovers:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    removed = await store.remove_leftovers()
    assert removed == ["records/settings/.1.json.abcd1234.tmp", "tokens/.hf.json.wxyz9876.tmp"]
    assert young.exists() and not any(path.exists() for path in leftovers)
    assert await store.get(settings_key(1)) == {"cap": 1}
    await store.close()


# ---------------------------------------------------------------- two containers


async def test_two_containers_with_caches_of_their_own_share_the_files(flavour, tmp_path):
    shared = _homes(flavour, tmp_path)
    first = DurableStore(_live(flavour, tmp_path, "first"), shared)
    second = DurableStore(_live(flavour, tmp_path, "second"), shared)

    assert await second.get(settings_key(1)) is None  # the second caches "no settings"
    await first.put(settings_key(1), {"cap": 1})
    assert await second.get(settings_key(1)) is None  # its cache is trusted...
    await second.live.pop(settings_key(1))
    assert await second.get(settings_key(1)) == {"cap": 1}  # ...until it misses
    assert await second.items("settings:") == {settings_key(1): {"cap": 1}}

    await asyncio.gather(*(store.put(generate_params_key(f"{name}{n}"), {"n": n})
                           for n in range(15) for name, store in (("a", first), ("b", second))))
    assert len(await first.keys("generate:")) == 30
    assert len(await second.items("generate:")) == 30
    await first.close()
    await second.close()


def test_writers_in_threads_lose_no_record(tmp_path):
    shared = local_homes(tmp_path / "data")

    def container(name: str) -> None:
        async def write_all():
            store = DurableStore(SqliteStore(tmp_path / f"{name}.sqlite3"), shared)
            await asyncio.gather(*(store.put(settings_key(f"{name}{n}"), {"n": n}) for n in range(20)))
            await store.put(ACTIVE_CHECKPOINT_KEY, {"by": name})  # the same record: one of them wins
            await store.close()

        asyncio.run(write_all())

    threads = [threading.Thread(target=container, args=(name,)) for name in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    async def check():
        store = DurableStore(SqliteStore(tmp_path / "fresh.sqlite3"), shared)
        assert len(await store.items("settings:")) == 60
        assert (await store.get(ACTIVE_CHECKPOINT_KEY))["by"] in ("a", "b", "c")
        assert list((tmp_path / "data" / "records").rglob(".*")) == []  # no temp file left behind
        await store.close()

    asyncio.run(check())
