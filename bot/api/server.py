"""How `toolbox serve` runs the API: uvicorn, with the limits a server open to a network needs and uvicorn lacks.

- Headers: a request's headers must be complete within `header_timeout` seconds of the connection
  opening (or of the previous response, on a kept-alive connection); else 408 and the connection closes.
  uvicorn has no such deadline: a client sending one byte a second holds a connection for ever.
- Bodies: after `body_grace` seconds, a body must have arrived at `min_body_rate` bytes a second on
  average since the app began reading it; else 408 and the connection closes.
- Connections: one client address may hold `connections_per_client` at once; the next is answered 429
  and closed, while other addresses are served. Behind a reverse proxy every client has the proxy's address:
  raise the limit there, or let the proxy keep these limits.
- The access log shows no query string values (a token put in a URL stays out of the log).

The Modal web endpoint runs the same app without this module: Modal's proxy takes the clients' connections
and ends every request after 150 s; the app's own body size limit (body_limit.py) holds on both.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from dataclasses import dataclass

import h11
import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from bot.api.responses import error_body
from modal_services.errors import ErrorCode, ToolboxError

log = logging.getLogger(__name__)

# Seconds a body may take before its average rate is judged: a client's connection warming up, a proxy
# buffering the first chunk.
BODY_GRACE_SECONDS = 10.0
ACCESS_LOGGER = "uvicorn.access"


@dataclass(frozen=True)
class ServingLimits:
    header_timeout: float = 30.0
    min_body_rate: float = 8 * 1024  # bytes a second
    connections_per_client: int = 32
    body_grace: float = BODY_GRACE_SECONDS

    @classmethod
    def from_settings(cls, settings) -> "ServingLimits":
        return cls(header_timeout=settings.api_header_timeout, min_body_rate=settings.api_min_body_rate * 1024,
                   connections_per_client=settings.api_connections_per_client)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline and a cap on connections per client address."""

    def __init__(self, *args, limits: ServingLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._too_many_from_this_address():
            log.info("refused a connection from %s: it already has %d open", self.client[0],
                     self.limits.connections_per_client)
            self._answer_and_close(429, ErrorCode.RATE_LIMITED, "Too many connections from this address at once.")
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in
            self._stop_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # waiting for the next request
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def _too_many_from_this_address(self) -> bool:
        if not self.client:
            return False  # a Unix socket: no address to count by
        host = self.client[0]
        open_here = sum(1 for other in self.connections if (getattr(other, "client", None) or ("",))[0] == host)
        return open_here > self.limits.connections_per_client  # this connection is among them

    def _await_headers(self) -> None:
        self._stop_header_deadline()
        self._header_deadline = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.info("closed a connection from %s: no complete request headers within %g s",
                 self.client[0] if self.client else "a local socket", self.limits.header_timeout)
        self._answer_and_close(408, ErrorCode.TIMEOUT,
                               f"The request's headers did not arrive within {self.limits.header_timeout:g} s.")

    def _answer_and_close(self, status: int, code: ErrorCode, message: str) -> None:
        """Answer outside any request (h11 sends responses only to a request it has read), then close."""
        body = error_body(ToolboxError(code, message)).model_dump_json(exclude_none=True).encode()
        head = (f"HTTP/1.1 {status} {'Request Timeout' if status == 408 else 'Too Many Requests'}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


class BodyRate:
    """ASGI wrapper: a request body slower than `min_body_rate` on average, after `body_grace` seconds, is
    answered 408 (the API's error shape) and its connection closed. Only time spent waiting on the client
    counts against it: the clock starts when the app first asks for the body."""

    def __init__(self, app, limits: ServingLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started: float | None = None
        arrived = 0
        cut = False

        async def timed_receive():
            nonlocal started, arrived, cut
            started = loop.time() if started is None else started
            # The body is on time while `arrived` bytes cover the rate for the time since the grace ran out.
            due = started + self.limits.body_grace + arrived / self.limits.min_body_rate
            try:
                async with asyncio.timeout_at(due):
                    message = await receive()
            except TimeoutError:
                cut = True
                # An HTTPException passes through FastAPI's body reading to the app's error handler.
                raise HTTPException(408, f"The request body arrived too slowly (under "
                                         f"{self.limits.min_body_rate / 1024:g} KB/s).") from None
            arrived += len(message.get("body", b""))
            return message

        async def closing_send(message):
            if cut and message["type"] == "http.response.start":
                # The rest of the body is still on its way: the connection cannot serve another request.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, closing_send)


class RedactedQueries(logging.Filter):
    """Shows a request target's query names without their values (`/jobs?token=***`) in the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redacted_target(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def redacted_target(text: str) -> str:
    """`/path?a=1&b` as `/path?a=***&***`; any other text as it is."""
    path, question, query = text.partition("?")
    if not question or not path.startswith("/"):
        return text
    pairs = (part.partition("=") for part in query.split("&") if part)
    parts = [f"{name}=***" if equals else "***" for name, equals, _ in pairs]
    return f"{path}?{'&'.join(parts)}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` as uvicorn binds one; one that cannot be is a one-line ToolboxError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _bind_error(host, port, exc) from None
    return sock


def _bind_error(host: str, port: int, exc: OSError) -> ToolboxError:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ToolboxError(ErrorCode.BACKEND_UNAVAILABLE, f"{address} is in use; choose another with --port.")
    if exc.errno == errno.EACCES:
        return ToolboxError(ErrorCode.PERMISSION_DENIED,
                            f"Listening on {address} needs more rights (ports below 1024 do); "
                            "choose another with --port.")
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return ToolboxError(ErrorCode.INVALID_INPUT,
                            f"--host {host}: not an address of this machine (127.0.0.1, 0.0.0.0 or one of its own).")
    return ToolboxError(ErrorCode.BACKEND_UNAVAILABLE, f"Cannot listen on {address}: {exc.strerror or exc}.")


def api_server(app, limits: ServingLimits) -> uvicorn.Server:
    """uvicorn serving `app` within `limits`, logging through the root logger (bot/logs.py's set-up)."""
    access = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(existing, RedactedQueries) for existing in access.filters):
        access.addFilter(RedactedQueries())
    config = uvicorn.Config(BodyRate(app, limits), http=functools.partial(GuardedH11Protocol, limits=limits),
                            ws="none", lifespan="on", log_config=None, log_level="info")
    return uvicorn.Server(config)


def run_api(app, sock: socket.socket, limits: ServingLimits) -> None:
    """Serve `app` on `sock` (from `listening_socket`) until SIGINT or SIGTERM."""
    host, port = sock.getsockname()[:2]
    # uvicorn names the address only when it binds the socket itself.
    log.info("serving the API on http://%s:%d (docs at /docs; Ctrl-C stops it)",
             f"[{host}]" if ":" in host else host, port)
    api_server(app, limits).run(sockets=[sock])
