"""`/v1/watch` with many streams in every state: every client gets the same events, each
revision once, in order; a client that stops reading is dropped with one line in the
log, and the others go on; a client that goes is forgotten without a word."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import pytest_asyncio

from controlplane.api import read
from controlplane.testing.inprocess import InProcessAgent, InProcessCluster

pytestmark = [pytest.mark.asyncio(loop_scope="module")]


def server_side(agent: InProcessAgent, client: socket.socket) -> asyncio.Transport:
    """The agent's end of `client`'s connection."""
    runner = agent.client.server.runner
    assert runner is not None and runner.server is not None
    (transport,) = [
        h.transport
        for h in runner.server.connections
        if h.transport is not None and h.transport.get_extra_info("peername") == client.getsockname()
    ]
    return transport


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
    held_before = agent.node.watchers

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
        lambda: asyncio.sleep(0, agent.node.watchers == held_before + len(streams) or None),
        10,
        "every stream open",
    )
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


async def test_a_client_that_stops_reading_is_dropped_and_the_others_go_on(
    cluster: InProcessCluster,
    agents: list[str],
    streams: list[Stream],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(read, "SSE_WRITE_TIMEOUT_S", 1.0)
    reader, writer = agents[1], agents[0]
    agent = cluster.agents[reader]
    held_before = watchers_before = agent.node.watchers
    good = Stream("reading")
    good.task = asyncio.create_task(follow_aiohttp(cluster.session, f"{agent.url}/v1/watch", good, None))
    streams.append(good)
    stuck = socket.create_connection((agent.client.server.host, agent.client.server.port))
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        stuck.sendall(b"GET /v1/watch HTTP/1.1\r\nHost: agent\r\n\r\n")
        await cluster.wait_for(
            lambda: asyncio.sleep(0, agent.node.watchers == held_before + 2 or None), 10, "both streams open"
        )
        transport = server_side(agent, stuck)  # the agent's side: a small send buffer, filled sooner
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        committed = []
        most_queued = 0
        deadline = time.monotonic() + 30
        while agent.node.watchers > held_before + 1 and time.monotonic() < deadline:
            committed.append(await feature(cluster, writer, enabled=len(committed) % 2 == 1))
            await asyncio.sleep(0.05)
            most_queued = max(most_queued, transport.get_write_buffer_size())
        assert agent.node.watchers == held_before + 1, "the client that stopped reading was not dropped"
        assert len(committed) < 300
        # Bounded: the transport pauses its writer past 64 KiB and aiohttp drains past 64 KiB
        # of its own writes, so at most about 128 KiB (and one event) wait for this client.
        assert most_queued <= 128 * 1024 + 4096, most_queued
        await cluster.wait_for(
            lambda: asyncio.sleep(0, (good.decisions() and good.decisions()[-1][0] >= committed[-1]) or None),
            10,
            "the reading client has the last revision",
        )
        seen = [r for r, _ in good.decisions()]
        assert seen == sorted(set(seen)) and set(committed) <= set(seen)
        assert agent.node.watchers == watchers_before + 1
        # One line that says what happened, not a traceback of a failed request.
        (dropped,) = [r for r in caplog.records if "stopped reading" in r.getMessage()]
        assert dropped.levelno == logging.WARNING and dropped.exc_info is None
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        stuck.close()


async def test_a_client_that_goes_is_forgotten_without_an_error_in_the_log(
    cluster: InProcessCluster, agents: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = agents[1], agents[0]
    agent = cluster.agents[reader]
    held_before = watchers_before = agent.node.watchers
    gone = socket.create_connection((agent.client.server.host, agent.client.server.port))
    gone.sendall(b"GET /v1/watch HTTP/1.1\r\nHost: agent\r\n\r\n")
    await cluster.wait_for(
        lambda: asyncio.sleep(0, agent.node.watchers == held_before + 1 or None), 10, "the stream"
    )
    gone.close()
    await feature(cluster, writer, enabled=False)
    await feature(cluster, writer, enabled=True)
    await cluster.wait_for(
        lambda: asyncio.sleep(0, agent.node.watchers == held_before or None), 10, "the stream gone"
    )
    assert agent.node.watchers == watchers_before
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
