"""Attachment downloads go through the egress policy: Discord's CDN only, capped, on a deadline.

The attachments are served by the fake CDN on 127.0.0.1 (an allowed host in
tests, as an admin allows one); every refusal is INVALID_INPUT naming the
file, and none shows the signed URL or anything else internal.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

import bot.attachments
from bot.attachments import read_image
from modal_services.errors import ErrorCode, ToolboxError
from tests.fakes.discord_fakes import fake_attachment
from tests.fakes.listener import Listener
from tests.images import png_bytes


@pytest.fixture
def connections(monkeypatch):
    """Every connection aiohttp opens, by host, still made (so a test sees what was attempted)."""
    attempted: list[str] = []
    real_connect = aiohttp.TCPConnector.connect

    async def connect(self, request, *args, **kwargs):
        attempted.append(request.url.host)
        return await real_connect(self, request, *args, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "connect", connect)
    return attempted


@pytest.fixture
def listeners():
    """Sockets on 127.0.0.1 and 127.0.0.2 that count connections: where a refused redirect must not go."""
    opened = [Listener("127.0.0.1"), Listener("127.0.0.2")]
    yield opened
    for listener in opened:
        listener.close()


async def refusal(attachment) -> str:
    with pytest.raises(ToolboxError) as caught:
        await read_image(attachment)
    error = caught.value
    assert error.code is ErrorCode.INVALID_INPUT
    assert f"`{attachment.filename}`" in error.message
    url = urlsplit(attachment.url)
    assert "hm=" not in error.message and (not url.path or url.path not in error.message)
    return error.message


async def test_an_attachment_is_read_from_the_cdn(fake_cdn, connections):
    data = png_bytes(30, 20)
    received = await read_image(fake_attachment(data, "cat.png"))
    assert received.size == (30, 20) and received.filename == "cat.png"
    assert len(fake_cdn.requests) == 1 and connections == ["127.0.0.1"]


async def test_a_redirect_within_the_cdn_is_followed(fake_cdn):
    attachment = fake_attachment(png_bytes(12, 10), "moved.png")
    attachment.url = fake_cdn.redirect(attachment.url)
    assert (await read_image(attachment)).size == (12, 10)
    assert len(fake_cdn.requests) == 2


@pytest.mark.parametrize("url", [
    "https://127.0.0.2:{port}/attachments/1/2/x.png",  # a private address, with something listening there
    "http://cdn.discordapp.com/attachments/1/2/x.png",  # Discord's host, but plain http
    "https://169.254.169.254/latest/meta-data/",
    "https://cdn.discordapp.com.evil.example/attachments/1/2/x.png",
    "https://cdn.discordapp.com@127.0.0.2/x.png",
    "https://[::ffff:127.0.0.2]/x.png",
    "file:///etc/passwd",
])
async def test_a_url_off_discords_cdn_is_refused_before_any_connection(url, listeners, connections):
    attachment = fake_attachment(png_bytes(), "x.png")
    attachment.url = url.format(port=listeners[1].port)
    assert "Refused" in await refusal(attachment)
    assert connections == [] and all(listener.connections == 0 for listener in listeners)


@pytest.mark.parametrize("target", [
    "https://127.0.0.1:{port}/x.png",  # loopback, on a port that is not the allowed CDN's
    "http://127.0.0.2:{port2}/x.png",
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://[::1]:{port}/x.png",
])
async def test_a_cdn_redirect_to_a_private_address_is_refused_at_the_hop(target, fake_cdn, listeners, monkeypatch):
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", fake_cdn.host_port)  # the CDN itself, and nothing else on loopback
    attachment = fake_attachment(png_bytes(), "hop.png")
    attachment.url = fake_cdn.redirect(target.format(port=listeners[0].port, port2=listeners[1].port))
    assert "Refused" in await refusal(attachment)
    assert len(fake_cdn.requests) == 1  # the redirect only
    assert all(listener.connections == 0 for listener in listeners)


@pytest.mark.parametrize("content_length", [True, False], ids=["declared by the server", "undeclared"])
async def test_a_body_larger_than_discord_declared_is_cut_and_refused(content_length, fake_cdn):
    body = bytes(32 * 2**20)  # more than loopback's socket buffers hold: the server sees the cut
    attachment = fake_attachment(b"", "big.png", size=1000)
    attachment.url = fake_cdn.publish(body, "big.png", content_length=content_length)
    assert "more than 1000 bytes" in await refusal(attachment)
    assert fake_cdn.wait_for_cut()


async def test_a_body_over_the_attachment_cap_is_refused_whatever_discord_declared(fake_cdn, monkeypatch):
    monkeypatch.setattr(bot.attachments, "MAX_ATTACHMENT_BYTES", 4096)
    attachment = fake_attachment(bytes(1 << 20), "huge.png")
    assert "more than 4096 bytes" in await refusal(attachment)


async def test_a_body_shorter_than_declared_is_refused(fake_cdn):
    data = png_bytes(40, 40)
    attachment = fake_attachment(data, "short.png", size=len(data) + 500)
    assert "arrived incomplete" in await refusal(attachment)


@pytest.mark.parametrize("status", [403, 404, 500])
async def test_a_cdn_error_status_is_refused(status, fake_cdn):
    attachment = fake_attachment(png_bytes(), "gone.png")
    attachment.url = fake_cdn.answer(status, "gone.png")
    assert f"HTTP {status}" in await refusal(attachment)


async def test_an_unreachable_cdn_is_refused():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there once it closes
    attachment = fake_attachment(png_bytes(), "far.png")
    attachment.url = f"http://127.0.0.1:{port}/attachments/1/2/far.png?hm=abc"
    assert "could not be reached" in await refusal(attachment)


async def test_a_slow_cdn_ends_at_the_deadline(fake_cdn, monkeypatch):
    monkeypatch.setattr(bot.attachments, "DOWNLOAD_DEADLINE_SECONDS", 0.3)
    attachment = fake_attachment(png_bytes(), "slow.png", delay=3.0)  # headers at once, the body late
    started = time.monotonic()
    assert "took too long" in await refusal(attachment)
    assert time.monotonic() - started < 2.0
