"""Reading a set of agents over their HTTP API: what every test harness of agents shares.

`LocalCluster` (agent processes) and `InProcessCluster` (agents in the test's own
process) both mix this in, so a test reads decisions, waits for a leader or posts an
intent the same way whichever it runs against.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import aiohttp

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=3.0)


class AgentHandle(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def alive(self) -> bool: ...


class AgentsReader:
    """HTTP helpers over `agents` (id -> handle with `url` and `alive`) and `_session`."""

    agents: Mapping[str, AgentHandle]
    admin_token: str
    _session: aiohttp.ClientSession | None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "cluster not started"
        return self._session

    async def get(self, agent_id: str, path: str) -> tuple[int, dict[str, str], Any]:
        """One GET to one agent: (status, headers, JSON body); status 0 when unreachable."""
        try:
            async with self.session.get(self.agents[agent_id].url + path) as r:
                body = await r.json(content_type=None)
                return r.status, dict(r.headers), body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, {}, None

    async def decision(self, agent_id: str) -> dict[str, Any] | None:
        status, headers, body = await self.get(agent_id, "/v1/decision")
        if status != 200 or not isinstance(body, dict):
            return None
        body["_stale"] = headers.get("X-Controlplane-Stale")
        return body

    async def decisions(self, agent_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any] | None]:
        ids = list(agent_ids or [a.id for a in self.agents.values() if a.alive])
        found = await asyncio.gather(*(self.decision(i) for i in ids))
        return dict(zip(ids, found, strict=True))

    async def wait_for(self, predicate: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
        """Poll the async `predicate()` until it returns something truthy; TimeoutError names `what`."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = await predicate()
            if last:
                return last
            await asyncio.sleep(interval_s)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")

    async def wait_ready(
        self, timeout_s: float = 30.0, agent_ids: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Every (given, live) agent is ready and serves the same revision."""
        ids = list(agent_ids or self.agents)

        async def all_ready() -> dict[str, Any] | None:
            for i in ids:
                status, _, _ = await self.get(i, "/readyz")
                if status != 200:
                    self.check_alive(ids)
                    return None
            ds = await self.decisions(ids)
            revisions = {d["revision"] for d in ds.values() if d}
            if len(revisions) == 1 and all(ds.values()):
                return next(iter(ds.values()))
            return None

        result: dict[str, Any] = await self.wait_for(all_ready, timeout_s, f"agents {ids} ready")
        return result

    def check_alive(self, agent_ids: Iterable[str]) -> None:
        """Raise when one of `agent_ids` has died (a harness with processes checks them)."""
        del agent_ids

    async def leader(self, agent_ids: Iterable[str] | None = None) -> str | None:
        """The agent that says it leads with quorum, asking only `agent_ids` when given."""
        ids = set(agent_ids) if agent_ids is not None else set(self.agents)
        for a in self.agents.values():
            if not a.alive or a.id not in ids:
                continue
            status, _, body = await self.get(a.id, "/v1/cluster")
            if status == 200 and body.get("is_leader") and body.get("has_quorum"):
                return str(a.id)
        return None

    async def wait_leader(self, timeout_s: float = 20.0, exclude: Iterable[str] = ()) -> str:
        """A leader other than `exclude`; the excluded agents are not asked (they may be paused)."""
        excluded = set(exclude)

        async def find() -> str | None:
            leader = await self.leader([i for i in self.agents if i not in excluded])
            return leader if leader and leader not in excluded else None

        result: str = await self.wait_for(find, timeout_s, "a leader")
        return result

    async def post(self, agent_id: str, path: str, body: Any, token: str | None = "admin") -> tuple[int, Any]:
        headers = {}
        if token == "admin":
            headers["Authorization"] = f"Bearer {self.admin_token}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self.session.post(self.agents[agent_id].url + path, json=body, headers=headers) as r:
                return r.status, await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, None

    async def settled(self, quiet_s: float = 2.0, timeout_s: float = 30.0) -> int:
        """Wait until the first agent's revision has not moved for `quiet_s` (start-up settles)."""
        first = next(iter(self.agents))
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            d = await self.decision(first)
            rev = d["revision"] if d else -1
            if rev != last:
                last, since = rev, time.monotonic()
            elif rev > 0 and time.monotonic() - since >= quiet_s:
                return int(rev)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"revision still moving after {timeout_s} s (at {last})")
