"""Records what every agent serves, every write and every fault, on one monotonic clock.

Each agent is polled (`GET /v1/decision`, short interval and timeout) and followed
(`GET /v1/watch`, reconnected when it drops) for the whole run, whatever is done to
it: a killed or stopped agent shows as failed polls, which is what the availability
check needs. Consecutive identical answers of one source are merged into one record, and
each distinct decision content is kept once, so memory grows with changes, not time;
past `max_records` or `max_contents` records are dropped and the history says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from controlplane.testing.chaos.history import POLL_TIMEOUT_S, Fault, Read, Write, content_hash, content_of

WRITE_TIMEOUT_S = 10.0
WATCH_READ_TIMEOUT_S = 20.0  # the agents send a heartbeat every 15 s


@dataclass
class Recorder:
    urls: Mapping[str, str]  # agent id -> http://host:port
    admin_token: str
    poll_interval_s: float = 0.1
    max_records: int = 200_000
    max_contents: int = 20_000
    reads: list[Read] = field(default_factory=list)
    contents: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    truncated: bool = False
    watch_events: int = 0
    staleness_events: int = 0
    _last: dict[tuple[str, str], Read] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Many connections per agent: polls, a stream, and concurrent writes.
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector)
        for agent in self.urls:
            self._tasks.append(asyncio.create_task(self._poll(agent), name=f"poll {agent}"))
            self._tasks.append(asyncio.create_task(self._watch(agent), name=f"watch {agent}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("recorder not started")
        return self._session

    # -- reads -----------------------------------------------------------------------

    def record(self, agent: str, source: str, status: int, body: Any, lo: float, hi: float) -> None:
        decision = body if status == 200 and isinstance(body, dict) and "revision" in body else None
        digest = None
        if decision is not None:
            content = content_of(decision)
            digest = content_hash(content)
            if digest not in self.contents:
                if len(self.contents) >= self.max_contents:
                    self.truncated = True
                    return
                self.contents[digest] = content
        stale = None if decision is None else bool(decision.get("stale"))
        revision = None if decision is None else int(decision["revision"])
        epoch = None if decision is None else str(decision.get("epoch") or "")
        intent_seq = None if decision is None else int(decision.get("intent_seq") or 0)
        last = self._last.get((agent, source))
        if (
            last is not None
            and last["status"] == status
            and last["content"] == digest
            and last["stale"] == stale
            and last["revision"] == revision
        ):
            last["last_lo"], last["last_hi"] = lo, hi
            last["count"] += 1
            return
        if len(self.reads) >= self.max_records:
            self.truncated = True
            return
        read = Read(
            agent=agent,
            source=source,
            status=status,
            epoch=epoch,
            revision=revision,
            stale=stale,
            content=digest,
            intent_seq=intent_seq,
            first_lo=lo,
            first_hi=hi,
            last_lo=lo,
            last_hi=hi,
            count=1,
        )
        self.reads.append(read)
        self._last[(agent, source)] = read

    async def _poll(self, agent: str) -> None:
        url = self.urls[agent] + "/v1/decision"
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)
        while True:
            lo = time.monotonic()
            status, body = 0, None
            try:
                async with self.session.get(url, timeout=timeout) as r:
                    status = r.status
                    body = orjson.loads(await r.read())
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, OSError):
                pass
            self.record(agent, "poll", status, body, lo, time.monotonic())
            await asyncio.sleep(self.poll_interval_s)

    async def _watch(self, agent: str) -> None:
        url = self.urls[agent] + "/v1/watch"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=POLL_TIMEOUT_S, sock_read=WATCH_READ_TIMEOUT_S
        )
        while True:
            lo = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with self.session.get(url, timeout=timeout) as r:
                    if r.status != 200:
                        raise ValueError(f"watch answered {r.status}")
                    event, data = "", b""
                    async for raw in r.content:
                        line = raw.rstrip(b"\r\n")
                        if line.startswith(b"event:"):
                            event = line[6:].strip().decode()
                        elif line.startswith(b"data:"):
                            data += line[5:].strip()
                        elif not line:
                            hi = time.monotonic()
                            if event == "decision" and data:
                                self.watch_events += 1
                                self.record(agent, "watch", 200, orjson.loads(data), lo, hi)
                                lo = hi
                            elif event in ("stale", "fresh"):
                                self.staleness_events += 1
                            event, data = "", b""
            # The stream ended (agent gone, restarted, or stopped answering): a new one
            # starts with the current decision, so nothing is lost but the gap itself.
            self._last.pop((agent, "watch"), None)
            await asyncio.sleep(0.2)

    # -- writes ----------------------------------------------------------------------

    async def write(
        self,
        agent: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        step: int,
        tag: str,
        client_id: str | None = None,
        retry: bool = False,
    ) -> Write:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        sent = time.monotonic()
        status, answer = 0, None
        try:
            async with self.session.request(
                method,
                self.urls[agent] + path,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=WRITE_TIMEOUT_S),
            ) as r:
                status = r.status
                raw = await r.read()
                with contextlib.suppress(orjson.JSONDecodeError):
                    answer = orjson.loads(raw)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            answer = {"error": type(exc).__name__, "detail": str(exc)[:200]}
        write = Write(
            step=step,
            tag=tag,
            agent=agent,
            method=method,
            path=path,
            body=body,
            client_id=client_id,
            retry=retry,
            sent=sent,
            received=time.monotonic(),
            status=status,
            answer=answer,
        )
        self.writes.append(write)
        return write

    # -- faults ----------------------------------------------------------------------

    def fault(
        self,
        step: int,
        episode: int,
        action: str,
        args: Mapping[str, Any],
        resolved: Mapping[str, Any],
        at: float | None = None,
        note: str | None = None,
    ) -> Fault:
        fault = Fault(
            at=time.monotonic() if at is None else at,
            step=step,
            episode=episode,
            action=action,
            args=dict(args),
            resolved=dict(resolved),
        )
        if note:
            fault["note"] = note
        self.faults.append(fault)
        return fault
