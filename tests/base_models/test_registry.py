"""The base-model registry: the contract's keys, the layout's paths, extensible sources."""

from __future__ import annotations

import pytest

from modal_services import layout
from modal_services.net.fetchers import FETCHERS
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.base_models.registry import BASE_MODELS, SDXL_CONFIG_FILES, get_entry, models_for, resolve_keys


def test_keys_are_the_contract():
    assert [key for key, entry in BASE_MODELS.items() if entry.optional is None] == [
        "illustrious-xl", "controlnet-tile", "sdxl-vae", "ip-adapter", "clip-vit-h", "qwen3-vl-2b", "sdxl-base",
        "nsfw-classifier", "wd-tagger"]
    assert [key for key, entry in BASE_MODELS.items() if entry.optional is not None] == [
        "flux1-dev", "instantid", "antelopev2"]


def test_instantids_models_are_optional_with_their_licences_and_land_where_the_engine_looks():
    from modal_services.base_models.registry import INSTANTID_MODELS

    instantid, antelopev2 = (BASE_MODELS[key] for key in INSTANTID_MODELS)
    assert "research" in instantid.optional.summary.lower() and "InstantX/InstantID" in instantid.optional.url
    assert "non-commercial" in antelopev2.optional.summary.lower()
    files = {f"{instantid.folder}/{instantid.dest_for(path)}" for path in instantid.source.include}
    assert {f"{layout.INSTANTID_CONTROLNET_DIR}/config.json",
            f"{layout.INSTANTID_CONTROLNET_DIR}/diffusion_pytorch_model.safetensors"} <= files
    # The pickle is fetched, and only its safetensors conversion is kept where the engine reads it.
    (pickled, converted), = instantid.converted.items()
    assert pickled in instantid.source.include and pickled.endswith(".bin")
    assert f"{instantid.folder}/{converted}" == layout.INSTANTID_ADAPTER_FILE
    # Every face-analysis file is pinned by its sha256.
    assert antelopev2.folder == layout.ANTELOPEV2_DIR
    assert set(antelopev2.published) == set(antelopev2.source.include)
    assert all(len(published.sha256) == 64 for published in antelopev2.published.values())
    assert not instantid.needed_by and not antelopev2.needed_by  # a plain /generate never waits for them


def test_files_land_where_the_engines_look():
    def dest(key: str, repo_path: str) -> str:
        entry = BASE_MODELS[key]
        return f"{entry.folder}/{entry.dest_for(repo_path)}"

    assert dest("illustrious-xl", "Illustrious-XL-v2.0.safetensors") == layout.ILLUSTRIOUS_CHECKPOINT
    assert dest("ip-adapter", "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors") == layout.IP_ADAPTER_FILE
    assert BASE_MODELS["qwen3-vl-2b"].folder == layout.CAPTION_MODEL
    assert BASE_MODELS["controlnet-tile"].folder == layout.CONTROLNET_TILE_DIR
    assert BASE_MODELS["sdxl-vae"].folder == layout.SDXL_VAE_DIR
    assert BASE_MODELS["clip-vit-h"].folder == layout.CLIP_VIT_H_DIR
    assert BASE_MODELS["sdxl-base"].folder == layout.SDXL_CONFIG_DIR


def test_sdxl_base_is_configs_and_tokenizers_only():
    include = BASE_MODELS["sdxl-base"].source.include
    assert include == SDXL_CONFIG_FILES
    assert "unet/config.json" in include and "tokenizer_2/*" in include
    assert not any(name.endswith((".safetensors", ".bin")) for name in include)


def test_every_source_kind_has_a_fetcher():
    for entry in BASE_MODELS.values():
        assert entry.source.kind in FETCHERS and entry.volume == "models" and entry.approx_bytes > 0


def test_resolve_and_purposes():
    assert [e.key for e in resolve_keys(["sdxl-base", "illustrious-xl", "sdxl-base"])] == ["illustrious-xl", "sdxl-base"]
    assert len(resolve_keys(None)) == 9 and len(resolve_keys(None, enabled={"instantid"})) == 10
    assert models_for("caption") == ["qwen3-vl-2b"]
    assert "qwen3-vl-2b" not in models_for("upscale") and "sdxl-base" in models_for("upscale")
    assert "nsfw-classifier" in models_for("upscale") and "nsfw-classifier" in models_for("generate")
    # The tagger judges every image-making kind's images (its drawn-minor rule never turns off).
    assert all("wd-tagger" in models_for(kind) for kind in ("upscale", "generate", "flux_generate"))
    with pytest.raises(ToolboxError) as caught:
        get_entry("flux")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "illustrious-xl" in caught.value.message
