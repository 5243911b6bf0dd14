"""`/v1/watch` with many streams in every state: the hub's shared writes and the
streams' own writes must give every client the same events, each revision once, in
order; a client that stops reading is dropped, and the others go on."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import pytest_asyncio

from controlplane.api import sse
from controlplane.api.sse import SSE_HUB, SseHub
from controlplane.testing.inprocess import InProcessCluster

pytestmark = [pytest.mark.asyncio(loop_scope="module")]


def hub_of(cluster: InProcessCluster, agent: str) -> SseHub:
    return cluster.agents[agent].client.server.app[SSE_HUB]


def parse_events(text: str) -> list[dict[str, str]]:
    """SSE events (comments dropped) as {field: value}."""
    events = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if fields:
            events.append(fields)
    return events


class Stream:
    """One client: aiohttp (HTTP/1.1, chunked) or a raw HTTP/1.0 socket (not chunked)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = ""
        self.task: asyncio.Task[None] | None = None

    def decisions(self) -> list[tuple[int, str]]:
        out = []
        for e in parse_events(self.text):
            if e.get("event") == "decision":
                out.append((int(e["id"].rpartition(".")[2]), e["data"]))
        return out


async def follow_aiohttp(session: aiohttp.ClientSession, url: str, stream: Stream, last: str | None) -> None:
    headers = {"Last-Event-ID": last} if last else {}
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as r:
        assert r.headers["Transfer-Encoding"] == "chunked"
        async for raw in r.content.iter_any():
            stream.text += raw.decode()


async def follow_http10(host: str, port: int, stream: Stream) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /v1/watch HTTP/1.0\r\nHost: agent\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"200" in head.split(b"\r\n")[0] and b"chunked" not in head.lower(), head
        while chunk := await reader.read(65536):
            stream.text += chunk.decode()
    finally:
        writer.close()


@pytest_asyncio.fixture(loop_scope="module")
async def streams(cluster: InProcessCluster) -> AsyncIterator[list[Stream]]:
    made: list[Stream] = []
    yield made
    for s in made:
        if s.task is not None:
            s.task.cancel()
    await asyncio.gather(*(s.task for s in made if s.task is not None), return_exceptions=True)


async def feature(cluster: InProcessCluster, writer: str, enabled: bool) -> int:
    status, body = await cluster.post(
        writer, "/v1/intents", {"kind": "feature", "name": "comments", "enabled": enabled, "reason": "sse"}
    )
    assert status == 201, body
    return int(body["revision"])


async def test_streams_in_every_state_see_each_revision_once_in_order_with_the_same_bytes(
    cluster: InProcessCluster, agents: list[str], streams: list[Stream]
) -> None:
    reader, writer = agents[2], agents[0]
    agent = cluster.agents[reader]
    host, port = agent.client.server.host, agent.client.server.port
    url = f"{agent.url}/v1/watch"
    current = await cluster.decision(reader)
    assert current is not None
    start, epoch = int(current["revision"]), current["epoch"]
    hub = hub_of(cluster, reader)
    held_before = len(hub)

    def add(name: str, coro_of: object) -> Stream:
        s = Stream(name)
        s.task = asyncio.create_task(coro_of(s))  # type: ignore[operator]
        streams.append(s)
        return s

    fresh = [add(f"fresh-{k}", lambda s: follow_aiohttp(cluster.session, url, s, None)) for k in range(12)]
    # Resumed at the current revision: nothing to send until the next one (no headers out yet).
    resumed = [
        add(f"resumed-{k}", lambda s: follow_aiohttp(cluster.session, url, s, f"{epoch}.{start}"))
        for k in range(4)
    ]
    behind = [
        add(f"behind-{k}", lambda s: follow_aiohttp(cluster.session, url, s, f"{epoch}.{start - 1}"))
        for k in range(3)
    ]
    old_clients = [add(f"http10-{k}", lambda s: follow_http10(host, port, s)) for k in range(2)]
    await cluster.wait_for(
        lambda: asyncio.sleep(0, len(hub) == held_before + len(streams) or None), 10, "every stream open"
    )
    direct_before = hub.direct_writes
    committed = []
    for k in range(6):
        committed.append(await feature(cluster, writer, enabled=k % 2 == 1))
        await cluster.wait_for(
            lambda r=committed[-1]: asyncio.sleep(
                0, all(s.decisions() and s.decisions()[-1][0] >= r for s in streams) or None
            ),
            10,
            f"revision {committed[-1]} on every stream",
        )

    by_revision: dict[int, set[str]] = {}
    for s in streams:
        seen = [r for r, _ in s.decisions()]
        assert seen == sorted(set(seen)), f"{s.name}: each revision once, in order: {seen}"
        assert set(committed) <= set(seen), f"{s.name} missed some of {committed}: {seen}"
        for r, data in s.decisions():
            by_revision.setdefault(r, set()).add(data)
    for s in fresh + old_clients:
        assert s.decisions()[0][0] == start, f"{s.name} starts with the current decision"
    for s in resumed:
        assert s.decisions()[0][0] == committed[0], f"{s.name} resumed after {start}"
    for s in behind:
        assert s.decisions()[0][0] == start, f"{s.name} resumed after {start - 1}"
    for r, datas in by_revision.items():
        assert len(datas) == 1, f"revision {r} was sent as {len(datas)} different events"
        body = orjson.loads(next(iter(datas)))
        assert body["revision"] == r and body["stale"] is False and body["served_by"] == reader
    # The shared path was taken: most streams heard most revisions from the hub.
    assert hub.direct_writes - direct_before >= len(streams) * (len(committed) - 1) // 2, hub.direct_writes


async def test_a_client_that_stops_reading_is_dropped_and_the_others_go_on(
    cluster: InProcessCluster, agents: list[str], streams: list[Stream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "DIRECT_WRITE_MAX_BUFFERED", 4096)
    monkeypatch.setattr(sse, "SSE_WRITE_TIMEOUT_S", 1.0)
    reader, writer = agents[1], agents[0]
    agent = cluster.agents[reader]
    hub = hub_of(cluster, reader)
    held_before = len(hub)
    watchers_before = agent.node.watchers
    good = Stream("reading")
    good.task = asyncio.create_task(follow_aiohttp(cluster.session, f"{agent.url}/v1/watch", good, None))
    streams.append(good)
    stuck = socket.create_connection((agent.client.server.host, agent.client.server.port))
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        stuck.sendall(b"GET /v1/watch HTTP/1.1\r\nHost: agent\r\n\r\n")
        await cluster.wait_for(
            lambda: asyncio.sleep(0, len(hub) == held_before + 2 or None), 10, "both streams open"
        )
        (transport,) = [  # the agent's side of the stuck client: a small send buffer
            stream.transport
            for stream in hub._streams
            if stream.transport.get_extra_info("peername") == stuck.getsockname()
        ]
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        committed = []
        most_queued = 0
        deadline = time.monotonic() + 30
        while len(hub) > held_before + 1 and time.monotonic() < deadline:
            committed.append(await feature(cluster, writer, enabled=len(committed) % 2 == 1))
            await asyncio.sleep(0.05)
            most_queued = max(most_queued, transport.get_write_buffer_size())
        assert len(hub) == held_before + 1, "the client that stopped reading was not dropped"
        assert len(committed) < 300
        # Bounded: what the agent queued for it stayed near the limit (one event over).
        assert most_queued <= 4096 + 4096, most_queued
        await cluster.wait_for(
            lambda: asyncio.sleep(0, (good.decisions() and good.decisions()[-1][0] >= committed[-1]) or None),
            10,
            "the reading client has the last revision",
        )
        seen = [r for r, _ in good.decisions()]
        assert seen == sorted(set(seen)) and set(committed) <= set(seen)
        assert agent.node.watchers == watchers_before + 1
    finally:
        stuck.close()
