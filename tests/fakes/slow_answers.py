"""A server on 127.0.0.1 that accepts connections and never finishes answering them.

Each connection gets its status line and then header after header, one byte
every `interval` seconds (or, `silent`, nothing at all: a TLS client waits on
its handshake), for at most `lasting` seconds. `accepted` counts connections;
`hang_ups` counts those the client closed (found by reading an end of stream),
once the server has closed its side too.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

STATUS_LINE = b"HTTP/1.1 200 OK\r\n"


def _endless_answer():
    """The status line, then headers without end, byte by byte."""
    lines = itertools.chain([STATUS_LINE], (b"X-Slow-%d: x\r\n" % n for n in itertools.count()))
    return (bytes([byte]) for line in lines for byte in line)


class SlowAnswers:
    def __init__(self, interval: float = 0.05, silent: bool = False, lasting: float = 20.0):
        self.interval, self.silent, self.lasting = interval, silent, lasting
        self.accepted = 0
        self.hang_ups = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "SlowAnswers":
        self._start(self._accept_loop)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def wait_for_hang_ups(self, count: int, within: float = 5.0) -> bool:
        end = time.monotonic() + within
        while self.hang_ups < count and time.monotonic() < end:
            time.sleep(0.01)
        return self.hang_ups >= count

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self._start(self._answer_slowly, conn)

    def _answer_slowly(self, conn: socket.socket) -> None:
        answer = _endless_answer()
        end = time.monotonic() + self.lasting
        hung_up = False
        with conn:
            conn.settimeout(self.interval)  # how long each turn waits for the client, then a byte goes out
            while not hung_up and not self._stop.is_set() and time.monotonic() < end:
                hung_up = self._turn(conn, answer)
        if hung_up:
            self.hang_ups += 1

    def _turn(self, conn: socket.socket, answer) -> bool:
        """Drop what the client sent (its request, a ClientHello), then send one byte: whether it hung up."""
        try:
            if conn.recv(65536) == b"":
                return True
        except TimeoutError:
            pass
        except OSError:
            return True
        try:
            if not self.silent:
                conn.sendall(next(answer))
        except OSError:
            return True
        return False
