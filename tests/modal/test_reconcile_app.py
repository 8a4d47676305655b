"""The app's daily reconcile: its schedule and mounts, and one run against a fake Dict and volumes."""

from __future__ import annotations

import json
import os
import time

import modal
import pytest

from modal_services.layout import RECORDS_VOLUME, TOKENS_VOLUME
from modal_services.state.keys import RECONCILE_KEY
from tests.fakes.modal_fakes import FakeModalDict, fake_volumes


class MountedVolume:
    """A volume mounted in the container: what the function asks of it is counted."""

    def __init__(self):
        self.reloads = 0
        self.commits = 0

    def reload(self) -> None:
        self.reloads += 1

    def commit(self) -> None:
        self.commits += 1


def test_the_reconcile_runs_daily_on_a_cpu_beside_the_model_volumes(app_module):
    options = app_module.recorded_options["reconcile_records"]
    assert options["schedule"].proto_message.period.days == 1
    assert options["volumes"] == app_module.MODEL_VOLUMES
    assert options["image"] is app_module.bot_image and "gpu" not in options


@pytest.mark.filterwarnings("ignore:The reconcile_records function is executing locally")
def test_the_scheduled_reconcile_warms_the_dict_and_reports_drift(app_module, monkeypatch, tmp_path):
    volumes = fake_volumes(monkeypatch)  # the records and tokens volumes, reached through the client API
    state = FakeModalDict()
    models_mount, loras_mount = tmp_path / "models", tmp_path / "loras"
    mounted = MountedVolume(), MountedVolume()
    monkeypatch.setattr(app_module, "state_dict", state)
    monkeypatch.setattr(app_module, "MODELS_MOUNT", models_mount)
    monkeypatch.setattr(app_module, "LORAS_MOUNT", loras_mount)
    monkeypatch.setattr(app_module, "MODEL_VOLUMES", {str(models_mount): mounted[0], str(loras_mount): mounted[1]})
    monkeypatch.setattr(app_module, "DOWNLOAD_VOLUMES", mounted)

    folder = loras_mount / "loras"
    folder.mkdir(parents=True)
    entry = {"name": "Kept", "file": "kept.safetensors", "type": "lora", "trigger_words": ["shiny"], "weight": 0.8}
    (folder / "kept.safetensors").write_bytes(b"weights")
    (folder / "kept.json").write_text(json.dumps({"toolbox": entry}))
    (folder / "gone.json").write_text(json.dumps({"toolbox": {**entry, "name": "Gone", "file": "gone.safetensors"}}))
    (folder / "stray.safetensors").write_bytes(b"weights")
    leftover = folder / ".kept.json.k1ll3d.tmp"
    leftover.write_text("{")
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    token = {"token": "hf_SECRETvalue0123456789", "user": "admin"}
    modal.Volume.from_name(TOKENS_VOLUME).files["hf.json"] = json.dumps(token).encode()
    state.put("settings:5", {"nsfw": "off"})  # kept only in the Dict by an earlier version
    records = modal.Volume.from_name(RECORDS_VOLUME).files
    for name, age_days in (("old", 91), ("fresh", 89)):  # past and within the default retention
        kept = {"params": {"prompt": name}, "kept_at": time.time() - age_days * 86_400, "guild_id": None}
        records[f"results/generate/{name}.json"] = json.dumps(kept).encode()

    for name, age_hours in (("old-job", 169), ("recent-job", 1)):  # past and within the default job retention
        state.put(f"job:{name}", {"id": name, "kind": "caption", "status": "done", "created_at": time.time() - age_hours * 3600,
                                  "finished_at": time.time() - age_hours * 3600})

    report = app_module.reconcile_records.local()

    assert all(volume.reloads == 1 for volume in mounted) and mounted[1].commits >= 1  # the leftover's removal
    assert report["entries_without_file"] == ["loras/gone.safetensors"]
    assert report["files_without_entry"] == ["loras/stray.safetensors"]
    assert report["leftovers_removed"] == ["loras/loras/.kept.json.k1ll3d.tmp"] and not leftover.exists()
    assert json.loads(volumes[RECORDS_VOLUME].files["settings/5.json"]) == {"nsfw": "off"}  # the upgrade's copy
    assert state.get("model:kept.safetensors")["trigger_words"] == ["shiny"]  # warmed from the sidecar
    assert state.get("secret:hf") == token and token["token"] not in json.dumps(report)
    assert state.get(RECONCILE_KEY) == report
    assert "results/generate/old.json" not in records and "results/generate/fresh.json" in records
    assert state.get("job:old-job") is None and state.get("job:recent-job") is not None
