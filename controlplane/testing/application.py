"""A simulated application that enforces the decision with the SDK, and users who use it.

The demo needs to show what degradation means to an application: features going off and
low-priority requests shed, not just numbers in a decision. `SimApplication` is a small
aiohttp web service with the SDK's pieces, as an application team would wire them:

- a `FlagsClient` following the agents (long-poll, last known good);
- `shedding_middleware` with a `Shedder` on that client: `/comments`, `/likes` and
  `/recommendations` belong to the features of the same names and are refused (503,
  `X-Controlplane-Feature-Off`) while the decision has them off; `/feed` is low
  priority and shed by the decision's `shed_fraction`, by user; `/checkout` is high
  priority and never shed.

and a user load: `rps` requests per second spread over those paths with user ids,
counted per second and path as served, feature off or shed. The demo prints the counts
as a timeline next to the load balancer's.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from ssl import SSLContext

import aiohttp
from aiohttp import web

from controlplane.client.flags import FlagsClient
from controlplane.client.middleware import Classifier, shedding_middleware
from controlplane.client.shedding import Shedder
from controlplane.tasks import spawn

PATHS = ("/checkout", "/feed", "/comments", "/likes", "/recommendations")
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


def classifier() -> Classifier:
    return Classifier(
        low_priority_paths=["/feed", "/recommendations"],
        high_priority_paths=["/checkout"],
        features={"/comments": "comments", "/likes": "likes", "/recommendations": "recommendations"},
    )


@dataclass
class AppSecond:
    """One second of user traffic: per path, how many were served, refused as a feature off, shed."""

    at: float
    served: Counter[str] = field(default_factory=Counter)
    feature_off: Counter[str] = field(default_factory=Counter)
    shed: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


@dataclass
class SimApplication:
    agents: Sequence[str]  # agent base URLs
    rps: float = 50.0
    token: str | None = None
    host: str = "127.0.0.1"
    flags: FlagsClient | None = None
    shedder: Shedder | None = None
    url: str = ""
    history: deque[AppSecond] = field(default_factory=lambda: deque(maxlen=3600))
    _runner: web.AppRunner | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    # For https agents: their CA (and a client certificate, for mutual TLS).
    ssl: SSLContext | None = None

    async def start(self) -> None:
        self.flags = FlagsClient(self.agents, token=self.token, wait_s=10.0, backoff_max_s=1.0, ssl=self.ssl)
        await self.flags.start()
        self.shedder = Shedder.of(self.flags, retry_after_s=2)
        app = web.Application(middlewares=[shedding_middleware(self.shedder, classifier())])
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.url = f"http://{self.host}:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self._tasks = [spawn("demo application users", self._users())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.flags is not None:
            await self.flags.stop()

    async def __aenter__(self) -> SimApplication:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(text=f"{request.path} for {request.headers.get('X-User-Id', '?')}\n")

    def _second(self) -> AppSecond:
        now = time.time()
        if not self.history or now - self.history[-1].at >= 1.0:
            self.history.append(AppSecond(at=float(int(now))))
        return self.history[-1]

    async def _users(self) -> None:
        interval = 1.0 / self.rps
        next_at = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        users = itertools.cycle(range(1000))
        paths = itertools.cycle(PATHS)
        try:
            while True:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(pending) >= 64:
                    continue
                task = asyncio.create_task(self._one(next(paths), f"user-{next(users)}"))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, path: str, user: str) -> None:
        assert self._session is not None
        second = self._second()
        try:
            async with self._session.get(
                self.url + path, headers={"X-User-Id": user}, timeout=REQUEST_TIMEOUT
            ) as r:
                await r.read()
                if r.status == 200:
                    second.served[path] += 1
                elif "X-Controlplane-Feature-Off" in r.headers:
                    second.feature_off[path] += 1
                elif "X-Controlplane-Shed" in r.headers:
                    second.shed[path] += 1
                else:
                    second.failed[path] += 1
        except (aiohttp.ClientError, TimeoutError):
            second.failed[path] += 1

    def refused(self, path: str, since: float = 0.0, until: float = float("inf")) -> int:
        """Requests to `path` refused as a feature off between two times (Unix seconds)."""
        return sum(s.feature_off[path] for s in self.history if since <= s.at < until)

    def served(self, path: str, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(s.served[path] for s in self.history if since <= s.at < until)
