"""The fault-injecting proxy forwards, partitions, heals and delays real TCP connections."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.testing import faultproxy
from controlplane.testing.faultproxy import FaultProxy, ProxyMesh


class EchoServer:
    """Echoes every byte back, after an optional greeting naming itself."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.connections = 0
        self.received = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._echo(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.name:
                writer.write(f"{self.name}\n".encode())
            while chunk := await reader.read(65536):
                self.received += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 0, "127.0.0.1", echo.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def roundtrip(self, data: bytes, timeout_s: float = 2.0) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        async with asyncio.timeout(timeout_s):
            return await self.reader.readexactly(len(data))

    def close(self) -> None:
        self.writer.transport.abort()


async def connect(port: int) -> Client:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    return Client(reader, writer)


async def assert_cut(client: Client) -> None:
    """The connection is dead: reads end (reset or EOF) without the echo coming back."""
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
        await client.roundtrip(b"anyone?")


async def test_bytes_pass_through_both_ways(proxy: FaultProxy, echo: EchoServer) -> None:
    client = await connect(proxy.port)
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB, more than any buffer on the way
        assert await client.roundtrip(payload) == payload
    finally:
        client.close()
    stats = proxy.stats()
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    assert echo.received == len(payload)
    assert stats["accepted"] == 1


async def test_half_close_is_passed_on(proxy: FaultProxy) -> None:
    client = await connect(proxy.port)
    try:
        client.writer.write(b"last words")
        client.writer.write_eof()
        async with asyncio.timeout(2):
            # The echo server answers, sees our EOF, closes: we get the bytes, then EOF.
            assert await client.reader.read() == b"last words"
    finally:
        client.close()


async def test_partition_cuts_existing_connections_and_resets_new_ones(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    client = await connect(proxy.port)
    try:
        assert await client.roundtrip(b"hello") == b"hello"
        proxy.partition()
        await assert_cut(client)
    finally:
        client.close()
    late = await connect(proxy.port)
    try:
        await assert_cut(late)
    finally:
        late.close()
    assert echo.connections == 1  # the late one never reached the target
    assert (proxy.stats()["dropped"], proxy.stats()["refused"]) == (1, 1)


async def test_blackhole_swallows_new_connections_until_heal(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.partition("blackhole")
    client = await connect(proxy.port)  # accepted...
    try:
        with pytest.raises(TimeoutError):  # ...but nothing ever comes back
            await client.roundtrip(b"hello", timeout_s=0.2)
        assert echo.connections == 0
        proxy.heal()
        # The swallowed connection is reset so that its client redials.
        await assert_cut(client)
    finally:
        client.close()
    again = await connect(proxy.port)
    try:
        assert await again.roundtrip(b"back") == b"back"
    finally:
        again.close()


async def test_heal_restores_forwarding(proxy: FaultProxy) -> None:
    proxy.partition()
    proxy.heal()
    assert proxy.partitioned is None
    client = await connect(proxy.port)
    try:
        assert await client.roundtrip(b"again") == b"again"
    finally:
        client.close()


async def test_delay_is_added_each_way_and_order_is_kept(proxy: FaultProxy) -> None:
    client = await connect(proxy.port)
    try:
        assert await client.roundtrip(b"warm") == b"warm"
        proxy.delay_ms = 100
        started = time.monotonic()
        assert await client.roundtrip(b"ping") == b"ping"
        elapsed = time.monotonic() - started
        # 100 ms up and 100 ms down; the event loop's clock may fire a tick early.
        assert elapsed >= 0.2 - 0.005

        # Shrinking the delay must not let later bytes overtake earlier ones.
        client.writer.write(b"first,")
        await client.writer.drain()
        await asyncio.sleep(0.01)
        proxy.delay_ms = 0
        client.writer.write(b"second")
        async with asyncio.timeout(2):
            assert await client.reader.readexactly(12) == b"first,second"
    finally:
        client.close()
    with pytest.raises(ValueError):
        proxy.delay_ms = -1


async def test_connection_count_is_capped(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", 0, "127.0.0.1", echo.port, max_connections=2) as p:
        clients = [await connect(p.port) for _ in range(2)]
        try:
            for c in clients:
                assert await c.roundtrip(b"x") == b"x"
            extra = await connect(p.port)
            try:
                await assert_cut(extra)
            finally:
                extra.close()
        finally:
            for c in clients:
                c.close()
        assert p.stats()["refused"] == 1


async def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with FaultProxy("127.0.0.1", 0, "127.0.0.1", dead_port) as p:
        client = await connect(p.port)
        try:
            await assert_cut(client)
        finally:
            client.close()
        assert p.stats()["connect_failures"] == 1


async def test_stop_closes_everything(echo: EchoServer) -> None:
    before = asyncio.all_tasks()
    p = FaultProxy("127.0.0.1", 0, "127.0.0.1", echo.port)
    await p.start()
    clients = [await connect(p.port) for _ in range(3)]
    try:
        for c in clients:
            assert await c.roundtrip(b"x") == b"x"
        p.delay_ms = 50
        for c in clients:  # leave bytes in flight
            c.writer.write(b"pending")
        await asyncio.sleep(0.01)
        await p.stop()
        for c in clients:
            await assert_cut(c)
    finally:
        for c in clients:
            c.close()
    # Only the echo server's own tasks may remain.
    assert {t for t in asyncio.all_tasks() - before if t not in echo.tasks} == set()
    with pytest.raises(ConnectionRefusedError):
        await connect(p.port)


# -- the mesh ---------------------------------------------------------------------------------


@pytest.fixture
async def members() -> AsyncIterator[dict[str, EchoServer]]:
    servers = {name: EchoServer(name) for name in ("a", "b", "c")}
    try:
        for server in servers.values():
            await server.start()
        yield servers
    finally:
        for server in servers.values():
            await server.stop()


@pytest.fixture
async def mesh(members: dict[str, EchoServer]) -> AsyncIterator[ProxyMesh]:
    m = ProxyMesh({name: f"127.0.0.1:{s.port}" for name, s in members.items()})
    await m.start()
    try:
        yield m
    finally:
        await m.stop()


async def who_answers(address: str) -> str | None:
    """The name the server behind `address` greets with, or None if the link is cut."""
    host, port = faultproxy.split_host_port(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except OSError:
        return None
    try:
        async with asyncio.timeout(0.3):
            line = await reader.readline()
    except (OSError, TimeoutError):
        return None
    finally:
        writer.transport.abort()
    return line.decode().strip() or None


async def test_dial_maps_route_each_member_to_the_right_peer(mesh: ProxyMesh) -> None:
    maps = mesh.dial_maps()
    assert set(maps) == {"a", "b", "c"}
    assert set(maps["a"]) == {"b", "c"}
    # Six directed links, six distinct proxies.
    assert len({addr for m in maps.values() for addr in m.values()}) == 6
    for src, peers in maps.items():
        for dst, address in peers.items():
            assert await who_answers(address) == dst, f"{src} dialling {dst}"
    assert mesh.link("a", "b").address == maps["a"]["b"]


async def test_isolate_cuts_a_member_both_ways_and_heal_restores(mesh: ProxyMesh) -> None:
    mesh.isolate("a")
    assert await who_answers(mesh.dial_map("a")["b"]) is None
    assert await who_answers(mesh.dial_map("b")["a"]) is None
    assert await who_answers(mesh.dial_map("c")["a"]) is None
    assert await who_answers(mesh.dial_map("b")["c"]) == "c"  # the others still talk
    mesh.heal_all()
    assert await who_answers(mesh.dial_map("a")["b"]) == "b"
    assert await who_answers(mesh.dial_map("c")["a"]) == "a"


async def test_cut_between_two_members_only(mesh: ProxyMesh) -> None:
    mesh.cut("a", "b", mode="blackhole")
    assert await who_answers(mesh.dial_map("a")["b"]) is None
    assert await who_answers(mesh.dial_map("b")["a"]) is None
    assert await who_answers(mesh.dial_map("a")["c"]) == "c"
    assert await who_answers(mesh.dial_map("c")["b"]) == "b"


async def test_mesh_delay_can_target_one_member(mesh: ProxyMesh) -> None:
    mesh.set_delay_ms(40, member="c")
    assert mesh.link("a", "c").delay_ms == 40
    assert mesh.link("c", "b").delay_ms == 40
    assert mesh.link("a", "b").delay_ms == 0
    with pytest.raises(KeyError):
        mesh.isolate("z")


class ReadyLine(io.StringIO):
    """Stands in for stdout; `ready` is set once a whole line has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if "\n" in s:
            self.ready.set()
        return n


async def test_admin_api_controls_the_mesh(
    members: dict[str, EchoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = ReadyLine()
    monkeypatch.setattr(sys, "stdout", out)
    stop = asyncio.Event()
    spec = {name: f"127.0.0.1:{s.port}" for name, s in members.items()}
    task = asyncio.create_task(faultproxy.serve(spec, "127.0.0.1", 0, stop))
    try:
        await asyncio.wait_for(out.ready.wait(), 3)
        ready = json.loads(out.getvalue())
        admin = f"http://127.0.0.1:{ready['admin_port']}"
        maps = ready["dial_maps"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
            async with s.get(f"{admin}/dial-map") as r:
                assert await r.json() == maps
            async with s.post(f"{admin}/isolate", json={"member": "b"}) as r:
                assert r.status == 200
            assert await who_answers(maps["a"]["b"]) is None
            async with s.post(f"{admin}/heal") as r:
                assert r.status == 200
            assert await who_answers(maps["a"]["b"]) == "b"
            async with s.post(f"{admin}/delay", json={"ms": 30}) as r:
                assert r.status == 200
            async with s.get(f"{admin}/stats") as r:
                assert (await r.json())["a->b"]["delay_ms"] == 30
            async with s.post(f"{admin}/isolate", json={"member": "nobody"}) as r:
                assert r.status == 400
                assert (await r.json())["error"] == "bad_request"
            async with s.post(f"{admin}/delay", json={"ms": -5}) as r:
                assert r.status == 400
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def test_load_members_checks_addresses() -> None:
    assert faultproxy.load_members({"members": {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}}) == {
        "a": "127.0.0.1:1",
        "b": "127.0.0.1:2",
    }
    with pytest.raises(ValueError, match="host:port"):
        faultproxy.load_members({"members": {"a": "127.0.0.1", "b": "127.0.0.1:2"}})
    with pytest.raises(ValueError, match="two or more"):
        faultproxy.load_members({"members": {"a": "127.0.0.1:1"}})


async def test_runs_as_a_separate_process(members: dict[str, EchoServer], tmp_path: Path) -> None:
    spec = tmp_path / "mesh.json"
    spec.write_text(json.dumps({"members": {n: f"127.0.0.1:{s.port}" for n, s in members.items()}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.testing.faultproxy", "--spec", str(spec), "--admin-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert await who_answers(ready["dial_maps"]["c"]["a"]) == "a"
        url = f"http://127.0.0.1:{ready['admin_port']}/isolate"
        async with aiohttp.ClientSession() as s, s.post(url, json={"member": "a"}) as r:
            assert r.status == 200
        assert await who_answers(ready["dial_maps"]["c"]["a"]) is None
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
