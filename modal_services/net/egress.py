"""The one egress policy: every outbound fetch of the workers and the bot goes through here.

`open_url` (blocking) and `open_url_async` take a URL and a `Purpose` (which
allow-list applies) and return a streamed response; `fetch_capped_async`
returns a whole small body (a Discord attachment), capped and on a deadline.
On every hop:

- the scheme is https (plain http only for explicitly allowed hosts);
- the URL carries no userinfo (`https://civitai.com@evil.example/` tricks);
- the host resolves, and *every* address it resolves to is public (no
  loopback, private, link-local, CGNAT, multicast, reserved, unspecified,
  nor IPv6 forms that embed one of those: mapped, NAT64, 6to4, Teredo);
- the connection is made to the address that was checked (no second DNS
  lookup that could answer differently), with TLS still verified against
  the host name;
- redirects are followed here, at most `MAX_REDIRECTS`, each hop checked;
  credentials go only to the origin they belong to, matched on the parsed
  URL, and never follow a redirect to another origin;
- (blocking side) the answer, TLS handshake to headers, comes within the read
  timeout of connecting, and the caller's `watch` can cut the connection from
  the moment it connects (`connections`).

Exceptions are explicit settings: the configured `CIVITAI_API_BASE` and
`HF_ENDPOINT` hosts and `TOOLBOX_ALLOWED_HOSTS` (comma-separated
`host[:port]`, for self-hosted storage on a LAN), which may be plain http and
private. Discord attachments come only from Discord's CDN hosts (or the
allowed hosts). A refusal is INVALID_INPUT naming the host and why; nothing
is fetched. A host whose name does not resolve is no refusal but a network
failure (`HostUnreachable`: CIVITAI_UNAVAILABLE for CivitAI, DOWNLOAD_FAILED
otherwise), not worth retrying. A caller whose URL must not be shown (a
signed link) gives a `label` to name it by in every message instead.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping
from urllib.parse import urljoin, urlsplit

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.net.addresses import address_problem, is_ip_literal

if TYPE_CHECKING:
    from modal_services.net.connections import ConnectionWatch

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DISCORD_CDN_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_READ_TIMEOUT = 60.0
# Headers that name the caller to one origin; dropped when a redirect leaves it.
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")


class Purpose(enum.Enum):
    CIVITAI = "civitai"  # the CivitAI API and the storage its downloads redirect to
    URL = "url"  # plain-URL models and per-request LoRA URLs: any public host
    ATTACHMENT = "attachment"  # Discord attachments: Discord's CDN only


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> "Origin":
        parts = urlsplit(url)
        scheme = (parts.scheme or "").lower()
        try:
            port = parts.port
        except ValueError:
            raise refused(url, "its port is not a number") from None
        return cls(scheme, _normal_host(parts.hostname or ""), port or (443 if scheme == "https" else 80))


@dataclass(frozen=True)
class Target:
    """A checked hop: where to connect (the checked address) and what to ask for."""

    origin: Origin
    address: str  # the IP to connect to
    request_path: str  # path and query, as sent

    @property
    def host_header(self) -> str:
        default = 443 if self.origin.scheme == "https" else 80
        host = f"[{self.origin.host}]" if ":" in self.origin.host else self.origin.host
        return host if self.origin.port == default else f"{host}:{self.origin.port}"


class HostUnreachable(ToolboxError):
    """A host that cannot be reached at all (its name does not resolve): a network failure, not bad input, and
    retrying it at once would fail the same way."""


def refused(url: str, why: str, label: str | None = None) -> ToolboxError:
    return ToolboxError(ErrorCode.INVALID_INPUT, f"Refused to fetch from {label or _describe_host(url)}: {why}.")


def _unresolved(url: str, purpose: Purpose, label: str | None) -> HostUnreachable:
    if purpose is Purpose.CIVITAI:
        return HostUnreachable(ErrorCode.CIVITAI_UNAVAILABLE,
                               f"{label or _describe_host(url)} does not resolve (check the network or CIVITAI_API_BASE).")
    return HostUnreachable(ErrorCode.DOWNLOAD_FAILED,
                           f"{label or _describe_host(url)} does not resolve (check the link and the network).")


def _describe_host(url: str) -> str:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    return f"`{host}`" if host else "that address"


def _normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii") if host and not is_ip_literal(host) else host
    except UnicodeError:
        return host


def _host_port_entries(value: str | None) -> set[tuple[str, int | None]]:
    entries = set()
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        parts = urlsplit(item if "://" in item else "//" + item)
        try:
            port = parts.port
        except ValueError:
            continue
        if parts.hostname:
            entries.add((_normal_host(parts.hostname), port))
    return entries


def allowed_hosts(environ: Mapping[str, str] | None = None) -> set[tuple[str, int | None]]:
    """The explicit exceptions: (host, port or None for any port), from the settings."""
    env = os.environ if environ is None else environ
    hosts = _host_port_entries(env.get("TOOLBOX_ALLOWED_HOSTS"))
    for name in ("CIVITAI_API_BASE", "HF_ENDPOINT"):
        if env.get(name):
            origin = Origin.of(env[name].strip())
            hosts.add((origin.host, origin.port))
    return hosts


def _is_allowed(origin: Origin, extra: Iterable[str], environ: Mapping[str, str] | None) -> bool:
    hosts = allowed_hosts(environ)
    for base in extra:
        trusted = Origin.of(base)
        hosts.add((trusted.host, trusted.port))
    return any(origin.host == host and port in (None, origin.port) for host, port in hosts)


def plain_http_allowed(url: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `url`'s host and port are an explicit exception (TOOLBOX_ALLOWED_HOSTS or a configured base),
    which may be fetched over plain http."""
    try:
        origin = Origin.of(url)
    except ToolboxError:
        return False
    return bool(origin.host) and _is_allowed(origin, (), environ)


def check(url: str, purpose: Purpose, trusted: Iterable[str] = (), environ: Mapping[str, str] | None = None,
          resolve=socket.getaddrinfo, label: str | None = None) -> Target:
    """One hop against the policy: the checked address to connect to, INVALID_INPUT saying why not, or
    `HostUnreachable`. With `label`, messages name the URL by it, and name no address it resolves to."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise refused(url, "it is not a valid URL", label) from None
    scheme = (parts.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise refused(url, f"only https links are fetched, not {scheme or 'scheme-less'} ones", label)
    if "@" in parts.netloc or parts.username is not None:
        raise refused(url, "the link carries a user name or password", label)
    try:
        origin = Origin.of(url)
    except ToolboxError:
        raise refused(url, "its port is not a number", label) from None
    if not origin.host:
        raise refused(url, "the link has no host", label)
    allowed = _is_allowed(origin, trusted, environ)
    if not allowed:
        if scheme != "https":
            raise refused(url, "only https links are fetched (add the host to TOOLBOX_ALLOWED_HOSTS for plain http)", label)
        if purpose is Purpose.ATTACHMENT and origin.host not in DISCORD_CDN_HOSTS:
            raise refused(url, "attachments are fetched from Discord's CDN only", label)
    try:
        infos = resolve(origin.host, origin.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise _unresolved(url, purpose, label) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise _unresolved(url, purpose, label)
    if not allowed:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                named = "an address that is not public" if label else problem
                raise refused(url, f"it resolves to {named} (add it to TOOLBOX_ALLOWED_HOSTS if it is yours)", label)
    request_path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(origin, addresses[0], request_path)


@dataclass(frozen=True)
class Credentials:
    """Headers for one origin only (a service's token): attached when a hop's parsed origin equals it."""

    origin: Origin
    headers: Mapping[str, str]

    @classmethod
    def for_base(cls, base_url: str, headers: Mapping[str, str]) -> "Credentials":
        return cls(Origin.of(base_url), dict(headers))

    def __repr__(self) -> str:  # the token stays out of logs
        return f"Credentials({self.origin.host}, {len(self.headers)} headers)"


def _hop_headers(target: Target, headers: Mapping[str, str] | None, credentials: Credentials | None,
                 first_origin: Origin) -> dict[str, str]:
    sent = {name: value for name, value in (headers or {}).items()
            if target.origin == first_origin or name.lower() not in CREDENTIAL_HEADERS}
    if credentials is not None and credentials.origin == target.origin:
        sent.update(credentials.headers)
    sent["Host"] = target.host_header
    return sent


def _next_hop(url: str, location: str | None, hops: int, label: str | None = None) -> str:
    if not location:
        raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{label or _describe_host(url)} answered a redirect without a target.")
    if hops >= MAX_REDIRECTS:
        raise refused(url, f"more than {MAX_REDIRECTS} redirects", label)
    return urljoin(url, location)


# ---------------------------------------------------------------- blocking


class _UnlabelledOnly(logging.Filter):
    """urllib3 logs each request's host and full URL (its query too) at DEBUG: dropped for a labelled
    fetch, whose URL must not be shown anywhere."""

    requesting = threading.local()  # `.label`: the label of the request this thread is making

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(self.requesting, "label", None) is None


_URLLIB3_FILTER = _UnlabelledOnly()
logging.getLogger("urllib3.connectionpool").addFilter(_URLLIB3_FILTER)


class Response:
    """A streamed response: `status`, `headers`, the final `url`; read it, then close it (or use `with`)."""

    def __init__(self, raw, pool, url: str):
        self.raw = raw
        self._pool = pool
        self.url = url
        self.status: int = raw.status
        self.headers = raw.headers

    def read1(self, amount: int) -> bytes:
        """Whatever has arrived, up to `amount` bytes (at least one, or b"" at the end), as sent."""
        return self.raw.read1(amount, decode_content=False)

    def read_capped(self, limit: int, deadline_at: float | None = None) -> bytes:
        """The whole body, refused (DOWNLOAD_FAILED) when it declares or brings more than `limit` bytes
        (a declared size is refused before the body is read), or is still coming at `deadline_at`."""
        too_large = ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{_describe_host(self.url)} sent more than {limit} bytes.")
        declared = self.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        while chunk := self.raw.read1(64 * 1024, decode_content=True):
            body += chunk
            if len(body) > limit:
                raise too_large
            if deadline_at is not None and time.monotonic() > deadline_at:
                raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{_describe_host(self.url)} took too long to answer.")
        return bytes(body)

    def json(self, limit: int, deadline_at: float | None = None) -> Any:
        return json.loads(self.read_capped(limit, deadline_at))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.release_conn()
        self.raw.close()
        self._pool.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_url(url: str, purpose: Purpose, *, headers: Mapping[str, str] | None = None,
             credentials: Credentials | None = None, trusted: Iterable[str] = (),
             timeout: tuple[float, float] = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
             follow_redirects: bool = True, label: str | None = None,
             watch: ConnectionWatch | None = None) -> Response:
    """GET `url` under the policy, following redirects here; a streamed `Response` of the last hop.

    `trusted`: base URLs the caller was configured with (CIVITAI_API_BASE) that
    count as allowed hosts. `follow_redirects=False` returns a redirect as it
    came (its target is for the caller to check and open). `label`: what
    messages call a URL that must not be shown. `timeout`: (connect, read)
    seconds; the read timeout bounds each read and, from connecting, the whole
    answer up to its headers. `watch` gets each hop's connection as soon as it
    connects, to cut it when the request must end, until the hop is closed.
    Connection failures raise urllib3's errors (`ReadTimeoutError` for an answer
    that came too slowly).
    """
    trusted = tuple(trusted)
    for hops in range(MAX_REDIRECTS + 1):
        target = check(url, purpose, trusted, label=label)
        if hops == 0:
            first = target.origin
        pool = _pool_for(target, timeout, watch)
        _URLLIB3_FILTER.requesting.label = label
        try:
            raw = pool.urlopen("GET", target.request_path, headers=_hop_headers(target, headers, credentials, first),
                               redirect=False, retries=False, preload_content=False, assert_same_host=False)
        except BaseException:
            pool.close()
            raise
        finally:
            _URLLIB3_FILTER.requesting.label = None
        response = Response(raw, pool, url)
        if response.status not in REDIRECT_STATUSES or not follow_redirects:
            return response
        location = response.headers.get("Location")
        response.close()
        url = _next_hop(url, location, hops, label)
    raise AssertionError("unreachable: the loop returns or raises")


def _pool_for(target: Target, timeout: tuple[float, float], watch: ConnectionWatch | None):
    """A pool for one request to the checked address, its connections watched from the moment they connect."""
    import urllib3

    from modal_services.net.connections import WatchedHTTPPool, WatchedHTTPSPool

    limits = {"timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1]), "maxsize": 1, "retries": False,
              "watch": watch, "answer_within": timeout[1]}
    if target.origin.scheme == "https":
        import certifi

        # Connected to the checked address; TLS still verified against the host name (SNI and certificate).
        return WatchedHTTPSPool(
            target.address, target.origin.port, server_hostname=target.origin.host,
            assert_hostname=target.origin.host, cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **limits,
        )
    return WatchedHTTPPool(target.address, target.origin.port, **limits)


# ---------------------------------------------------------------- async


@contextlib.asynccontextmanager
async def open_url_async(url: str, purpose: Purpose, *, headers: Mapping[str, str] | None = None,
                         credentials: Credentials | None = None, trusted: Iterable[str] = (),
                         timeout: tuple[float, float] = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)):
    """`async with open_url_async(...) as response:` an aiohttp response of the last hop, under the same policy."""
    import asyncio

    import aiohttp

    trusted = tuple(trusted)
    first = Origin.of(url)
    client_timeout = aiohttp.ClientTimeout(sock_connect=timeout[0], sock_read=timeout[1])
    async with aiohttp.ClientSession(timeout=client_timeout, auto_decompress=False) as session:
        for hops in range(MAX_REDIRECTS + 1):
            target = await asyncio.to_thread(check, url, purpose, trusted)
            address = f"[{target.address}]" if ":" in target.address else target.address
            direct = f"{target.origin.scheme}://{address}:{target.origin.port}{target.request_path}"
            response = await session.get(
                direct, headers=_hop_headers(target, headers, credentials, first), allow_redirects=False,
                server_hostname=target.origin.host if target.origin.scheme == "https" else None,
            )
            if response.status not in REDIRECT_STATUSES:
                try:
                    yield response
                finally:
                    response.release()
                return
            location = response.headers.get("Location")
            response.release()
            url = _next_hop(url, location, hops)


async def fetch_capped_async(url: str, purpose: Purpose, *, limit: int, deadline: float) -> bytes:
    """The whole body of `url`, fetched under the policy; the async side's `Response.read_capped`.

    The body is asked for as stored (no content coding), so `limit` counts the
    bytes the caller gets. DOWNLOAD_FAILED when the host cannot be reached or
    breaks off, answers anything but 200, declares or sends more than `limit`
    bytes (the transfer is cut there), or has not sent it all within
    `deadline` seconds, redirects included. Refusals of the policy stay INVALID_INPUT.
    """
    import asyncio

    import aiohttp

    host = _describe_host(url)
    too_large = ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{host} sent more than {limit} bytes.")
    body = bytearray()
    try:
        async with asyncio.timeout(deadline):
            async with open_url_async(url, purpose, headers={"Accept-Encoding": "identity"}) as response:
                if response.status != 200:
                    raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{host} answered HTTP {response.status}.")
                if response.content_length is not None and response.content_length > limit:
                    raise too_large
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise too_large
    except TimeoutError:  # before OSError: it is one; aiohttp's socket timeouts are TimeoutErrors too
        raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{host} took too long to answer.") from None
    except (aiohttp.ClientError, OSError):
        raise ToolboxError(ErrorCode.DOWNLOAD_FAILED, f"{host} could not be reached, or broke off.") from None
    return bytes(body)
