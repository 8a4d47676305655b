"""The reconcile of the durable records with their files: drift, the cache re-warmed, leftovers removed,
the report kept and shown (/status to admins, `toolbox status`), never a token's value; and the library
rebuilt from its sidecars on a fresh data dir."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from bot.backend import LocalBackend
from bot.cli import main
from bot.settings import Settings
from cogs.models import scan_text
from modal_services.library.entries import Library
from modal_services.state import reconcile as reconciling
from modal_services.state.durable import DurableStore, local_homes, record_kind
from modal_services.state.keys import RECONCILE_KEY
from modal_services.state.reconcile import ReconcileReport, last_report, reconcile, reconcile_at_start
from modal_services.state.store import SqliteStore
from tests.fakes.discord_fakes import fake_interaction, invoke

TOKEN = "hf_SECRETvalue0123456789abcdef"


def store_over(data: Path, cache: str = "state.sqlite3") -> DurableStore:
    return DurableStore(SqliteStore(data / cache), local_homes(data))


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


@pytest.fixture
async def store(data):
    opened = store_over(data)
    yield opened
    await opened.close()


def entry(file: str, kind: str = "lora", **fields) -> dict:
    return {"name": file.removesuffix(".safetensors").title(), "file": file, "type": kind,
            "trigger_words": ["shiny"], "weight": 0.7 if kind == "lora" else None, **fields}


def model_file(data: Path, folder: str, file: str) -> Path:
    path = data / "loras" / folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


async def add_model(store: DurableStore, data: Path, file: str, kind: str = "lora") -> None:
    model_file(data, "loras" if kind == "lora" else "checkpoints", file)
    await store.put(f"model:{file}", entry(file, kind))


# ---- drift -------------------------------------------------------------------


async def test_a_library_in_order_reports_nothing(store, data):
    await add_model(store, data, "a.safetensors")
    await add_model(store, data, "c.safetensors", kind="checkpoint")
    await store.put("settings:7", {"nsfw": "off"})
    report = await reconcile(store)
    assert report.drift() == [] and report.records["model:"] == 2 and report.records["settings:"] == 1
    assert report.describe("3 h") == "checked 3 h ago, all in order"


async def test_entries_without_a_file_and_files_without_an_entry(store, data):
    await add_model(store, data, "kept.safetensors")
    await add_model(store, data, "gone.safetensors")
    await add_model(store, data, "gone-checkpoint.safetensors", kind="checkpoint")
    (data / "loras" / "loras" / "gone.safetensors").unlink()
    (data / "loras" / "checkpoints" / "gone-checkpoint.safetensors").unlink()
    model_file(data, "loras", "stray.safetensors")
    model_file(data, "checkpoints", "stray-checkpoint.safetensors")
    # An A1111 sidecar the toolbox never took in describes no entry: its file is untracked.
    model_file(data, "loras", "a1111.safetensors")
    (data / "loras" / "loras" / "a1111.json").write_text(json.dumps({"activation text": "x"}))
    # A converted LoRA's original, in the hidden folder beside it: never a file without an entry.
    model_file(data, "loras/.original", "kept.safetensors")

    report = await reconcile(store)
    assert report.entries_without_file == ["loras/gone.safetensors", "checkpoints/gone-checkpoint.safetensors"]
    assert report.files_without_entry == ["loras/a1111.safetensors", "loras/stray.safetensors",
                                          "checkpoints/stray-checkpoint.safetensors"]
    assert report.describe("5 min") == (
        "checked 5 min ago · 2 entries without a file (loras/gone.safetensors, checkpoints/gone-checkpoint.safetensors)"
        " · 3 files without an entry (loras/a1111.safetensors, loras/stray.safetensors, "
        "checkpoints/stray-checkpoint.safetensors)")
    # The entries are still there (the file may come back); only the report tells.
    assert await store.get("model:gone.safetensors") is not None


async def test_a_long_drift_list_names_a_few_and_counts_the_rest(store, data):
    for number in range(8):
        model_file(data, "loras", f"stray-{number}.safetensors")
    [line] = (await reconcile(store)).drift()
    assert line.startswith("8 files without an entry (loras/stray-0.safetensors") and line.endswith("and 3 more)")


async def test_unreadable_record_files_are_named_whether_cached_or_not(store, data):
    await store.put("settings:1", {"nsfw": "off"})
    await store.put("settings:2", {"nsfw": "off"})
    await add_model(store, data, "a.safetensors")
    # Broken behind the cache's back: settings:1 is still cached, settings:3 never was.
    (data / "records" / "settings" / "1.json").write_text("{not json")
    (data / "records" / "settings" / "3.json").write_bytes(b"\xff\xfe")
    (data / "loras" / "loras" / "a.json").write_text("[1, 2")
    report = await reconcile(store)
    assert sorted(report.unreadable) == ["loras/loras/a.json", "records/settings/1.json", "records/settings/3.json"]
    assert "3 unreadable record files" in report.describe("1 min")
    assert report.records["settings:"] == 2  # settings:1 answers from the cache; settings:3 reads as absent
    assert await store.get("settings:3") is None


# ---- the cache ---------------------------------------------------------------


async def test_a_fresh_live_store_is_warmed_from_the_files_and_stale_entries_dropped(store, data):
    await add_model(store, data, "a.safetensors")
    await store.put("settings:7", {"nsfw": "off"})
    await store.put("active_checkpoint", "c.safetensors")
    await store.put("generate:job1", {"prompt": "a cat"})
    fresh = store_over(data, cache="fresh.sqlite3")
    try:
        await fresh.live.put("settings:9", {"nsfw": "blur"})  # cached, but its file is gone
        await fresh.live.put("job:x", {"status": "running"})  # live keys are none of its business
        report = await reconcile(fresh)
        assert (report.warmed, report.dropped) == (4, 1)
        # Warm: the live store itself holds every record now, as its file says.
        assert (await fresh.live.get("model:a.safetensors"))["trigger_words"] == ["shiny"]
        assert await fresh.live.get("settings:7") == {"nsfw": "off"}
        assert await fresh.live.get("active_checkpoint") == "c.safetensors"
        assert await fresh.live.get("generate:job1") == {"prompt": "a cat"}
        assert await fresh.live.get("settings:9") is None and await fresh.live.get("job:x") is not None
        again = await reconcile(fresh)
        assert (again.warmed, again.dropped) == (0, 0)
    finally:
        await fresh.close()


async def test_leftover_temporary_files_of_killed_writes_are_removed(store, data):
    await store.put("settings:1", {"nsfw": "off"})
    await store.put("secret:hf", {"token": TOKEN})
    folder = data / "records" / "settings"
    old = folder / ".1.json.k1ll3d.tmp"
    old.write_text('{"nsfw": "o')
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    old_token = data / "tokens" / ".hf.json.k1ll3d.tmp"
    old_token.write_text(TOKEN)
    os.utime(old_token, (time.time() - 3600, time.time() - 3600))
    recent = folder / ".1.json.writing.tmp"  # a write that may still be under way
    recent.write_text("{")
    report = await reconcile(store)
    assert sorted(report.leftovers_removed) == ["records/settings/.1.json.k1ll3d.tmp", "tokens/.hf.json.k1ll3d.tmp"]
    assert not old.exists() and not old_token.exists() and recent.exists()
    assert await store.get("settings:1") == {"nsfw": "off"}


# ---- the report --------------------------------------------------------------


async def test_the_report_is_kept_in_the_live_store_only(store, data):
    model_file(data, "loras", "stray.safetensors")
    before = time.time()
    report = await reconcile(store)
    assert record_kind(RECONCILE_KEY) is None  # live: no file of its own
    assert await store.live.get(RECONCILE_KEY) == report.to_dict()
    kept = await last_report(store)
    assert kept == report and kept.ran_at >= before
    assert ReconcileReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert not any("reconcile" in path.name for path in data.rglob("*"))


async def test_secret_values_are_never_in_the_log_nor_the_report(store, data, caplog):
    await store.put("secret:hf", {"token": TOKEN, "user": "someone"})
    (data / "tokens" / "civitai.json").write_text('{"token": "' + TOKEN)  # torn by hand: unreadable
    fresh = store_over(data, cache="fresh.sqlite3")
    caplog.set_level(logging.DEBUG)
    try:
        report = await reconcile(fresh)
        assert report.unreadable == ["tokens/civitai.json"] and report.warmed == 1
        kept = json.dumps(await fresh.live.get(RECONCILE_KEY))
    finally:
        await fresh.close()
    assert "records reconciled" in caplog.text and "tokens/civitai.json" in caplog.text
    for text in (caplog.text, json.dumps(report.to_dict()), kept, report.describe("1 s"), report.summary()):
        assert TOKEN not in text and TOKEN[:12] not in text


# ---- at a local start --------------------------------------------------------


async def test_a_starting_local_backend_reconciles_unless_a_recent_reconcile_ran(data):
    settings = Settings.load()
    model_file(data, "loras", "stray.safetensors")
    backend = LocalBackend(settings)
    try:
        await backend.start()
        first = await last_report(backend.store)
        assert first.files_without_entry == ["loras/stray.safetensors"]
        await backend.start()
        assert await last_report(backend.store) == first  # a second start within the hour reads nothing
        await backend.store.put(RECONCILE_KEY, {**first.to_dict(), "ran_at": time.time() - 2 * 3600})
        await backend.start()
        assert (await last_report(backend.store)).ran_at > first.ran_at
    finally:
        await backend.close()


async def test_a_failing_reconcile_never_stops_the_start(data, monkeypatch, caplog):
    async def broken(store):
        raise OSError("disk gone")

    monkeypatch.setattr(reconciling, "reconcile", broken)
    backend = LocalBackend(Settings.load())
    try:
        await backend.start()
        assert await reconcile_at_start(backend.store) is None
    finally:
        await backend.close()
    assert "the records reconcile failed; starting anyway" in caplog.text


# ---- shown: /status to admins, toolbox status ----------------------------------


def status_text(interaction) -> str:
    return interaction.calls.edit_original_response.await_args.kwargs["content"]


async def test_status_shows_the_records_line_to_admins_only(make_toolbox_bot, data):
    toolbox_bot = await make_toolbox_bot("cogs.jobs")
    status = toolbox_bot.tree.get_command("status")
    admin = fake_interaction(admin=True)
    await invoke(toolbox_bot, status, admin)
    assert "**Records**: not checked yet" in status_text(admin)

    model_file(data, "loras", "my_stray.safetensors")
    await toolbox_bot.backend.store.put(RECONCILE_KEY, {
        **(await reconcile(toolbox_bot.backend.store)).to_dict(), "ran_at": time.time() - 3 * 3600 - 5})
    admin = fake_interaction(admin=True)
    await invoke(toolbox_bot, status, admin)
    assert r"**Records**: checked 3 h 0 min ago · 1 file without an entry (loras/my\_stray.safetensors)" in status_text(admin)
    member = fake_interaction(admin=False)
    await invoke(toolbox_bot, status, member)
    assert "Records" not in status_text(member) and "my_stray" not in status_text(member)


def test_toolbox_status_carries_the_last_report(data, capsys):
    model_file(data, "checkpoints", "stray.safetensors")
    assert main(["status", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["records_check"]
    assert check["files_without_entry"] == ["checkpoints/stray.safetensors"]
    assert time.time() - check["ran_at"] < 60
    assert main(["status"]) == 0
    assert "records: checked 0 s ago · 1 file without an entry (checkpoints/stray.safetensors)" in capsys.readouterr().out


# ---- the library from its sidecars -----------------------------------------------


async def test_a_library_copied_onto_a_fresh_data_dir_lists_every_model(store, data, tmp_path):
    await add_model(store, data, "a.safetensors")
    await add_model(store, data, "b.safetensors")
    await add_model(store, data, "c.safetensors", kind="checkpoint")
    await store.put("model:b.safetensors", {**entry("b.safetensors"), "trigger_words": ["glow", "neon"], "weight": 1.2})
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data / "loras", elsewhere / "loras")  # sidecars and model files, no state.sqlite3

    for scanned in (False, True):
        fresh = store_over(elsewhere, cache=f"state-{scanned}.sqlite3")
        library = Library(fresh, elsewhere / "loras", elsewhere / "models")
        try:
            if scanned:
                report = await library.scan()
                assert (report.restored, report.untracked, report.missing) == (3, [], [])
                assert "Entries restored from their sidecars: 3" in scan_text(report.to_dict())
            listed = {e.file: (e.type, e.trigger_words, e.weight, e.missing) for e in await library.entries()}
        finally:
            await fresh.close()
        assert listed == {"a.safetensors": ("lora", ["shiny"], 0.7, False),
                          "b.safetensors": ("lora", ["glow", "neon"], 1.2, False),
                          "c.safetensors": ("checkpoint", ["shiny"], None, False)}


async def test_a_scan_over_a_warm_cache_restores_nothing(store, data):
    await add_model(store, data, "a.safetensors")
    report = await Library(store, data / "loras", data / "models").scan()
    assert report.restored == 0 and "restored" not in scan_text(report.to_dict())


def test_toolbox_models_scan_and_list_on_a_copied_library(data, tmp_path, capsys):
    source = tmp_path / "source"

    async def build():
        built = store_over(source)
        await add_model(built, source, "a.safetensors")
        await built.put("model:a.safetensors", {**entry("a.safetensors"), "trigger_words": ["glow"], "weight": 0.9})
        await built.close()

    asyncio.run(build())
    shutil.copytree(source / "loras", data / "loras")
    assert main(["models", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["file"], listed["trigger_words"], listed["weight"]) == ("a.safetensors", ["glow"], 0.9)
    assert main(["models", "scan", "--json"]) == 0
    scanned = json.loads(capsys.readouterr().out)
    assert (scanned["untracked"], scanned["missing"]) == ([], [])
