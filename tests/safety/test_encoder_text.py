"""What is screened is what the text encoders read: the prompt after the LoRAs' trigger words, the region
prompts (tile captions), the negative prompt, read as written, as the model reads it (weights removed, BREAK's
chunks joined) and without any weighting form; refused in
the front ends before any job, and again in the worker for a payload that never went through one."""

from __future__ import annotations

import base64

import pytest

from bot.core.build import build_generate_request, build_upscale_request
from bot.core.choices import GenerateChoices, LoraChoice, UpscaleChoices
from bot.replies import error_text
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.encoder_text import readings, with_trigger_words, without_weighting
from modal_services.jobs.records import create_job
from modal_services.jobs.requests import (
    CaptionRequest,
    FluxGenerateRequest,
    GenerateRequest,
    ResolvedLora,
    UpscaleRequest,
)
from modal_services.library.entries import Library, LibraryEntry, entry_key
from modal_services.safety.prompt_screen import MINOR_REFUSAL, SERVER_REFUSAL
from modal_services.services import SERVICES, run_service_job
from tests.api.test_api import served  # noqa: F401 (a fixture)
from tests.bot.test_generate_cog import engine  # noqa: F401 (a fixture)
from tests.bot.test_upscale_cog import FakeUpscaleEngine
from tests.core.test_front_ends_agree import on_the_cli_store, run_cli
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.images import png_bytes

# A library LoRA whose trigger word is a minor term: on its own a style, with `nude` the refused pairing.
MINOR_TRIGGER = LibraryEntry(name="School Style", file="school_style.safetensors", type="lora", weight=0.7,
                             trigger_words=["schoolgirl uniform", "schoolgirl"])
ADULT_TRIGGER = LibraryEntry(name="Glow", file="glow.safetensors", type="lora", weight=0.7, trigger_words=["glowing"])
MINOR_SEXUAL = ToolboxError(ErrorCode.INVALID_PROMPT, MINOR_REFUSAL)


async def stock(store) -> None:
    for entry in (MINOR_TRIGGER, ADULT_TRIGGER):
        await store.put(entry_key(entry.file), entry.to_dict())


@pytest.fixture
async def library(store, tmp_path):
    await stock(store)
    return Library(store, tmp_path / "loras", tmp_path / "models", files_visible=False)


def resolved(entry: LibraryEntry) -> dict:
    return {"name": entry.name, "file": entry.file, "weight": entry.weight, "trigger_words": entry.trigger_words}


def refused(parse, payload: dict) -> ToolboxError:
    with pytest.raises(ToolboxError) as caught:
        parse(payload)
    return caught.value


# ---------------------------------------------------------------- the text the encoders read


def test_trigger_words_are_joined_once_as_the_engines_read_them():
    loras = [ResolvedLora(name="a", file="a.safetensors", trigger_words=["shiny", " Cat Ears ", ""]),
             ResolvedLora(name="b", file="b.safetensors", trigger_words=["shiny", "glow"])]
    assert with_trigger_words("1girl, cat ears, smile", loras) == "shiny, glow, 1girl, cat ears, smile"
    assert with_trigger_words("", loras) == "shiny, Cat Ears, glow"
    # A word inside another word does not count as present.
    assert with_trigger_words("glowing", loras[1:]) == "shiny, glow, glowing"


def test_each_request_gives_its_engine_the_prompt_it_screened():
    lora = resolved(ADULT_TRIGGER)
    assert GenerateRequest.parse({"prompt": "a fox", "loras": [lora]}).encoder_prompt() == "glowing, a fox"
    assert FluxGenerateRequest.parse({"prompt": "a fox", "loras": [lora]}).encoder_prompt() == "glowing, a fox"
    upscale = UpscaleRequest.parse({"image": png_bytes(8, 8), "prompt": "  a fox ", "loras": [lora]})
    assert upscale.encoder_prompt() == "glowing, a fox"


@pytest.mark.parametrize("kind, fields", [
    (GenerateRequest, {}),
    (FluxGenerateRequest, {}),
    (UpscaleRequest, {"image": png_bytes(8, 8)}),
])
def test_a_minor_trigger_word_with_a_sexual_prompt_is_refused_by_every_kind(kind, fields):
    error = refused(kind.parse, {**fields, "prompt": "nude", "loras": [resolved(MINOR_TRIGGER)]})
    assert (error.code, error.message) == (MINOR_SEXUAL.code, MINOR_SEXUAL.message)
    # The same trigger word with an ordinary prompt runs, and so does the prompt with another LoRA.
    kind.parse({**fields, "prompt": "a classroom", "loras": [resolved(MINOR_TRIGGER)]})
    kind.parse({**fields, "prompt": "nude, marble statue", "loras": [resolved(ADULT_TRIGGER)]})


def test_a_region_prompt_or_tile_caption_is_screened_with_the_prompt():
    image = png_bytes(64, 64)
    error = refused(UpscaleRequest.parse, {"image": image, "prompt": "a town",
                                           "region_prompts": [{"box": [0, 0, 32, 32], "prompt": "1girl, loli, nude"}]})
    assert error.message == MINOR_REFUSAL
    # The pairing split between the prompt (its trigger word) and a tile's caption is the text that tile reads.
    request = UpscaleRequest.parse({"image": image, "prompt": "a town", "loras": [resolved(MINOR_TRIGGER)]})
    with pytest.raises(ToolboxError) as caught:
        request.with_region_prompts([{"box": [0, 0, 32, 32], "prompt": "topless"}])
    assert caught.value.message == MINOR_REFUSAL
    assert request.with_region_prompts([{"box": [0, 0, 32, 32], "prompt": "brick wall"}]).region_prompts


@pytest.mark.parametrize("prompt", [
    "(chi:1.1)ld, nude",
    "(lo:1.2)(li:0.9), nude",
    "(nu:1.3)de, (ki:1.1)d",
    "n(u)d(e) (c)(hi)(ld)",
    "[[shota]], (naked:1.4)",
    "<lora:kid:0.8> nude",
    # BREAK, read as the model reads it: its chunks joined.
    "nude, chi BREAK ld",
    "lo BREAK li, nude",
    "(lo BREAK li:1.2), nude",
    "nu BREAK de, kid",
])
def test_weighting_syntax_does_not_hide_a_pairing(prompt):
    assert refused(GenerateRequest.parse, {"prompt": prompt}).message == MINOR_REFUSAL


def test_a_servers_phrase_split_by_break_is_still_refused():
    safety = {"refused_words": ["blood bath"]}
    assert refused(GenerateRequest.parse, {"prompt": "a (blood:1.3) BREAK bath", "safety": safety}).message == (
        SERVER_REFUSAL)
    GenerateRequest.parse({"prompt": "a blood moon BREAK a bath", "safety": safety})


def test_weighting_syntax_alone_refuses_nothing():
    for prompt in ("(masterpiece:1.2), [blurry], a fox", "(nude:1.2), (adult woman:1.1)", "<lora:detail:0.8> a fox",
                   "1girl, school uniform BREAK nude statue in a museum, (adult:1.2)"):
        GenerateRequest.parse({"prompt": prompt})
    assert without_weighting("(masterpiece:1.2), [a fox]") == "masterpiece, a fox"
    assert readings(["a fox"]) == ["a fox"]
    assert readings(["(a:1.1) BREAK fox"]) == ["(a:1.1) BREAK fox", "a fox", "a BREAK fox", " a  BREAK fox"]


# ---------------------------------------------------------------- the front ends, before any job


async def test_the_core_refuses_a_minor_trigger_word_before_any_job(library, store):
    for build, choices in [
        (build_generate_request, GenerateChoices(prompt="nude", loras=(LoraChoice("School Style"),))),
        (build_upscale_request, UpscaleChoices(image=png_bytes(64, 64), prompt="nude", loras=(LoraChoice("School Style"),))),
    ]:
        with pytest.raises(ToolboxError) as caught:
            await build(library, choices)
        assert (caught.value.code, caught.value.message) == (MINOR_SEXUAL.code, MINOR_SEXUAL.message)
    assert await store.keys("job:") == []


async def test_discord_refuses_a_minor_trigger_word_privately(make_toolbox_bot, engine):  # noqa: F811
    bot = await make_toolbox_bot("cogs.generate")
    await stock(bot.backend.store)
    interaction = fake_interaction()
    await invoke(bot, bot.tree.get_command("generate"), interaction, prompt="nude", lora1="School Style")
    assert ephemeral_error(interaction) == error_text(MINOR_SEXUAL)
    assert await bot.backend.store.keys("job:") == [] and engine.generated == []


async def test_a_tile_caption_pairing_is_refused_before_the_upscale_job(make_toolbox_bot, stand_in_engines, fast_progress):
    class MinorTagger:
        loaded = True

        def load(self):
            pass

        def caption(self, request, progress):
            return ["1girl, loli, nude" for _ in request.images]

    upscaler = FakeUpscaleEngine()
    stand_in_engines.use(UpscaleRequest, upscaler)
    stand_in_engines.use(CaptionRequest, MinorTagger())
    bot = await make_toolbox_bot("cogs.caption", "cogs.upscale")
    interaction = fake_interaction()
    await invoke(bot, bot.tree.get_command("upscale"), interaction, fake_attachment(png_bytes(600, 400)),
                 2.0, "a town", None, None, None, None, None, None, None, None, 7, True)
    assert ephemeral_error(interaction) == error_text(MINOR_SEXUAL)
    kinds = [job["kind"] for job in (await bot.backend.store.items("job:")).values()]
    assert kinds == ["caption"] and upscaler.payloads == []


def test_the_cli_refuses_a_minor_trigger_word(engine, capsys):  # noqa: F811
    on_the_cli_store(stock)
    status, err = run_cli(["generate", "nude", "--lora", "School Style", "--no-safety-check"], capsys)
    assert (status, err) == (2, f"error: INVALID_PROMPT: {MINOR_REFUSAL}\n")
    assert on_the_cli_store(lambda store: store.keys("job:")) == [] and engine.generated == []


async def test_the_api_refuses_a_minor_trigger_word(served, engine):  # noqa: F811
    client, backend = await served()
    await stock(backend.store)
    response = await client.post("/generate-image", json={"prompt": "nude", "loras": [{"name": "School Style"}],
                                                          "safety_check": False})
    assert (response.status_code, response.json()["error_code"], response.json()["error"]) == (
        400, "INVALID_PROMPT", MINOR_REFUSAL)
    source = base64.b64encode(png_bytes(48, 32)).decode()
    response = await client.post("/jobs", json={"kind": "upscale", "image_base64": source, "prompt": "nude",
                                                "loras": [{"name": "School Style"}], "safety_check": False})
    assert (response.status_code, response.json()["error_code"]) == (400, "INVALID_PROMPT")
    assert await backend.store.keys("job:") == [] and engine.generated == []


# ---------------------------------------------------------------- the worker, the last guard


class Untouchable:
    """An engine that fails the test if anything loads or runs it."""

    loaded = False

    def load(self):
        raise AssertionError("the engine was loaded for a refused prompt")


@pytest.mark.parametrize("kind, payload", [
    (GenerateRequest, {"prompt": "nude", "loras": [resolved(MINOR_TRIGGER)], "safety": {"policy": "off"}}),
    (FluxGenerateRequest, {"prompt": "(nu:1.2)de", "loras": [resolved(MINOR_TRIGGER)], "safety": {"policy": "off"}}),
    (UpscaleRequest, {"image": png_bytes(16, 16), "prompt": "a town", "safety": {"policy": "off"},
                      "region_prompts": [{"box": [0, 0, 8, 8], "prompt": "nude"}], "loras": [resolved(MINOR_TRIGGER)]}),
])
async def test_the_worker_refuses_a_payload_no_front_end_built(store, kind, payload):
    job = await create_job(store, SERVICES[kind].kind)
    with pytest.raises(ToolboxError) as caught:
        await run_service_job(store, Untouchable(), SERVICES[kind], job.id, payload)
    assert (caught.value.code, caught.value.message) == (MINOR_SEXUAL.code, MINOR_SEXUAL.message)
