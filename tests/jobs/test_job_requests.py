"""The job requests: one set of limits for every front end, the worker and the /settings defaults."""

from __future__ import annotations

import typing

import pytest

from bot.guild_settings import GuildSettings
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import (
    CAPTION_STYLES,
    POSE_NEEDS_A_FACE,
    CaptionRequest,
    FluxGenerateRequest,
    GenerateRequest,
    LoraRef,
    ModelImportRequest,
    ModelUploadRequest,
    TextToImageRequest,
    UpscaleRequest,
)
from modal_services.jobs.validation import field_bounds, field_choices
from modal_services.services import SERVICES


@pytest.fixture
async def options(make_toolbox_bot):
    """Each command's serialised options as `tree.sync()` sends them, by command path then option name."""
    toolbox_bot = await make_toolbox_bot()
    found: dict[str, dict[str, dict]] = {}

    def collect(path: str, options: list[dict]) -> None:
        for option in options:
            if option["type"] in (1, 2):  # a subcommand or group
                collect(f"{path} {option['name']}", option.get("options", []))
            else:
                found.setdefault(path, {})[option["name"]] = option

    for command in toolbox_bot.tree.get_commands():
        payload = command.to_dict(toolbox_bot.tree)
        collect(payload["name"], payload.get("options", []))
    return found


def assert_range(option: dict, model, field: str) -> None:
    low, high = field_bounds(model, field)
    if option["type"] == 3:  # a string: the length range
        assert (option.get("min_length"), option.get("max_length")) == (low, high), option["name"]
    else:
        assert (option.get("min_value"), option.get("max_value")) == (low, high), option["name"]


UPSCALE_OPTIONS = {"scale": "scale", "prompt": "prompt", "negative": "negative", "creativity": "creativity",
                   "seed": "seed"}


@pytest.mark.parametrize("option, field", UPSCALE_OPTIONS.items())
def test_upscale_option_ranges_are_the_requests(options, option, field):
    assert_range(options["upscale"][option], UpscaleRequest, field)


@pytest.mark.parametrize("option", ["lora1_weight", "lora2_weight", "lora3_weight"])
def test_upscale_lora_weights_are_the_requests(options, option):
    assert_range(options["upscale"][option], LoraRef, "weight")


def test_models_options_are_the_requests(options):
    assert_range(options["models edit"]["weight"], LoraRef, "weight")
    assert_range(options["models import"]["source"], ModelImportRequest, "ref")
    for command, name_option in (("models upload", "name"), ("models edit", "display_name")):
        assert_range(options[command][name_option], ModelUploadRequest, "name")
        assert_range(options[command]["trigger_words"], ModelUploadRequest, "trigger_words")


def test_caption_options_are_the_requests(options):
    assert_range(options["caption"]["question"], CaptionRequest, "question")
    assert [choice["value"] for choice in options["caption"]["style"]["choices"]] == list(field_choices(CaptionRequest, "style"))


@pytest.mark.parametrize("option, field", [("upscale_scale", "default_upscale_scale"),
                                           ("creativity", "default_creativity"),
                                           ("user_cap", "user_cap"), ("guild_cap", "guild_cap")])
def test_settings_default_ranges_are_the_requests(options, option, field):
    assert_range(options["settings defaults"][option], GuildSettings, field)


def test_settings_defaults_use_the_job_fields():
    # The defaults are typed with the job's own fields: same limits, so a stored default is one a job accepts.
    assert field_bounds(GuildSettings, "default_creativity") == field_bounds(UpscaleRequest, "creativity")
    assert field_bounds(GuildSettings, "default_upscale_scale") == field_bounds(UpscaleRequest, "scale")
    assert field_choices(GuildSettings, "default_caption_style") == tuple(CAPTION_STYLES)


@pytest.mark.parametrize("changes, words", [
    ({"default_creativity": 0.0}, "Creativity must be between 0.05 and 1"),
    ({"default_upscale_scale": 9.0}, "Scale must be between"),
    ({"default_caption_style": "poem"}, "caption style"),
    ({"user_cap": 50, "guild_cap": 10}, "cap"),
])
def test_settings_refuse_a_default_a_job_would_refuse(changes, words):
    with pytest.raises(ToolboxError) as error:
        GuildSettings().changed(**changes)
    assert error.value.code is ErrorCode.INVALID_INPUT and words in error.value.message


def test_a_default_stored_before_the_checks_falls_back_to_the_builtin():
    stored = GuildSettings.from_dict({"default_creativity": 0, "allowed_role_ids": [5], "user_cap": 3})
    assert stored.default_creativity == UpscaleRequest.model_fields["creativity"].default
    assert stored.allowed_role_ids == [5] and stored.user_cap == 3


@pytest.mark.parametrize("payload, words", [
    ({"creativity": 5}, "Creativity must be between 0.05 and 1 (got 5)."),
    ({"seed": -1}, "The seed must be between 0 and 4294967295 (got -1)."),
    ({"seed": "abc"}, "The seed must be a whole number"),
    ({"scale": float("nan")}, "Scale must be a number"),
    ({"prompt": "x" * 1001}, "The prompt is limited to 1000 characters."),
    ({"loras": [{"name": "a", "file": "a.safetensors", "weight": 3}]}, "A LoRA weight must be between -2 and 2"),
    ({"loras": [{"name": "a"}]}, "needs a file or a path"),
    ({"unknown": 1}, "no field 'unknown'"),
    ({"region_prompts": [{"box": [1, 2], "prompt": "x"}]}, "Box needs exactly 4 values."),
])
def test_each_violation_is_one_clear_line(payload, words):
    with pytest.raises(ToolboxError) as error:
        UpscaleRequest.parse({"image": b"png", **payload})
    assert error.value.code is ErrorCode.INVALID_INPUT
    assert words in error.value.message and "\n" not in error.value.message


def test_a_request_left_without_a_seed_picks_one_in_range():
    seeds = {UpscaleRequest.parse({"image": b"png"}).seed for _ in range(5)}
    low, high = field_bounds(UpscaleRequest, "seed")
    assert all(low <= seed <= high for seed in seeds) and len(seeds) > 1


# What the SDXL and Flux requests share, and what each adds: (field, default, bounds).
SHARED_TEXT_TO_IMAGE = [("negative_prompt", "", (None, 1000)), ("steps", 28, (20, 50)), ("count", 1, (1, 4)),
                        ("loras", [], (None, 3)), ("timeout", 60.0, (None, 300)), ("image", None, (None, None)),
                        ("strength", 0.35, (0.05, 1.0))]
OWN_FIELDS = {
    GenerateRequest: [("width", 1024, (512, 1536)), ("height", 1024, (512, 1536)), ("cfg", 5.5, (1.0, 20.0)),
                      ("checkpoint", None, (None, None)), ("lora_url", None, (8, 4000)), ("lora_scale", 1.0, (0.0, 1.0)),
                      ("lora_sha256", None, (None, None)), ("face_image", None, (None, None)),
                      ("pose_image", None, (None, None)), ("identity_strength", 0.8, (0.0, 1.5)),
                      ("controlnet_strength", 0.8, (0.0, 1.5)), ("sampler", None, (None, None))],
    FluxGenerateRequest: [("width", 1024, (512, 2048)), ("height", 1024, (512, 2048)), ("guidance", 3.5, (1.0, 10.0))],
}


@pytest.mark.parametrize("request_class", [GenerateRequest, FluxGenerateRequest])
def test_the_text_to_image_requests_share_a_base_and_keep_their_fields(request_class):
    assert issubclass(request_class, TextToImageRequest)
    expected = {"safety", "prompt", "seed", *(name for name, _, _ in SHARED_TEXT_TO_IMAGE + OWN_FIELDS[request_class])}
    assert set(request_class.model_fields) == expected
    assert field_bounds(request_class, "prompt") == (1, 1000) and field_bounds(request_class, "seed") == (0, 2**32 - 1)
    for name, default, bounds in SHARED_TEXT_TO_IMAGE + OWN_FIELDS[request_class]:
        assert (request_class.model_fields[name].default, field_bounds(request_class, name)) == (default, bounds), name
    payload = request_class.parse({"prompt": " a fox ", "seed": 3}).to_payload()
    assert payload["prompt"] == "a fox" and set(payload) == expected


@pytest.mark.parametrize("request_class, payload, code, words", [
    (GenerateRequest, {"prompt": ""}, ErrorCode.INVALID_PROMPT, "The prompt cannot be empty."),
    (GenerateRequest, {"prompt": "a", "negative_prompt": "x" * 1001}, ErrorCode.INVALID_PROMPT,
     "The negative prompt is limited to 1000 characters."),
    (GenerateRequest, {"prompt": "a", "pose_image": b"png"}, ErrorCode.INVALID_INPUT, POSE_NEEDS_A_FACE),
    (GenerateRequest, {"prompt": "a", "steps": 10}, ErrorCode.INVALID_INPUT, "Steps must be between 20 and 50 (got 10)."),
    (FluxGenerateRequest, {"prompt": ""}, ErrorCode.INVALID_PROMPT, "The prompt cannot be empty."),
    # Flux has no negative prompt: one given is a wrong input, not a wrong prompt.
    (FluxGenerateRequest, {"prompt": "a", "negative_prompt": "x" * 1001}, ErrorCode.INVALID_INPUT,
     "The negative prompt is limited to 1000 characters."),
    (FluxGenerateRequest, {"prompt": "a", "negative_prompt": "blurry"}, ErrorCode.INVALID_INPUT, "Flux has no negative prompt"),
    (FluxGenerateRequest, {"prompt": "a", "cfg": 2}, ErrorCode.INVALID_INPUT, "no field 'cfg'"),
    (FluxGenerateRequest, {"prompt": "a", "loras": [{"name": "a", "file": "a.safetensors"}] * 2},
     ErrorCode.INVALID_INPUT, "The same LoRA is listed twice."),
])
def test_text_to_image_parse_tells_a_prompt_problem_from_an_input_one(request_class, payload, code, words):
    with pytest.raises(ToolboxError) as error:
        request_class.parse(payload)
    assert error.value.code is code and words in error.value.message


@pytest.mark.parametrize("request_class", list(SERVICES), ids=lambda request_class: request_class.kind)
def test_each_kind_names_a_real_engine_method_that_takes_its_request(app_module, request_class):
    spec = SERVICES[request_class]
    method = spec.method()
    assert method.__name__ == spec.method_name and getattr(spec.engine(), spec.method_name) is method
    assert typing.get_type_hints(method)["request"] is request_class and spec.kind == request_class.kind
    # The Modal class serving the kind has a method of that name, so `spawn` finds it.
    assert spec.method_name in getattr(app_module, spec.modal_class)._get_method_names()


async def test_the_worker_refuses_a_bad_payload_before_loading_anything(tmp_path):
    from modal_services.jobs.records import JobStatus, create_job, load_job
    from modal_services.services import run_service_job
    from modal_services.state.store import SqliteStore

    class NeverLoads:
        loaded = False

        def load(self):
            raise AssertionError("loaded for a request that was refused")

    store = SqliteStore(tmp_path / "state.sqlite3")
    job = await create_job(store, "upscale")
    with pytest.raises(ToolboxError) as error:
        await run_service_job(store, NeverLoads(), SERVICES[UpscaleRequest], job.id, {"image": b"png", "creativity": 5})
    assert error.value.code is ErrorCode.INVALID_INPUT
    record = await load_job(store, job.id)
    assert record.status is JobStatus.ERROR and "Creativity" in record.error_message
    await store.close()


@pytest.mark.parametrize("request_class, payload, code", [
    (GenerateRequest, {"prompt": "a fox\x00"}, ErrorCode.INVALID_PROMPT),
    (FluxGenerateRequest, {"prompt": "a fox\x9b"}, ErrorCode.INVALID_PROMPT),
    (UpscaleRequest, {"image": b"png", "negative": "\x1bblur"}, ErrorCode.INVALID_INPUT),
    (UpscaleRequest, {"image": b"png", "region_prompts": [{"box": [0, 0, 8, 8], "prompt": "eye\x08"}]},
     ErrorCode.INVALID_INPUT),
    (CaptionRequest, {"images": [b"png"], "question": "who\x7f"}, ErrorCode.INVALID_INPUT),
])
def test_control_characters_are_refused_by_the_request_itself(request_class, payload, code):
    # The worker parses every payload again: a front end that let one through is still refused there.
    with pytest.raises(ToolboxError) as refused:
        request_class.parse(payload)
    assert refused.value.code is code and "contains a control character (U+" in refused.value.message


def test_line_breaks_and_tabs_are_prompt_text():
    assert GenerateRequest.parse({"prompt": "a fox,\n\tin snow\r\n"}).prompt == "a fox,\n\tin snow"
