"""Content safety in Discord: /generate, /upscale and the result buttons in channels that are age-restricted
or not, and in DMs, for each policy; and /settings safety.

Real LocalBackend and cogs, stand-in SDXL engines, the tiny ViT classifier (one that flags every image).
"""

from __future__ import annotations

from unittest.mock import MagicMock

import discord
import pytest

from bot.guild_settings import GuildSettings, load_guild_settings, save_guild_settings
from tests.bot.buttons import press as press_button
from modal_services.jobs.requests import GenerateRequest
from tests.fakes.discord_fakes import ephemeral_error, fake_attachment, fake_interaction, fake_message, invoke
from tests.images import png_bytes
from tests.bot.test_generate_cog import attachment_from, final_edit, generate, sdxl_stand_in

GUILD = 2002


@pytest.fixture
def engine(stand_in_engines, install_nsfw_classifier):
    engine = stand_in_engines.use(GenerateRequest, sdxl_stand_in(delay=0))
    install_nsfw_classifier("flags")
    return engine


@pytest.fixture
async def toolbox_bot(make_toolbox_bot):
    return await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate", "cogs.settings", "cogs.jobs")


def in_channel(kind: str, **options):
    """A fake interaction from a text channel ("sfw" or "nsfw") or a DM ("dm")."""
    if kind == "dm":
        interaction = fake_interaction(guild_id=None, **options)
        interaction.channel = MagicMock(spec=discord.DMChannel)
    else:
        interaction = fake_interaction(**options)
        interaction.channel = MagicMock(spec=discord.TextChannel)
        interaction.channel.is_nsfw.return_value = kind == "nsfw"
    return interaction


async def use_policy(bot, policy: str, guild_id: int | None = GUILD) -> None:
    await save_guild_settings(bot.backend.store, guild_id, GuildSettings(safety_policy=policy))


def private_messages(interaction) -> list[str]:
    return [call.args[0] for call in interaction.followup.send.await_args_list if call.kwargs.get("ephemeral")]


def buttons(final: dict) -> list[str]:
    return [item.custom_id.split(":")[2] for item in final["view"].children]


async def press(bot, job_id: str, action: str, where: str, message) -> MagicMock:
    """The result's `action` button (u1, v2, reroll...) pressed on `message`, in a channel of kind `where`."""
    click = in_channel(where)
    click.message, click.client = message, bot
    await press_button(f"toolbox:generate:{action}:{job_id}", click)
    return click


async def generated_message(bot, interaction):
    """The only job's id, and its result as a message whose attachments the buttons can read."""
    files = final_edit(interaction)["attachments"]
    job_id = (await bot.backend.store.keys("job:"))[0].split(":", 1)[1]
    return job_id, fake_message(*(attachment_from(file) for file in files))


async def test_block_withholds_flagged_images_outside_age_restricted_channels(toolbox_bot, engine, fast_progress):
    interaction = in_channel("sfw")
    await generate(toolbox_bot, interaction, "a beach", count=2, seed=5)
    final = final_edit(interaction)
    assert final["attachments"] == []
    assert "Images 1, 2 not posted" in final["content"]
    assert buttons(final) == ["reroll"]  # nothing to upscale or vary
    [notice] = private_messages(interaction)
    assert "withheld" in notice and "1.00" in notice and "not age-restricted" in notice and "0.7" in notice
    job = next(iter((await toolbox_bot.backend.store.items("job:")).values()))
    assert [image["decision"] for image in job["safety"]["images"]] == ["withhold", "withhold"]


async def test_spoiler_posts_flagged_images_as_spoilers(toolbox_bot, engine, fast_progress):
    await use_policy(toolbox_bot, "spoiler")
    interaction = in_channel("sfw")
    await generate(toolbox_bot, interaction, "a beach", count=2, seed=5)
    final = final_edit(interaction)
    assert [file.filename for file in final["attachments"]] == ["SPOILER_image1.png", "SPOILER_image2.png"]
    assert all(file.spoiler for file in final["attachments"])
    assert "flagged by the safety check: posted as a spoiler" in final["content"]
    assert buttons(final) == ["u1", "u2", "v1", "v2", "reroll"]
    assert private_messages(interaction) == []


async def test_off_posts_everything_unchecked_and_says_so(toolbox_bot, engine, fast_progress):
    await use_policy(toolbox_bot, "off")
    interaction = in_channel("sfw")
    await generate(toolbox_bot, interaction, "a beach")
    final = final_edit(interaction)
    assert [file.filename for file in final["attachments"]] == ["image1.png"]
    assert "Safety check not run: the safety check is off" in final["content"]
    job = next(iter((await toolbox_bot.backend.store.items("job:")).values()))
    assert job["safety"]["images"] == [{"nsfw_score": None, "decision": "post", "rating": "general", "reason": None}]


@pytest.mark.parametrize("policy", ["block", "spoiler", "off"])
async def test_age_restricted_channels_get_images_as_generated(toolbox_bot, engine, fast_progress, policy):
    await use_policy(toolbox_bot, policy)
    interaction = in_channel("nsfw")
    await generate(toolbox_bot, interaction, "a beach", count=2)
    final = final_edit(interaction)
    assert [file.filename for file in final["attachments"]] == ["image1.png", "image2.png"]
    assert not any(file.spoiler for file in final["attachments"])
    assert "Safety check not run" in final["content"] and private_messages(interaction) == []


@pytest.mark.parametrize("policy, posted", [("block", []), ("spoiler", ["SPOILER_image1.png"]), ("off", ["image1.png"])])
async def test_dms_count_as_not_age_restricted(toolbox_bot, engine, fast_progress, policy, posted):
    await use_policy(toolbox_bot, policy, guild_id=None)
    interaction = in_channel("dm")
    await generate(toolbox_bot, interaction, "a beach")
    assert [file.filename for file in final_edit(interaction)["attachments"]] == posted


async def test_the_buttons_are_judged_for_the_channel_they_are_pressed_in(toolbox_bot, engine, fast_progress):
    await use_policy(toolbox_bot, "spoiler")
    interaction = in_channel("nsfw")
    await generate(toolbox_bot, interaction, "a beach", count=2, seed=3)
    job_id, message = await generated_message(toolbox_bot, interaction)
    await use_policy(toolbox_bot, "block")
    # The same result's buttons: withheld in an ordinary channel, posted in an age-restricted one.
    for action in ("reroll", "v1", "u2"):
        assert final_edit(await press(toolbox_bot, job_id, action, "sfw", message))["attachments"] == []
        assert final_edit(await press(toolbox_bot, job_id, action, "nsfw", message))["attachments"]


async def test_a_spoilered_result_still_feeds_its_buttons(toolbox_bot, engine, fast_progress):
    await use_policy(toolbox_bot, "spoiler")
    interaction = in_channel("sfw")
    await generate(toolbox_bot, interaction, "a beach", count=2, seed=3)
    job_id, message = await generated_message(toolbox_bot, interaction)
    click = await press(toolbox_bot, job_id, "u2", "sfw", message)
    assert engine.upscaled and ephemeral_error(click) is None
    assert [file.filename for file in final_edit(click)["attachments"]] == ["SPOILER_upscaled.png",
                                                                            "SPOILER_source.png"]


async def test_upscale_results_are_judged(toolbox_bot, engine, fast_progress):
    command = toolbox_bot.tree.get_command("upscale")
    interaction = in_channel("sfw")
    await invoke(toolbox_bot, command, interaction, fake_attachment(png_bytes(40, 30)))
    final = final_edit(interaction)
    assert final["attachments"] == [] and final["view"] is None and "not posted" in final["content"]
    [notice] = private_messages(interaction)
    assert "The image withheld" in notice

    # An uploaded image may show a real person: flagged, it is withheld in an age-restricted channel too.
    interaction = in_channel("nsfw")
    await invoke(toolbox_bot, command, interaction, fake_attachment(png_bytes(40, 30)))
    assert final_edit(interaction)["attachments"] == []
    [notice] = private_messages(interaction)
    assert "real person" in notice


async def test_refused_prompts_never_start_a_job(toolbox_bot, engine, fast_progress):
    settings = GuildSettings(refused_words=["clown"])
    await save_guild_settings(toolbox_bot.backend.store, GUILD, settings)
    for prompt, negative, words in [("n u d e, c h i l d", None, "minors"), ("1girl, nude", "adult", "minors"),
                                    ("a CL0WN at a party", None, "does not allow")]:
        for where in ("sfw", "nsfw"):
            interaction = in_channel(where)
            await generate(toolbox_bot, interaction, prompt, negative=negative)
            assert words in ephemeral_error(interaction)
    assert engine.generated == [] and await toolbox_bot.backend.store.keys("job:") == []


# ------------------------------------------------------------------ /settings safety


async def settings_safety(bot, interaction, **options):
    command = bot.tree.get_command("settings").get_command("safety")
    names = ["policy", "threshold", "add_word", "remove_word"]
    await invoke(bot, command, interaction, *(options.get(name) for name in names))
    return interaction.response.send_message.await_args.args[0] if interaction.response.send_message.await_args else None


def choice(value: str) -> discord.app_commands.Choice:
    return discord.app_commands.Choice(name=value, value=value)


async def test_settings_safety_sets_the_policy_threshold_and_words(toolbox_bot):
    store = toolbox_bot.backend.store
    admin = fake_interaction(admin=True, user_id=77)
    reply = await settings_safety(toolbox_bot, admin, policy=choice("spoiler"), threshold=0.5, add_word="clown")
    assert "spoiler" in reply and "`clown`" in reply and "minors are refused" in reply
    await settings_safety(toolbox_bot, fake_interaction(admin=True), add_word="Blood Moon")
    await settings_safety(toolbox_bot, fake_interaction(admin=True), add_word="CLOWN")  # already there
    settings = await load_guild_settings(store, GUILD)
    assert (settings.safety_policy, settings.nsfw_threshold) == ("spoiler", 0.5)
    assert settings.refused_words == ["clown", "Blood Moon"] and settings.safety_off_by is None
    reply = await settings_safety(toolbox_bot, fake_interaction(admin=True), remove_word="blood moon")
    assert (await load_guild_settings(store, GUILD)).refused_words == ["clown"] and "Blood" not in reply

    interaction = fake_interaction(admin=True)
    await settings_safety(toolbox_bot, interaction, remove_word="juggler")
    assert "not on this server's list" in ephemeral_error(interaction)


async def test_turning_safety_off_is_recorded_and_shown(toolbox_bot):
    store = toolbox_bot.backend.store
    await settings_safety(toolbox_bot, fake_interaction(admin=True, user_id=77), policy=choice("off"))
    settings = await load_guild_settings(store, GUILD)
    assert settings.safety_policy == "off" and settings.safety_off_by == 77 and settings.safety_off_at > 0

    show = fake_interaction(admin=True)
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("settings").get_command("show"), show)
    shown = show.response.send_message.await_args.args[0]
    assert "Safety: **off**" in shown and "<@77>" in shown and f"<t:{int(settings.safety_off_at)}:R>" in shown

    status = fake_interaction()
    await invoke(toolbox_bot, toolbox_bot.tree.get_command("status"), status)
    assert "**Safety**: **off**" in status.edit_original_response.await_args.kwargs["content"]

    await settings_safety(toolbox_bot, fake_interaction(admin=True), policy=choice("block"))
    settings = await load_guild_settings(store, GUILD)
    assert settings.safety_off_by is None and settings.safety_off_at is None


async def test_only_admins_change_safety_and_bad_values_change_nothing(toolbox_bot):
    store = toolbox_bot.backend.store
    member = fake_interaction()
    await settings_safety(toolbox_bot, member, policy=choice("off"))
    assert "Only this server's admins" in ephemeral_error(member)
    admin = fake_interaction(admin=True)
    await settings_safety(toolbox_bot, admin, threshold=1.5)
    assert "threshold" in ephemeral_error(admin).lower()
    assert await load_guild_settings(store, GUILD) == GuildSettings()
