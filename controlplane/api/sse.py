"""`/v1/watch`: server-sent events, one write loop per revision for every stream.

A new revision reaches the open streams from one loop over their transports, the
event's bytes encoded and framed once (`SseHub.publish`, called by the revision feed),
instead of resuming each stream's coroutine to pass the same bytes through aiohttp's
writer: at ten thousand streams that costs 55-70 us a stream and a revision
(`bench/README.md`, issue 15 item 2), against a few for a `transport.write`.

Each stream's own coroutine still writes what is particular to it: the first event,
heartbeats and stale/fresh events, through aiohttp and under a write timeout. It takes
over a revision whenever the shared path cannot be sure of it: before the stream's
headers went out, while the stream is itself writing, when the client's socket buffer
is filling (a slow reader is dropped by the coroutine's bounded write, as before), and
while the agent is stale (a stale answer says how stale, so it is encoded per stream).
What a client receives is the same either way.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from controlplane.agent.feed import TimerWheel
from controlplane.agent.node import Node
from controlplane.api.common import NODE
from controlplane.api.read import encoded_decision, parse_epoch, parse_position
from controlplane.model import Decision

HEARTBEAT_S = 15.0
SSE_WRITE_TIMEOUT_S = 10.0
# Past this many bytes queued for a client, a revision goes through its coroutine,
# whose bounded write drops a client that stopped reading.
DIRECT_WRITE_MAX_BUFFERED = 64 * 1024
BACKLOG_POLL_S = 0.05


class _Stream:
    """One open stream: where it stands, and how the hub may write to it."""

    __slots__ = ("after", "busy", "chunked", "epoch", "ready", "stale", "transport", "waiter")

    def __init__(self, transport: asyncio.Transport, chunked: bool, after: int, epoch: str | None) -> None:
        self.transport = transport
        self.chunked = chunked
        self.after = after  # the revision it last sent (or the client had)
        self.epoch = epoch  # that revision's epoch; None when the client did not say
        self.stale = False  # what it last said about staleness
        self.ready = False  # its headers went out (after its first write through aiohttp)
        self.busy = False  # its coroutine is writing
        self.waiter: asyncio.Future[bool] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(True)


class SseHub:
    def __init__(self, node: Node) -> None:
        self._node = node
        self._streams: set[_Stream] = set()
        self._wheel = TimerWheel()
        self.direct_writes = 0  # revisions written by the hub (a test can tell the paths apart)

    def __len__(self) -> int:
        return len(self._streams)

    def publish(self, decision: Decision | None, stale: bool) -> None:
        """The feed saw a change: write the new revision to every stream that can take it."""
        if decision is None or stale or not self._streams:
            for stream in self._streams:
                stream.wake()
            return
        _, event = encoded_decision(self._node, decision)
        framed = b"%x\r\n%s\r\n" % (len(event), event)
        for stream in self._streams:
            if decision.revision <= stream.after and decision.epoch == stream.epoch:
                if stream.stale:  # no new revision, but it last said stale: "fresh" is due
                    stream.wake()
                continue
            transport = stream.transport
            if (
                stream.busy
                or not stream.ready
                or transport.is_closing()
                or transport.get_write_buffer_size() > DIRECT_WRITE_MAX_BUFFERED
            ):
                stream.wake()
                continue
            try:
                transport.write(framed if stream.chunked else event)
            except (OSError, RuntimeError):  # the connection went: its coroutine's write ends it
                stream.wake()
                continue
            stream.after, stream.epoch, stream.stale = decision.revision, decision.epoch, False
            self.direct_writes += 1

    async def serve(self, request: web.Request, after: int, epoch: str | None) -> web.StreamResponse:
        """Hold one stream open until its client goes (or stops reading)."""
        node = self._node
        feed = node.feed
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        transport = request.transport
        if transport is None:  # the client went during prepare
            return response
        chunked = response.headers.get("Transfer-Encoding") == "chunked"
        stream = _Stream(transport, chunked, after, epoch)
        self._streams.add(stream)
        loop = asyncio.get_running_loop()
        try:
            while True:
                decision, stale = feed.decision, feed.stale()
                if not self._due(stream, decision, stale):
                    waiter: asyncio.Future[bool] = loop.create_future()
                    stream.waiter = waiter
                    slot = self._wheel.add(loop, loop.time() + HEARTBEAT_S, waiter)
                    try:
                        woken = await waiter
                    finally:
                        stream.waiter = None
                        self._wheel.discard(slot, waiter)
                    decision, stale = feed.decision, feed.stale()
                    if woken and not self._due(stream, decision, stale):
                        continue  # the hub wrote it meanwhile, or it was not for this stream
                chunk = self._next_chunk(stream, decision, stale)
                stream.busy = True
                try:
                    async with asyncio.timeout(SSE_WRITE_TIMEOUT_S):
                        # aiohttp waits for a slow client only past what it wrote itself;
                        # count what the hub wrote too. Polled: aiohttp owns the protocol, so
                        # no public event says the buffer drained; only a backlogged stream polls.
                        while transport.get_write_buffer_size() > DIRECT_WRITE_MAX_BUFFERED:  # noqa: ASYNC110
                            await asyncio.sleep(BACKLOG_POLL_S)
                        await response.write(chunk)
                finally:
                    stream.busy = False
                stream.ready = True
        finally:
            self._streams.discard(stream)

    @staticmethod
    def _due(stream: _Stream, decision: Decision | None, stale: bool) -> bool:
        """Whether the stream has something to say now, without waiting."""
        if decision is not None and (
            decision.revision > stream.after or (stream.epoch is not None and decision.epoch != stream.epoch)
        ):
            return True
        return stale != stream.stale

    def _next_chunk(self, stream: _Stream, decision: Decision | None, stale: bool) -> bytes:
        if decision is not None and (
            decision.revision > stream.after or decision.epoch != (stream.epoch or "")
        ):
            _, chunk = encoded_decision(self._node, decision)
            stream.after, stream.epoch, stream.stale = decision.revision, decision.epoch, stale
            return chunk
        if stale != stream.stale:
            # No new revision, but the agent lost (or regained) quorum: say so now.
            stream.stale = stale
            return staleness_event(self._node, decision, stale)
        return b": heartbeat\n\n"


def staleness_event(node: Node, decision: Decision | None, stale: bool) -> bytes:
    """An SSE `stale` (or `fresh`) event: this agent lost (or regained) quorum."""
    stale_s = node.stale_for_s()
    data = orjson.dumps(
        {
            "stale": stale,
            "stale_s": None if stale_s is None else round(stale_s, 1),
            "revision": decision.revision if decision else None,
            "epoch": decision.epoch if decision else None,
            "served_by": node.agent_id,
        }
    )
    return b"event: %s\ndata: %s\n\n" % (b"stale" if stale else b"fresh", data)


SSE_HUB: web.AppKey[SseHub] = web.AppKey("sse_hub", SseHub)


async def watch(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one `decision` event per new revision, heartbeats between.

    Resumes after `Last-Event-ID` (or `?index=`); without either the current decision
    is sent first. A client that stops reading is dropped after a bounded write wait.
    """
    node = request.app[NODE]
    epoch, last = parse_position(request.headers.get("Last-Event-ID") or request.query.get("index"))
    epoch = parse_epoch(request.query.get("epoch")) or epoch
    with node.watcher():
        return await request.app[SSE_HUB].serve(request, -1 if last is None else last, epoch)


def add_routes(app: web.Application) -> None:
    node = app[NODE]
    hub = app[SSE_HUB] = SseHub(node)
    stop = node.feed.listen(hub.publish)

    async def stop_listening(_: web.Application) -> None:
        stop()

    app.on_cleanup.append(stop_listening)
    app.router.add_get("/v1/watch", watch)
