"""Every rule's refusal through every front end: Discord's /generate, `toolbox generate` and POST /generate-image
answer each bad choice of `GENERATE_REFUSALS` with the core's code and message, before any job exists.

Each front end has a table from the core's choices to its own options. A choice a front end has no way to
express (no option for it, or a value its own client never sends) is skipped for that front end, saying why;
nothing is faked in its place.
"""

from __future__ import annotations

import asyncio
import base64

import pytest

from bot.cli import main
from bot.replies import error_text
from bot.settings import Settings
from cogs.generate import Generate
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.library.entries import entry_key
from modal_services.state.store import SqliteStore
from tests.api.test_api import served  # noqa: F401 (a fixture)
from tests.bot.test_flux_cog import enable_flux, flux  # noqa: F401 (flux: a fixture)
from tests.bot.test_generate_cog import engine  # noqa: F401 (a fixture)
from tests.core.conftest import LORAS
from tests.core.test_build import GENERATE_REFUSALS
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, invoke
from tests.fixtures.tiny_instantid import enable_instantid

PROMPT = "a fox"


def row_id(asked: dict) -> str:
    """A row's choices in a few words: `model=flux,face_image`, `loras=Detail:3`, `prompt=blank`."""
    words = []
    for field, value in asked.items():
        if isinstance(value, bytes):
            words.append(field)
        elif field == "loras":
            words.append("loras=" + "+".join(lora.name if lora.weight is None else f"{lora.name}:{lora.weight:g}"
                                              for lora in value))
        else:
            words.append(f"{field}={str(value).strip() or 'blank'}")
    return ",".join(words)


async def stock(store) -> None:
    """What every row may need: Flux and InstantID enabled and "downloaded", a LoRA of each family."""
    await enable_flux(store)
    await enable_instantid(store)
    for entry in LORAS:
        await store.put(entry_key(entry.file), entry.to_dict())


def refusal_rows(front_end: str, cannot_express) -> list:
    """GENERATE_REFUSALS for one front end, a row it cannot express skipped (with why)."""
    rows = []
    for asked, code, message in GENERATE_REFUSALS:
        reason = cannot_express(asked)
        marks = [pytest.mark.skip(reason=f"{front_end}: {reason}")] if reason else []
        rows.append(pytest.param(asked, code, message, id=row_id(asked), marks=marks))
    return rows


# ---------------------------------------------------------------- Discord: /generate


# The core's choices as /generate's options (loras: lora1-lora3, each with its _weight); None: /generate has no
# option for it.
DISCORD_OPTIONS = {
    "prompt": "prompt", "model": "model", "negative": "negative", "aspect": "aspect", "cfg": "cfg",
    "loras": "lora1", "face_image": "face", "pose_image": "pose", "identity_strength": "identity_strength",
    "width": None, "height": None, "lora_url": None, "controlnet_strength": None, "sampler": "sampler",
}
GENERATE_OPTIONS = {parameter.name: parameter for parameter in Generate.generate.parameters}


def discord_cannot_express(asked: dict) -> str | None:
    """Why Discord's client cannot send these choices: /generate has no such option, or the value is
    not among the option's choices or within its range (the client offers and sends only those)."""
    for field, value in asked.items():
        if DISCORD_OPTIONS[field] is None:
            return f"/generate has no option for {field}"
        if field == "loras":
            sent = [("lora1_weight", lora.weight) for lora in value if lora.weight is not None]
        else:
            sent = [(DISCORD_OPTIONS[field], value)]
        for name, sent_value in sent:
            if reason := _outside_the_option(GENERATE_OPTIONS[name], sent_value):
                return reason
    return None


def _outside_the_option(option, value) -> str | None:
    if option.choices and value not in [choice.value for choice in option.choices]:
        return f"{value!r} is not one of {option.name}'s choices"
    if isinstance(value, (int, float)) and not option.min_value <= value <= option.max_value:
        return f"{option.name} takes {option.min_value:g} to {option.max_value:g} (got {value:g})"
    return None


def discord_options(asked: dict) -> dict:
    options = {}
    for field, value in asked.items():
        if field == "loras":
            for number, lora in enumerate(value, start=1):
                options[f"lora{number}"], options[f"lora{number}_weight"] = lora.name, lora.weight
        elif field in ("face_image", "pose_image"):
            options[DISCORD_OPTIONS[field]] = fake_attachment(value, f"{field}.png")
        elif field in ("model", "aspect", "sampler"):
            option = GENERATE_OPTIONS[field]
            options[field] = next(choice for choice in option.choices if choice.value == value)
        else:
            options[DISCORD_OPTIONS[field]] = value
    return options


@pytest.mark.parametrize("asked, code, message",
                         refusal_rows("Discord", discord_cannot_express))
async def test_discord_refuses_as_the_core_does(make_toolbox_bot, engine, flux, asked, code, message):  # noqa: F811
    bot = await make_toolbox_bot("cogs.generate")
    await stock(bot.backend.store)
    interaction = fake_interaction()
    await invoke(bot, bot.tree.get_command("generate"), interaction, **{"prompt": PROMPT, **discord_options(asked)})
    # The code is said by its title, before the core's message.
    assert ephemeral_error(interaction) == error_text(ToolboxError(code, message))
    assert await bot.backend.store.keys("job:") == [] and engine.generated == flux.generated == []


# ---------------------------------------------------------------- CLI: toolbox generate


# The core's choices as `toolbox generate`'s options; None: the CLI has no option for it.
CLI_OPTIONS = {
    "prompt": "PROMPT", "model": "--model", "negative": "--negative", "aspect": "--aspect", "width": "--width",
    "height": "--height", "cfg": "--cfg", "loras": "--lora", "face_image": "--face", "pose_image": "--pose",
    "identity_strength": "--identity-strength", "controlnet_strength": "--controlnet-strength", "lora_url": None,
    "sampler": "--sampler",
}


def cli_cannot_express(asked: dict) -> str | None:
    missing = [field for field in asked if CLI_OPTIONS[field] is None]
    return f"`toolbox generate` has no option for {missing[0]}" if missing else None


def cli_argv(asked: dict, folder) -> list[str]:
    argv = ["generate", asked.get("prompt", PROMPT)]
    for field, value in asked.items():
        if field == "loras":
            argv += [arg for lora in value for arg in
                     ("--lora", lora.name if lora.weight is None else f"{lora.name}:{lora.weight:g}")]
        elif field in ("face_image", "pose_image"):
            photo = folder / f"{field}.png"
            photo.write_bytes(value)
            argv += [CLI_OPTIONS[field], str(photo)]
        elif field != "prompt":
            argv += [CLI_OPTIONS[field], str(value)]
    return argv


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """The exit status and stderr of `toolbox ARGV` (argparse's own refusals exit through SystemExit)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def on_the_cli_store(work):
    """`work(store)` on the state store `toolbox` opens (the test's data dir), closed after."""
    async def run():
        store = SqliteStore(Settings.load().state_path)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


@pytest.mark.parametrize("asked, code, message", refusal_rows("CLI", cli_cannot_express))
def test_the_cli_refuses_as_the_core_does(engine, flux, tmp_path, capsys, asked, code, message):  # noqa: F811
    on_the_cli_store(stock)
    status, err = run_cli(cli_argv(asked, tmp_path), capsys)
    assert (status, err) == (2 if code in (ErrorCode.INVALID_INPUT, ErrorCode.INVALID_PROMPT) else 1,
                             f"error: {code.value}: {message}\n")
    assert on_the_cli_store(lambda store: store.keys("job:")) == []
    assert engine.generated == flux.generated == []


# ---------------------------------------------------------------- HTTP API: POST /generate-image


# The core's choices as /generate-image's fields; None: the API has no field for it.
API_FIELDS = {
    "prompt": "prompt", "model": "model", "negative": "negative_prompt", "width": "width", "height": "height",
    "cfg": "cfg", "loras": "loras", "lora_url": "lora_url", "face_image": "reference_image_base64",
    "pose_image": "pose_image_base64", "identity_strength": "identity_strength",
    "controlnet_strength": "controlnet_strength", "aspect": None, "sampler": "sampler",
}


def api_cannot_express(asked: dict) -> str | None:
    missing = [field for field in asked if API_FIELDS[field] is None]
    if missing:
        return f"/generate-image has no field for {missing[0]} (it takes a width and a height)"
    if ("width" in asked) != ("height" in asked):
        # The worker contract's default: a side left out is 1024, so one side alone is a whole size.
        return "a side left out is the contract's 1024, so one side alone cannot be sent"
    return None


def api_body(asked: dict) -> dict:
    body = {"prompt": PROMPT}
    for field, value in asked.items():
        if field == "loras":
            value = [{"name": lora.name} | ({} if lora.weight is None else {"weight": lora.weight}) for lora in value]
        elif isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        body[API_FIELDS[field]] = value
    return body


@pytest.mark.parametrize("asked, code, message", refusal_rows("API", api_cannot_express))
async def test_the_api_refuses_as_the_core_does(served, engine, flux, asked, code, message):  # noqa: F811
    client, backend = await served()
    await stock(backend.store)
    response = await client.post("/generate-image", json=api_body(asked))
    body = response.json()
    assert (response.status_code, body["error_code"]) == (400, code.value)
    # A problem the body's schema finds names the field it is about first (`cfg: ...`); the words are the core's.
    assert body["error"] == message or body["error"].endswith(f": {message}"), body["error"]
    assert await backend.store.keys("job:") == [] and engine.generated == flux.generated == []


# ---------------------------------------------------------------- upscale: one set of options


def test_upscale_offers_the_same_set_on_discord_and_the_api():
    from bot.api.schema import UpscaleJob
    from cogs.upscale import Upscale
    from modal_services.jobs.requests import MAX_LORAS_PER_JOB, UpscaleRequest
    from modal_services.jobs.validation import field_bounds

    options = [parameter.name for parameter in Upscale.upscale.parameters]
    discord_slots = [name for name in options if name.startswith("lora") and not name.endswith("_weight")]
    api_loras = UpscaleJob.model_json_schema()["properties"]["loras"]["maxItems"]
    assert len(discord_slots) == api_loras == field_bounds(UpscaleRequest, "loras")[1] == MAX_LORAS_PER_JOB
    assert "tile_captions" in options and "tile_captions" in UpscaleJob.model_fields
