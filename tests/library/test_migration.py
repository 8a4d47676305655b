"""`toolbox migrate` on a data dir built in the older Gradio toolbox's layouts, with the fake hub
standing in for Hugging Face (a claimed base model is believed only once its files match it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main
from modal_services.net.transfer import retrying
from modal_services.base_models.downloads import DownloadEngine
from modal_services.jobs.requests import DownloadRequest
from modal_services.library.migration_report import MigrationReport, render_report
from modal_services.state.durable import RECORD_KINDS, DurableStore, local_homes
from modal_services.state.record_files import TEMP_SUFFIX
from modal_services.state.store import SqliteStore
from modal_services.state.keys import manifest_key, secret_key
from modal_services.layout import Layout
from tests.fakes.hf_server import FakeHub
from tests.fixtures import tiny_loras

pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]
AESTHETIC = tiny_loras.to_bytes(tiny_loras.sdxl_kohya(seed=21))
DETAILER = tiny_loras.to_bytes(tiny_loras.sdxl_loha(seed=22))  # LoHa: converted at migration, the original kept
UPLOAD_OLD = tiny_loras.to_bytes(tiny_loras.sdxl_kohya(seed=23))
UPLOAD_NEW = b"this project's own upload, same name" * 40
NOOBAI = tiny_loras.to_bytes(tiny_loras.sdxl_checkpoint())
SD15 = tiny_loras.to_bytes(tiny_loras.sd15_checkpoint())
CIVITAI_TOKEN = "old-civitai-token-0000aaaa"
HF_TOKEN = "hf_oldtoken_11112222bbbb"


@pytest.fixture
def hub(fake_hub, monkeypatch):
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)  # the source's retries, without the waits
    return fake_hub


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


def store_of(data: Path) -> DurableStore:
    """The data dir's store as the toolbox reads it: durable records from their files."""
    return DurableStore(SqliteStore(data / "state.sqlite3"), local_homes(data))


def stored(data: Path, prefix: str | None = None) -> dict:
    """The records under `prefix`; without one, every live key and every durable record."""
    async def read():
        store = store_of(data)
        try:
            if prefix is not None:
                return await store.items(prefix)
            found = await store.items("")
            for kind in RECORD_KINDS:
                found.update(await store.items(kind.prefix))
            return found
        finally:
            await store.close()

    return asyncio.run(read())


def put(data: Path, key: str, value) -> None:
    async def write():
        store = store_of(data)
        await store.put(key, value)
        await store.close()

    asyncio.run(write())


def snapshot(data: Path) -> dict[str, str]:
    """Every file under the data dir with its sha256, and every link with its target; not the SQLite
    files, huggingface_hub's download cache or the records holding times (they differ between two
    installs; `stored` compares those records without their times)."""
    found = {}
    for path in sorted(data.rglob("*")):
        relative = str(path.relative_to(data))
        if relative.startswith(("state.sqlite3", "records/", "tokens/", "models/toolbox-manifests/")) or "/.cache/" in relative:
            continue
        if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX):
            continue  # what a write killed with the migration left; never read, removed at a later start
        if path.is_symlink():
            found[relative] = "-> " + str(Path(os.readlink(path)).relative_to(data))
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def without_times(items: dict) -> dict:
    return {key: {k: v for k, v in value.items() if k not in ("completed_at", "set_at", "at")}
            if isinstance(value, dict) else value for key, value in items.items()}


def build_old_install(data: Path, hub: FakeHub) -> None:
    """An install of the older toolbox: flat LoRAs, its index with present and missing files, a
    checkpoint in the newer folder, a tokens file, and a manifest that claims one model it has and one it lost."""
    loras = data / "loras"
    (loras / "loras").mkdir(parents=True)
    (loras / "checkpoints").mkdir()
    (loras / "lora_929497.safetensors").write_bytes(AESTHETIC)
    (loras / "lora_1231943.safetensors").write_bytes(DETAILER)
    (loras / "my_upload.safetensors").write_bytes(UPLOAD_OLD)
    (loras / "loras" / "my_upload.safetensors").write_bytes(UPLOAD_NEW)  # the name is taken here already
    (loras / "old_style.pt").write_bytes(b"pickle")
    (loras / "checkpoints" / "noobaiXL_v10.safetensors").write_bytes(NOOBAI)
    (loras / "checkpoints" / "dreamshaper_8.safetensors").write_bytes(SD15)
    (data / "outside.safetensors").write_bytes(b"not part of any volume")
    (loras / "link.safetensors").symlink_to(data / "outside.safetensors")
    index = {
        "version": 1,
        "active_checkpoint": "noobaiXL_v10.safetensors",
        "models": {
            "lora_929497.safetensors": {
                "type": "lora", "display_name": "Aesthetic Quality Modifiers - Masterpiece", "short_name": "Aesthetic Quality",
                "source": "civitai", "civitai_model_id": 929497, "civitai_version_id": 2247497,
                "trigger_words": ["masterpiece", "best quality", "very aesthetic"], "recommended_weight": 0.8,
                "base_model": "illustrious-xl", "tags": ["aesthetic", "quality"], "added_at": "2026-02-20T12:00:00Z",
                "sha256": "abc123...",
            },
            "lora_1231943.safetensors": {
                "type": "lora", "display_name": "Detailer IL", "source": "civitai", "civitai_model_id": 1231943,
                "trigger_words": [], "recommended_weight": None, "added_at": "2026-02-20T12:00:00Z",
                "sha256": hashlib.sha256(DETAILER).hexdigest(), "file_size_bytes": len(DETAILER),
            },
            "my_upload.safetensors": {"type": "lora", "display_name": "My upload", "source": "upload",
                                      "added_at": "2026-02-21T09:00:00Z"},
            "noobaiXL_v10.safetensors": {
                "type": "checkpoint", "display_name": "NoobAI XL v1.0", "source": "civitai",
                "civitai_model_id": 833294, "civitai_version_id": 1456732, "base_model": "sdxl",
                "added_at": "2026-02-21T15:30:00Z",
            },
            "dreamshaper_8.safetensors": {"type": "checkpoint", "display_name": "DreamShaper 8", "base_model": "sd15",
                                          "added_at": "2026-02-21T15:30:00Z"},
            "gone_lora.safetensors": {"type": "lora", "display_name": "Gone", "added_at": "2026-02-20T12:00:00Z"},
            "../../outside.safetensors": {"type": "lora", "display_name": "Escape"},
        },
    }
    (loras / ".metadata.json").write_text(json.dumps(index))
    (loras / ".api_tokens.json").write_text(json.dumps({"civitai_token": CIVITAI_TOKEN, "hf_token": HF_TOKEN}))

    # The IP-Adapter's files, as the older toolbox downloaded them (into the same folder this project uses).
    async def download_ip_adapter():
        scratch = SqliteStore(data.parent / "scratch.sqlite3")
        engine = DownloadEngine(Layout(data / "models", loras, scratch))
        engine.load()
        await asyncio.to_thread(engine.download, DownloadRequest(keys=["ip-adapter"]), lambda *args: None)
        await scratch.close()

    asyncio.run(download_ip_adapter())
    (data / "models" / ".manifest.json").write_text(json.dumps({"version": 1, "models": {
        "ip-adapter": {"status": "complete", "size_bytes": 4096, "downloaded_at": "2026-02-22T14:00:00Z"},
        "controlnet-tile": {"status": "complete", "size_bytes": 2502345678, "downloaded_at": "2026-02-22T14:05:00Z"},
        "lora-aesthetic-quality": {"status": "complete"},
    }}))
    (data / "models" / ".progress.json").write_text(json.dumps({"illustrious-xl": {"status": "downloading"}}))


def migrate(capsys, *options: str) -> dict:
    assert main(["migrate", "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def outcomes(report: dict) -> dict[tuple[str, str], str]:
    return {(item["kind"], item["subject"]): item["outcome"] for item in report["items"]}


def details(report: dict) -> dict[tuple[str, str], str]:
    return {(item["kind"], item["subject"]): item["detail"] for item in report["items"]}


def test_dry_run_prints_the_plan_and_changes_nothing(hub, data, capsys):
    build_old_install(data, hub)
    before, asked = snapshot(data), len(hub.body_requests("/"))
    report = migrate(capsys, "--dry-run")
    assert snapshot(data) == before
    assert not (data / "state.sqlite3").exists()  # not even an empty state store
    assert report["dry_run"] and report["changed"]
    planned = outcomes(report)
    assert planned[("file", "lora_929497.safetensors")] == "moved"
    assert planned[("entry", "lora_929497.safetensors")] == "added"
    assert planned[("token", "CivitAI")] == "moved" and planned[("manifest", "ip-adapter")] == "recorded"
    assert len(hub.body_requests("/")) == asked  # nothing asked of the source either
    text = render_report(MigrationReport.from_dict(report))
    assert text.startswith("Dry run, nothing was changed.") and "would move" in text
    assert CIVITAI_TOKEN not in text and HF_TOKEN not in text


def test_the_migration_builds_library_manifest_and_tokens(hub, data, capsys):
    build_old_install(data, hub)
    report = migrate(capsys)
    loras = data / "loras"
    result, why = outcomes(report), details(report)

    # Files moved, not copied; the taken name kept both; what cannot be used stayed where it was.
    assert (loras / "loras" / "lora_929497.safetensors").read_bytes() == AESTHETIC
    assert (loras / "loras" / ".original" / "lora_1231943.safetensors").read_bytes() == DETAILER  # converted
    assert (loras / "loras" / "my_upload.safetensors").read_bytes() == UPLOAD_NEW
    assert (loras / "loras" / "my_upload-2.safetensors").read_bytes() == UPLOAD_OLD
    upload = [item for item in report["items"] if item["subject"] == "my_upload.safetensors" and item["kind"] == "file"]
    assert [item["outcome"] for item in upload] == ["moved", "kept"] and "both kept" in upload[1]["detail"]
    assert not (loras / "lora_929497.safetensors").exists() and not (loras / "my_upload.safetensors").exists()
    assert (loras / "old_style.pt").exists() and "pickle" in why[("file", "old_style.pt")]
    assert (loras / "link.safetensors").is_symlink() and result[("file", "link.safetensors")] == "skipped"
    assert (data / "outside.safetensors").read_bytes() == b"not part of any volume"

    # The library, from the index: trigger words, weights, CivitAI ids, sha256 (computed when absent or bogus).
    entries = {key.removeprefix("model:"): value for key, value in stored(data, "model:").items()}
    assert set(entries) == {"lora_929497.safetensors", "lora_1231943.safetensors", "my_upload-2.safetensors",
                            "noobaiXL_v10.safetensors"}
    aesthetic = entries["lora_929497.safetensors"]
    assert aesthetic["name"] == "Aesthetic Quality Modifiers - Masterpiece" and aesthetic["weight"] == 0.8
    assert aesthetic["trigger_words"] == ["masterpiece", "best quality", "very aesthetic"]
    assert (aesthetic["civitai_model_id"], aesthetic["civitai_version_id"], aesthetic["source"]) == (929497, 2247497, "civitai")
    assert aesthetic["sha256"] == hashlib.sha256(AESTHETIC).hexdigest() and aesthetic["size_bytes"] == len(AESTHETIC)
    detailer = entries["lora_1231943.safetensors"]
    assert detailer["weight"] == 1.0 and detailer["format"] == "loha"
    assert detailer["original_file"] == ".original/lora_1231943.safetensors"
    assert aesthetic["format"] == "kohya" and aesthetic["original_file"] is None
    assert entries["my_upload-2.safetensors"]["sha256"] == hashlib.sha256(UPLOAD_OLD).hexdigest()
    noobai = entries["noobaiXL_v10.safetensors"]
    assert noobai["type"] == "checkpoint" and noobai["weight"] is None and noobai["civitai_version_id"] == 1456732
    assert stored(data, "active_checkpoint")["active_checkpoint"] == "noobaiXL_v10.safetensors"
    assert "not on the volume" in why[("entry", "gone_lora.safetensors")]
    assert "not SDXL" in why[("entry", "dreamshaper_8.safetensors")]  # the importer's own refusal
    assert (loras / "checkpoints" / "dreamshaper_8.safetensors").read_bytes() == SD15
    assert "plain .safetensors file name" in why[("entry", "../../outside.safetensors")]

    # The manifest believes what checks out against the source, and nothing else.
    manifests = stored(data, "manifest:")
    assert set(manifests) == {manifest_key("ip-adapter")}
    assert manifests[manifest_key("ip-adapter")]["files"]["ip-adapter-plus_sdxl_vit-h.safetensors"]["sha256"]
    assert "files are not on the volume" in why[("manifest", "controlnet-tile")]
    assert result[("manifest", "lora-aesthetic-quality")] == "skipped"

    # Tokens moved into the state store; the old file is gone; nothing printed them.
    assert stored(data, "secret:")[secret_key("civitai")]["token"] == CIVITAI_TOKEN
    assert stored(data, "secret:")[secret_key("hf")]["token"] == HF_TOKEN
    assert not (loras / ".api_tokens.json").exists()
    assert CIVITAI_TOKEN not in json.dumps(report) and HF_TOKEN not in json.dumps(report)
    text = render_report(MigrationReport.from_dict(report))
    assert text.startswith("Migration: ") and "kept         file     my_upload.safetensors: " in text

    # The old indexes are retired, the journal is cleared, and the CLI sees the result.
    assert (loras / ".metadata.json.migrated").is_file() and not (loras / ".metadata.json").exists()
    assert (data / "models" / ".manifest.json.migrated").is_file() and not (data / "models" / ".progress.json").exists()
    assert not stored(data, "migration:")
    assert main(["models", "list", "--json"]) == 0
    listed = {entry["file"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["lora_929497.safetensors"]["path"] == str(loras / "loras" / "lora_929497.safetensors")
    assert main(["status", "--json"]) == 0
    states = {m["key"]: m["state"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert states["ip-adapter"] == "present" and states["controlnet-tile"] == "missing"


def test_a_second_run_changes_nothing(hub, data, capsys):
    build_old_install(data, hub)
    migrate(capsys)
    files, state = snapshot(data), stored(data)
    report = migrate(capsys)
    assert snapshot(data) == files and stored(data) == state
    # Only the files it will not take are reported again, each with its reason.
    assert not report["changed"]
    assert sorted(item["subject"] for item in report["items"]) == ["link.safetensors", "old_style.pt"]
    assert {item["outcome"] for item in report["items"]} == {"skipped"}
    (data / "loras" / "link.safetensors").unlink()
    (data / "loras" / "old_style.pt").unlink()
    assert main(["migrate"]) == 0
    assert "Nothing to migrate" in capsys.readouterr().out


KILL_SCRIPT = """
import os, signal, sys
from bot.cli import main
when, at = sys.argv[1], int(sys.argv[2])
real, calls = os.replace, [0]
def replace(source, dest):
    calls[0] += 1
    if when == "before" and calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    real(source, dest)
    if when == "after" and calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.exit(main(["migrate"]))
"""


def finished_state(data: Path) -> tuple[dict, dict]:
    files = snapshot(data)
    for relative in list(files):
        # A LoRA converted to another format is known by its original: the conversion's floats are not
        # bit-for-bit the same from one run to the next.
        original = relative.replace("loras/loras/", "loras/loras/.original/", 1)
        if original != relative and original in files:
            files[relative] = "converted from " + files[original]
    return files, without_times(stored(data))


@pytest.fixture
def uninterrupted(hub, tmp_path_factory, monkeypatch, capsys):
    """What a run that was never interrupted leaves behind, on an identical install."""
    clean = tmp_path_factory.mktemp("clean") / "data"
    build_old_install(clean, hub)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(clean))
    migrate(capsys)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(clean.parent.parent / "unused"))
    return finished_state(clean)


# The os.replace calls of a run: 1-3 the moves (lora_1231943, lora_929497, the clashing upload); 4-8 the
# importer's renames into place (5 sets the LoHa's original aside, 6 puts its conversion in place); 9-10
# the retirement of .manifest.json and .metadata.json.
@pytest.mark.parametrize("when, at", [
    ("after", 3), ("after", 5),
    *(pytest.param(*point, marks=pytest.mark.slow)
      for point in (("before", 1), ("after", 4), ("after", 6), ("after", 9), ("before", 10))),
])
def test_a_run_killed_mid_way_completes_when_run_again(hub, data, uninterrupted, monkeypatch, capsys, when, at):
    build_old_install(data, hub)
    monkeypatch.setenv("TOOLBOX_DATA_DIR", str(data))
    environment = {**os.environ, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, when, str(at)], env=environment,
                            capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    migrate(capsys)
    files, state = finished_state(data)
    clean_files, clean_state = uninterrupted
    assert files == clean_files
    # The entries' names and added_at match too: only timestamps of this run differ.
    assert state == clean_state
    assert not migrate(capsys)["changed"]


def test_a_name_an_import_is_installing_is_not_taken(hub, data, capsys):
    from modal_services.state.keys import file_lock_name
    from modal_services.state.locks import try_lock

    build_old_install(data, hub)

    async def importing():  # an import holds the name while it moves its own file in
        store = store_of(data)
        assert await try_lock(store, file_lock_name("lora_929497.safetensors"), "an-import")
        await store.close()

    asyncio.run(importing())
    report = migrate(capsys)
    assert (data / "loras" / "loras" / "lora_929497-2.safetensors").read_bytes() == AESTHETIC
    assert not (data / "loras" / "loras" / "lora_929497.safetensors").exists()  # left to the import
    assert "import under way" in details(report)[("file", "lora_929497.safetensors")]
    assert stored(data, "model:")["model:lora_929497-2.safetensors"]["civitai_model_id"] == 929497


def test_a_token_already_set_is_kept_and_the_file_stays(hub, data, capsys):
    build_old_install(data, hub)
    put(data, secret_key("civitai"), {"token": "newer-civitai-token-9999zzzz", "user": "admin", "set_at": 1.0})
    report = migrate(capsys)
    assert stored(data, "secret:")[secret_key("civitai")]["token"] == "newer-civitai-token-9999zzzz"
    assert stored(data, "secret:")[secret_key("hf")]["token"] == HF_TOKEN
    assert outcomes(report)[("token", "CivitAI")] == "kept"
    assert "••••zzzz" in details(report)[("token", "CivitAI")]
    assert (data / "loras" / ".api_tokens.json").exists()  # removed once one of the two tokens is cleared
    assert "newer-civitai-token-9999zzzz" not in json.dumps(report) and CIVITAI_TOKEN not in json.dumps(report)


def test_an_unreachable_source_leaves_the_claim_for_a_later_run(hub, data, capsys):
    build_old_install(data, hub)
    hub.fault("/api/models/h94/IP-Adapter", "status", status=503, times=20)
    report = migrate(capsys)
    item = next(i for i in report["items"] if i["subject"] == "ip-adapter")
    assert item["outcome"] == "skipped" and item["retry"]
    assert (data / "models" / ".manifest.json").is_file()  # kept until its claims could be checked
    assert not stored(data, "manifest:")
    hub.faults.clear()  # the hub is back
    assert outcomes(migrate(capsys))[("manifest", "ip-adapter")] == "recorded"
    assert (data / "models" / ".manifest.json.migrated").is_file()


def test_damaged_files_are_not_believed_and_not_removed(hub, data, capsys):
    build_old_install(data, hub)
    weights = data / "models" / "ip-adapter" / "ip-adapter-plus_sdxl_vit-h.safetensors"
    weights.write_bytes(b"x" * weights.stat().st_size)
    report = migrate(capsys)
    assert "not matching the source" in details(report)[("manifest", "ip-adapter")]
    assert not stored(data, "manifest:") and weights.read_bytes() == b"x" * 4096


def test_a_broken_index_is_left_alone(hub, data, capsys):
    build_old_install(data, hub)
    (data / "loras" / ".metadata.json").write_text("{not json")
    report = migrate(capsys)
    assert "not readable JSON" in details(report)[("index", ".metadata.json")]
    assert (data / "loras" / ".metadata.json").read_text() == "{not json"
    # The files still move (the index can be fixed and the migration run again for their entries).
    assert (data / "loras" / "loras" / "lora_929497.safetensors").is_file()
    assert not stored(data, "model:")


def test_with_the_modal_backend_the_deployed_function_migrates_the_volumes(capsys, monkeypatch):
    import modal

    asked = []

    class Function:
        class remote:
            @staticmethod
            async def aio(dry_run):
                asked.append(dry_run)
                return MigrationReport(dry_run=dry_run).to_dict()

    def from_name(app_name, name):
        assert (app_name, name) == ("ai-toolbox", "migrate_volumes")
        return Function

    monkeypatch.setenv("TOOLBOX_BACKEND", "modal")
    monkeypatch.setattr(modal.Function, "from_name", from_name)
    assert main(["migrate", "--dry-run"]) == 0
    assert asked == [True] and "Nothing to migrate" in capsys.readouterr().out


def test_an_app_that_is_not_deployed_is_one_clear_error(capsys, monkeypatch):
    import modal

    def missing(app_name, name):
        raise modal.exception.NotFoundError("app not found")

    monkeypatch.setenv("TOOLBOX_BACKEND", "modal")
    monkeypatch.setattr(modal.Function, "from_name", missing)
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "error: BACKEND_UNAVAILABLE:" in err and "modal run -m modal_services.app::migrate" in err


def test_the_modal_entry_point_mounts_both_volumes(app_module):
    options = app_module.recorded_options["migrate_volumes"]
    assert set(options["volumes"]) == {"/vol/models", "/vol/loras"}
    assert options["image"] is app_module.model_image and "gpu" not in options
    assert app_module.migrate.info.function_name == "migrate"
