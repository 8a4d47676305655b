"""Expected failures to reach Discord or Modal, said in one line instead of a traceback.

An outage (DNS failing, a refused connection, a TLS failure, a timeout, a
gateway that closes) is not a bug: the log says what happened and when the
next try is, and nothing more. Anything else still logs its full traceback,
once, where it is caught.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import aiohttp
import discord

# discord.py's own loggers that report a lost connection with a traceback before retrying.
DISCORD_LOGGERS = ("discord.client", "discord.gateway", "discord.http", "discord.shard")


def describe_outage(error: BaseException) -> str | None:
    """The cause of an expected connection failure in a few words, or None if `error` is not one."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {error.host} rejected"
    if isinstance(error, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError, ssl.SSLError)):
        return "TLS handshake failed"
    if isinstance(error, aiohttp.ClientConnectorError):
        if isinstance(error.os_error, socket.gaierror):
            return f"DNS lookup of {error.host} failed"
        reason = error.os_error.strerror or type(error.os_error).__name__
        return f"cannot connect to {error.host}:{error.port} ({reason})"
    if isinstance(error, discord.GatewayNotFound):
        return "Discord's gateway is unavailable"
    if isinstance(error, discord.ConnectionClosed):
        return f"the gateway closed the connection (code {error.code})"
    if isinstance(error, discord.DiscordServerError):
        return f"Discord answered HTTP {error.status}"
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timed out"
    if isinstance(error, (aiohttp.ClientError, ConnectionError)):
        return f"connection failed ({type(error).__name__})"
    if isinstance(error, OSError) and error.strerror:
        return f"connection failed ({error.strerror})"
    return None


class OneLineOutages(logging.Filter):
    """Turns a log record that carries an outage's traceback into one line naming its cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            cause = describe_outage(record.exc_info[1])
            if cause is not None:
                record.msg = f"{record.getMessage()}: {cause}"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


def quiet_discord_outages() -> None:
    """discord.py reconnects by itself after an outage; its log lines then name the cause, no traceback."""
    for name in DISCORD_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, OneLineOutages) for existing in logger.filters):
            logger.addFilter(OneLineOutages())
