"""The egress policy: addresses and URLs refused or allowed, redirects checked per hop, tokens kept to their origin."""

from __future__ import annotations

import os
import socket
import time

import pytest

from modal_services.net import egress
from modal_services.library.civitai import CivitaiClient
from modal_services.net.addresses import address_problem
from modal_services.net.egress import Credentials, Purpose, check, open_url, open_url_async
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.transfer.download import download_file
from tests.fakes.hf_server import FakeHub
from tests.fakes.listener import Listener

DATA = os.urandom(10_000)


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True),
    ("2606:4700::1111", True),
    ("::ffff:93.184.216.34", True),  # mapped, of a public address
    ("127.0.0.1", False), ("127.8.9.10", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("100.127.255.254", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("239.255.255.250", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("192.0.0.1", False), ("198.18.0.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("fd12:3456::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:10.0.0.1", False),
    ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::", False),  # 6to4 of 169.254.169.254
    ("::127.0.0.1", False),  # IPv4-compatible
    ("2001:db8::1", False),  # documentation
])
def test_address_table(address, public):
    assert (address_problem(address) is None) is public, address_problem(address)


def fake_dns(table):
    """getaddrinfo over a fixed table: no name ever reaches a real resolver."""
    def resolve(host, port, type=0):
        if host not in table:
            raise socket.gaierror("unknown")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]
    return resolve


DNS = fake_dns({
    "civitai.com": ["104.18.1.1"],
    "cdn.discordapp.com": ["162.159.129.233"],
    "media.discordapp.net": ["162.159.130.234"],
    "example.com": ["93.184.216.34"],
    "evil.example": ["93.184.216.35"],
    "rebind.example": ["93.184.216.36", "127.0.0.1"],  # one public, one loopback: refused
    "internal.example": ["10.0.0.5"],
    "v6-mapped.example": ["::ffff:127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
})


@pytest.mark.parametrize("url, purpose, why", [
    ("http://example.com/x", Purpose.URL, "only https"),
    ("ftp://example.com/x", Purpose.URL, "only https"),
    ("file:///etc/passwd", Purpose.URL, "only https"),
    ("gopher://example.com/", Purpose.URL, "only https"),
    ("//example.com/x", Purpose.URL, "only https"),
    ("https://civitai.com@evil.example/x", Purpose.CIVITAI, "user name"),
    ("https://user:pw@example.com/x", Purpose.URL, "user name"),
    ("https://internal.example/x", Purpose.URL, "private"),
    ("https://rebind.example/x", Purpose.URL, "loopback"),
    ("https://v6-mapped.example/x", Purpose.URL, "embeds"),
    ("https://metadata.example/latest", Purpose.URL, "link-local"),
    ("https://example.com/x.png", Purpose.ATTACHMENT, "Discord's CDN"),
    ("https://cdn.discordapp.com.evil.example/x", Purpose.ATTACHMENT, "Discord's CDN"),
    ("https://example.com:99999/x", Purpose.URL, "port"),
])
def test_refused_urls(url, purpose, why):
    with pytest.raises(ToolboxError) as caught:
        check(url, purpose, resolve=DNS)
    assert caught.value.code is ErrorCode.INVALID_INPUT and why in caught.value.message


@pytest.mark.parametrize("url, purpose, code, hint", [
    ("https://unknown.example/x", Purpose.URL, ErrorCode.DOWNLOAD_FAILED, "check the link and the network"),
    ("https://unknown.example/api/v1/models/1", Purpose.CIVITAI, ErrorCode.CIVITAI_UNAVAILABLE, "CIVITAI_API_BASE"),
])
def test_a_name_that_does_not_resolve_is_a_network_failure_not_bad_input(url, purpose, code, hint):
    with pytest.raises(egress.HostUnreachable) as caught:
        check(url, purpose, resolve=DNS)
    assert caught.value.code is code and "`unknown.example` does not resolve" in caught.value.message
    assert hint in caught.value.message


def test_an_unreachable_civitai_is_unavailable_at_once():
    """What `toolbox models import` met: CIVITAI_UNAVAILABLE (exit 1) on the first try, not INVALID_INPUT (exit 2)."""
    started = time.monotonic()
    with pytest.raises(ToolboxError) as caught:
        CivitaiClient("https://civitai.invalid", None).resolve_download("https://civitai.com/api/download/models/1", "x")
    assert caught.value.code is ErrorCode.CIVITAI_UNAVAILABLE and "does not resolve" in caught.value.message
    assert time.monotonic() - started < 2  # no retries of a name that does not resolve


def test_a_label_keeps_the_url_out_of_refusals():
    for url in ("http://secret.example/x", "https://internal.example/secret", "https://u:secret@example.com/x",
                "https://secret.unknown/x"):
        with pytest.raises(ToolboxError) as caught:
            check(url, Purpose.URL, resolve=DNS, label="the link")
        assert "the link" in caught.value.message
        assert "secret" not in caught.value.message and "10.0.0.5" not in caught.value.message, caught.value.message


def test_plain_http_is_allowed_to_listed_hosts_only(monkeypatch):
    environ = {"TOOLBOX_ALLOWED_HOSTS": "minio.lan:9000, nas.lan"}
    assert egress.plain_http_allowed("http://minio.lan:9000/bucket/x.safetensors", environ)
    assert egress.plain_http_allowed("http://nas.lan:8080/x", environ)
    for url in ("http://minio.lan:9001/x", "http://example.com/x", "http://minio.lan.evil.example:9000/x",
                "http://nas.lan:bad/x", "http:///x"):
        assert not egress.plain_http_allowed(url, environ), url


@pytest.mark.parametrize("url", [
    "https://2130706433/x",  # decimal 127.0.0.1
    "https://0177.0.0.1/x",  # octal
    "https://0x7f.0.0.1/x",  # hex
    "https://127.1/x",  # short form
    "https://[::1]/x",
    "https://[::ffff:7f00:1]/x",
    "https://[0:0:0:0:0:ffff:169.254.169.254]/x",
    "https://169.254.169.254/latest/meta-data",
    "https://0.0.0.0/x",
])
def test_numeric_host_forms_are_resolved_then_refused(url):
    """The system's own parser reads the odd forms (as a connect would): the address it yields is what is checked."""
    def numeric_only(host, port, type=0):  # the same parser, never a DNS query
        return socket.getaddrinfo(host, port, type=type, flags=socket.AI_NUMERICHOST)

    with pytest.raises(ToolboxError) as caught:
        check(url, Purpose.URL, resolve=numeric_only)
    assert caught.value.code is ErrorCode.INVALID_INPUT and "resolves to" in caught.value.message


@pytest.mark.parametrize("url, purpose", [
    ("https://civitai.com/api/v1/models/1", Purpose.CIVITAI),
    ("https://example.com/model.safetensors", Purpose.URL),
    ("https://cdn.discordapp.com/attachments/1/2/a.safetensors", Purpose.ATTACHMENT),
    ("https://MEDIA.discordapp.net./attachments/1/2/a.png", Purpose.ATTACHMENT),
])
def test_allowed_urls_connect_to_the_checked_address(url, purpose):
    target = check(url, purpose, resolve=DNS)
    assert target.address == DNS(target.origin.host, 443)[0][4][0]


def test_allowed_hosts_setting_admits_a_lan_host_over_http(monkeypatch):
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "internal.example:8080, 127.0.0.1")
    assert check("http://internal.example:8080/x", Purpose.URL, resolve=DNS).address == "10.0.0.5"
    with pytest.raises(ToolboxError):  # another port of the same host is not in the list
        check("http://internal.example:8081/x", Purpose.URL, resolve=DNS)
    # The CDN rule gives way to an explicit allowed host, as the setting says.
    assert check("http://internal.example:8080/a.png", Purpose.ATTACHMENT, resolve=DNS)


def test_configured_bases_are_allowed(monkeypatch):
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "")
    monkeypatch.setenv("HF_ENDPOINT", "http://internal.example:9000")
    assert check("http://internal.example:9000/api/models/x", Purpose.URL, resolve=DNS)
    assert check("http://metadata.example/x", Purpose.CIVITAI, trusted=("http://metadata.example",), resolve=DNS)
    with pytest.raises(ToolboxError):
        check("http://metadata.example/x", Purpose.CIVITAI, resolve=DNS)


# ---------------------------------------------------------------- redirects, against loopback servers


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.add_plain("f", DATA)
        yield server


@pytest.fixture
def other():
    listener = Listener()
    yield listener
    listener.close()


def test_a_redirect_to_a_host_not_allowed_is_never_connected_to(hub, other, tmp_path):
    hub.fault("/files/f", "status", status=302, headers={"Location": f"http://127.0.0.2:{other.port}/x"})
    with pytest.raises(ToolboxError) as caught:
        download_file(f"{hub.url}/files/f", tmp_path / "f")
    assert caught.value.code is ErrorCode.INVALID_INPUT and "127.0.0.2" in caught.value.message
    assert other.connections == 0 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("location", [
    "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", "ftp://127.0.0.1/x", "https://[::1]/x",
])
def test_redirects_to_forbidden_targets_are_refused(hub, tmp_path, location):
    hub.fault("/files/f", "status", status=302, headers={"Location": location})
    with pytest.raises(ToolboxError) as caught:
        download_file(f"{hub.url}/files/f", tmp_path / "f")
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert len(hub.requests) == 1  # one hop, no retries of a refusal


def test_too_many_redirects(hub):
    hub.fault("/files/f", "status", times=6, status=302, headers={"Location": "/files/f"})
    with pytest.raises(ToolboxError) as caught:
        open_url(f"{hub.url}/files/f", Purpose.URL)
    assert "redirects" in caught.value.message and len(hub.requests) == egress.MAX_REDIRECTS + 1


def test_redirects_within_the_limit_are_followed(hub):
    hub.fault("/files/f", "status", times=2, status=307, headers={"Location": "/files/f"})
    with open_url(f"{hub.url}/files/f", Purpose.URL) as response:
        assert response.status == 200 and response.read_capped(1 << 20) == DATA


def test_a_small_body_declared_over_its_limit_is_refused_before_it_is_read(hub):
    hub.add_plain("large", os.urandom(8 << 20))
    hub.pace = 1 << 20  # reading it would take eight seconds
    with open_url(f"{hub.url}/files/large", Purpose.URL) as response:
        started = time.monotonic()
        with pytest.raises(ToolboxError) as caught:
            response.read_capped(1 << 20)
    assert caught.value.code is ErrorCode.DOWNLOAD_FAILED and "more than 1048576 bytes" in caught.value.message
    assert time.monotonic() - started < 1


@pytest.fixture
def far_hub(monkeypatch):
    """A second server on 127.0.0.2, allowed, standing for CivitAI's storage on another host."""
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "127.0.0.1,127.0.0.2")
    with FakeHub(host="127.0.0.2") as server:
        server.add_plain("f", DATA)
        yield server


def test_the_token_never_follows_a_cross_host_redirect(hub, far_hub, tmp_path):
    secret = "civitai-secret-token"
    hub.fault("/files/f", "status", status=302, headers={"Location": f"{far_hub.url}/files/f"})
    got = download_file(f"{hub.url}/files/f", tmp_path / "f",
                        credentials=Credentials.for_base(hub.url, {"Authorization": f"Bearer {secret}"}))
    assert got.size == len(DATA)
    assert hub.requests[0]["headers"].get("Authorization") == f"Bearer {secret}"
    (storage,) = far_hub.body_requests("/files/f")
    assert storage["headers"].get("Authorization") is None


def test_the_civitai_token_reaches_only_the_api_host(hub, far_hub):
    """A downloadUrl the API sends cannot steer the token: rebuilt from parsed parts, matched by origin."""
    api = CivitaiClient(hub.url, "civitai-secret-token")
    assert api.rebase("https:.evil.example/x") == f"{hub.url}/.evil.example/x"
    assert api.rebase("https://civitai.com/api/download/models/1?type=Model") == f"{hub.url}/api/download/models/1?type=Model"
    assert api.rebase(f"{far_hub.url}/files/f") == f"{far_hub.url}/files/f"  # another host stays that host...
    resolved = api.resolve_download(f"{far_hub.url}/files/f", "x")
    assert resolved.credentials is None  # ...and gets no token
    assert far_hub.requests[0]["headers"].get("Authorization") is None
    assert "secret" not in repr(api) and "secret" not in repr(api.credentials)


# ---------------------------------------------------------------- async


async def test_async_open_reads_an_allowed_host(hub):
    async with open_url_async(f"{hub.url}/files/f", Purpose.URL) as response:
        assert response.status == 200 and await response.read() == DATA


async def test_async_open_refuses_before_connecting(hub, other, monkeypatch):
    hub.fault("/files/f", "status", status=302, headers={"Location": f"http://127.0.0.2:{other.port}/x"})
    with pytest.raises(ToolboxError) as caught:
        async with open_url_async(f"{hub.url}/files/f", Purpose.URL) as response:
            await response.read()
    assert caught.value.code is ErrorCode.INVALID_INPUT and other.connections == 0
    monkeypatch.setenv("TOOLBOX_ALLOWED_HOSTS", "")
    with pytest.raises(ToolboxError) as caught:
        async with open_url_async(f"{hub.url}/files/f", Purpose.ATTACHMENT) as response:
            await response.read()
    assert caught.value.code is ErrorCode.INVALID_INPUT and len(hub.requests) == 1  # the redirect only
