"""Agents in one process: the real API and the real deciding loop on the in-memory backend.

For API tests that need no processes, no ports of their own and no waiting for
elections: every agent of the configuration is a real `Node` with its real HTTP
application (`api.app.create_app`, served by aiohttp's test server on a free loopback
port), its real decide loop and revision feed, over one `MemoryGroup`. What the probes
would see is set by the test (`see`), and every agent publishes it as its own
observations, refreshed like the daemon does, so `decide()` runs on it for real.
`isolate()` cuts one agent off the group (it keeps serving, stale). Use the
process-based `LocalCluster` for what needs real processes, sockets between agents or
real probes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from controlplane.access import Scope, Tokens
from controlplane.agent.loops import decide_loop, publish, watch_loop
from controlplane.agent.node import Node
from controlplane.api.app import create_app
from controlplane.config import Settings, load_settings
from controlplane.consensus.memory import MemoryGroup, MemoryStore
from controlplane.metrics import Metrics
from controlplane.model import Observation
from controlplane.tasks import spawn
from controlplane.testing.localcluster import DEMO_CONFIG
from controlplane.testing.reading import HTTP_TIMEOUT, AgentsReader

ADMIN_TOKEN = "admin-token-for-tests"


@dataclass
class InProcessAgent:
    node: Node
    client: TestClient[Any, Any]
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.node.agent_id

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    @property
    def alive(self) -> bool:
        return True  # in-process agents live as long as the cluster

    @property
    def store(self) -> MemoryStore:
        store = self.node.store
        assert isinstance(store, MemoryStore)
        return store


def _secret_of(tokens: Tokens, scope: Scope) -> str | None:
    """The secret of the first token with exactly `scope`, if any."""
    return next((t.secret for t in tokens.entries if t.scope is scope), None)


class InProcessCluster(AgentsReader):
    """`async with InProcessCluster() as c:` every agent of `settings` in this process."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        tokens: Tokens | None = None,
        refresh_s: float = 1.0,
    ) -> None:
        self.settings = settings or load_settings(DEMO_CONFIG)
        self.tokens = tokens or Tokens(admin=ADMIN_TOKEN)
        self.admin_token = self.tokens.admin or _secret_of(self.tokens, Scope.ADMIN) or ""
        self._session: aiohttp.ClientSession | None = None
        self.refresh_s = refresh_s
        ids = [a.id for a in self.settings.cluster.agents]
        self.group = MemoryGroup(ids)
        self.agents: dict[str, InProcessAgent] = {}
        # What every observer sees: (region, service) -> up; all up until a test says otherwise.
        self.world: dict[tuple[str, str], bool] = {
            (r.name, s): True
            for s in self.settings.policy.services
            for r in self.settings.policy.regions_of(s)
        }

    @classmethod
    def from_file(cls, path: Path, **kw: Any) -> InProcessCluster:
        return cls(load_settings(path), **kw)

    async def __aenter__(self) -> InProcessCluster:
        try:
            # Reads need the read token when one is configured, as for any client.
            read = self.tokens.read or _secret_of(self.tokens, Scope.READ)
            headers = {"Authorization": f"Bearer {read}"} if read else None
            self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT, headers=headers)
            for agent in self.settings.cluster.agents:
                await self._start(agent.id)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self, agent_id: str) -> None:
        store = MemoryStore(agent_id, self.group)
        node = Node(
            settings=self.settings,
            agent_id=agent_id,
            store=store,
            metrics=Metrics(agent_id),
            tokens=self.tokens,
        )
        await store.start()
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(node), host="127.0.0.1"))
        await client.start_server()
        agent = InProcessAgent(node, client)
        self.agents[agent_id] = agent
        agent.tasks = [
            spawn(f"{agent_id} revision feed", node.feed.run()),
            spawn(f"{agent_id} decide", decide_loop(node, tick_s=0.2)),
            spawn(f"{agent_id} watch", watch_loop(node, tick_s=0.5)),
            spawn(f"{agent_id} observe", self._observe_loop(node)),
        ]
        await self._publish(node)

    async def close(self) -> None:
        for agent in self.agents.values():
            for task in agent.tasks:
                task.cancel()
            await asyncio.gather(*agent.tasks, return_exceptions=True)
            await agent.client.close()
            await agent.node.store.close()
        self.agents.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the world -----------------------------------------------------------------------

    async def see(self, region: str, service: str | None = None, *, up: bool) -> None:
        """From now on every observer sees `region` (one service or all) up or down."""
        for r, s in self.world:
            if r == region and service in (None, s):
                self.world[(r, s)] = up
        for agent in self.agents.values():
            await self._publish(agent.node)

    def observations(self, observer: str) -> list[Observation]:
        now = time.time()
        return [
            Observation(
                observer=observer,
                region=r,
                service=s,
                up=up,
                at=now,
                latency_ms=5.0 if up else None,
                error=None if up else "connect refused",
            )
            for (r, s), up in self.world.items()
        ]

    async def _publish(self, node: Node) -> None:
        if self.group.in_quorum(node.agent_id):
            await publish(node, self.observations(node.agent_id))

    async def _observe_loop(self, node: Node) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._publish(node)

    # -- faults --------------------------------------------------------------------------

    def isolate(self, agent_id: str) -> None:
        self.group.isolate(agent_id)

    def heal(self, agent_id: str | None = None) -> None:
        self.group.heal(agent_id)

    # -- reading -------------------------------------------------------------------------

    def client(self, agent_id: str | None = None) -> TestClient[Any, Any]:
        return self.agents[agent_id or next(iter(self.agents))].client

    @property
    def admin(self) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {self.tokens.admin}"}

    def revision(self, agent_id: str | None = None) -> int:
        return self.agents[agent_id or next(iter(self.agents))].node.state().revision

    async def wait_for_revision(self, at_least: int = 1, timeout_s: float = 10.0) -> int:
        """Until every agent serves a revision >= `at_least`; returns the lowest served."""
        deadline = time.monotonic() + timeout_s
        while True:
            revisions = [a.node.state().revision for a in self.agents.values()]
            if min(revisions) >= at_least:
                return min(revisions)
            if time.monotonic() > deadline:
                raise TimeoutError(f"revisions {revisions} did not reach {at_least} in {timeout_s:g} s")
            await asyncio.sleep(0.02)
