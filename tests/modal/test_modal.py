"""The Modal side, offline: ModalBackend patched at the seam, and the app's wiring.

Nothing here reaches Modal: `modal.Cls.from_name`, `modal.FunctionCall.from_id`
and `modal.Dict.from_name` are replaced by fakes that behave like a deployed
app whose container runs the real `run_job` path against the shared Dict.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.backend import ModalBackend, call_key, make_backend
from bot.settings import Settings
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import CaptionRequest
from modal_services.jobs.records import JobStatus, load_job
from modal_services.state.store import ModalDictStore
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.fakes.modal_fakes import FakeModalDict
from tests.images import png_bytes


@pytest.fixture
def deployment(modal_deployment, monkeypatch):
    monkeypatch.setenv("TOOLBOX_MODAL_APP", "toolbox-test")
    return modal_deployment


async def test_settings_pick_the_modal_backend(deployment):
    backend = make_backend(Settings.load())
    assert isinstance(backend, ModalBackend) and backend.app_name == "toolbox-test"


async def test_submit_spawns_the_deployed_class_and_result_comes_back(deployment):
    backend = make_backend(Settings.load())
    job = await backend.submit(CaptionRequest.parse({"images": [b"x", b"y"], "style": "tags", "question": None}), owner={"user_id": 5})
    [(app_name, method, (job_id, payload))] = deployment.spawned
    assert (app_name, method, job_id) == ("toolbox-test", "CaptionService.caption", job.id)
    assert await backend.result(job.id) == ["tags caption 0", "tags caption 1"]
    record = await backend.job(job.id)
    assert record.status is JobStatus.DONE and record.owner == {"user_id": 5}
    assert (await backend.store.get(call_key(job.id))).startswith("fc-")


async def test_a_failed_job_raises_its_error(deployment):
    def failing(payload, progress):
        raise ToolboxError(ErrorCode.MODELS_MISSING, "Run /setup first.")

    deployment.work = failing
    backend = make_backend(Settings.load())
    job = await backend.submit(CaptionRequest.parse({"images": [b"x"], "style": "short", "question": None}))
    with pytest.raises(ToolboxError) as caught:
        await backend.result(job.id)
    assert caught.value.code is ErrorCode.MODELS_MISSING
    assert (await backend.job(job.id)).error().code is ErrorCode.MODELS_MISSING


async def test_missing_models_are_refused_before_any_gpu_work(deployment):
    from modal_services.base_models.downloads import manifest_key

    deployment.store._dict.pop(manifest_key("qwen3-vl-2b"))
    backend = make_backend(Settings.load())
    with pytest.raises(ToolboxError) as caught:
        await backend.submit(CaptionRequest.parse({"images": [b"x"], "style": "short", "question": None}))
    assert caught.value.code is ErrorCode.MODELS_MISSING
    assert "Qwen3-VL" in caught.value.message and remedies.download("qwen3-vl-2b") in caught.value.message
    assert deployment.spawned == [] and await backend.store.keys("job:") == []


async def test_app_not_deployed_is_a_clear_error(deployment):
    deployment.missing = True
    backend = make_backend(Settings.load())
    with pytest.raises(ToolboxError) as caught:
        await backend.submit(CaptionRequest.parse({"images": [b"x"], "style": "short", "question": None}))
    assert caught.value.code is ErrorCode.BACKEND_UNAVAILABLE and "modal deploy" in caught.value.message
    # Refused: nothing started, so no job record is left behind.
    assert await backend.store.keys("job:") == [] and await backend.store.keys("call:") == []


async def test_caption_cog_over_modal(deployment, fast_progress, make_toolbox_bot):
    toolbox_bot = await make_toolbox_bot("cogs.caption")
    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("caption"), interaction, fake_attachment(png_bytes()), None, None)
    assert ephemeral_error(interaction) is None
    assert "descriptive caption 0" in interaction.calls.edit_original_response.await_args.kwargs["content"]


# ---- the app's wiring -------------------------------------------------------


def test_caption_service_wiring(app_module):
    from modal_services.layout import MODELS_MOUNT

    options = app_module.recorded_options["CaptionService"]
    assert options["gpu"] == "T4"  # a deploy-time setting
    assert options["image"] is app_module.caption_image  # the GPU image with onnxruntime, for the booru tagger
    assert options["volumes"] == {str(MODELS_MOUNT): app_module.models_volume}
    assert options["scaledown_window"] >= 60 and options["max_containers"] >= 1
    spec = app_module.CaptionService._get_class_service_function()._spec_
    assert spec.gpus == "T4" and str(MODELS_MOUNT) in spec.volumes
    assert any(package.startswith("torch") for package in app_module.GPU_PACKAGES)
    assert any(package.startswith("transformers") for package in app_module.GPU_PACKAGES)
    # Cold starts: the CPU-side load is snapshotted, the GPU move runs after restore.
    assert options["enable_memory_snapshot"] is True
    assert app_module.recorded_options["CaptionService.load_weights"] == {"snap": True}
    assert app_module.recorded_options["CaptionService.move_to_gpu"] == {"snap": False}


def test_the_bot_runs_in_one_always_on_container_without_the_ml_stack(app_module):
    import tomllib

    options = app_module.recorded_options["DiscordBot"]
    assert options["min_containers"] == 1 and options["max_containers"] == 1
    assert options["image"] is app_module.bot_image and "gpu" not in options
    assert options["secrets"] == [app_module.bot_secret]
    pyproject = tomllib.loads((Path(app_module.__file__).parent.parent / "pyproject.toml").read_text())
    bot_dependencies = " ".join(pyproject["project"]["dependencies"]).lower()
    for heavy in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        assert heavy not in bot_dependencies


def test_cpu_services_have_no_gpu(app_module):
    for name in ("DownloadService", "ModelService"):
        options = app_module.recorded_options[name]
        assert options["secrets"] == [app_module.bot_secret]  # the tokens put in the bot's secret reach them
        assert "gpu" not in options
        assert app_module.models_volume in options["volumes"].values()
        assert app_module.loras_volume in options["volumes"].values()


async def test_caption_service_runs_a_job_locally(app_module, monkeypatch, tiny_qwen_dir, tiny_tagger_dirs, tmp_path):
    from modal_services.layout import CAPTION_MODEL, TAGGER_DIR

    state = FakeModalDict()
    monkeypatch.setattr(app_module, "state_dict", state)
    models = tmp_path / "models"
    models.mkdir()
    (models / CAPTION_MODEL).symlink_to(tiny_qwen_dir, target_is_directory=True)
    (models / TAGGER_DIR).symlink_to(tiny_tagger_dirs["safe"], target_is_directory=True)
    monkeypatch.setattr(app_module, "MODELS_MOUNT", models)
    store = ModalDictStore(state)
    from modal_services.jobs.records import create_job

    service = app_module.CaptionService()
    service._enter()  # modal's .local() skips sync @enter hooks before async methods
    assert service.engine.loaded  # both models, loaded with the container
    for style in ("short", "tags"):
        job = await create_job(store, "caption")
        captions = await service.caption.local(job.id, {"images": [png_bytes()], "style": style, "question": None})
        assert len(captions) == 1 and captions[0]
        assert (await load_job(store, job.id)).status is JobStatus.DONE
    assert captions[0].endswith(", general")  # the tagger's rating closes a tags caption


async def test_the_nsfw_classifier_is_required_only_when_images_are_classified(deployment):
    from modal_services.base_models.downloads import manifest_key
    from modal_services.jobs.requests import GenerateRequest

    deployment.store._dict.pop(manifest_key("nsfw-classifier"))
    backend = make_backend(Settings.load())
    with pytest.raises(ToolboxError) as caught:
        await backend.submit(GenerateRequest.parse({"prompt": "a cat"}))
    assert caught.value.code is ErrorCode.MODELS_MISSING and "NSFW image classifier" in caught.value.message
    assert deployment.spawned == []
    for safety in ({"policy": "off"}, {"age_restricted": True}):
        await backend.submit(GenerateRequest.parse({"prompt": "a cat", "safety": safety}))
    assert [method for _, method, _ in deployment.spawned] == ["SdxlService.generate"] * 2


async def test_only_tags_captions_need_the_tagger(deployment):
    from modal_services.base_models.downloads import manifest_key

    deployment.store._dict.pop(manifest_key("wd-tagger"))
    backend = make_backend(Settings.load())
    with pytest.raises(ToolboxError) as caught:
        await backend.submit(CaptionRequest.parse({"images": [b"x"], "style": "tags"}))
    assert caught.value.code is ErrorCode.MODELS_MISSING and "Booru tagger" in caught.value.message
    assert deployment.spawned == []
    await backend.submit(CaptionRequest.parse({"images": [b"x"], "style": "descriptive"}))
    await backend.submit(CaptionRequest.parse({"images": [b"x"], "style": "tags", "question": "What is it?"}))
    assert [method for _, method, _ in deployment.spawned] == ["CaptionService.caption"] * 2
