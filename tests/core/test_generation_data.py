"""Generation data: written into every result PNG in A1111's format, and read back from the files of every tool
that writes one (fixtures built here from each tool's documented format), hostile files included."""

from __future__ import annotations

import io
import json
import re
import time
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.result_images import fit_to_limit
from modal_services import __version__
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.image_info import containers, model_hashes
from modal_services.image_info.containers import embedded_metadata, exif_with_user_comment, with_png_text
from modal_services.image_info.reading import MAX_IMAGE_BYTES, read_generation_settings
from modal_services.image_info.settings import LoraUse
from modal_services.image_info.writing import MadeWith, sampler_of, with_generation_data
from modal_services.imaging import encode_png
from modal_services.layout import ILLUSTRIOUS_CHECKPOINT, LORAS_SUBDIR
from modal_services.state.durable import record_kind
from modal_services.state.keys import entry_key, manifest_key
from tests.images import noise_image

LORA_SHA256 = "ab12" * 16
CHECKPOINT_SHA256 = "cd34" * 16


def small_png(width: int = 64, height: int = 48) -> bytes:
    return encode_png(noise_image(width, height))


def png_with(texts: dict[str, str], compressed: bool = False) -> bytes:
    """A PNG with text chunks as Pillow (A1111's, ComfyUI's and NovelAI's writer) adds them."""
    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value, zip=compressed)
    buffer = io.BytesIO()
    noise_image(32, 32).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def with_user_comment(fmt: str, text: str, encoding: str = "utf-16-be") -> bytes:
    """A JPEG or WebP whose EXIF UserComment holds `text` after the `UNICODE\\0` prefix, as A1111 writes it."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode(encoding)
    buffer = io.BytesIO()
    noise_image(32, 32).save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue()


def write_sidecar(lora_file, sha256: str) -> None:
    """The library's sidecar beside a model file, written by the library's own record format."""
    key = entry_key(lora_file.name)
    entry = {"name": "Detail Tweaker", "file": lora_file.name, "type": "lora", "sha256": sha256}
    lora_file.with_suffix(".json").write_bytes(record_kind(key).encode(key, entry))


def write_manifest(models_dir, sha256: str) -> None:
    """Illustrious' base-model manifest, where the store keeps it on the models volume."""
    key = manifest_key("illustrious-xl")
    path = models_dir / record_kind(key).paths(key)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    name = ILLUSTRIOUS_CHECKPOINT.split("/", 1)[1]
    path.write_text(json.dumps({"key": "illustrious-xl", "files": {name: {"size": 4, "sha256": sha256}}}))


# ---------------------------------------------------------------- A1111's own rules, re-implemented from its parser

A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(text: str) -> dict[str, str]:
    """`parse_generation_parameters` (modules/infotext_utils.py) as A1111 reads a `parameters` text."""
    result, prompt, negative, done_with_prompt = {}, "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(A1111_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result["Prompt"], result["Negative prompt"] = prompt, negative
    for key, value in A1111_PARAM.findall(lastline):
        if value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        size = A1111_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


class Named:
    """A LoRA as a job ran it (LoraSpec's fields)."""

    def __init__(self, name, path, weight):
        self.name, self.path, self.weight = name, path, weight


class EulerAncestralDiscreteScheduler:
    """A scheduler as the pipeline holds one: what matters is its class name and config."""

    config = {}


def made_with(tmp_path, **changes) -> MadeWith:
    lora = tmp_path / "loras" / LORAS_SUBDIR / "detail_tweaker.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(b"weights")
    write_sidecar(lora, LORA_SHA256)
    checkpoint = tmp_path / "models" / ILLUSTRIOUS_CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"ckpt")
    write_manifest(tmp_path / "models", CHECKPOINT_SHA256)
    fields = dict(prompt="shiny, 1girl, (masterpiece:1.2), night sky", negative_prompt="lowres, bad hands", steps=28,
                  cfg=5.5, width=832, height=1216, sampler=sampler_of(EulerAncestralDiscreteScheduler()),
                  model="Illustrious-XL-v2.0", loras=[Named("Detail Tweaker", lora, 0.6)], checkpoint_file=checkpoint,
                  models_dir=tmp_path / "models")
    return MadeWith(**{**fields, **changes})


def test_the_text_is_what_a1111s_parser_reads_with_a1111s_field_names(tmp_path):
    text = made_with(tmp_path).text(seed=1234)
    read = a1111_parse(text)
    assert read["Prompt"] == "shiny, 1girl, (masterpiece:1.2), night sky <lora:Detail Tweaker:0.6>"
    assert read["Negative prompt"] == "lowres, bad hands"
    assert (read["Steps"], read["Sampler"], read["CFG scale"], read["Seed"]) == ("28", "Euler a", "5.5", "1234")
    assert (read["Size-1"], read["Size-2"]) == ("832", "1216")
    assert read["Model hash"] == CHECKPOINT_SHA256[:10] and read["Model"] == "Illustrious-XL-v2.0"
    assert read["Lora hashes"] == f"Detail Tweaker: {LORA_SHA256[:10]}"
    assert read["Version"] == f"AI Toolbox {__version__}"
    # In A1111's order, and nothing it would not write for such an image.
    settings_line = text.rsplit("\n", 1)[1]
    assert [key for key, _ in A1111_PARAM.findall(settings_line)] == [
        "Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Lora hashes", "Version"]


def test_a_schedule_type_quoted_values_and_a_variation_strength_follow_a1111s_writer(tmp_path):
    text = made_with(tmp_path, sampler=("DPM++ 2M", "Karras"), model="mix: v2, final", negative_prompt="",
                     denoising_strength=0.35).text(seed=7)
    read = a1111_parse(text)
    assert "Negative prompt:" not in text and read["Negative prompt"] == ""
    assert (read["Sampler"], read["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert 'Model: "mix: v2, final"' in text and read["Model"] == "mix: v2, final"
    assert read["Denoising strength"] == "0.35"
    assert list(a1111_parse(text))[2:5] == ["Steps", "Sampler", "Schedule type"]


def test_a_job_that_names_its_sampler_writes_that_one(tmp_path):
    made = made_with(tmp_path, sampler=sampler_of(EulerAncestralDiscreteScheduler(), named="DPM++ 2M SDE Karras"))
    read = a1111_parse(made.text(seed=1))
    assert (read["Sampler"], read["Schedule type"]) == ("DPM++ 2M SDE", "Karras")


@pytest.mark.slow  # importing diffusers
def test_diffusers_schedulers_are_named_as_a1111_names_them():
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    assert sampler_of(EulerDiscreteScheduler()) == ("Euler", None)
    assert sampler_of(EulerDiscreteScheduler(use_karras_sigmas=True)) == ("Euler", "Karras")
    assert sampler_of(DPMSolverMultistepScheduler()) == ("DPM++ 2M", None)
    assert sampler_of(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)) == (
        "DPM++ 2M SDE", "Karras")
    assert sampler_of(UniPCMultistepScheduler()) == ("UniPC", None)
    assert sampler_of(DDIMScheduler()) == ("DDIM", None)
    assert sampler_of(FlowMatchEulerDiscreteScheduler()) == ("Euler", None)


def test_a_model_whose_sha256_nobody_recorded_gets_no_hash_field(tmp_path):
    stranger = tmp_path / "loras" / LORAS_SUBDIR / "stranger.safetensors"
    made = made_with(tmp_path)
    stranger.write_bytes(b"unknown")
    other_checkpoint = tmp_path / "checkpoint-without-sidecar.safetensors"
    other_checkpoint.write_bytes(b"x")
    text = MadeWith(**{**made.__dict__, "loras": [Named("stranger", stranger, 1.0)],
                       "checkpoint_file": other_checkpoint}).text(seed=1)
    read = a1111_parse(text)
    assert "Model hash" not in read and "Lora hashes" not in read
    assert "<lora:stranger:1>" in read["Prompt"]


def test_a_request_loras_file_named_by_its_sha256_is_that_hash(tmp_path):
    sha256 = "9f" * 32
    kept = tmp_path / f"{sha256}.safetensors"
    kept.write_bytes(b"lora")
    assert model_hashes.recorded_sha256(kept) == sha256


def test_hashes_are_looked_up_once_per_file_not_per_image(tmp_path, monkeypatch):
    made = made_with(tmp_path)
    reads = []
    real_read = model_hashes._read
    monkeypatch.setattr(model_hashes, "_read", lambda path: reads.append(path) or real_read(path))
    model_hashes._recorded.cache_clear()
    result = {"images": [small_png(), small_png()], "seeds": [3, 4], "prompt": made.prompt, "negative_prompt": "",
              "steps": 28, "cfg": 5.5, "width": 64, "height": 48, "checkpoint": "Illustrious-XL-v2.0", "strength": None}
    tagged = with_generation_data(result, EulerAncestralDiscreteScheduler(), made.loras, made.checkpoint_file,
                                  made.models_dir)
    # The LoRA's sidecar, and the checkpoint's (absent) sidecar then its manifest: once each for both images.
    assert len(reads) == len(set(reads)) == 3
    seeds = [read_generation_settings(png).seed for png in tagged["images"]]
    assert seeds == [3, 4]


def test_the_chunk_is_added_without_encoding_the_pixels_again():
    png = small_png()
    tagged = with_png_text(png, "parameters", "a cat ✓\nSteps: 20, Sampler: Euler, CFG scale: 7")
    assert tagged.startswith(png[:33])  # the signature and IHDR as they were
    assert tagged.endswith(png[33:])  # every byte after them too: the chunk sits before the image data
    assert Image.open(io.BytesIO(tagged)).info["parameters"].endswith("CFG scale: 7")


# ---------------------------------------------------------------- a real generated image read back


@pytest.mark.slow
def test_a_generated_png_reads_back_to_the_settings_it_was_made_with(tmp_path_factory):
    from modal_services.engines.sdxl.engine import SdxlEngine
    from modal_services.jobs.requests import GenerateRequest
    from modal_services.layout import Layout
    from modal_services.net.transfer.files import sha256_file
    from tests.fixtures.tiny_sdxl_checkpoint import build_tiny_volume

    volume = build_tiny_volume(tmp_path_factory.mktemp("volume"))
    write_sidecar(volume.loras["detail"], LORA_SHA256)
    checkpoint_sha256 = sha256_file(volume.checkpoint)
    write_manifest(volume.models_dir, checkpoint_sha256)
    engine = SdxlEngine(Layout(volume.models_dir, volume.loras_dir), generate_preview_interval=0.0)
    engine.load()
    request = GenerateRequest.parse({
        "prompt": "a cat, night", "negative_prompt": "blurry", "width": 512, "height": 512, "steps": 20, "cfg": 1.0,
        "seed": 77, "count": 2, "timeout": 300,
        "loras": [{"name": "Detail Tweaker", "file": "detail.safetensors", "weight": 0.7, "trigger_words": ["shiny"]}],
    })
    result = engine.generate(request, lambda fraction, stage: None)
    for png, seed in zip(result["images"], [77, 78]):
        read = read_generation_settings(png)
        assert (read.source, read.prompt, read.negative_prompt) == ("A1111/Forge", "shiny, a cat, night", "blurry")
        assert (read.steps, read.cfg, read.seed, read.width, read.height) == (20, 1.0, seed, 512, 512)
        assert read.sampler == "Euler"  # the tiny checkpoint's config names EulerDiscreteScheduler
        assert (read.model, read.model_hash) == ("Illustrious-XL-v2.0", checkpoint_sha256[:10])
        assert read.loras == [LoraUse("Detail Tweaker", 0.7, LORA_SHA256[:10])]
        assert read.other["Version"] == f"AI Toolbox {__version__}"


# ---------------------------------------------------------------- fixtures of each tool's metadata

A1111_TEXT = ("masterpiece, 1girl, <lora:add_detail:0.5>, smile\nNegative prompt: worst quality,\nbad hands\n"
              'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, '
              'Model hash: 6ce0161689, Model: waiNSFWIllustrious_v110, Clip skip: 2, '
              'Lora hashes: "add_detail: 7c6bad76eb54, other: 0123456789", Version: v1.10.1')


def check_a1111(read):
    assert read.source == "A1111/Forge"
    assert read.prompt == "masterpiece, 1girl, smile"
    assert read.negative_prompt == "worst quality,\nbad hands"
    assert (read.steps, read.sampler, read.cfg, read.seed) == (30, "DPM++ 2M Karras", 6.5, 3141592653)
    assert (read.width, read.height, read.model, read.model_hash) == (832, 1216, "waiNSFWIllustrious_v110", "6ce0161689")
    assert read.loras == [LoraUse("add_detail", 0.5, "7c6bad76eb54"), LoraUse("other", None, "0123456789")]
    assert read.other == {"Clip skip": "2", "Version": "v1.10.1"}


@pytest.mark.parametrize("make", [
    lambda: png_with({"parameters": A1111_TEXT}),
    lambda: png_with({"parameters": A1111_TEXT}, compressed=True),  # zTXt
    lambda: with_user_comment("JPEG", A1111_TEXT),
    lambda: with_user_comment("WEBP", A1111_TEXT),
    lambda: with_user_comment("JPEG", A1111_TEXT, encoding="utf-16-le"),  # as some EXIF tools write it
], ids=["png-text", "png-ztxt", "jpeg-exif", "webp-exif", "jpeg-exif-little-endian"])
def test_a1111_and_forge_images_in_every_format(make):
    check_a1111(read_generation_settings(make()))


def test_unicode_parameters_in_an_itxt_chunk():
    read = read_generation_settings(png_with({"parameters": "猫, café\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"},
                                             compressed=True))
    assert (read.prompt, read.sampler) == ("猫, café", "Euler a")


COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": ["20", 0], "steps": 25, "cfg": 6.0, "sampler_name": "euler_ancestral", "scheduler": "normal",
        "denoise": 1.0, "model": ["11", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SDXL\\illustriousXL_v20.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "styles/watercolor.safetensors", "strength_model": 0.8,
                                                  "strength_clip": 1.0, "model": ["4", 0], "clip": ["4", 1]}},
    "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "detail.safetensors", "strength_model": 0.4,
                                                           "model": ["10", 0]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1536, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "1girl, watercolor", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "lowres", "clip": ["10", 1]}},
    "20": {"class_type": "PrimitiveNode", "inputs": {"value": 987654321}},
    # The hires pass: a second sampler at denoise 0.4, which is not the one read.
    "30": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 12, "cfg": 4.0, "sampler_name": "dpmpp_2m",
                                                "scheduler": "karras", "denoise": 0.4, "model": ["4", 0]}},
}
COMFY_WORKFLOW = {
    "nodes": [
        {"id": 3, "type": "KSampler", "widgets_values": [555, "randomize", 30, 7.5, "dpmpp_2m", "karras", 1.0],
         "inputs": [{"name": "model", "link": 1}, {"name": "positive", "link": 2}, {"name": "negative", "link": 3},
                    {"name": "latent_image", "link": 4}]},
        {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["noobai.safetensors"]},
        {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a fox in snow"]},
        {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["blurry"]},
        {"id": 5, "type": "EmptyLatentImage", "widgets_values": [896, 1152, 1]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 6, 0, 3, 1, "CONDITIONING"], [3, 7, 0, 3, 2, "CONDITIONING"],
              [4, 5, 0, 3, 3, "LATENT"]],
}


def test_comfyui_prompt_graph():
    read = read_generation_settings(png_with({"prompt": json.dumps(COMFY_PROMPT), "workflow": json.dumps(COMFY_WORKFLOW)}))
    assert (read.source, read.prompt, read.negative_prompt) == ("ComfyUI", "1girl, watercolor", "lowres")
    assert (read.seed, read.steps, read.cfg, read.sampler) == (987654321, 25, 6.0, "Euler a")
    assert (read.width, read.height, read.model) == (1024, 1536, "illustriousXL_v20")
    assert read.loras == [LoraUse("detail", 0.4), LoraUse("watercolor", 0.8)]


def test_comfyui_workflow_alone():
    read = read_generation_settings(png_with({"workflow": json.dumps(COMFY_WORKFLOW)}))
    assert (read.prompt, read.negative_prompt, read.seed, read.steps, read.cfg) == ("a fox in snow", "blurry", 555, 30, 7.5)
    assert (read.sampler, read.width, read.height, read.model) == ("DPM++ 2M Karras", 896, 1152, "noobai")


def test_novelai_comment():
    comment = {"prompt": "1girl, {{smile}}", "uc": "lowres", "steps": 28, "scale": 5, "seed": 42, "width": 832,
               "height": 1216, "sampler": "k_euler_ancestral", "noise_schedule": "karras", "cfg_rescale": 0}
    read = read_generation_settings(png_with({"Title": "NovelAI generated image", "Description": "1girl, {{smile}}",
                                              "Software": "NovelAI", "Source": "NovelAI Diffusion V4.5 4BDE2A90",
                                              "Comment": json.dumps(comment)}))
    assert (read.source, read.prompt, read.negative_prompt) == ("NovelAI", "1girl, {{smile}}", "lowres")
    assert (read.steps, read.cfg, read.seed, read.width, read.height) == (28, 5.0, 42, 832, 1216)
    assert (read.sampler, read.model) == ("Euler a Karras", "NovelAI Diffusion V4.5 4BDE2A90")
    assert read.other == {"cfg_rescale": "0"}


def test_invokeai_metadata():
    metadata = {"generation_mode": "sdxl_txt2img", "positive_prompt": "a castle", "negative_prompt": "fog",
                "width": 1024, "height": 1024, "seed": 9, "cfg_scale": 6.5, "steps": 35, "scheduler": "dpmpp_2m_k",
                "model": {"key": "k1", "hash": "sha256:" + LORA_SHA256, "name": "Juggernaut XL", "base": "sdxl"},
                "loras": [{"model": {"key": "k2", "hash": "blake3:ffee", "name": "Pixel Art"}, "weight": 0.75}]}
    read = read_generation_settings(png_with({"invokeai_metadata": json.dumps(metadata)}))
    assert (read.source, read.prompt, read.negative_prompt, read.sampler) == ("InvokeAI", "a castle", "fog", "DPM++ 2M Karras")
    assert (read.model, read.model_hash, read.steps, read.cfg) == ("Juggernaut XL", "sha256:" + LORA_SHA256, 35, 6.5)
    assert read.loras == [LoraUse("Pixel Art", 0.75, "blake3:ffee")]


def test_an_image_without_metadata_gives_none():
    assert read_generation_settings(small_png()) is None
    assert read_generation_settings(png_with({"Software": "GIMP"})) is None


# ---------------------------------------------------------------- hostile files


@pytest.mark.parametrize("data, words", [
    (b"", "empty"), (b"GIF89a" + b"\x00" * 10, None), (b"not an image", "not an image"),
])
def test_what_is_no_image_is_refused_in_words(data, words):
    if words is None:
        assert read_generation_settings(data) is None  # a GIF: a format read, with no metadata kind
        return
    with pytest.raises(ToolboxError) as error:
        read_generation_settings(data, "`x.png`")
    assert error.value.code is ErrorCode.INVALID_INPUT and words in error.value.message and "`x.png`" in error.value.message


def test_a_file_over_the_size_cap_is_refused_before_any_parsing():
    with pytest.raises(ToolboxError) as error:
        read_generation_settings(small_png() + b"\x00" * MAX_IMAGE_BYTES)
    assert "MiB" in error.value.message


def test_text_beyond_the_caps_is_skipped_and_a_zlib_bomb_is_not_inflated():
    huge = png_with({"parameters": "x" * (containers.MAX_BLOCK_BYTES + 10)})
    assert read_generation_settings(huge) is None
    bomb = zlib.compress(b"a" * (64 * 1024 * 1024), 9)  # 64 MiB inflated, about 64 KB here
    body = b"parameters\x00\x00" + bomb
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")
    png = small_png()
    started = time.monotonic()
    assert read_generation_settings(png[:33] + chunk + png[33:]) is None
    assert time.monotonic() - started < 2


def test_a_truncated_file_gives_what_came_before_the_damage():
    png = png_with({"parameters": "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5"})
    assert read_generation_settings(png[: png.index(b"IDAT") + 20]).seed == 5
    assert read_generation_settings(png[:40]) is None


def test_control_characters_and_terminal_escapes_are_removed():
    text = "cat\x1b[31m red\x00\x07, @everyone\nSteps: 20\x1b[2J, Sampler: Euler\u202e, CFG scale: 7, Seed: 1"
    read = read_generation_settings(png_with({"parameters": text}, compressed=True))
    assert read.prompt == "cat [31m red  , @everyone"
    assert read.sampler == "Euler" and read.steps is None  # "20\x1b[2J" is no number
    assert not any(ord(ch) < 32 or ch == "\u202e" for ch in read.prompt + read.sampler)


def test_bad_or_deep_json_and_looping_graphs_read_as_nothing_or_end():
    deep = "[" * 200_000 + "]" * 200_000
    assert read_generation_settings(png_with({"prompt": deep, "workflow": "{not json"})) is None
    looping = {"1": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "steps": 20,
                                                          "seed": ["4", 0]}},
               "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "a.safetensors", "model": ["2", 0]}},
               "3": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["3", 0]}},
               "4": {"class_type": "Reroute", "inputs": {"value": ["4", 0]}}}
    read = read_generation_settings(png_with({"prompt": json.dumps(looping)}))
    assert (read.steps, read.prompt, read.seed, read.model) == (20, "", None, None)
    assert read.loras == [LoraUse("a", None)]


def test_hostile_settings_lines_take_linear_time():
    for line in ("a" * 60_000, "k: " * 20_000, 'k: "\\' * 15_000, "a: b, " * 10_000):
        started = time.monotonic()
        read_generation_settings(png_with({"parameters": "prompt\n" + line}, compressed=True))
        assert time.monotonic() - started < 1.5, line[:10]


def test_a_flood_of_fields_and_loras_is_bounded():
    pairs = ", ".join(f"Key{n}: {n}" for n in range(500))
    tags = " ".join(f"<lora:l{n}:1>" for n in range(500))
    read = read_generation_settings(png_with({"parameters": f"{tags}\n{pairs}"}, compressed=True))
    assert len(read.other) == 40 and len(read.loras) == 20


# ---------------------------------------------------------------- results re-encoded to fit Discord


def test_a_result_sent_as_webp_keeps_its_generation_data():
    text = "a big picture\nNegative prompt: blur\nSteps: 28, Sampler: Euler a, CFG scale: 5.5, Seed: 99, Size: 640x480"
    png = with_png_text(encode_png(noise_image(640, 480)), "parameters", text)
    fitted = fit_to_limit(png, len(png) // 2, "image1")
    assert fitted.filename == "image1.webp" and "generation data" not in fitted.note
    read = read_generation_settings(fitted.data)
    assert (read.prompt, read.negative_prompt, read.seed, read.width) == ("a big picture", "blur", 99, 640)


def test_a_jpeg_says_when_the_generation_data_did_not_fit(monkeypatch):
    import bot.result_images

    picture = noise_image(80, 60).resize((640, 480))  # smooth: libjpeg's optimiser cannot take pure noise at q95
    real = bot.result_images._best_quality
    # A WebP never small enough: the JPEG is what is sent.
    monkeypatch.setattr(bot.result_images, "_best_quality",
                        lambda image, fmt, limit, exif: None if fmt == "WEBP" else real(image, fmt, limit, exif))
    short = with_png_text(encode_png(picture), "parameters", "cat\nSteps: 20, Sampler: Euler, CFG scale: 7")
    fitted = fit_to_limit(short, len(short) // 2, "image1")
    assert fitted.filename == "image1.jpg" and "generation data" not in fitted.note
    assert read_generation_settings(fitted.data).prompt == "cat"
    long = with_png_text(encode_png(picture), "parameters", "cat " * 9000 + "\nSteps: 20, Seed: 1, CFG scale: 7")
    assert len(exif_with_user_comment(embedded_metadata(long).texts["parameters"])) > containers.JPEG_SEGMENT_LIMIT
    fitted = fit_to_limit(long, len(long) // 2, "image1")
    assert "its generation data is too long for a JPEG and was left out" in fitted.note
    assert read_generation_settings(fitted.data) is None


# ---------------------------------------------------------------- Flux, and what Generate with these settings makes


def test_flux_guidance_is_written_as_forge_writes_it_and_planned_back_as_guidance(tmp_path):
    text = made_with(tmp_path, model="flux1-dev", cfg=3.5, negative_prompt="", loras=[], checkpoint_file=None,
                     distilled_guidance=True).text(seed=2)
    read = a1111_parse(text)
    assert (read["CFG scale"], read["Distilled CFG Scale"], read["Model"]) == ("1", "3.5", "flux1-dev")


async def test_a_flux_image_plans_a_flux_generate_with_its_guidance(library):
    from bot.core.image_settings import plan_generate
    from modal_services.image_info.infotext import parse_infotext

    settings = parse_infotext("a lighthouse, <lora:Flux Detail:0.9>\nNegative prompt: fog\n"
                              "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
                              "Seed: 11, Size: 1024x1024, Model: flux1-dev-bnb-nf4")
    remake = await plan_generate(settings, library)
    assert remake.problem is None
    assert remake.params == {"prompt": "a lighthouse", "negative": None, "model": "flux", "width": 1024, "height": 1024,
                             "steps": 20, "cfg": 3.5, "seed": 11,
                             "loras": [{"name": "flux_detail.safetensors", "weight": 0.9}]}
    assert "Flux takes no negative prompt: the image's is left out." in remake.notes


async def test_loras_are_found_by_autov2_or_full_sha256_never_by_another_hash(library, store):
    from bot.core.image_settings import lora_by_hash
    from modal_services.library.entries import LibraryEntry

    entry = LibraryEntry(name="Detail", file="detail.safetensors", type="lora", sha256=LORA_SHA256)
    assert lora_by_hash([entry], LORA_SHA256[:10]) is entry
    assert lora_by_hash([entry], LORA_SHA256.upper()) is entry
    assert lora_by_hash([entry], "sha256:" + LORA_SHA256) is entry
    assert lora_by_hash([entry], LORA_SHA256[:12]) is None  # A1111's own 12-digit hash is not the file's sha256
    assert lora_by_hash([entry], "blake3:" + LORA_SHA256) is None and lora_by_hash([entry], None) is None


async def test_values_out_of_range_are_brought_in_and_a_seed_too_large_is_redrawn(library):
    from bot.core.image_settings import plan_generate
    from modal_services.image_info.settings import GenerationSettings

    settings = GenerationSettings(source="ComfyUI", prompt="a cat", steps=8, cfg=30, seed=2**40, width=3000,
                                  height=300, loras=[LoraUse("Detail", 5.0), LoraUse("nowhere", 1.0)])
    remake = await plan_generate(settings, library)
    params = remake.params
    assert (params["steps"], params["cfg"], params["seed"], params["width"], params["height"]) == (20, 20, None, 1536, 512)
    assert params["loras"] == [{"name": "detail.safetensors", "weight": 2.0}]
    assert [lora.name for lora in remake.missing] == ["nowhere"]
    assert remake.notes == [
        "Size 3000×300 is not one SDXL makes: 1536×512 is used.", "Steps 8 is outside 20-50 here: 20 is used.",
        "CFG 30 is outside 1-20 here: 20 is used.", f"Seed {2**40} is outside 0-4294967295: a random seed is used.",
        "LoRA Detail at 5 is outside -2-2: 2 is used.",
    ]


async def test_the_images_checkpoint_is_generated_with_when_the_library_has_it(library, store):
    """By version id, by AutoV2 hash, by name; the active one needs no choice; one the library lacks is named."""
    from bot.core.image_settings import plan_generate
    from modal_services.image_info.settings import GenerationSettings
    from modal_services.library.entries import ACTIVE_CHECKPOINT_KEY, LibraryEntry, entry_key

    wai = LibraryEntry(name="WAI", file="wai_v14.safetensors", type="checkpoint", sha256="bdb59bac77" + "0" * 54,
                       civitai_version_id=1183765)
    await store.put(entry_key(wai.file), wai.to_dict())
    for found in (dict(model_version_id=1183765), dict(model_hash="BDB59BAC77"), dict(model="wai_v14"),
                  dict(model="Pony Mix", model_version_id=5)):
        remake = await plan_generate(GenerationSettings(source="CivitAI", prompt="a cat", **found), library)
        expected = "pony_mix.safetensors" if found.get("model") == "Pony Mix" else "wai_v14.safetensors"
        assert remake.params["checkpoint"] == expected and remake.missing_checkpoint is None, found
    await store.put(ACTIVE_CHECKPOINT_KEY, wai.file)
    remake = await plan_generate(GenerationSettings(source="CivitAI", prompt="a cat", model_version_id=1183765), library)
    assert "checkpoint" not in remake.params and remake.notes == []
    remake = await plan_generate(GenerationSettings(source="CivitAI", prompt="a cat", model="Other", model_version_id=9),
                                 library)
    assert "checkpoint" not in remake.params and remake.importable() == [("Other", 9)]
    assert remake.notes == ["Made with the checkpoint Other, which is not in the library: WAI is used."]
