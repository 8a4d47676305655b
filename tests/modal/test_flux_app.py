"""FluxService's wiring, the precision it deploys with, and a Flux job through one container locally."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from modal_services.engines.flux import precision_for_gpu
from modal_services.jobs.records import JobStatus, create_job, load_job
from modal_services.jobs.requests import FluxGenerateRequest
from modal_services.layout import LORAS_MOUNT, MODELS_MOUNT, NSFW_CLASSIFIER_DIR, TAGGER_DIR
from modal_services.services import SERVICES
from modal_services.engines.sdxl.previews import preview_key
from modal_services.state.store import ModalDictStore
from tests.fakes.modal_fakes import FakeModalDict
from tests.fixtures.tiny_flux import build_tiny_flux_volume


def test_flux_service_wiring(app_module):
    options = app_module.recorded_options["FluxService"]
    assert options["gpu"] == "L40S"  # the default of TOOLBOX_FLUX_GPU
    assert options["image"] is app_module.flux_image
    assert options["volumes"] == {str(MODELS_MOUNT): app_module.models_volume, str(LORAS_MOUNT): app_module.loras_volume}
    assert options["enable_memory_snapshot"] is True and options["max_containers"] >= 1
    assert options["scaledown_window"] == app_module.SCALEDOWN_SECONDS  # scales to zero when idle
    assert app_module.FluxService._get_class_service_function()._spec_.gpus == "L40S"
    spec = SERVICES[FluxGenerateRequest]
    assert (spec.modal_class, spec.method_name, spec.previews) == ("FluxService", "generate", True)


@pytest.mark.parametrize("gpu, chosen", [("L40S", "bf16"), ("H100", "bf16"), ("A100-80GB", "bf16"), ("L4", "fp8"),
                                         ("A10G", "nf4"), ("a10g", "nf4")])
def test_the_deployed_precision_follows_the_gpu(gpu, chosen):
    assert precision_for_gpu(gpu, "auto") == chosen
    assert precision_for_gpu(gpu, "bf16") == "bf16"


def test_quantisers_are_installed_only_where_the_precision_needs_them(app_module):
    assert app_module.FLUX_PRECISION == "bf16" and app_module.FLUX_QUANTISERS.get("bf16") is None
    assert "torchao" in app_module.FLUX_QUANTISERS["fp8"][0] and "bitsandbytes" in app_module.FLUX_QUANTISERS["nf4"][0]


@pytest.mark.slow
async def test_one_flux_container_stages_in_host_memory_then_runs_a_judged_job(app_module, monkeypatch, tmp_path,
                                                                               tiny_nsfw_dirs, tiny_tagger_dirs):
    volume = build_tiny_flux_volume(tmp_path)
    (volume.models_dir / NSFW_CLASSIFIER_DIR).symlink_to(tiny_nsfw_dirs["passes"], target_is_directory=True)
    (volume.models_dir / TAGGER_DIR).symlink_to(tiny_tagger_dirs["safe"], target_is_directory=True)
    state = FakeModalDict()
    monkeypatch.setattr(app_module, "state_dict", state)
    monkeypatch.setattr(app_module, "MODELS_MOUNT", volume.models_dir)
    monkeypatch.setattr(app_module, "LORAS_MOUNT", volume.loras_dir)
    monkeypatch.setattr(app_module, "FLUX_DEVICE", "cpu")  # no GPU here
    store = ModalDictStore(state)
    service = app_module.FluxService()
    service._enter()  # modal's .local() skips sync @enter hooks before async methods: both phases run here
    assert service.engine.loaded and service.engine.placement == "cpu" and service.engine.precision == "bf16"
    assert service.classifier.loaded and service.tagger.loaded  # Flux's images are judged in its own container
    job = await create_job(store, "flux_generate")
    result = await service.generate.local(job.id, {"prompt": "a cat", "width": 512, "height": 512, "steps": 20,
                                                   "seed": 3, "timeout": 300})
    assert Image.open(io.BytesIO(result["images"][0])).size == (512, 512) and result["seeds"] == [3]
    assert result["safety"]["checked"] and result["safety"]["images"][0]["decision"] == "post"
    assert (await load_job(store, job.id)).status is JobStatus.DONE
    assert not await store.contains(preview_key(job.id))
