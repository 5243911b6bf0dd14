"""A simulated load balancer that routes real requests by the committed weights.

It follows the decision of one service from the agents with the SDK's
`DecisionFollower` (as a real adapter does), picks a region per
request by weighted choice, sends a real HTTP request to that region's simulated
backend, and counts what happened per region and per second. The demo prints its
counts as the traffic timeline; tests use them to check where traffic went.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ssl import SSLContext

import aiohttp

from controlplane.client.follower import DecisionFollower
from controlplane.lb.report import Reporter
from controlplane.model import Decision
from controlplane.tasks import spawn

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=1.0)


@dataclass
class Second:
    """What happened in one second of traffic."""

    at: float
    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


@dataclass
class SimLoadBalancer:
    agents: Sequence[str]  # base URLs, e.g. http://127.0.0.1:8701
    service: str
    backends: Mapping[str, str]  # region -> base URL of its backend for this service
    rps: float = 100.0
    seed: int = 1
    weights: dict[str, int] = field(default_factory=dict)
    revision: int = 0
    history: deque[Second] = field(default_factory=lambda: deque(maxlen=3600))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _session: aiohttp.ClientSession | None = None
    _in_flight: int = 0
    _max_in_flight: int = 256
    # Report what it applied to the agents, as the real adapters do (`lb.report`).
    report_as: str | None = None
    token: str | None = None
    report_s: float = 1.0
    _reporter: Reporter | None = None
    # For https agents: their CA (and a client certificate, for mutual TLS).
    ssl: SSLContext | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._max_in_flight))
        self._stop = asyncio.Event()
        follower = DecisionFollower(self.agents, self.apply, wait_s=10.0, retry_s=0.2, ssl=self.ssl)
        self._tasks = [
            spawn("lb follow decision", follower.run(self._stop)),
            spawn("lb send traffic", self._send()),
        ]
        if self.report_as is not None:
            self._reporter = Reporter(
                self.agents,
                self.report_as,
                "simulated",
                heartbeat_s=self.report_s,
                token=self.token,
                ssl=self.ssl,
            )
            self._tasks.append(spawn("lb report", self._reporter.run(self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SimLoadBalancer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def apply(self, decision: Decision) -> None:
        """Take a decision's weights for our service (the follower never goes back)."""
        placements = decision.services.get(self.service, {})
        self.weights = {r: p.weight for r, p in placements.items()}
        self.revision = decision.revision
        if self._reporter is not None:
            self._reporter.update(
                {
                    "revision": decision.revision,
                    "applied_revision": decision.revision,
                    "applied_epoch": decision.epoch,
                    "applied_at": time.time(),
                    "ok": True,
                }
            )

    def _second(self) -> Second:
        now = time.time()
        if not self.history or now - self.history[-1].at >= 1.0:
            self.history.append(Second(at=float(int(now))))
        return self.history[-1]

    async def _send(self) -> None:
        rng = random.Random(self.seed)
        interval = 1.0 / self.rps
        next_at = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                regions = [r for r, w in self.weights.items() if w > 0]
                if not regions:
                    continue
                region = rng.choices(regions, weights=[self.weights[r] for r in regions])[0]
                if self._in_flight >= self._max_in_flight:
                    self._second().failed[region] += 1
                    continue
                task = asyncio.create_task(self._one(region))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, region: str) -> None:
        assert self._session is not None
        second = self._second()
        second.sent[region] += 1
        self._in_flight += 1
        try:
            async with self._session.get(self.backends[region] + "/", timeout=REQUEST_TIMEOUT) as r:
                await r.read()
                (second.ok if r.status == 200 else second.failed)[region] += 1
        except (aiohttp.ClientError, TimeoutError):
            second.failed[region] += 1
        finally:
            self._in_flight -= 1

    def totals(self, since: float = 0.0) -> tuple[Counter[str], Counter[str]]:
        ok: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for s in self.history:
            if s.at >= since:
                ok.update(s.ok)
                failed.update(s.failed)
        return ok, failed
