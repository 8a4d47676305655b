"""Pickled weights become safetensors at download time; a pickle that carries code is refused unrun."""

from __future__ import annotations

import asyncio
import hashlib
import io
import pickle

import pytest
import torch
from safetensors.torch import load_file

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.state.keys import download_key, manifest_key
from modal_services.base_models.pickle_weights import convert_pickle
from modal_services.base_models.registry import HFSource, ModelEntry
from tests.fixtures.tiny_instantid import face_adapter_tree
from tests.base_models.test_downloads import hf_hub, hub, make_engine, run, sleeps, store  # noqa: F401 (fixtures)


class RunsCode:
    """What a hostile pickle does: asks the unpickler to call a function of its choosing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickled(tree) -> bytes:
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    return buffer.getvalue()


def test_nested_tensors_become_one_flat_safetensors_file_and_the_pickle_goes(tmp_path):
    tree = face_adapter_tree()
    source, target = tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors"
    source.write_bytes(pickled(tree))
    convert_pickle(source, target)
    flat = load_file(str(target))
    assert not source.exists() and not list(tmp_path.glob("*.partial"))
    assert set(flat) == {f"{part}.{key}" for part, tensors in tree.items() for key in tensors}
    torch.testing.assert_close(flat["image_proj.latents"], tree["image_proj"]["latents"])


@pytest.mark.parametrize("payload", ["code", "object", "not a pickle"])
def test_a_pickle_with_code_or_anything_but_tensors_is_refused_and_deleted(tmp_path, payload):
    marker = tmp_path / "ran"
    source, target = tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors"
    if payload == "code":
        # Also a plain pickle (no torch zip): the oldest trick in the book.
        source.write_bytes(pickle.dumps({"image_proj": RunsCode(marker)}))
    elif payload == "object":
        source.write_bytes(pickled({"image_proj": {"latents": torch.zeros(2)}, "note": "a string"}))
    else:
        source.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ToolboxError) as error:
        convert_pickle(source, target)
    assert error.value.code is ErrorCode.INCOMPATIBLE_MODEL
    assert not marker.exists() and not source.exists() and not target.exists()


PICKLED_ENTRY = {
    "faces": ModelEntry("faces", "Face adapter", HFSource("org/faces", include=("ip-adapter.bin",)), "faces",
                        approx_bytes=1000, converted={"ip-adapter.bin": "ip-adapter.safetensors"}),
}


async def test_a_download_keeps_only_the_converted_file_and_its_manifest_says_so(hf_hub, tmp_path, store, sleeps):
    hf_hub.add_file("org/faces", "ip-adapter.bin", pickled(face_adapter_tree()))
    engine = make_engine(tmp_path, store, registry=PICKLED_ENTRY)
    result, _ = await asyncio.to_thread(run, engine, keys=["faces"])
    folder = tmp_path / "models" / "faces"
    assert result == {"faces": "downloaded"}
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["ip-adapter.safetensors"]
    manifest = await store.get(manifest_key("faces"))
    converted = folder / "ip-adapter.safetensors"
    assert list(manifest["files"]) == ["ip-adapter.safetensors"]
    assert manifest["files"]["ip-adapter.safetensors"]["sha256"] == hashlib.sha256(converted.read_bytes()).hexdigest()
    assert manifest["size_bytes"] == converted.stat().st_size
    # Present from now on: nothing is fetched again.
    gets = len(hf_hub.body_requests("/resolve/"))
    result, _ = await asyncio.to_thread(run, engine, keys=["faces"])
    assert result == {"faces": "present"} and len(hf_hub.body_requests("/resolve/")) == gets


async def test_a_download_whose_pickle_carries_code_fails_and_leaves_nothing(hf_hub, tmp_path, store, sleeps):
    marker = tmp_path / "ran"
    hf_hub.add_file("org/faces", "ip-adapter.bin", pickle.dumps({"image_proj": RunsCode(marker)}))
    engine = make_engine(tmp_path, store, registry=PICKLED_ENTRY)
    with pytest.raises(ToolboxError) as error:
        await asyncio.to_thread(run, engine, keys=["faces"])
    assert error.value.code is ErrorCode.INCOMPATIBLE_MODEL and "refused" in error.value.message
    assert not marker.exists()
    assert not [p for p in (tmp_path / "models" / "faces").iterdir() if p.is_file()]
    assert await store.get(manifest_key("faces")) is None
    assert (await store.get(download_key("faces")))["status"] == "failed"
