"""The connections `egress.open_url` makes: cuttable from the moment they connect, and answered in bounded time.

A read blocks until bytes come or its socket timeout passes, so a server that
trickles its TLS handshake, status line or headers a byte at a time would hold
a request as long as it liked, out of reach of whatever ends a transfer
(Cancel, the job's deadline, the stall rule), which until now only got the
response once its headers were in. So, as soon as a connection's socket
connects, its `CutLine` (what cuts it, from any thread):

- goes to the request's `watch` (`transfer.deadlines.TransferWatch`), which
  holds it until the request is closed and cuts it when the transfer must end;
- cuts it when the answer (TLS handshake, status line and headers) is not all
  in within `answer_within` seconds of connecting; the request then fails with
  urllib3's `ReadTimeoutError`, as a read that timed out does.

Each request has a pool of its own (`open_url` makes one per hop), which
closes its connections' lines with itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable, Protocol

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection


class ConnectionWatch(Protocol):
    """Whoever cuts a request's connections when it must end (`transfer.deadlines.TransferWatch`)."""

    def attach(self, line: "CutLine") -> None: ...

    def detach(self, line: "CutLine") -> None: ...


class CutLine:
    """What cuts one connection from any thread, from its connect until its request is closed: a read
    blocked on it (handshake, headers or body) returns at once. It also keeps the answer's deadline."""

    def __init__(self, sock: socket.socket, answer_within: float, watch: ConnectionWatch | None):
        # A duplicate: TLS takes the descriptor of the socket it wraps (during the handshake already), while a
        # shutdown through any descriptor of a socket ends the connection itself.
        self._sock = sock.dup()
        self._lock = threading.Lock()
        self._answered = False
        self.late = False  # the answer deadline passed first, and the connection was cut
        self._watch = watch
        self._timer = threading.Timer(answer_within, self._answer_missed)
        self._timer.daemon = True
        self._timer.start()
        if watch is not None:
            watch.attach(self)

    def abort(self) -> None:
        """Cut the connection now."""
        with self._lock, contextlib.suppress(OSError):  # closed already, or never quite connected
            self._sock.shutdown(socket.SHUT_RDWR)

    def answered(self) -> None:
        """The status line and headers are in: the answer deadline no longer applies."""
        self._timer.cancel()
        with self._lock:
            self._answered = True

    def _answer_missed(self) -> None:
        with self._lock:
            if self._answered:
                return
            self.late = True
        self.abort()

    def close(self) -> None:
        self._timer.cancel()
        if self._watch is not None:
            self._watch.detach(self)
        with self._lock:
            self._sock.close()  # later aborts fail on the closed socket, never on a reused descriptor


class _HandsOverItsLine:
    """A connection that hands its socket to `on_connect` (which makes its `CutLine`) as soon as it connects,
    and that fails with a read timeout when its line's answer deadline passes first."""

    def __init__(self, *args, on_connect: Callable[[socket.socket], CutLine], **kwargs):
        self._on_connect = on_connect
        self._line: CutLine | None = None
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._line = self._on_connect(sock)
        return sock

    def connect(self) -> None:  # the TLS handshake, for https
        with self._late_is_a_timeout():
            super().connect()

    def getresponse(self):
        with self._late_is_a_timeout():
            response = super().getresponse()
            self._line.answered()
        return response

    @contextlib.contextmanager
    def _late_is_a_timeout(self):
        """What fails, or ends, after the answer deadline cut the connection is a read timeout (urllib3 makes
        it its `ReadTimeoutError`)."""
        try:
            yield
        except Exception:
            self._raise_if_late()
            raise
        self._raise_if_late()

    def _raise_if_late(self) -> None:
        if self._line is not None and self._line.late:
            raise socket.timeout("the answer's status line and headers did not all come in time") from None


class _WatchedHTTPConnection(_HandsOverItsLine, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_HandsOverItsLine, HTTPSConnection):
    pass


class _PoolOfOneRequest:
    """The pool of one request: it makes its connections' lines, for `watch` and with the answer deadline,
    and closes them with itself."""

    def __init__(self, *args, watch: ConnectionWatch | None, answer_within: float, **kwargs):
        self._lines: list[CutLine] = []
        self._watch, self._answer_within = watch, answer_within
        super().__init__(*args, on_connect=self._line_for, **kwargs)

    def _line_for(self, sock: socket.socket) -> CutLine:
        line = CutLine(sock, self._answer_within, self._watch)
        self._lines.append(line)
        return line

    def close(self) -> None:
        try:
            super().close()
        finally:
            while self._lines:
                self._lines.pop().close()


class WatchedHTTPPool(_PoolOfOneRequest, urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class WatchedHTTPSPool(_PoolOfOneRequest, urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection
