"""The import engine against the fake CivitAI: downloads, rules, faults, locks, uploads, delete, scan."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from modal_services.net.transfer import retrying
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import Layout
from modal_services.library.imports import ModelEngine
from modal_services.state.store import SqliteStore
from modal_services.jobs.requests import ModelDeleteRequest, ModelImportRequest, ModelScanRequest, ModelUploadRequest
from tests.fakes.civitai_server import FakeCivitai
from tests.fixtures import tiny_loras

pytest.importorskip("torch")


@pytest.fixture
def civitai():
    server = FakeCivitai().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(retrying, "wait_before_retry", lambda seconds, interrupt=None: None)


@pytest.fixture
def engine(tmp_path):
    engine = ModelEngine(Layout(tmp_path / "models", tmp_path / "loras", SqliteStore(tmp_path / "state.sqlite3")))
    engine.wait_poll = 0.05
    engine.load()
    yield engine
    asyncio.run(engine.store.close())


class Progress:
    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction: float, stage: str) -> None:
        self.calls.append((fraction, stage))


LORA = tiny_loras.to_bytes(tiny_loras.sdxl_kohya())


def do_import(engine, civitai, ref="https://civitai.com/models/1"):
    return engine.import_model(ModelImportRequest(ref=ref, api_base=civitai.base), Progress())


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def entries(engine):
    return asyncio.run(engine.library.entries())


def test_import_a_lora_end_to_end(engine, civitai, tmp_path):
    civitai.add_model(1, 11, LORA, trained_words=["detailed"], tags=["detail"])
    progress = Progress()
    request = ModelImportRequest(ref="  <https://civitai.com/models/1/detail-tweaker>  ", api_base=civitai.base)
    result = engine.import_model(request, progress)
    entry = result["entry"]
    assert result["already_installed"] is False
    assert entry["file"] == "detail_tweaker_xl.safetensors" and entry["type"] == "lora" and entry["format"] == "kohya"
    assert entry["sha256"] == hashlib.sha256(LORA).hexdigest() and entry["size_bytes"] == len(LORA)
    assert (entry["civitai_model_id"], entry["civitai_version_id"], entry["source"]) == (1, 11, "civitai")
    assert entry["trigger_words"] == ["detailed"] and entry["weight"] == 1.0 and entry["base_model"] == "SDXL 1.0"
    assert entry["path"] == str(tmp_path / "loras" / "loras" / "detail_tweaker_xl.safetensors")
    assert files_under(tmp_path / "loras") == ["loras/detail_tweaker_xl.safetensors"]  # nothing left in .incoming
    # The token-less request to storage, and live progress during the download.
    (storage,) = civitai.hits("/storage/")
    assert "authorization" not in storage.headers
    assert any("downloading" in stage for _, stage in progress.calls)


def test_the_same_version_twice_downloads_once(engine, civitai):
    civitai.add_model(1, 11, LORA)
    do_import(engine, civitai)
    again = do_import(engine, civitai, ref="v:11")
    assert again["already_installed"] is True
    assert len(civitai.hits("/storage/")) == 1 and len(entries(engine)) == 1


def test_two_imports_at_once_make_one_download(engine, civitai, tmp_path):
    civitai.add_model(1, 11, LORA)
    civitai.fault("/storage/", kind="drop", at=100)  # slows the first transfer down (a resumed retry)
    second = ModelEngine(Layout(tmp_path / "models", tmp_path / "loras", SqliteStore(tmp_path / "state.sqlite3")))
    second.wait_poll = 0.05
    second.load()
    results = []
    threads = [threading.Thread(target=lambda e=e: results.append(do_import(e, civitai))) for e in (engine, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 2 and sorted(r["already_installed"] for r in results) == [False, True]
    assert len({r["entry"]["file"] for r in results}) == 1
    storage = civitai.hits("/storage/")
    assert len(storage) == 2  # one import's transfer: the dropped attempt and its retry
    asyncio.run(second.store.close())


def test_two_models_whose_files_share_a_name_both_stay(engine, civitai, tmp_path):
    """Different models, same file name, imported at once by two engines (bot and CLI): two files, two entries."""
    import diffusers

    assert diffusers.StableDiffusionXLPipeline  # imported here first: diffusers' lazy imports race in two threads

    other = tiny_loras.to_bytes(tiny_loras.sdxl_kohya(seed=99))
    civitai.add_model(1, 11, LORA, name="First", file_name="same.safetensors")
    civitai.add_model(2, 21, other, name="Second", file_name="same.safetensors")
    second = ModelEngine(Layout(tmp_path / "models", tmp_path / "loras", SqliteStore(tmp_path / "state.sqlite3")))
    second.wait_poll = 0.05
    second.load()
    results = []
    threads = [threading.Thread(target=lambda e=e, ref=ref: results.append(do_import(e, civitai, ref)))
               for e, ref in ((engine, "https://civitai.com/models/1"), (second, "https://civitai.com/models/2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    files = sorted(r["entry"]["file"] for r in results)
    assert files == ["same-2.safetensors", "same.safetensors"]
    by_file = {r["entry"]["file"]: r["entry"] for r in results}
    for file, entry in by_file.items():
        data = (tmp_path / "loras" / "loras" / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]  # each file is its own model's
    assert {entry["sha256"] for entry in by_file.values()} == {hashlib.sha256(LORA).hexdigest(), hashlib.sha256(other).hexdigest()}
    assert len(entries(engine)) == 2 and not (tmp_path / "loras" / ".incoming").exists()
    asyncio.run(second.store.close())


def test_a_dropped_connection_resumes(engine, civitai):
    civitai.add_model(1, 11, LORA)
    civitai.fault("/storage/", kind="drop", at=1000)
    assert do_import(engine, civitai)["entry"]["sha256"] == hashlib.sha256(LORA).hexdigest()
    assert len(civitai.hits("/storage/")) == 2


def test_wrong_bytes_are_discarded(engine, civitai, tmp_path):
    civitai.add_model(1, 11, LORA)
    civitai.fault("/storage/", kind="corrupt")
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert files_under(tmp_path / "loras") == [] and entries(engine) == []
    assert asyncio.run(engine.store.keys("lock:")) == []  # the lock is released


def test_gated_model_needs_a_token(engine, civitai, monkeypatch):
    civitai.add_model(1, 11, LORA, gated=True)
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is ErrorCode.CIVITAI_AUTH_REQUIRED and remedies.set_token("civitai") in caught.value.message
    assert civitai.token not in caught.value.message
    monkeypatch.setenv("CIVITAI_TOKEN", civitai.token)  # the fallback of the /setup token
    assert do_import(engine, civitai)["entry"]["civitai_version_id"] == 11


@pytest.mark.parametrize("status, code", [(404, ErrorCode.CIVITAI_NOT_FOUND), (401, ErrorCode.CIVITAI_AUTH_REQUIRED)])
def test_api_errors(engine, civitai, status, code):
    civitai.add_model(1, 11, LORA)
    civitai.fault("/api/v1/models/1", status=status)
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is code


def test_rate_limits_are_retried(engine, civitai):
    civitai.add_model(1, 11, LORA)
    civitai.fault("/api/download/models/11", status=429, retry_after="0")
    civitai.fault("/storage/", status=503, retry_after="0")
    assert do_import(engine, civitai)["already_installed"] is False
    assert len(civitai.hits("/api/download/models/11")) == 2


def test_loha_is_converted_and_the_original_kept(engine, civitai, tmp_path):
    civitai.add_model(1, 11, tiny_loras.to_bytes(tiny_loras.sdxl_loha()), type="LoCon", file_name="armor.safetensors")
    entry = do_import(engine, civitai)["entry"]
    assert entry["format"] == "loha" and entry["original_file"] == ".original/armor.safetensors"
    assert files_under(tmp_path / "loras") == ["loras/.original/armor.safetensors", "loras/armor.safetensors"]
    report = asyncio.run(engine.library.scan())
    assert report.untracked == [] and report.missing == []


def test_a_lora_for_another_base_model_is_refused_and_nothing_written(engine, civitai, tmp_path):
    civitai.add_model(1, 11, tiny_loras.to_bytes(tiny_loras.kohya()))  # labelled SDXL, shaped for something else
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL
    assert files_under(tmp_path / "loras") == [] and entries(engine) == []


def _poisoned(key_part: str, value: float) -> dict:
    state = tiny_loras.sdxl_kohya()
    key = next(k for k in state if key_part in k)
    state[key] = state[key].clone().fill_(value) if state[key].dim() else state[key].new_tensor(value)
    return state


@pytest.mark.parametrize("key_part, value", [("lora_up", float("nan")), ("lora_down", float("-inf")), ("alpha", float("inf"))])
def test_a_lora_with_nan_or_inf_weights_is_refused_naming_the_tensor(engine, civitai, tmp_path, key_part, value):
    civitai.add_model(1, 11, tiny_loras.to_bytes(_poisoned(key_part, value)))
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and key_part in caught.value.message
    assert "NaN or infinite" in caught.value.message
    assert files_under(tmp_path / "loras") == [] and entries(engine) == []


def test_a_checkpoint_with_nan_weights_is_refused(engine, civitai, tmp_path):
    state = tiny_loras.sdxl_checkpoint()
    state["model.diffusion_model.input_blocks.0.0.weight"][0, 0, 0, 0] = float("nan")
    civitai.add_model(2, 21, tiny_loras.to_bytes(state), type="Checkpoint", file_name="nan.safetensors")
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai, ref="2")
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and "input_blocks.0.0.weight" in caught.value.message
    assert files_under(tmp_path / "loras") == []


def _sd15_lora(names: dict) -> dict:
    import torch

    g, state = torch.Generator().manual_seed(5), {}
    for name, (out, inp) in names.items():
        state[f"{name}.lora_down.weight"] = torch.randn((1, inp), generator=g)
        state[f"{name}.lora_up.weight"] = torch.randn((out, 1), generator=g)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    return state


# Layers SD 1.5 and SDXL both have with the same shapes: such a LoRA would load into SDXL.
SHARED_SHAPES = {
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280),
    "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_k": (1280, 1280),
    "lora_te1_text_model_encoder_layers_11_self_attn_out_proj": (768, 768),
}


@pytest.mark.parametrize("names, why", [
    (SHARED_SHAPES, "only layers SD 1.5 has"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
      "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280)}, "SD 1.5's single text encoder"),
])
def test_an_sd15_lora_labelled_sdxl_is_refused_and_nothing_written(engine, civitai, tmp_path, names, why):
    civitai.add_model(1, 11, tiny_loras.to_bytes(_sd15_lora(names)))
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL and why in caught.value.message
    assert files_under(tmp_path / "loras") == [] and entries(engine) == []


def test_disk_full_while_converting_is_storage_full(engine, civitai, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    civitai.add_model(1, 11, tiny_loras.to_bytes(tiny_loras.sdxl_loha()), file_name="armor.safetensors")
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai)
    assert caught.value.code is ErrorCode.STORAGE_FULL
    assert files_under(tmp_path / "loras") == [] and entries(engine) == []


def test_a_name_over_255_utf8_bytes_is_shortened_and_nothing_is_left_behind(engine, civitai, tmp_path):
    long_name = "字" * 200 + ".safetensors"  # 212 characters, 612 bytes
    civitai.add_model(1, 11, LORA, file_name=long_name)
    entry = do_import(engine, civitai)["entry"]
    assert len(entry["file"].encode()) <= 200 and entry["file"].startswith("字") and entry["file"].endswith(".safetensors")
    assert files_under(tmp_path / "loras") == [f"loras/{entry['file']}"]  # no .incoming/<id>/ left


def test_checkpoints_go_to_checkpoints_and_must_be_sdxl(engine, civitai, tmp_path):
    civitai.add_model(2, 21, tiny_loras.to_bytes(tiny_loras.sdxl_checkpoint()), type="Checkpoint",
                      name="NoobAI XL", file_name="noobai.safetensors", base_model="NoobAI")
    entry = do_import(engine, civitai, ref="urn:air:sdxl:checkpoint:civitai:2@21")["entry"]
    assert entry["type"] == "checkpoint" and entry["weight"] is None and entry["format"] == "checkpoint"
    assert entry["path"].endswith("loras/checkpoints/noobai.safetensors")
    civitai.add_model(3, 31, tiny_loras.to_bytes(tiny_loras.sd15_checkpoint()), type="Checkpoint", file_name="old.safetensors")
    with pytest.raises(ToolboxError) as caught:
        do_import(engine, civitai, ref="3")
    assert caught.value.code is ErrorCode.INCOMPATIBLE_MODEL
    assert files_under(tmp_path / "loras") == ["checkpoints/noobai.safetensors"]


def test_file_names_are_sanitised_and_unique(engine, civitai):
    civitai.add_model(1, 11, LORA, file_name="../../evil name.safetensors", name="A")
    civitai.add_model(2, 21, tiny_loras.to_bytes(tiny_loras.sdxl_kohya(seed=99)), file_name="evil name.safetensors", name="A")
    first = do_import(engine, civitai, ref="1")["entry"]
    second = do_import(engine, civitai, ref="2")["entry"]
    assert (first["file"], second["file"]) == ("evil name.safetensors", "evil name-2.safetensors")
    assert (first["name"], second["name"]) == ("A", "A v1.0")


def test_a_missing_file_is_downloaded_again(engine, civitai, tmp_path):
    civitai.add_model(1, 11, LORA)
    entry = do_import(engine, civitai)["entry"]
    asyncio.run(engine.library.edit(entry["file"], trigger_words="mine"))
    (tmp_path / "loras" / "loras" / entry["file"]).unlink()
    again = do_import(engine, civitai)
    assert again["already_installed"] is False and again["entry"]["file"] == entry["file"]
    assert again["entry"]["trigger_words"] == ["mine"]  # the admin's edits survive


def test_upload_is_described_from_civitai_by_hash(engine, civitai):
    civitai.add_model(1, 11, LORA, trained_words=["detailed"])
    civitai.files["my_lora.safetensors"] = LORA
    request = ModelUploadRequest(url=f"{civitai.base}/files/my_lora.safetensors", filename="my_lora.safetensors",
                                 type="lora", size_bytes=len(LORA), api_base=civitai.base)
    result = engine.upload_model(request, Progress())
    entry = result["entry"]
    assert (entry["name"], entry["civitai_version_id"], entry["trigger_words"]) == ("Detail Tweaker XL", 11, ["detailed"])
    assert entry["source"] == "upload" and entry["file"] == "my_lora.safetensors"


def test_upload_unknown_to_civitai_keeps_the_given_metadata(engine, civitai):
    civitai.files["x.safetensors"] = LORA
    request = ModelUploadRequest(url=f"{civitai.base}/files/x.safetensors", filename="x.safetensors", type="lora",
                                 name="Mine", trigger_words="a, b", api_base=civitai.base)
    entry = engine.upload_model(request, Progress())["entry"]
    assert (entry["name"], entry["trigger_words"], entry["civitai_version_id"]) == ("Mine", ["a", "b"], None)


def test_upload_refuses_pickles_and_wrong_types(engine, civitai):
    with pytest.raises(ToolboxError):
        engine.upload_model(ModelUploadRequest(url=f"{civitai.base}/files/x.ckpt", filename="x.ckpt", type="lora"), Progress())
    civitai.add_model(1, 11, LORA)
    civitai.files["x.safetensors"] = LORA
    with pytest.raises(ToolboxError) as caught:
        engine.upload_model(ModelUploadRequest(url=f"{civitai.base}/files/x.safetensors", filename="x.safetensors",
                                               type="checkpoint", api_base=civitai.base), Progress())
    assert "LORA" in caught.value.message and entries(engine) == []


@pytest.mark.parametrize("url", [
    "https://example.com/attachments/x.safetensors",  # not Discord's CDN
    "http://cdn.discordapp.com/attachments/x.safetensors",  # not https
    "https://cdn.discordapp.com@127.0.0.1/x.safetensors",  # userinfo trick
    "file:///etc/passwd",
])
def test_upload_fetches_only_from_discords_cdn(engine, civitai, monkeypatch, url):
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "")
    with pytest.raises(ToolboxError) as caught:
        engine.upload_model(ModelUploadRequest(url=url, filename="x.safetensors", type="lora", api_base=civitai.base), Progress())
    assert caught.value.code is ErrorCode.INVALID_INPUT and "Refused to fetch" in caught.value.message
    assert civitai.hits("/files/") == [] and entries(engine) == []


def test_delete_and_scan_adopt(engine, civitai, tmp_path):
    civitai.add_model(1, 11, LORA)
    entry = do_import(engine, civitai)["entry"]
    assert engine.delete_model(ModelDeleteRequest(name=entry["name"]), Progress())["entry"]["file"] == entry["file"]
    assert files_under(tmp_path / "loras") == [] and entries(engine) == []
    stray = tmp_path / "loras" / "loras" / "stray.safetensors"
    stray.write_bytes(LORA)
    (tmp_path / "loras" / "loras" / "broken.safetensors").write_bytes(b"not safetensors")
    report = engine.scan_library(ModelScanRequest(adopt=True, api_base=civitai.base), Progress())
    assert {item["file"] for item in report["untracked"]} == {"stray.safetensors", "broken.safetensors"}
    assert [e["file"] for e in report["adopted"]] == ["stray.safetensors"]
    assert report["adopted"][0]["civitai_version_id"] == 11 and report["adopted"][0]["source"] == "civitai"
    assert [f["file"] for f in report["failed"]] == ["broken.safetensors"]
    assert (tmp_path / "loras" / "loras" / "broken.safetensors").exists()  # left where it was
