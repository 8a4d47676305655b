"""The buttons under results and running jobs: their custom ids, which old messages carry, stay the
same, each is answered by its own button class, and what they all share (refused while the bot
closes, errors answered privately) holds for each."""

from __future__ import annotations

from unittest.mock import MagicMock

import discord
import pytest

from bot.tracker import CancelJobButton, cancel_view
from cogs.generate import (
    GenerateFromCaptionButton,
    RerollButton,
    UpscaleImageButton,
    VaryImageButton,
    generate_from_caption_view,
)
from cogs.generate import result_view as generate_result_view
from cogs.upscale import CaptionResultButton, UpscaleAgainButton, VarySeedButton
from cogs.upscale import result_view as upscale_result_view
from tests.bot.buttons import rebuilt
from tests.fakes.discord_fakes import ephemeral_error, fake_interaction

# Custom ids as messages sent by earlier versions carry them, and the button each must reach.
OLD_CUSTOM_IDS = {
    "toolbox:generate:u1:0a1b": UpscaleImageButton,
    "toolbox:generate:u4:0a1b": UpscaleImageButton,
    "toolbox:generate:v2:0a1b": VaryImageButton,
    "toolbox:generate:reroll:0a1b": RerollButton,
    "toolbox:caption-generate:0a1b": GenerateFromCaptionButton,
    "toolbox:upscale:again:0a1b": UpscaleAgainButton,
    "toolbox:upscale:vary:0a1b": VarySeedButton,
    "toolbox:upscale:caption:0a1b": CaptionResultButton,
    "toolbox:cancel:0a1b": CancelJobButton,
}


@pytest.mark.parametrize("custom_id, button", OLD_CUSTOM_IDS.items())
async def test_old_custom_ids_reach_their_own_button(custom_id, button):
    assert type(await rebuilt(custom_id)) is button


async def test_every_button_a_view_shows_is_rebuilt_from_its_custom_id_as_it_was():
    views = [generate_result_view("0a1b", [1, 2, 3, 4]), upscale_result_view("0a1b", True),
             generate_from_caption_view("0a1b"), cancel_view("0a1b")]
    for item in (item for view in views for item in view.children):
        again = await rebuilt(item.custom_id)
        assert again.to_component_dict() == item.to_component_dict()


def test_ids_that_no_button_ever_had_match_none():
    for custom_id in ("toolbox:generate:u5:0a1b", "toolbox:generate:x1:0a1b", "toolbox:upscale:again:XYZ"):
        templates = [button.__discord_ui_compiled_template__ for button in OLD_CUSTOM_IDS.values()]
        assert not any(template.fullmatch(custom_id) for template in templates)


async def test_a_press_while_the_bot_closes_is_refused_privately():
    button = await rebuilt("toolbox:generate:reroll:0a1b")
    click = fake_interaction()
    click.type = discord.InteractionType.component
    click.client = MagicMock(stopping=True)
    assert await button.interaction_check(click) is False
    assert "restarting" in click.calls.send_message.await_args.args[0]
    click.client.stopping = False
    assert await button.interaction_check(click) is True


async def test_an_error_in_a_press_is_answered_privately(make_toolbox_bot):
    click = fake_interaction()
    click.client = await make_toolbox_bot("cogs.caption", "cogs.upscale", "cogs.generate")
    # No settings kept under that job id.
    await (await rebuilt("toolbox:generate:reroll:0a1b")).callback(click)
    assert "no longer kept" in ephemeral_error(click)
