"""Servers that pose as an agent and misbehave, for cpctl to meet first in --endpoint.

Each is a thread with a listening socket on loopback: one that accepts and never
answers (hung), one that sends its answer a byte per second (trickling), and one that
answers 200 with a fixed body (junk: not JSON, or JSON of the wrong shape).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Serve = Callable[[socket.socket], None]


@contextmanager
def fake_agent(serve: Serve) -> Iterator[str]:
    """An endpoint whose every connection is handled by `serve` (in a thread of its own)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=_quietly, args=(serve, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        for conn in held:
            conn.close()


def _quietly(serve: Serve, conn: socket.socket) -> None:
    # cpctl giving up and closing the connection is what these servers are for.
    with contextlib.suppress(OSError):
        serve(conn)


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def hung(conn: socket.socket) -> None:
    """Accepts, reads the request, never answers."""
    _read_request(conn)
    time.sleep(3600)


def trickling(conn: socket.socket) -> None:
    """A valid-looking answer, one byte a second: never done within any sane timeout."""
    _read_request(conn)
    body = b'{"intents": [], "intent_seq": 0}' * 100
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    for i in range(len(answer)):
        conn.sendall(answer[i : i + 1])
        time.sleep(1.0)


def answering(body: bytes, content_type: str = "application/json") -> Serve:
    """Answers every request 200 with `body`."""

    def serve(conn: socket.socket) -> None:
        _read_request(conn)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    return serve
