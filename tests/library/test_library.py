"""The model library: entries in the store, files on disk, the active checkpoint."""

from __future__ import annotations

import asyncio

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import ILLUSTRIOUS_CHECKPOINT
from modal_services.library.entries import (
    ACTIVE_CHECKPOINT_KEY,
    DEFAULT_CHECKPOINT,
    Library,
    LibraryEntry,
    entry_key,
    parse_trigger_words,
)
from modal_services.library.file_names import safe_file_name, unique_file_name
from modal_services.library import entries as entries_module
from modal_services.state.keys import file_lock_name
from modal_services.state.locks import try_lock
from modal_services.state.store import SqliteStore


@pytest.fixture
async def library(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    yield Library(store, tmp_path / "loras", tmp_path / "models")
    await store.close()


async def put_model(library: Library, file: str, kind: str = "lora", **fields) -> LibraryEntry:
    path = library.folder(kind) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 10)
    entry = LibraryEntry(name=fields.pop("name", file.removesuffix(".safetensors")), file=file, type=kind,
                         size_bytes=10, **{"weight": 1.0 if kind == "lora" else None, **fields})
    return await library.add(entry)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("detail.safetensors", "detail.safetensors"),
        ("../../etc/passwd", "passwd.safetensors"),
        ("a/b\\c.safetensors", "c.safetensors"),
        ("..", "model.safetensors"),
        ("...safetensors", "safetensors.safetensors"),
        ("bad\x00name\n.safetensors", "bad_name_.safetensors"),
        ('we<ird>:"|?*.safetensors', "we_ird______.safetensors"),
        (".hidden.safetensors", "hidden.safetensors"),
        ("a..b.safetensors", "a_b.safetensors"),
        ("", "model.safetensors"),
        ("noext", "noext.safetensors"),
    ],
)
def test_safe_file_name(raw, expected):
    assert safe_file_name(raw) == expected


def test_safe_file_name_is_bounded():
    name = safe_file_name("x" * 1000 + ".safetensors")
    assert len(name.encode()) <= 200 and name.endswith(".safetensors")


@pytest.mark.parametrize("letter", ["é", "字", "🎨"])
def test_long_names_are_shortened_by_utf8_bytes(letter):
    """Under 255 characters but far over 255 bytes: shortened on a character boundary, room left for suffixes."""
    name = safe_file_name(letter * 250 + ".safetensors")
    assert len(name.encode()) <= 200 and name.endswith(".safetensors") and set(name[: -len(".safetensors")]) == {letter}
    taken = unique_file_name(name, {name})
    assert len((taken + ".partial").encode()) < 255 and taken.endswith("-2.safetensors")


def test_unique_file_name():
    assert unique_file_name("a.safetensors", {"b.safetensors"}) == "a.safetensors"
    assert unique_file_name("a.safetensors", {"A.safetensors", "a-2.safetensors"}) == "a-3.safetensors"


def test_trigger_words_parse():
    assert parse_trigger_words(" a , b,,A, c  d ") == ["a", "b", "c d"]
    with pytest.raises(ToolboxError):
        parse_trigger_words(", ".join(f"w{i}" for i in range(60)))


async def test_add_list_find_and_json_path(library, tmp_path):
    await put_model(library, "detail.safetensors", name="Detail Tweaker", trigger_words=["detailed"], tags=["style"])
    await put_model(library, "noob.safetensors", kind="checkpoint", name="NoobAI XL")
    assert [e.file for e in await library.entries()] == ["detail.safetensors", "noob.safetensors"]
    assert [e.file for e in await library.entries("checkpoint")] == ["noob.safetensors"]
    assert (await library.find("detail tweaker")).file == "detail.safetensors"
    assert (await library.find("detail")).file == "detail.safetensors"  # the stem
    document = library.to_json(await library.find("detail.safetensors"))
    assert document["path"] == str(tmp_path / "loras" / "loras" / "detail.safetensors")
    for key in ("name", "file", "type", "base_model", "trigger_words", "weight", "size_bytes", "sha256", "source",
                "civitai_model_id", "civitai_version_id", "added_at", "path", "format", "tags", "nsfw", "thumbnail_url"):
        assert key in document
    with pytest.raises(ToolboxError) as caught:
        await library.find("nothing")
    assert caught.value.code is ErrorCode.INVALID_INPUT


async def test_entry_is_refused_until_its_file_is_in_place(library):
    with pytest.raises(ToolboxError):
        await library.add(LibraryEntry(name="x", file="x.safetensors", type="lora"))
    assert await library.store.keys("model:") == []


async def test_ambiguous_names_ask_for_the_file(library):
    await put_model(library, "a.safetensors", name="Same")
    await put_model(library, "b.safetensors", name="Same")
    with pytest.raises(ToolboxError) as caught:
        await library.find("same")
    assert "a.safetensors" in caught.value.message and "b.safetensors" in caught.value.message


async def test_search_by_name_tag_and_trigger_word(library):
    await put_model(library, "a.safetensors", name="Shiny Armor", trigger_words=["glossy metal"], tags=["armor"])
    await put_model(library, "b.safetensors", name="Soft Light", trigger_words=["soft"], tags=["lighting"])
    assert [e.file for e in await library.search("glossy")] == ["a.safetensors"]
    assert [e.file for e in await library.search("LIGHTING")] == ["b.safetensors"]
    assert [e.file for e in await library.search("so")] == ["b.safetensors"]
    assert len(await library.search("")) == 2


async def test_edit_checks_everything_before_writing(library):
    await put_model(library, "a.safetensors", name="A")
    before = await library.store.get(entry_key("a.safetensors"))
    with pytest.raises(ToolboxError):
        await library.edit("A", display_name="B", weight=99)
    assert await library.store.get(entry_key("a.safetensors")) == before
    entry = await library.edit("A", display_name="  Better   name ", trigger_words="x, y", weight=0.7)
    assert (entry.name, entry.trigger_words, entry.weight) == ("Better name", ["x", "y"], 0.7)
    assert (await library.get("a.safetensors")).name == "Better name"
    with pytest.raises(ToolboxError):
        await library.edit("Better name")


async def test_two_edits_of_one_model_at_once_both_land(library):
    await put_model(library, "a.safetensors", name="A")
    await asyncio.gather(library.edit("A", trigger_words="shiny"), library.edit("A", weight=0.6),
                         library.edit("a.safetensors", display_name="Renamed"))
    entry = await library.get("a.safetensors")
    assert (entry.name, entry.trigger_words, entry.weight) == ("Renamed", ["shiny"], 0.6)


async def test_an_edit_during_an_import_of_that_file_waits_then_says_so(library, monkeypatch):
    await put_model(library, "a.safetensors", name="A")
    monkeypatch.setattr(entries_module, "EDIT_LOCK_WAIT_SECONDS", 0.2)
    assert await try_lock(library.store, file_lock_name("a.safetensors"), "an import")
    with pytest.raises(ToolboxError) as refused:
        await library.edit("A", trigger_words="lost")
    assert refused.value.code == ErrorCode.RATE_LIMITED and "being changed by someone else" in refused.value.message
    assert (await library.get("a.safetensors")).trigger_words == []


async def test_checkpoints_have_no_weight(library):
    await put_model(library, "c.safetensors", kind="checkpoint")
    with pytest.raises(ToolboxError):
        await library.edit("c", weight=0.5)


async def test_active_checkpoint_default_switch_and_back(library, tmp_path):
    active = await library.active_checkpoint()
    assert active["default"] and active["key"] == DEFAULT_CHECKPOINT
    assert active["path"] == str(tmp_path / "models" / ILLUSTRIOUS_CHECKPOINT)
    await put_model(library, "noob.safetensors", kind="checkpoint", name="NoobAI")
    active = await library.set_active_checkpoint("NoobAI")
    assert active["file"] == "noob.safetensors" and not active["default"]
    assert await library.store.get(ACTIVE_CHECKPOINT_KEY) == "noob.safetensors"
    with pytest.raises(ToolboxError):
        await library.set_active_checkpoint("a-lora-is-not-a-checkpoint")
    with pytest.raises(ToolboxError) as refused:  # the base checkpoint's file is not there yet
        await library.set_active_checkpoint("illustrious-xl")
    assert refused.value.code is ErrorCode.MODELS_MISSING
    assert await library.store.get(ACTIVE_CHECKPOINT_KEY) == "noob.safetensors"
    (tmp_path / "models" / ILLUSTRIOUS_CHECKPOINT).parent.mkdir(parents=True)
    (tmp_path / "models" / ILLUSTRIOUS_CHECKPOINT).write_bytes(b"weights")
    assert (await library.set_active_checkpoint("illustrious-xl"))["default"]


async def test_deleting_the_active_checkpoint_is_refused(library):
    entry = await put_model(library, "noob.safetensors", kind="checkpoint")
    await library.set_active_checkpoint("noob")
    with pytest.raises(ToolboxError) as caught:
        await library.delete("noob")
    assert "active checkpoint" in caught.value.message
    assert library.path_of(entry).is_file() and await library.get("noob.safetensors") is not None


async def test_delete_removes_entry_then_file_and_original(library):
    entry = await put_model(library, "a.safetensors", original_file=".original/a.safetensors")
    original = library.original_path(entry)
    original.parent.mkdir(parents=True)
    original.write_bytes(b"orig")
    await library.delete("a")
    assert await library.get("a.safetensors") is None
    assert not library.path_of(entry).exists() and not original.exists()


async def test_scan_lists_untracked_and_flags_missing(library):
    kept = await put_model(library, "kept.safetensors")
    gone = await put_model(library, "gone.safetensors", kind="checkpoint")
    library.path_of(gone).unlink()
    (library.folder("lora") / "stray.safetensors").write_bytes(b"abc")
    (library.folder("lora") / "notes.txt").write_text("not a model")
    report = await library.scan()
    assert report.missing == ["gone.safetensors"]
    assert report.untracked == [{"file": "stray.safetensors", "type": "lora", "size_bytes": 3}]
    assert (await library.store.get(entry_key("gone.safetensors")))["missing"] is True
    # The bot of a Modal deployment sees the flag the worker wrote.
    blind = Library(library.store, library.loras_dir, library.models_dir, files_visible=False)
    assert [e.missing for e in await blind.entries()] == [True, False]
    assert kept.file in {e.file for e in await blind.entries()}


async def test_choices_are_bounded_and_from_the_store(library):
    for i in range(30):
        await put_model(library, f"m{i:02}.safetensors", name=f"Model {i:02}")
    choices = await library.choices("")
    assert len(choices) == 25 and choices[0] == ("Model 00 · lora", "m00.safetensors")
    assert [value for _, value in await library.choices("model 1")][:2] == ["m10.safetensors", "m11.safetensors"]
    checkpoints = await library.checkpoint_choices("")
    assert checkpoints[0][1] == DEFAULT_CHECKPOINT


async def test_the_base_checkpoint_on_modal_is_installed_by_its_manifest(tmp_path):
    from modal_services.state.keys import manifest_key

    store = SqliteStore(tmp_path / "state.sqlite3")
    library = Library(store, tmp_path / "loras", tmp_path / "models", files_visible=False)
    try:
        with pytest.raises(ToolboxError) as refused:
            await library.set_active_checkpoint("illustrious-xl")
        assert refused.value.code is ErrorCode.MODELS_MISSING
        await store.put(manifest_key(DEFAULT_CHECKPOINT), {"complete": True})
        assert (await library.set_active_checkpoint("illustrious-xl"))["default"]
    finally:
        await store.close()
