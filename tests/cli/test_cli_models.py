"""`toolbox models …` against the fake CivitAI, through the local backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from tests.fixtures import tiny_loras

pytest.importorskip("torch")

LORA = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())


@pytest.fixture
def civitai(fake_civitai):
    return fake_civitai


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_list_info_edit_use_delete(civitai, capsys, tmp_path):
    civitai.add_model(1, 11, LORA, trained_words=["detailed"])
    civitai.add_model(2, 21, tiny_loras.to_bytes(tiny_loras.sdxl_checkpoint()), type="Checkpoint", name="NoobAI XL",
                      file_name="noobai.safetensors", base_model="NoobAI", trained_words=[])
    code, out, err = run(capsys, "models", "import", "https://civitai.com/models/1", "--yes", "--json")
    assert code == 0, err
    entry = json.loads(out)
    assert entry["path"] == str(tmp_path / "data" / "loras" / "loras" / "detail_tweaker_xl.safetensors")
    assert Path(entry["path"]).is_file() and entry["trigger_words"] == ["detailed"]
    for key in ("name", "file", "type", "base_model", "trigger_words", "weight", "size_bytes", "sha256", "source",
                "civitai_model_id", "civitai_version_id", "added_at", "path"):
        assert key in entry
    assert run(capsys, "models", "import", "v:21", "--yes")[0] == 0

    code, out, _ = run(capsys, "models", "import", "1", "--yes")
    assert code == 0 and "Detail Tweaker XL" in out and len(civitai.hits("/storage/")) == 2  # not fetched again

    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0 and [e["file"] for e in json.loads(out)] == ["detail_tweaker_xl.safetensors", "noobai.safetensors"]
    code, out, _ = run(capsys, "models", "list", "--type", "checkpoint")
    assert "noobai.safetensors" in out and "detail_tweaker" not in out
    code, out, _ = run(capsys, "models", "list", "--query", "detailed", "--json")
    assert len(json.loads(out)) == 1

    assert run(capsys, "models", "edit", "Detail Tweaker XL", "--name", "Detailer", "--triggers", "a, b", "--weight", "0.7")[0] == 0
    code, out, _ = run(capsys, "models", "info", "detailer", "--json")
    assert (json.loads(out)["name"], json.loads(out)["trigger_words"], json.loads(out)["weight"]) == ("Detailer", ["a", "b"], 0.7)
    # A checkpoint's sampler, for jobs that name none.
    code, out, _ = run(capsys, "models", "edit", "NoobAI XL", "--sampler", "dpm++ 2m karras")
    assert code == 0 and "sampler DPM++ 2M Karras" in out
    assert json.loads(run(capsys, "models", "info", "NoobAI XL", "--json")[1])["sampler"] == "DPM++ 2M Karras"
    for name, sampler, words in (("NoobAI XL", "Heun", "The sampler must be one of Euler a, "),
                                 ("Detailer", "Euler a", "Only checkpoints have a sampler.")):
        code, _, err = run(capsys, "models", "edit", name, "--sampler", sampler)
        assert code == 2 and err.startswith(f"error: INVALID_INPUT: {words}")

    assert run(capsys, "models", "use", "NoobAI XL")[0] == 0
    code, _, err = run(capsys, "models", "delete", "NoobAI XL", "--yes")
    assert code == 2 and err.startswith("error: INVALID_INPUT:") and "active checkpoint" in err
    base_checkpoint = tmp_path / "data" / "models" / "illustrious-xl" / "Illustrious-XL-v2.0.safetensors"
    base_checkpoint.parent.mkdir(parents=True)
    base_checkpoint.write_bytes(b"weights")  # switching back needs it installed
    assert run(capsys, "models", "use", "illustrious-xl")[0] == 0
    code, out, _ = run(capsys, "models", "delete", "NoobAI XL", "--yes")
    assert code == 0 and not (tmp_path / "data" / "loras" / "checkpoints" / "noobai.safetensors").exists()


def test_errors_have_codes_and_exit_status(civitai, capsys):
    code, out, err = run(capsys, "models", "import", "https://example.com/x", "--yes")
    assert (code, out) == (2, "") and err.startswith("error: INVALID_INPUT:")
    code, _, err = run(capsys, "models", "import", "404", "--yes")
    assert code == 1 and err.startswith("error: CIVITAI_NOT_FOUND:")
    civitai.add_model(1, 11, LORA, base_model="SD 1.5")
    code, _, err = run(capsys, "models", "import", "1", "--yes")
    assert code == 1 and err.startswith("error: INCOMPATIBLE_MODEL:")
    civitai.add_model(2, 21, LORA, gated=True)
    code, _, err = run(capsys, "models", "import", "2", "--yes")
    last = err.strip().splitlines()[-1]  # after the preview
    assert code == 1 and last.startswith("error: CIVITAI_AUTH_REQUIRED:") and last.endswith(
        "set CIVITAI_TOKEN in the environment or the `.env` file.")
    code, _, err = run(capsys, "models", "info", "nothing")
    assert code == 2 and "No model named" in err


def test_import_without_yes_and_no_terminal_asks_for_it(civitai, capsys, monkeypatch):
    import io

    civitai.add_model(1, 11, LORA)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "models", "import", "1")
    assert code == 2 and "--yes" in err and not civitai.hits("/storage/")


def test_scan_json(civitai, capsys, tmp_path):
    folder = tmp_path / "data" / "loras" / "loras"
    folder.mkdir(parents=True)
    (folder / "stray.safetensors").write_bytes(LORA)
    code, out, _ = run(capsys, "models", "scan", "--json")
    assert code == 0 and [i["file"] for i in json.loads(out)["untracked"]] == ["stray.safetensors"]
    code, out, _ = run(capsys, "models", "scan", "--adopt", "--json")
    assert [e["file"] for e in json.loads(out)["adopted"]] == ["stray.safetensors"]
