"""Fake Discord interactions and attachments for calling app-command callbacks directly.

dpytest does not support app commands, so the interaction is a spec'd mock:
every response method is an AsyncMock hung off one parent mock, so a test can
read the order of calls (`interaction.calls`). An attachment's bytes are
served by the fake CDN (`cdn`, set by the `fake_cdn` fixture) at its `url`,
as Discord serves them.
"""

from __future__ import annotations

import itertools
from unittest.mock import AsyncMock, MagicMock

import discord
from discord import app_commands

from tests.fakes.discord_cdn import FakeCdn

# The CDN that serves `fake_attachment`'s bytes; the `fake_cdn` fixture sets it for each test.
cdn: FakeCdn | None = None

_ids = itertools.count(900_000_000_000_000_001)

RESPONSE_METHODS = ("defer", "send_message", "send_modal", "edit_message")
# The Discord application's owner, for a bot that is not logged in (the `make_toolbox_bot` fixture's).
APPLICATION_OWNER_ID = 4242


def fake_interaction(user_id: int = 1001, guild_id: int = 2002, channel_id: int = 3003, admin: bool = False,
                     operator: bool = False):
    """`admin`: the server's Administrator; `operator`: one of the bot's operators (the application's owner,
    as the fake client's `is_owner` says; a test that sets `client` to a real bot names them there)."""
    interaction = MagicMock(spec=discord.Interaction)
    interaction.client.settings.operator_ids = ()
    interaction.client.is_owner = AsyncMock(return_value=operator)
    calls = MagicMock()
    interaction.calls = calls
    responded = {"done": False}

    def mark_done(*args, **kwargs):
        responded["done"] = True

    interaction.response = MagicMock()
    for name in RESPONSE_METHODS:
        method = AsyncMock(side_effect=mark_done)
        calls.attach_mock(method, name)
        setattr(interaction.response, name, method)
    interaction.response.is_done = lambda: responded["done"]
    for name in ("edit_original_response", "delete_original_response"):
        method = AsyncMock()
        calls.attach_mock(method, name)
        setattr(interaction, name, method)
    interaction.original_response = AsyncMock(return_value=MagicMock(spec=discord.InteractionMessage, id=next(_ids)))
    interaction.created_at = discord.utils.utcnow()
    interaction.followup = MagicMock()
    interaction.followup.send = AsyncMock()
    calls.attach_mock(interaction.followup.send, "followup_send")
    interaction.user = MagicMock(spec=discord.Member)
    interaction.user.id = user_id
    interaction.user.guild_permissions = discord.Permissions.all() if admin else discord.Permissions.none()
    interaction.user.roles = []
    interaction.guild_id = guild_id
    interaction.channel_id = channel_id
    interaction.filesize_limit = 10 * 1024 * 1024
    return interaction


def fake_attachment(data: bytes, filename: str = "image.png", content_type: str | None = "image/png", size=None,
                    width: int | None = None, height: int | None = None, delay: float = 0.0):
    """`size`, `width` and `height` are what Discord reports (None: the real size; not reported);
    the CDN waits `delay` seconds before the body."""
    if cdn is None:
        raise RuntimeError("fake_attachment needs the fake CDN: use the fake_cdn fixture (autouse in tests/)")
    attachment = MagicMock(spec=discord.Attachment)
    attachment.filename = filename
    attachment.content_type = content_type
    attachment.size = len(data) if size is None else size
    attachment.width, attachment.height = width, height
    attachment.url = cdn.publish(data, filename, content_type or "application/octet-stream", delay=delay)
    # The bot downloads through its egress policy; discord.py's own fetch would bypass it.
    attachment.read = AsyncMock(side_effect=AssertionError("attachments are downloaded from attachment.url, not read()"))
    return attachment


def fake_message(*attachments):
    message = MagicMock(spec=discord.Message)
    message.attachments = list(attachments)
    return message


async def invoke(bot, command, interaction, *args, **kwargs):
    """Call an app command's callback the way the tree does, errors going to the bot's handler."""
    try:
        binding = getattr(command, "binding", None)
        if binding is not None:
            await command.callback(binding, interaction, *args, **kwargs)
        else:
            await command.callback(interaction, *args, **kwargs)
    except app_commands.AppCommandError as error:
        await bot.tree.on_error(interaction, error)
    except Exception as error:  # the tree wraps anything else the same way
        await bot.tree.on_error(interaction, app_commands.CommandInvokeError(command, error))


def ephemeral_error(interaction) -> str | None:
    """The text of the ephemeral error the user saw, if any."""
    for mock in (interaction.calls.send_message, interaction.calls.followup_send):
        for call in mock.await_args_list:
            if call.kwargs.get("ephemeral"):
                return call.args[0] if call.args else call.kwargs.get("content")
    return None


def channel_spy(bot):
    """Replace the bot's channel access: returns (channel, message) whose `edit` / `send` are recorded.

    What a reply uses once the interaction token is gone: the bot's own token on the channel.
    """
    channel, message = MagicMock(), MagicMock()
    message.edit = AsyncMock()
    channel.get_partial_message.return_value = message
    channel.send = AsyncMock()
    bot.get_partial_messageable = MagicMock(return_value=channel)
    return channel, message
