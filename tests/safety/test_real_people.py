"""Real people's photos: a face photo, or an uploaded image as a job's source, with a sexual prompt is refused,
and a flagged image made from one is withheld, whatever the policy, the channel or `safety_check`; the bot's
own earlier results are judged by the server's policy as before."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bot.core.build import build_generate_request
from bot.core.choices import GenerateChoices
from bot.replies import error_text
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.records import create_job
from modal_services.jobs.requests import GenerateRequest, SafetyContext, UpscaleRequest
from modal_services.library.entries import Library
from modal_services.safety.judge import Decision, SafetyReport, judge
from modal_services.safety.prompt_screen import asks_for_sexual_content as is_sexual
from modal_services.safety.real_people import REAL_PERSON_REFUSAL
from modal_services.safety.tagger import Tags
from modal_services.services import SERVICES, run_service_job
from tests.api.test_api import served  # noqa: F401 (a fixture)
from tests.bot.test_safety_cogs import (  # noqa: F401 (engine, toolbox_bot: fixtures)
    engine,
    final_edit,
    generate,
    generated_message,
    in_channel,
    press,
    private_messages,
    toolbox_bot,
    use_policy,
)
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, invoke
from tests.fixtures.tiny_instantid import enable_instantid
from tests.images import png_bytes
from tests.safety.test_safety import ByRedness

PHOTO = png_bytes(64, 64)
REFUSED = ToolboxError(ErrorCode.INVALID_PROMPT, REAL_PERSON_REFUSAL)


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
async def library(store, tmp_path):
    return Library(store, tmp_path / "loras", tmp_path / "models", files_visible=False)


# ---------------------------------------------------------------- the sexual signal


def test_the_sexual_signal_reads_words_as_the_prompt_screen_does():
    for prompt in ("nude", "N U D E portrait", "t0pless on a beach", "(lingerie:1.2)", "hentai"):
        assert is_sexual(prompt), prompt
    # Steering away from clothes asks for nudity as plainly.
    assert is_sexual("a portrait", "clothes, blurry")
    for prompt in ("a portrait in a garden", "business suit, office", "a nun in a chapel"):
        assert not is_sexual(prompt, "blurry, lowres"), prompt


# ---------------------------------------------------------------- the prompt side


@pytest.mark.parametrize("safety", [SafetyContext(policy="off"), SafetyContext(policy="block", age_restricted=True),
                                    SafetyContext(policy="spoiler")])
@pytest.mark.parametrize("prompt, negative", [("nude", None), ("(t0pless:1.2), beach", None),
                                              ("a portrait", "clothes")])
async def test_a_face_photo_with_a_sexual_prompt_is_refused_whatever_the_policy(library, safety, prompt, negative):
    with pytest.raises(ToolboxError) as caught:
        await build_generate_request(library, GenerateChoices(prompt=prompt, negative=negative, face_image=PHOTO,
                                                              safety=safety))
    assert (caught.value.code, caught.value.message) == (REFUSED.code, REFUSED.message)


async def test_a_face_photo_with_an_ordinary_prompt_runs(library, store):
    await enable_instantid(store)
    built = await build_generate_request(library, GenerateChoices(prompt="a portrait in a garden", face_image=PHOTO,
                                                                  safety=SafetyContext(policy="off")))
    assert built.request.safety.real_photo and built.request.safety.classifies


def test_a_face_photo_is_a_real_person_whoever_built_the_payload():
    for safety in ({"policy": "off", "real_photo": False}, SafetyContext(policy="off"), None):
        payload = {"prompt": "lingerie", "face_image": PHOTO} | ({"safety": safety} if safety is not None else {})
        with pytest.raises(ToolboxError) as caught:
            GenerateRequest.parse(payload)
        assert caught.value.message == REAL_PERSON_REFUSAL
    request = GenerateRequest.parse({"prompt": "a portrait", "face_image": PHOTO, "safety": {"real_photo": False}})
    assert request.safety.real_photo


def test_an_uploaded_source_refuses_a_sexual_prompt_and_the_bots_own_result_does_not():
    upload = {"image": PHOTO, "prompt": "1girl, adult woman, nude", "safety": {"policy": "off", "real_photo": True}}
    with pytest.raises(ToolboxError) as caught:
        UpscaleRequest.parse(upload)
    assert caught.value.message == REAL_PERSON_REFUSAL
    # The bot's own result: the prompt is an adult one, and the server's policy judges the images as before.
    own = UpscaleRequest.parse({**upload, "safety": {"policy": "block"}})
    assert not own.safety.real_photo
    # A variation likewise: of an uploaded photo refused, of the bot's own result judged as before.
    variation = {"prompt": "nude, adult woman", "image": PHOTO}
    with pytest.raises(ToolboxError):
        GenerateRequest.parse({**variation, "safety": {"real_photo": True}})
    assert not GenerateRequest.parse(variation).safety.real_photo


async def test_the_api_refuses_a_real_persons_photo_with_a_sexual_prompt_even_unchecked(served, engine):  # noqa: F811
    client, backend = await served()
    photo = base64.b64encode(PHOTO).decode()
    response = await client.post("/generate-image", json={"prompt": "nude", "reference_image_base64": photo,
                                                          "safety_check": False})
    assert (response.status_code, response.json()["error_code"], response.json()["error"]) == (
        400, "INVALID_PROMPT", REAL_PERSON_REFUSAL)
    response = await client.post("/jobs", json={"kind": "upscale", "image_base64": photo, "prompt": "topless",
                                                "safety_check": False})
    assert (response.status_code, response.json()["error"]) == (400, REAL_PERSON_REFUSAL)
    assert await backend.store.keys("job:") == []


async def test_discord_refuses_an_uploaded_image_with_a_sexual_prompt(toolbox_bot, engine, fast_progress):  # noqa: F811
    await use_policy(toolbox_bot, "off")
    interaction = in_channel("nsfw")
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("upscale"), interaction, fake_attachment(PHOTO),
                 2.0, "nude, adult woman")
    assert ephemeral_error(interaction) == error_text(REFUSED)
    assert await toolbox_bot.backend.store.keys("job:") == []


async def test_the_bots_own_result_upscaled_is_judged_by_the_servers_policy(toolbox_bot, engine, fast_progress):  # noqa: F811
    # An adult sexual prompt made in an age-restricted channel, the classifier flagging every image.
    interaction = in_channel("nsfw")
    await generate(toolbox_bot, interaction, "1girl, adult woman, nude", count=2, seed=3)
    job_id, message = await generated_message(toolbox_bot, interaction)
    assert len(final_edit(interaction)["attachments"]) == 2
    # U on that result: not an uploaded photo, so posted as generated in the age-restricted channel...
    click = await press(toolbox_bot, job_id, "u1", "nsfw", message)
    assert ephemeral_error(click) is None and final_edit(click)["attachments"]
    # ...and withheld by the server's "block" elsewhere, for the usual reason.
    click = await press(toolbox_bot, job_id, "u1", "sfw", message)
    assert final_edit(click)["attachments"] == []
    assert "real person" not in private_messages(click)[0]


# ---------------------------------------------------------------- the output side


def drawn_adult(images: list[bytes]) -> list[Tags]:
    """The tagger's word on photographs of adults: nothing the drawn-minor rule acts on."""
    return [Tags("general", {"general": 0.9, "sensitive": 0.1}, {"1girl": 0.9}) for _ in images]


class StandInTagger:
    loaded = True

    def load(self):
        pass

    def tag(self, images):
        return drawn_adult(images)


@pytest.mark.parametrize("policy, age_restricted, threshold", [
    ("off", False, 0.7), ("block", True, 0.7), ("spoiler", False, 0.7), ("off", False, 0.99)])
def test_a_flagged_image_from_a_real_photo_is_withheld_always(policy, age_restricted, threshold):
    images = [red_png(), png_bytes(16, 16)]
    scores = {images[0]: 0.9, images[1]: 0.1}
    context = SafetyContext(policy=policy, age_restricted=age_restricted, threshold=threshold, real_photo=True)
    kept, report = judge(images, context, lambda batch: [scores[data] for data in batch], drawn_adult)
    assert kept == [None, images[1]]
    assert [image.decision for image in report.images] == [Decision.WITHHOLD, Decision.POST]
    assert report.checked and report.real_photo and report.unchecked_reason() is None
    assert SafetyReport.from_dict(report.to_dict()) == report
    # Without a real photo the same context posts as before.
    plain = context.model_copy(update={"real_photo": False})
    assert judge(images, plain, lambda batch: [scores[data] for data in batch], drawn_adult)[0][0] is not None


async def test_the_worker_withholds_an_uploaded_photos_flagged_upscale_with_the_policy_off(store):
    class RedUpscaler:
        loaded = True

        def load(self):
            pass

        def upscale(self, request, progress, preview=None):
            return red_png()

    classifier = ByRedness()
    job = await create_job(store, "upscale")
    payload = {"image": PHOTO, "prompt": "a portrait", "safety": {"policy": "off", "real_photo": True}}
    result = await run_service_job(store, RedUpscaler(), SERVICES[UpscaleRequest], job.id, payload,
                                   classifier=classifier, tagger=StandInTagger())
    assert result["image"] is None and classifier.batches == [1]
    assert SafetyReport.from_dict(result["safety"]).real_photo
