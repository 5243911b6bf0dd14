"""A TCP proxy that can partition and delay, for fault injection between agents.

The acceptance tests must cut agents off from each other and add WAN delay, and the
kernel on these machines has no `netem` (see FACTS.md). So every agent-to-agent link
goes through a `FaultProxy` of our own: agent i dials agent j through proxy (i, j),
which forwards bytes both ways unless told otherwise.

- `partition("reset")`: existing connections are reset (RST) and new ones are accepted
  and reset at once: the peer learns immediately, as when a host is gone.
- `partition("blackhole")`: existing connections are reset too, and new ones are
  accepted and then silently swallowed: the peer only learns by its own timeouts, as
  behind a firewall that drops packets. `heal()` resets the swallowed connections so
  their clients redial through the healed link.
- `delay_ms`: every chunk is held that long before it is passed on, in each direction,
  in order; reading continues meanwhile, so the link keeps its throughput (up to the
  buffer bound below) and only gains latency.

`ProxyMesh` builds one proxy per directed pair of members and answers `dial_map(i)`:
the address agent i should dial for each other member. It runs in-process, or as a
separate process controlled over HTTP:

    python -m controlplane.testing.faultproxy --spec FILE --admin-port P

where FILE (YAML or JSON) is `{"members": {"a": "127.0.0.1:7001", ...}}`. When ready it
prints one JSON line `{"admin_port": P, "dial_maps": {...}}`. Admin endpoints:
`GET /dial-map`, `GET /stats`, `POST /isolate {"member", "mode"?}`,
`POST /cut {"a", "b", "mode"?}`, `POST /heal`, `POST /delay {"ms", "member"?}`.

Bounds: at most `max_connections` connections per proxy (more are reset), at most
`queue_chunks` chunks of `chunk_size` bytes buffered per direction (a slow reader
stalls its writer through TCP backpressure, as without the proxy), and a timeout on
dialling the target. Reads and writes on an established connection have no timeout of
their own: like TCP, the proxy leaves that to the endpoints, and an idle connection
between agents is normal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import signal
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args

import orjson
import yaml
from aiohttp import web

PartitionMode = Literal["reset", "blackhole"]
PARTITION_MODES: tuple[str, ...] = get_args(PartitionMode)

MAX_DELAY_MS = 60_000
_ADMIN_MAX_BODY = 64 * 1024

# Queue items: when the chunk may be passed on, and the chunk (b"" is end of stream).
_Chunk = tuple[float, bytes]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: a cut link should look broken, not finished."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be host:port (got {address!r})")
    return host.strip("[]"), int(port)


class _Link:
    """One client connection and, once dialled, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)
        if self.task is not None:
            self.task.cancel()


class FaultProxy:
    """Forwards `listen_host:listen_port` to `target_host:target_port`, with faults on demand.

    `listen_port=0` picks a free port; read it from `port` after `start()`.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        *,
        max_connections: int = 256,
        connect_timeout_s: float = 3.0,
        chunk_size: int = 16 * 1024,
        queue_chunks: int = 16,
    ) -> None:
        self.listen_host = listen_host
        self.target_host = target_host
        self.target_port = target_port
        self._requested_port = listen_port
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._chunk_size = chunk_size
        self._queue_chunks = queue_chunks
        self._delay_s = 0.0
        self._partition: PartitionMode | None = None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._links: set[_Link] = set()
        self._swallowed: set[_Link] = set()
        # Every connection task, including those of links already cut, so stop() can
        # await them all.
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        self.connect_failures = 0
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def partitioned(self) -> PartitionMode | None:
        return self._partition

    @property
    def delay_ms(self) -> float:
        return self._delay_s * 1000.0

    @delay_ms.setter
    def delay_ms(self, value: float) -> None:
        if not (math.isfinite(value) and 0 <= value <= MAX_DELAY_MS):
            raise ValueError(f"delay_ms must be from 0 to {MAX_DELAY_MS} (got {value})")
        self._delay_s = value / 1000.0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await asyncio.start_server(self._accept, self.listen_host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, reset every connection and await every task."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = self._links | self._swallowed
        self._links, self._swallowed = set(), set()
        for link in links:
            link.reset()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- faults ----------------------------------------------------------------------

    def partition(self, mode: PartitionMode = "reset") -> None:
        """Cut the link: reset every connection, and reset or swallow new ones."""
        if mode not in PARTITION_MODES:
            raise ValueError(f"partition mode must be one of {list(PARTITION_MODES)} (got {mode!r})")
        self._partition = mode
        links, self._links = self._links, set()
        self.dropped += len(links)
        for link in links:
            link.reset()

    def heal(self) -> None:
        """Forward again. Connections swallowed while blackholed are reset so they redial."""
        self._partition = None
        swallowed, self._swallowed = self._swallowed, set()
        for link in swallowed:
            link.reset()

    def stats(self) -> dict[str, Any]:
        return {
            "listen": f"{self.listen_host}:{self._port}",
            "target": f"{self.target_host}:{self.target_port}",
            "partition": self._partition,
            "delay_ms": self.delay_ms,
            "active": len(self._links),
            "swallowed": len(self._swallowed),
            "accepted": self.accepted,
            "refused": self.refused,
            "dropped": self.dropped,
            "connect_failures": self.connect_failures,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }

    # -- forwarding ------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: the connection's task is ours to track,
        # cancel and await (asyncio would otherwise own it and log its cancellation).
        self.accepted += 1
        if self._partition == "reset" or len(self._links) + len(self._swallowed) >= self._max_connections:
            self.refused += 1
            _reset(writer)
            return
        link = _Link(writer)
        if self._partition == "blackhole":
            self._swallowed.add(link)
            link.task = asyncio.create_task(self._swallow(link, reader))
        else:
            self._links.add(link)
            link.task = asyncio.create_task(self._forward(link, reader))
        self._tasks.add(link.task)
        link.task.add_done_callback(self._tasks.discard)

    async def _swallow(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(self._chunk_size):
                pass
        except OSError:
            pass
        finally:
            self._swallowed.discard(link)
            link.client.transport.abort()

    async def _forward(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        try:
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    upstream_reader, upstream = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except (OSError, TimeoutError):
                self.connect_failures += 1
                link.reset()
                return
            link.upstream = upstream
            if await self._pump_both(client_reader, link.client, upstream_reader, upstream):
                link.reset()
            else:
                link.client.close()
                upstream.close()
        finally:
            self._links.discard(link)

    async def _pump_both(
        self,
        client_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> bool:
        """Run both directions until both ended (False) or one broke (True)."""
        up: asyncio.Queue[_Chunk] = asyncio.Queue(self._queue_chunks)
        down: asyncio.Queue[_Chunk] = asyncio.Queue(self._queue_chunks)
        tasks = [
            asyncio.create_task(self._feed(client_reader, up)),
            asyncio.create_task(self._deliver(up, upstream, upstream=True)),
            asyncio.create_task(self._feed(upstream_reader, down)),
            asyncio.create_task(self._deliver(down, client, upstream=False)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            return any(not t.cancelled() and t.exception() is not None for t in done)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _feed(self, reader: asyncio.StreamReader, queue: asyncio.Queue[_Chunk]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chunk = await reader.read(self._chunk_size)
            # The delay is read per chunk so a change applies to what arrives next;
            # the FIFO queue keeps order even when the delay shrinks.
            await queue.put((loop.time() + self._delay_s, chunk))
            if not chunk:
                return

    async def _deliver(
        self, queue: asyncio.Queue[_Chunk], writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, chunk = await queue.get()
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not chunk:
                # Pass the half-close on; the other direction may still be talking.
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
            if upstream:
                self.bytes_up += len(chunk)
            else:
                self.bytes_down += len(chunk)


class ProxyMesh:
    """One `FaultProxy` per directed pair of members: agent i dials j through proxy (i, j).

    `members` maps member id to the "host:port" it really listens on.
    """

    def __init__(
        self, members: Mapping[str, str], *, listen_host: str = "127.0.0.1", **proxy_options: Any
    ) -> None:
        if len(members) < 2:
            raise ValueError("a mesh needs at least two members")
        self.members = dict(members)
        self._targets = {member: split_host_port(address) for member, address in members.items()}
        self._proxies: dict[tuple[str, str], FaultProxy] = {}
        for src, dst in itertools.permutations(self.members, 2):
            host, port = self._targets[dst]
            self._proxies[(src, dst)] = FaultProxy(listen_host, 0, host, port, **proxy_options)

    async def start(self) -> None:
        try:
            for proxy in self._proxies.values():
                await proxy.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for proxy in self._proxies.values():
            await proxy.stop()

    async def __aenter__(self) -> ProxyMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def link(self, src: str, dst: str) -> FaultProxy:
        """The proxy that carries what `src` sends to `dst`."""
        return self._proxies[(src, dst)]

    def dial_map(self, member: str) -> dict[str, str]:
        """For each other member, the "host:port" that `member` should dial."""
        self._check(member)
        return {dst: p.address for (src, dst), p in self._proxies.items() if src == member}

    def dial_maps(self) -> dict[str, dict[str, str]]:
        return {member: self.dial_map(member) for member in self.members}

    def isolate(self, member: str, mode: PartitionMode = "reset") -> None:
        """Cut `member` off from every other member, both ways."""
        self._check(member)
        for (src, dst), proxy in self._proxies.items():
            if member in (src, dst):
                proxy.partition(mode)

    def cut(self, a: str, b: str, mode: PartitionMode = "reset") -> None:
        """Cut the links between `a` and `b`, both ways; the rest stays connected."""
        self._check(a)
        self._check(b)
        self._proxies[(a, b)].partition(mode)
        self._proxies[(b, a)].partition(mode)

    def heal_all(self) -> None:
        for proxy in self._proxies.values():
            proxy.heal()

    def set_delay_ms(self, ms: float, member: str | None = None) -> None:
        """Delay every link by `ms` each way, or only the links to and from `member`."""
        if member is not None:
            self._check(member)
        for (src, dst), proxy in self._proxies.items():
            if member is None or member in (src, dst):
                proxy.delay_ms = ms

    def stats(self) -> dict[str, dict[str, Any]]:
        return {f"{src}->{dst}": p.stats() for (src, dst), p in self._proxies.items()}

    def _check(self, member: str) -> None:
        if member not in self.members:
            raise KeyError(f"unknown member {member!r}; members: {sorted(self.members)}")


# -- admin API (a mesh in its own process) ----------------------------------------------


def admin_app(mesh: ProxyMesh) -> web.Application:
    """HTTP control of `mesh`; errors are `{"error", "detail"}` with status 400."""

    async def body_of(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            raise _bad("body is not JSON") from None
        if not isinstance(body, dict):
            raise _bad("body must be a JSON object")
        return body

    def mode_of(body: Mapping[str, Any]) -> PartitionMode:
        mode = body.get("mode", "reset")
        if mode not in PARTITION_MODES:
            raise _bad(f"mode must be one of {list(PARTITION_MODES)} (got {mode!r})")
        return cast(PartitionMode, mode)

    def member_of(body: Mapping[str, Any], key: str) -> str:
        member = body.get(key)
        if member not in mesh.members:
            raise _bad(f"{key} must be one of {sorted(mesh.members)} (got {member!r})")
        return cast(str, member)

    async def isolate(request: web.Request) -> web.Response:
        body = await body_of(request)
        mesh.isolate(member_of(body, "member"), mode_of(body))
        return _json({"ok": True})

    async def cut(request: web.Request) -> web.Response:
        body = await body_of(request)
        mesh.cut(member_of(body, "a"), member_of(body, "b"), mode_of(body))
        return _json({"ok": True})

    async def heal(request: web.Request) -> web.Response:
        mesh.heal_all()
        return _json({"ok": True})

    async def delay(request: web.Request) -> web.Response:
        body = await body_of(request)
        ms = body.get("ms")
        if isinstance(ms, bool) or not isinstance(ms, int | float):
            raise _bad(f"ms must be a number (got {ms!r})")
        member = None if body.get("member") is None else member_of(body, "member")
        try:
            mesh.set_delay_ms(float(ms), member)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        return _json({"ok": True})

    async def dial_map(request: web.Request) -> web.Response:
        return _json(mesh.dial_maps())

    async def stats(request: web.Request) -> web.Response:
        return _json(mesh.stats())

    app = web.Application(client_max_size=_ADMIN_MAX_BODY)
    app.router.add_post("/isolate", isolate)
    app.router.add_post("/cut", cut)
    app.router.add_post("/heal", heal)
    app.router.add_post("/delay", delay)
    app.router.add_get("/dial-map", dial_map)
    app.router.add_get("/stats", stats)
    return app


def _bad(detail: str) -> web.HTTPBadRequest:
    body = orjson.dumps({"error": "bad_request", "detail": detail}).decode()
    return web.HTTPBadRequest(text=body, content_type="application/json")


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def load_members(data: object) -> dict[str, str]:
    """The `members` mapping of a spec, each address checked."""
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, dict) or len(members) < 2:
        raise ValueError('spec must be {"members": {id: "host:port", ...}} with two or more members')
    out = {}
    for member, address in members.items():
        split_host_port(str(address))
        out[str(member)] = str(address)
    return out


async def serve(
    members: Mapping[str, str],
    admin_host: str,
    admin_port: int,
    stop: asyncio.Event | None = None,
    listen_host: str = "127.0.0.1",
) -> None:
    """Run a mesh with its admin API until `stop` is set (or SIGINT/SIGTERM)."""
    loop = asyncio.get_running_loop()
    signals = stop is None
    stop = stop or asyncio.Event()
    async with ProxyMesh(members, listen_host=listen_host) as mesh:
        runner = web.AppRunner(admin_app(mesh), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, admin_host, admin_port)
            await site.start()
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
            port = runner.addresses[0][1]
            ready = {"admin_port": port, "dial_maps": mesh.dial_maps()}
            sys.stdout.write(orjson.dumps(ready).decode() + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.testing.faultproxy", description="Run a fault-injecting proxy mesh."
    )
    parser.add_argument("--spec", required=True, type=Path, help='YAML/JSON {"members": {...}}')
    parser.add_argument("--admin-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--admin-host", default="127.0.0.1")
    parser.add_argument("--listen-host", default="127.0.0.1", help="where the proxies listen")
    args = parser.parse_args(argv)
    try:
        members = load_members(yaml.safe_load(args.spec.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValueError) as exc:
        print(f"bad spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(members, args.admin_host, args.admin_port, listen_host=args.listen_host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
