"""The cheap checks come before any image is decoded: the token, the caller's cap, the optional models a
request needs, then each image's header for its pixel limit. A 16-bit PNG of 39.9 MP that compresses to about
a megabyte is the attack: decoded, it costs over a second of CPU and hundreds of MB.

Pillow decodes pixels in `ImageFile.load` and reads a header in `Image.open`: the tests count both.
"""

from __future__ import annotations

import base64
import struct
import time
import zlib

import pytest
from PIL import Image, ImageFile

from tests.api.test_api import assert_error, gated_engine, generate_engine, served  # noqa: F401 (fixtures)
from tests.fakes.engines import SlowCaptionEngine
from tests.fixtures.tiny_instantid import enable_instantid
from modal_services.jobs.requests import CaptionRequest, UpscaleRequest

HUGE_SIDES = (7300, 5466)  # 39.9 MP


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def huge_png() -> str:
    """A black 16-bit RGB PNG of 39.9 MP, base64: about 1 MB on the wire, 240 MB of raw pixels."""
    width, height = HUGE_SIDES
    rows = (b"\x00" + bytes(width * 6)) * 64
    packer = zlib.compressobj(1)
    pixels = b"".join(packer.compress(rows) for _ in range(height // 64))
    pixels += packer.compress((b"\x00" + bytes(width * 6)) * (height % 64)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


@pytest.fixture
def image_reads(monkeypatch) -> dict[str, int]:
    """How many images were opened (a header read) and decoded (pixels) since the test began."""
    counts = {"opened": 0, "decoded": 0}
    open_image, load = Image.open, ImageFile.ImageFile.load

    def counted_open(*args, **kwargs):
        counts["opened"] += 1
        return open_image(*args, **kwargs)

    def counted_load(self):
        counts["decoded"] += 1
        return load(self)

    monkeypatch.setattr(Image, "open", counted_open)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
    return counts


@pytest.fixture
def job_engines(stand_in_engines, generate_engine):  # noqa: F811
    stand_in_engines.use(CaptionRequest, SlowCaptionEngine(delay=0))
    stand_in_engines.use(UpscaleRequest, generate_engine)  # one SDXL engine does both


@pytest.mark.parametrize("path, body, words", [
    ("/generate-image", {"prompt": "a portrait", "reference_image_base64": None},
     "reference_image_base64 is 7300×5466 (39.9 MP); the limit is 25 MP."),
    ("/generate-image", {"prompt": "a portrait", "reference_image_base64": "small", "pose_image_base64": None},
     "pose_image_base64 is 7300×5466 (39.9 MP); the limit is 25 MP."),
    ("/jobs", {"kind": "caption", "images_base64": ["small", None]},
     "images_base64.1 is 7300×5466 (39.9 MP); the limit is 25 MP."),
    ("/jobs", {"kind": "upscale", "image_base64": None}, "The file to upscale is 7300×5466 (39.9 MP)"),
])
async def test_a_huge_but_small_png_is_refused_from_its_header_without_a_decode(
        served, job_engines, huge_png, image_reads, path, body, words):
    client, backend = await served()
    await enable_instantid(backend.store)
    small = base64.b64encode(_small_png()).decode()
    body = {name: _filled(value, huge_png, small) for name, value in body.items()}
    started = time.perf_counter()
    error = assert_error(await client.post(path, json=body), 400, "INVALID_INPUT")
    elapsed = time.perf_counter() - started
    assert error["error"].startswith(words)
    # Only headers were read: not one image decoded, not even the small one sent beside the huge one.
    assert image_reads["decoded"] == 0 and image_reads["opened"] >= 1
    assert elapsed < 1.0, f"{elapsed:.2f} s: the image was decoded"
    assert await backend.store.keys("job:") == []


async def test_a_caller_at_its_cap_is_refused_before_any_image_is_read(served, gated_engine, huge_png, image_reads):  # noqa: F811
    client, backend = await served(concurrency=1)
    await enable_instantid(backend.store)
    assert (await client.post("/jobs", json={"kind": "generate", "prompt": "a cat"})).status_code == 202
    for path, body in (("/generate-image", {"prompt": "a portrait", "reference_image_base64": huge_png}),
                       ("/jobs", {"kind": "caption", "images_base64": [huge_png]}),
                       ("/jobs", {"kind": "upscale", "image_base64": huge_png})):
        assert_error(await client.post(path, json=body), 429, "RATE_LIMITED")
    assert image_reads == {"opened": 0, "decoded": 0}
    assert len(await backend.store.keys("job:")) == 1


async def test_a_feature_not_enabled_is_refused_before_any_image_is_read(served, generate_engine, huge_png,  # noqa: F811
                                                                         image_reads):
    client, backend = await served()
    # InstantID is not enabled on this bot.
    error = assert_error(await client.post("/generate-image", json={"prompt": "a portrait",
                                                                    "reference_image_base64": huge_png}),
                         503, "MODELS_MISSING")
    assert "InstantID" in error["error"]
    # Flux takes no face photo at all.
    await enable_instantid(backend.store)
    assert_error(await client.post("/generate-image", json={"prompt": "a portrait", "model": "flux",
                                                            "reference_image_base64": huge_png}),
                 400, "INVALID_INPUT")
    assert image_reads == {"opened": 0, "decoded": 0}
    assert await backend.store.keys("job:") == []


async def test_images_within_the_limits_are_decoded_once_the_checks_pass(served, job_engines, image_reads):
    client, backend = await served()
    await enable_instantid(backend.store)
    photo = base64.b64encode(_small_png()).decode()
    response = await client.post("/generate-image", json={"prompt": "a portrait", "reference_image_base64": photo})
    assert response.status_code == 200, response.text
    assert image_reads["decoded"] >= 1


def _small_png() -> bytes:
    from tests.images import png_bytes

    return png_bytes(64, 64)


def _filled(value, huge: str, small: str):
    """A body value with its placeholders filled: None is the huge PNG, "small" a small one."""
    if isinstance(value, list):
        return [_filled(item, huge, small) for item in value]
    if value is None:
        return huge
    return small if value == "small" else value
