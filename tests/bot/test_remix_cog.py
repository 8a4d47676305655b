"""/generate remix: a CivitAI image's published settings, against the fake CivitAI in the images endpoint's
real shapes, with fake interactions on the real LocalBackend: the request the stand-in engine receives,
what the reply says differs, the Import missing button (for those who may import, and only them), and
hostile answers refused privately before any job exists."""

from __future__ import annotations

import json

import discord
import pytest
from discord import app_commands

from bot.remix_replies import ImportMissingButton
from modal_services.jobs.requests import GenerateRequest
from modal_services.library import civitai as civitai_module
from modal_services.library.entries import LibraryEntry
from tests.bot.buttons import press
from tests.fakes.civitai_server import FakeCivitai
from tests.fakes.discord_fakes import APPLICATION_OWNER_ID, ephemeral_error, fake_interaction, invoke
from tests.fakes.engines import StandInImageEngine
from tests.library.test_civitai_images import GENERATOR_META, UPLOADED_META

IMAGE = 9173928
LINK = f"https://civitai.com/images/{IMAGE}?postId=1981754"
CHECKPOINT_VERSION, LORA_VERSION = 1183765, 2247497


@pytest.fixture
def civitai(monkeypatch):
    server = FakeCivitai().start()
    monkeypatch.setenv("CIVITAI_API_BASE", server.base)
    monkeypatch.setattr(civitai_module, "backoff_delay", lambda failures: 0.0)
    yield server
    server.stop()


@pytest.fixture
def engine(stand_in_engines):
    return stand_in_engines.use(GenerateRequest, StandInImageEngine(shrink=8))


@pytest.fixture
async def toolbox_bot(civitai, make_toolbox_bot):
    return await make_toolbox_bot("cogs.upscale", "cogs.generate", "cogs.models")


async def add_entry(bot, file: str, kind: str, **fields) -> LibraryEntry:
    library = bot.get_cog("Models").library
    path = library.folder(kind) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return await library.add(LibraryEntry(name=fields.pop("name"), file=file, type=kind, **fields))


async def remix(bot, interaction, reference: str = LINK, prompt: str | None = None, **options):
    names = ["negative", "aspect", "count", "steps", "cfg", "seed", "lora1", "lora1_weight", "lora2",
             "lora2_weight", "lora3", "lora3_weight", "face", "identity_strength", "pose", "model"]
    await invoke(bot, bot.tree.get_command("generate"), interaction, prompt,
                 *(options.get(name) for name in names), reference)
    return interaction


def result_text(interaction) -> str:
    return interaction.calls.edit_original_response.await_args.kwargs["content"]


def private_offers(interaction) -> list:
    return [call for call in interaction.calls.followup_send.await_args_list if call.kwargs.get("ephemeral")]


async def test_a_remix_reproduces_the_published_settings_with_the_librarys_models(toolbox_bot, civitai, engine,
                                                                                fast_progress):
    civitai.add_image(IMAGE, GENERATOR_META, version_ids=[CHECKPOINT_VERSION, LORA_VERSION])
    await add_entry(toolbox_bot, "wai_v14.safetensors", "checkpoint", name="WAI Illustrious v14",
                    civitai_version_id=CHECKPOINT_VERSION)
    await add_entry(toolbox_bot, "detail.safetensors", "lora", name="Detail", civitai_version_id=LORA_VERSION,
                    weight=0.5, trigger_words=["detailed"])
    interaction = await remix(toolbox_bot, fake_interaction())
    assert ephemeral_error(interaction) is None
    [request] = engine.generated
    assert request["prompt"] == GENERATOR_META["prompt"] and request["negative_prompt"] == "lowres, bad hands"
    assert (request["steps"], request["cfg"], request["seed"]) == (28, 5.5, 2817340411)
    assert request["sampler"] == "Euler a"  # the image's own, one this bot has
    assert (request["width"], request["height"], request["count"]) == (832, 1216, 1)
    assert request["checkpoint"] == "wai_v14.safetensors"
    # The image's weight, not the library's recommended one.
    assert request["loras"] == [{"name": "Detail", "file": "detail.safetensors", "weight": 0.8,
                                 "trigger_words": ["detailed"]}]
    text = result_text(interaction)
    assert f"-# Remix of CivitAI image {IMAGE}" in text and "WAI Illustrious v14" in text
    assert "not applied" not in text
    assert private_offers(interaction) == []  # nothing is missing

    # Reroll keeps the image's checkpoint and LoRA, with a new seed.
    view = interaction.calls.edit_original_response.await_args.kwargs["view"]
    [reroll] = [child.custom_id for child in view.children if ":reroll:" in child.custom_id]
    click = fake_interaction()
    click.client = toolbox_bot
    await press(reroll, click)
    again = engine.generated[1]
    assert again["checkpoint"] == "wai_v14.safetensors" and again["loras"] == request["loras"]
    assert again["prompt"] == request["prompt"] and again["seed"] != request["seed"]


async def test_what_differs_is_said_and_an_operator_gets_import_missing(toolbox_bot, civitai, engine, fast_progress):
    civitai.add_image(IMAGE, GENERATOR_META)
    civitai.add_model(900, CHECKPOINT_VERSION, b"c" * 64, name="WAI Illustrious", type="Checkpoint",
                      base_model="Illustrious", file_name="wai.safetensors")
    civitai.add_model(901, LORA_VERSION, b"l" * 64, name="Detail Tweaker XL", base_model="Illustrious")
    interaction = await remix(toolbox_bot, fake_interaction(admin=True, operator=True))
    [request] = engine.generated
    assert request["checkpoint"] is None and request["loras"] == []  # the active (base) checkpoint, no LoRA
    text = result_text(interaction)
    assert f"Made with the checkpoint CivitAI model version {CHECKPOINT_VERSION}, which is not in the library" in text
    assert f"Not in the library, left out: CivitAI model version {LORA_VERSION}." in text
    [offer] = private_offers(interaction)
    assert "Import them, then remix again" in offer.args[0]
    [button] = offer.kwargs["view"].children
    assert button.custom_id == f"toolbox:import-missing:{CHECKPOINT_VERSION},{LORA_VERSION}"

    # Pressed (after a restart too: the ids are in the button): each version's /models import preview.
    click = fake_interaction(user_id=APPLICATION_OWNER_ID)
    click.client = toolbox_bot
    await press(button.custom_id, click)
    assert ephemeral_error(click) is None
    first = click.calls.edit_original_response.await_args.kwargs
    assert first["content"].startswith("Import this checkpoint") and first["embed"].title.startswith("WAI Illustrious")
    second = click.calls.followup_send.await_args.kwargs
    assert second["content"].startswith("Import this lora") and second["embed"].title.startswith("Detail Tweaker XL")
    assert {child.label for child in second["view"].children} == {"Download", "Cancel"}


async def test_a_member_sees_no_import_button(toolbox_bot, civitai, engine, fast_progress):
    civitai.add_image(IMAGE, GENERATOR_META)
    interaction = await remix(toolbox_bot, fake_interaction(admin=True))  # an admin, where imports are not allowed
    [offer] = private_offers(interaction)
    assert offer.args[0].endswith("A server admin can add them.") and offer.kwargs["view"] is discord.utils.MISSING
    assert len(engine.generated) == 1


async def test_a_member_cannot_press_a_copied_button(toolbox_bot, civitai):
    click = fake_interaction(user_id=5)
    click.client = toolbox_bot
    await press(ImportMissingButton.of([LORA_VERSION]).custom_id, click)
    assert "Only the bot's operators can add models here" in ephemeral_error(click)
    assert civitai.hits("/api/v1/model-versions") == []


async def test_an_uploaded_images_lora_is_found_by_hash_and_the_checkpoint_by_name(toolbox_bot, civitai, engine,
                                                                                 fast_progress):
    civitai.add_image(IMAGE, UPLOADED_META)
    await add_entry(toolbox_bot, "waiIllustriousSDXL_v140.safetensors", "checkpoint", name="WAI")
    await add_entry(toolbox_bot, "more_detail.safetensors", "lora", name="More detail", sha256="7c6bad76eb" + "0" * 54)
    await remix(toolbox_bot, fake_interaction())
    [request] = engine.generated
    assert request["checkpoint"] == "waiIllustriousSDXL_v140.safetensors" and request["prompt"] == "1girl, city lights"
    assert [(lora["file"], lora["weight"]) for lora in request["loras"]] == [("more_detail.safetensors", 0.6)]
    assert (request["steps"], request["cfg"], request["seed"], request["width"]) == (30, 7.0, 123, 1024)


async def test_what_the_member_gives_wins_over_the_image(toolbox_bot, civitai, engine, fast_progress):
    civitai.add_image(IMAGE, GENERATOR_META)
    await remix(toolbox_bot, fake_interaction(), prompt="a lighthouse", seed=7, count=2, aspect=_choice("1:1"))
    [request] = engine.generated
    assert (request["prompt"], request["seed"], request["count"]) == ("a lighthouse", 7, 2)
    assert (request["width"], request["height"], request["steps"]) == (1024, 1024, 28)


def _choice(value: str) -> app_commands.Choice[str]:
    return app_commands.Choice(name=value, value=value)


@pytest.mark.parametrize("arrange, reference, words", [
    (lambda fake: None, "https://civitai.com/models/929497", "is not a CivitAI image"),
    (lambda fake: None, LINK, f"CivitAI shows no image {IMAGE}"),
    (lambda fake: fake.add_image(IMAGE, None), LINK, "publishes no prompt"),
    (lambda fake: fake.add_image(IMAGE, {"prompt": 5, "seed": "x", "civitaiResources": 1}), LINK, "publishes no prompt"),
    (lambda fake: fake.add_image(IMAGE, {**GENERATOR_META, "prompt": "x" * 50_000}), LINK,
     "cannot be remixed: The image's prompt is 20000 characters"),
    (lambda fake: fake.raw_images.update({IMAGE: b"{" * 100_000}), LINK, "not JSON"),
    (lambda fake: fake.image_redirects.update({IMAGE: "http://169.254.169.254/latest/meta-data/"}), LINK,
     "Refused to fetch"),
    (lambda fake: fake.fault("/api/v1/images", status=404), LINK, f"CivitAI has no image {IMAGE}"),
    (lambda fake: [fake.fault("/api/v1/images", status=503) for _ in range(5)], LINK, "CivitAI is not answering"),
])
async def test_hostile_or_missing_answers_start_nothing(toolbox_bot, civitai, engine, arrange, reference, words):
    arrange(civitai)
    interaction = await remix(toolbox_bot, fake_interaction(admin=True, operator=True), reference)
    assert words in ephemeral_error(interaction)
    assert engine.generated == [] and await toolbox_bot.backend.store.keys("job:") == []


async def test_neither_a_prompt_nor_a_remix_is_refused_before_the_defer(toolbox_bot, engine):
    interaction = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("generate"), interaction, None)
    assert "Give a prompt, or a CivitAI image to remix." in ephemeral_error(interaction)
    assert interaction.calls.defer.await_count == 0


async def test_a_json_answer_with_a_huge_meta_is_bounded_in_the_reply(toolbox_bot, civitai, engine, fast_progress):
    loras = [{"type": "lora", "modelVersionId": n, "weight": 0.5, "modelName": "@everyone " + "n" * 150}
             for n in range(1, 500)]
    civitai.raw_images[IMAGE] = json.dumps({"items": [{"id": IMAGE, "meta": {**GENERATOR_META,
                                                                          "civitaiResources": loras}}]}).encode()
    interaction = await remix(toolbox_bot, fake_interaction(admin=True, operator=True))
    text = result_text(interaction)
    assert len(text) <= 2000 and "@everyone" not in text.replace("@\u200beveryone", "")
    [offer] = private_offers(interaction)
    assert len(offer.args[0]) <= 2000 and len(offer.kwargs["view"].children[0].custom_id) <= 100
