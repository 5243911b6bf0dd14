"""Authenticated TCP between Raft nodes (asyncio), built to survive hostile input.

Topology: every node dials every peer once, and sends only on that connection; the
connections it accepts only receive (plus keepalives back). A peer's identity comes from
the handshake, never from the socket address, so a TCP proxy in between works, and the
address a node dials for a peer (`dial`) may differ from the peer's own.

Handshake (every frame before authentication is at most 512 bytes, and the whole
handshake must finish within `handshake_timeout_s`):

    dialer   -> listener  ["hello", 1, from, to, nonce_d]
    listener -> dialer    ["challenge", nonce_l, HMAC(K, "listener" | transcript)]
    dialer   -> listener  ["auth", HMAC(K, "dialer" | transcript)]
    listener -> dialer    ["ok"]

K = HMAC-SHA256(cluster secret, label); transcript = nonce_d | nonce_l | from | to. Both
sides prove they know the secret over fresh nonces; the session key is
HMAC(K, "session" | transcript). Afterwards every frame is `[u32 length][body][mac]`
with mac = HMAC-SHA256(session, direction | sequence number | body)[:16], so frames can
be neither forged, replayed, reordered nor reflected. Frames are capped
(`max_frame_bytes`); the length is checked before anything is read.

A wrong secret is logged on both sides (rate-limited): the dialer sees a bad proof and
still sends its own, so the listener can tell too.

Bounds: at most `max_unauthenticated` connections in handshake (the oldest is evicted
for a new one, so idle sockets cannot lock peers out), at most `max_connections` in
all, a bounded queue per peer that drops its oldest message (Raft tolerates loss; drops
are counted), idle timeouts on both directions (keepalives flow every `keepalive_s`,
so silence means a dead peer or path). `accept()` failing with EMFILE/ENFILE/ENOBUFS/
ENOMEM is logged and retried with backoff; the listener is never closed for it (asyncio
would retry too, but logs through the loop's handler, and pysyncobj closed its listener
for good: issue 12 item 4).

Payloads are opaque bytes here (the node encodes them with msgpack); nothing is ever
unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.errors import ControlplaneError
from controlplane.raft import codec

log = logging.getLogger("controlplane.raft.transport")

PREAUTH_MAX_BYTES = 512
MAC_BYTES = 16
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_KIND_DATA = b"\x00"
_KIND_KEEPALIVE = b"\x01"
_DIR_DIALER = b"D"
_DIR_LISTENER = b"L"
_KEY_LABEL = b"controlplane raft v1 cluster key"
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


COUNTERS = (
    "accept_errors",
    "connections_refused",
    "unauthenticated_evicted",
    "handshake_failures",
    "auth_failures",
    "bad_frames",
    "idle_closed",
)


class FrameError(ControlplaneError):
    pass


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be host:port (got {address!r})")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class TransportConfig:
    connect_timeout_s: float = 1.0
    handshake_timeout_s: float = 2.0
    idle_timeout_s: float = 3.0
    keepalive_s: float = 0.5
    max_frame_bytes: int = 4 << 20
    queue_messages: int = 4096
    queue_bytes: int = 64 << 20
    max_connections: int = 128
    max_unauthenticated: int = 32
    log_interval_s: float = 30.0


@dataclass(frozen=True, slots=True)
class LinkStatus:
    peer: str
    dial: str
    connected_out: bool
    connected_in: bool
    last_heard_mono: float | None
    sent: int
    received: int
    dropped: int


@dataclass
class _Link:
    peer: str
    host: str
    port: int
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    connected_out: bool = False
    inbound: _Conn | None = None
    last_heard_mono: float | None = None
    sent: int = 0
    received: int = 0
    dropped: int = 0


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    address: str
    opened_mono: float
    peer: str | None = None
    task: asyncio.Task[None] | None = None

    def abort(self) -> None:
        self.writer.transport.abort()


class _Channel:
    """MAC and sequence numbers of one authenticated connection, one direction each way."""

    def __init__(self, key: bytes, out_dir: bytes, in_dir: bytes) -> None:
        self._key = key
        self._out_dir = out_dir
        self._in_dir = in_dir
        self._out_seq = 0
        self._in_seq = 0

    def seal(self, body: bytes) -> bytes:
        mac = hmac.new(self._key, self._out_dir + _SEQ.pack(self._out_seq) + body, hashlib.sha256).digest()
        self._out_seq += 1
        return _LEN.pack(len(body) + MAC_BYTES) + body + mac[:MAC_BYTES]

    def open(self, frame: bytes) -> bytes:
        body, mac = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
        want = hmac.new(self._key, self._in_dir + _SEQ.pack(self._in_seq) + body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want[:MAC_BYTES]):
            raise FrameError("bad frame MAC")
        self._in_seq += 1
        return body


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    header = await reader.readexactly(_LEN.size)
    (length,) = _LEN.unpack(header)
    if length == 0 or length > max_bytes:
        raise FrameError(f"frame of {length} bytes refused (limit {max_bytes})")
    return await reader.readexactly(length)


def _preauth(obj: list[Any]) -> bytes:
    body = codec.packb(obj)
    if len(body) > PREAUTH_MAX_BYTES:
        raise ValueError("handshake frame too large")
    return _LEN.pack(len(body)) + body


class _RateLimited:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += f" ({suppressed} more like this since the last report)"
        log.log(level, msg, *args)


class Transport:
    """Runs on the engine thread's event loop; `send` and `status` are loop-thread calls."""

    def __init__(
        self,
        node_id: str,
        dial: Mapping[str, str],
        secret: bytes,
        config: TransportConfig,
        listener: socket.socket,
        on_payload: Callable[[str, bytes], None],
    ) -> None:
        self.id = node_id
        self.config = config
        self._key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
        self._sock = listener
        self._on_payload = on_payload
        self._links: dict[str, _Link] = {}
        for peer, address in dial.items():
            host, port = split_host_port(address)
            self._links[peer] = _Link(peer, host, port)
        self._conns: set[_Conn] = set()
        self._unauth: deque[_Conn] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._rl = _RateLimited(config.log_interval_s)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sock.setblocking(False)
        self._tasks.append(asyncio.create_task(self._accept_loop(), name=f"raft-accept-{self.id}"))
        for link in self._links.values():
            self._tasks.append(asyncio.create_task(self._dial_loop(link), name=f"raft-dial-{link.peer}"))

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for c in list(self._conns):
            c.abort()
            if c.task is not None:
                c.task.cancel()
        tasks = self._tasks + [c.task for c in self._conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sock.close()

    # -- sending ----------------------------------------------------------------------------------

    def send(self, peer: str, payload: bytes) -> bool:
        """Queue `payload` for `peer`. Drops the oldest queued messages beyond the bounds."""
        link = self._links.get(peer)
        if link is None:
            return False
        if len(payload) + 1 > self.config.max_frame_bytes - MAC_BYTES:
            log.error("raft message of %d bytes to %s is larger than a frame; dropped", len(payload), peer)
            link.dropped += 1
            return False
        link.queue.append(payload)
        link.queued_bytes += len(payload)
        # While the link is down keep only the newest few: Raft resends what matters, and a
        # long partition must not end with a flood of stale messages.
        limit = self.config.queue_messages if link.connected_out else min(256, self.config.queue_messages)
        while len(link.queue) > limit or link.queued_bytes > self.config.queue_bytes:
            old = link.queue.popleft()
            link.queued_bytes -= len(old)
            link.dropped += 1
        link.wake.set()
        return True

    def queued_bytes(self, peer: str) -> int:
        link = self._links.get(peer)
        return link.queued_bytes if link is not None else 0

    def status(self) -> dict[str, LinkStatus]:
        return {
            p: LinkStatus(
                p,
                f"{link.host}:{link.port}",
                link.connected_out,
                link.inbound is not None,
                link.last_heard_mono,
                link.sent,
                link.received,
                link.dropped,
            )
            for p, link in self._links.items()
        }

    # -- dialling ----------------------------------------------------------------------------------

    async def _dial_loop(self, link: _Link) -> None:
        backoff = 0.05
        while not self._closing:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    reader, writer = await asyncio.open_connection(link.host, link.port, limit=1 << 16)
                async with asyncio.timeout(self.config.handshake_timeout_s):
                    channel = await self._dial_handshake(link, reader, writer)
                if channel is None:
                    backoff = 1.0
                else:
                    backoff = 0.05
                    link.connected_out = True
                    log.info("raft link to %s at %s:%d is up", link.peer, link.host, link.port)
                    await self._pump(link, reader, writer, channel)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, FrameError, codec.DecodeError) as exc:
                if link.connected_out:
                    log.info("raft link to %s lost: %s", link.peer, exc or type(exc).__name__)
                elif isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
                    self._rl.log(logging.ERROR, f"dial-{link.peer}", "cannot dial %s: %s", link.peer, exc)
            finally:
                link.connected_out = False
                if writer is not None:
                    writer.transport.abort()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _dial_handshake(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Channel | None:
        nonce_d = os.urandom(32)
        writer.write(_preauth(["hello", 1, self.id, link.peer, nonce_d]))
        msg = codec.unpackb(await _read_frame(reader, PREAUTH_MAX_BYTES))
        if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == "challenge"):
            raise FrameError(f"unexpected handshake answer from {link.peer}")
        nonce_l, proof_l = msg[1], msg[2]
        if not isinstance(nonce_l, bytes) or not isinstance(proof_l, bytes) or len(nonce_l) != 32:
            raise FrameError(f"malformed challenge from {link.peer}")
        transcript = nonce_d + nonce_l + self.id.encode() + b"\0" + link.peer.encode()
        want = hmac.new(self._key, b"listener" + transcript, hashlib.sha256).digest()
        proof_d = hmac.new(self._key, b"dialer" + transcript, hashlib.sha256).digest()
        # Send our proof even when theirs is wrong, so the listener can log the mismatch too.
        writer.write(_preauth(["auth", proof_d]))
        if not hmac.compare_digest(want, proof_l):
            self.counters["auth_failures"] += 1
            self._rl.log(
                logging.ERROR,
                f"secret-out-{link.peer}",
                "raft peer %s at %s:%d rejected our cluster secret or does not know it",
                link.peer,
                link.host,
                link.port,
            )
            with contextlib.suppress(OSError):
                await writer.drain()
            return None
        try:
            answer = codec.unpackb(await _read_frame(reader, PREAUTH_MAX_BYTES))
        except asyncio.IncompleteReadError:
            answer = None
        if answer != ["ok"]:
            self.counters["auth_failures"] += 1
            self._rl.log(
                logging.ERROR,
                f"secret-out-{link.peer}",
                "raft peer %s at %s:%d rejected our cluster secret or does not know it",
                link.peer,
                link.host,
                link.port,
            )
            return None
        session = hmac.new(self._key, b"session" + transcript, hashlib.sha256).digest()
        return _Channel(session, _DIR_DIALER, _DIR_LISTENER)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: _Channel
    ) -> None:
        """Send queued messages (and keepalives); read the listener's keepalives."""

        async def write_loop() -> None:
            while True:
                if not link.queue:
                    link.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.config.keepalive_s):
                            await link.wake.wait()
                if link.queue:
                    frames = []
                    while link.queue:
                        payload = link.queue.popleft()
                        link.queued_bytes -= len(payload)
                        frames.append(channel.seal(_KIND_DATA + payload))
                        link.sent += 1
                    writer.write(b"".join(frames))
                else:
                    writer.write(channel.seal(_KIND_KEEPALIVE))
                async with asyncio.timeout(self.config.idle_timeout_s):
                    await writer.drain()

        async def read_loop() -> None:
            while True:
                async with asyncio.timeout(self.config.idle_timeout_s):
                    frame = await _read_frame(reader, PREAUTH_MAX_BYTES)
                channel.open(frame)
                link.last_heard_mono = time.monotonic()

        await self._first_failure(write_loop(), read_loop())

    @staticmethod
    async def _first_failure(*coros: Any) -> None:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- accepting -----------------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while not self._closing:
            try:
                sock, addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                self.counters["accept_errors"] += 1
                self._rl.log(
                    logging.ERROR,
                    "accept",
                    "raft listener cannot accept (%s); still listening, retrying with backoff",
                    exc.strerror or exc,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            address = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if len(self._conns) >= self.config.max_connections:
                self.counters["connections_refused"] += 1
                self._rl.log(logging.WARNING, "max-conns", "raft listener at its connection limit; refusing")
                sock.close()
                continue
            try:
                reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
            except OSError:
                sock.close()
                continue
            conn = _Conn(writer, address, time.monotonic())
            self._conns.add(conn)
            self._unauth.append(conn)
            while len(self._unauth) > self.config.max_unauthenticated:
                oldest = self._unauth.popleft()
                self.counters["unauthenticated_evicted"] += 1
                oldest.abort()
            conn.task = asyncio.create_task(self._serve(conn, reader))

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                channel, link = await self._listen_handshake(conn, reader)
            if channel is None or link is None:
                return
            with contextlib.suppress(ValueError):
                self._unauth.remove(conn)
            if link.inbound is not None and link.inbound is not conn:
                link.inbound.abort()  # the peer reconnected: the old connection is dead
            link.inbound = conn
            await self._receive(conn, link, reader, channel)
        except TimeoutError:
            if conn.peer is None:
                self.counters["handshake_failures"] += 1
            else:
                self.counters["idle_closed"] += 1
                log.info("raft connection from %s (%s) idle too long; closed", conn.peer, conn.address)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except (FrameError, codec.DecodeError) as exc:
            self.counters["bad_frames"] += 1
            self._rl.log(
                logging.WARNING, f"bad-{conn.address}", "raft connection from %s: %s", conn.address, exc
            )
        finally:
            conn.abort()
            self._conns.discard(conn)
            with contextlib.suppress(ValueError):
                self._unauth.remove(conn)
            for link in self._links.values():
                if link.inbound is conn:
                    link.inbound = None

    async def _listen_handshake(
        self, conn: _Conn, reader: asyncio.StreamReader
    ) -> tuple[_Channel | None, _Link | None]:
        writer = conn.writer
        msg = codec.unpackb(await _read_frame(reader, PREAUTH_MAX_BYTES))
        if not (isinstance(msg, list) and len(msg) == 5 and msg[0] == "hello" and msg[1] == 1):
            raise FrameError("not a raft handshake")
        claimed, to, nonce_d = msg[2], msg[3], msg[4]
        if not (isinstance(claimed, str) and isinstance(to, str) and isinstance(nonce_d, bytes)):
            raise FrameError("malformed hello")
        link = self._links.get(claimed)
        if link is None or to != self.id or len(nonce_d) != 32:
            self._rl.log(
                logging.WARNING,
                f"who-{claimed}",
                "raft connection from %s claims to be %r for %r: not a member of this cluster or not for us",
                conn.address,
                claimed[:64],
                to[:64],
            )
            return None, None
        nonce_l = os.urandom(32)
        transcript = nonce_d + nonce_l + claimed.encode() + b"\0" + self.id.encode()
        writer.write(
            _preauth(
                ["challenge", nonce_l, hmac.new(self._key, b"listener" + transcript, hashlib.sha256).digest()]
            )
        )
        # A dialer that hangs up here proved nothing either way: no log (IncompleteReadError).
        answer = codec.unpackb(await _read_frame(reader, PREAUTH_MAX_BYTES))
        want = hmac.new(self._key, b"dialer" + transcript, hashlib.sha256).digest()
        proof = answer[1] if isinstance(answer, list) and len(answer) == 2 and answer[0] == "auth" else None
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, want):
            self.counters["auth_failures"] += 1
            self._rl.log(
                logging.ERROR,
                f"secret-in-{claimed}",
                "raft connection from %s claiming to be %s failed authentication: wrong cluster secret",
                conn.address,
                claimed,
            )
            return None, None
        writer.write(_preauth(["ok"]))
        conn.peer = claimed
        session = hmac.new(self._key, b"session" + transcript, hashlib.sha256).digest()
        return _Channel(session, _DIR_LISTENER, _DIR_DIALER), link

    async def _receive(
        self, conn: _Conn, link: _Link, reader: asyncio.StreamReader, channel: _Channel
    ) -> None:
        limit = self.config.max_frame_bytes + MAC_BYTES

        async def keepalives() -> None:
            while True:
                conn.writer.write(channel.seal(_KIND_KEEPALIVE))
                async with asyncio.timeout(self.config.idle_timeout_s):
                    await conn.writer.drain()
                await asyncio.sleep(self.config.keepalive_s)

        async def frames() -> None:
            while True:
                async with asyncio.timeout(self.config.idle_timeout_s):
                    frame = await _read_frame(reader, limit)
                body = channel.open(frame)
                link.last_heard_mono = time.monotonic()
                if body[:1] == _KIND_DATA:
                    link.received += 1
                    self._on_payload(link.peer, body[1:])

        await self._first_failure(keepalives(), frames())
