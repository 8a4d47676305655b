"""SdxlService's wiring and a generate and an upscale job through one container locally; live previews in the store."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from modal_services.jobs.records import JobStatus, create_job, load_job
from modal_services.layout import LORAS_MOUNT, MODELS_MOUNT, Layout
from modal_services.engines.sdxl.previews import MAX_PREVIEW_BYTES, PreviewSink, decode_preview, preview_key
from modal_services.state.store import ModalDictStore, SqliteStore
from tests.fakes.modal_fakes import FakeModalDict
from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume
from tests.images import png_bytes


def test_sdxl_service_wiring(app_module, monkeypatch):
    options = app_module.recorded_options["SdxlService"]
    assert options["gpu"] == "A10G"  # the default of TOOLBOX_SDXL_GPU
    assert options["image"] is app_module.sdxl_image
    assert options["volumes"] == {str(MODELS_MOUNT): app_module.models_volume, str(LORAS_MOUNT): app_module.loras_volume}
    assert options["timeout"] >= 600 and options["max_containers"] >= 1
    assert options["enable_memory_snapshot"] is True
    spec = app_module.SdxlService._get_class_service_function()._spec_
    assert spec.gpus == "A10G"


@pytest.mark.slow
async def test_one_sdxl_container_serves_generate_and_upscale_and_cleans_its_previews(app_module, monkeypatch, tmp_path):
    volume = build_tiny_volume(tmp_path)
    state = FakeModalDict()
    monkeypatch.setattr(app_module, "state_dict", state)
    monkeypatch.setattr(app_module, "MODELS_MOUNT", volume.models_dir)
    monkeypatch.setattr(app_module, "SDXL_DEVICE", "cpu")  # no GPU here
    store = ModalDictStore(state)
    service = app_module.SdxlService()
    service._enter()  # modal's .local() skips sync @enter hooks before async methods: both phases run here
    assert service.engine.loaded and service.engine.models.placement == "cpu"
    assert service.classifier.loaded  # loaded with the engine, in the same container
    service.engine.upscaler.preview_interval = 0.0
    unet = service.engine.models.pipe.unet
    job = await create_job(store, "upscale")
    result = await service.upscale.local(job.id, {"image": png_bytes(48, 40), "scale": 2.0, "steps": 4, "seed": 3})
    assert Image.open(io.BytesIO(result["image"])).size == (96, 80)
    assert result["safety"]["checked"] and result["safety"]["images"][0]["decision"] == "post"
    assert (await load_job(store, job.id)).status is JobStatus.DONE
    assert not await store.contains(preview_key(job.id))
    job = await create_job(store, "generate")
    generated = await service.generate.local(job.id, {"prompt": "a cat", "width": 512, "height": 512, "steps": 20, "seed": 3})
    assert Image.open(io.BytesIO(generated["images"][0])).size == (512, 512) and generated["seeds"] == [3]
    assert (await load_job(store, job.id)).status is JobStatus.DONE
    assert service.engine.models.pipe.unet is unet  # the same weights served both jobs


async def test_preview_sink_keeps_the_latest_and_cleans_up(tmp_path):
    store = SqliteStore(tmp_path / "state.sqlite3")
    sink = PreviewSink(store, "job1")
    jpeg = b"\xff\xd8" + b"x" * 100
    # Called from the engine's worker thread.
    await asyncio.get_running_loop().run_in_executor(None, sink, jpeg)
    await asyncio.wrap_future(sink._pending)
    assert decode_preview(await store.get(preview_key("job1"))) == jpeg
    sink(b"\xff\xd8" + b"y" * (MAX_PREVIEW_BYTES + 1))  # too big: dropped
    assert decode_preview(await store.get(preview_key("job1"))) == jpeg
    await sink.close()
    assert not await store.contains(preview_key("job1"))
    assert decode_preview({"jpeg": "not base64!"}) is None and decode_preview(None) is None
    await store.close()


def test_the_output_limit_is_a_deploy_setting_shared_by_bot_and_worker(monkeypatch):
    import importlib

    import modal_services.engines.sdxl.limits as limits

    monkeypatch.setenv("TOOLBOX_UPSCALE_MAX_MP", "64")
    try:
        assert importlib.reload(limits).DEFAULT_MAX_OUTPUT_PIXELS == 8192 * 8192
        assert limits.check_upscale_size(2048, 2048, 4.0) == (8192, 8192)
    finally:
        monkeypatch.delenv("TOOLBOX_UPSCALE_MAX_MP")
        importlib.reload(limits)
    assert limits.DEFAULT_MAX_OUTPUT_PIXELS == 4096 * 4096


@pytest.mark.slow
def test_staged_weights_wait_in_host_memory_in_the_target_dtype(tmp_path):
    import torch

    from modal_services.engines.sdxl.pipeline import SdxlModels

    volume = build_tiny_volume(tmp_path)
    models = SdxlModels(Layout(volume.models_dir), device="cuda")  # the snapshot phase: no GPU attached yet
    models.load(staging_device="cpu")
    assert models.placement == "cpu" and models.dtype == torch.float16
    for model in (models.pipe.unet, models.pipe.controlnet, models.pipe.vae, models.pipe.text_encoder_2):
        parameter = next(model.parameters())
        assert parameter.device.type == "cpu" and parameter.dtype == torch.float16
    # The generate pipelines built over them share the weights without casting them (from_pipe's default is fp32).
    from modal_services.engines.sdxl.generate import TextToImage

    text_to_image, img2img = TextToImage(models, request_loras=None, instant_id=None)._pipelines()
    assert text_to_image.unet is models.pipe.unet and next(models.pipe.unet.parameters()).dtype == torch.float16


def test_the_sdxl_image_has_face_analysis_for_the_chosen_provider(app_module, monkeypatch):
    import importlib
    import sys

    assert {"insightface==2.1", "onnxruntime>=1.20", "opencv-python>=4.8"} <= set(app_module.FACE_PACKAGES)
    monkeypatch.setenv("TOOLBOX_FACE_PROVIDER", "cuda")
    sys.modules.pop("modal_services.app", None)
    on_gpu = importlib.import_module("modal_services.app")
    assert "onnxruntime-gpu>=1.20" in on_gpu.FACE_PACKAGES and "onnxruntime>=1.20" not in on_gpu.FACE_PACKAGES
    # Two builds of OpenCV install the same module: only the one insightface asks for.
    assert not any("headless" in package for package in on_gpu.FACE_PACKAGES)
