"""Follow the committed decision from the agents and hand each new one to an adapter.

`DecisionFollower` long-polls `GET /v1/decision?index=N&wait=...` (a blocking query:
the agent answers as soon as the revision passes N) on one agent at a time, and moves to
the next agent when one fails, times out, has no decision yet, or says it has lost
quorum (`X-Controlplane-Stale`: its decision is committed but may be old, and a fresher
agent may exist). What it guarantees:

- Revision fencing: the apply callback only ever sees revisions above the last one it
  applied successfully, so a lagging or stale agent can never roll a load balancer back.
- Static stability: when no agent answers, nothing is applied; the load balancer keeps
  the last applied state. It says so in the log, once per round of agents.
- Every call has a timeout (the wait plus a margin); failures back off, bounded.
- A callback that raises is retried with the same (or a newer) decision after a pause;
  the revision counts as applied only once the callback returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from controlplane.model import Decision, decision_from_json

log = logging.getLogger(__name__)

ApplyFn = Callable[[Decision], Awaitable[None]]


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass
class Answer:
    """One agent's answer to one blocking query."""

    agent: str
    decision: Decision | None
    stale: bool = False
    error: str | None = None


class DecisionFollower:
    """Follows the decision across `agents` (base URLs such as http://10.0.0.1:8700)."""

    def __init__(
        self,
        agents: Sequence[str],
        apply: ApplyFn,
        *,
        wait_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        retry_s: float = 0.5,
        max_backoff_s: float = 5.0,
        token: str | None = None,
    ) -> None:
        if not agents:
            raise ValueError("at least one agent URL is needed")
        self.agents = [a.rstrip("/") for a in agents]
        self._apply = apply
        self.wait_s = wait_s
        self.timeout = aiohttp.ClientTimeout(
            total=wait_s + wait_s / 16 + 5.0, connect=connect_timeout_s, sock_connect=connect_timeout_s
        )
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.applied_revision = 0
        self.applied: Decision | None = None
        self.applied_at: float | None = None  # time.time() of the last successful apply
        self.last_error: str | None = None
        self._current = 0
        self._failures = 0  # consecutive failed queries, across agents
        self._session: aiohttp.ClientSession | None = None

    @property
    def agent(self) -> str:
        """The agent queried now."""
        return self.agents[self._current]

    def _next_agent(self) -> None:
        self._current = (self._current + 1) % len(self.agents)

    async def query(self, session: aiohttp.ClientSession) -> Answer:
        """One blocking query to the current agent for a revision past the applied one."""
        agent = self.agent
        url = f"{agent}/v1/decision"
        params = {"index": str(self.applied_revision), "wait": f"{self.wait_s:g}s"}
        try:
            async with session.get(url, params=params, headers=self._headers, timeout=self.timeout) as r:
                if r.status != 200:
                    text = (await r.text())[:200]
                    return Answer(agent, None, error=f"HTTP {r.status}: {text}")
                body = await r.json(content_type=None)
                decision = decision_from_json(body)
                stale = r.headers.get("X-Controlplane-Stale") is not None or bool(body.get("stale"))
                return Answer(agent, decision, stale=stale)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return Answer(agent, None, error=f"{type(e).__name__}: {e}".rstrip(": "))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return Answer(agent, None, error=f"not a decision: {e!r}")

    async def step(self, session: aiohttp.ClientSession) -> bool:
        """Query once and apply what is new; True when a new revision was applied."""
        answer = await self.query(session)
        if answer.decision is None:
            self._failed(answer)
            return False
        self._failures = 0
        if answer.stale:
            log.info("%s has lost quorum (stale decision); moving to the next agent", answer.agent)
            self._next_agent()
        decision = answer.decision
        if decision.revision <= self.applied_revision:
            # The wait ended with nothing new (or a lagging agent): ask again, but never spin.
            await asyncio.sleep(0.1)
            return False
        try:
            await self._apply(decision)
        except Exception as e:
            self.last_error = f"applying revision {decision.revision} failed: {e!r}"
            log.exception("applying revision %d failed; will retry", decision.revision)
            await asyncio.sleep(self.retry_s)
            return False
        self.applied_revision = decision.revision
        self.applied = decision
        self.applied_at = time.time()
        self.last_error = None
        return True

    def _failed(self, answer: Answer) -> None:
        self._failures += 1
        self.last_error = f"{answer.agent}: {answer.error}"
        log.warning("agent %s did not answer: %s", answer.agent, answer.error)
        self._next_agent()
        if self._failures % len(self.agents) == 0:
            log.warning(
                "no agent answered (%d in a row); keeping revision %d as applied",
                self._failures,
                self.applied_revision,
            )

    def backoff_s(self) -> float:
        """Pause before the next query after failures: short while other agents remain."""
        if self._failures == 0:
            return 0.0
        rounds = (self._failures - 1) // len(self.agents)
        return float(min(self.max_backoff_s, self.retry_s * (2**rounds)))

    async def run(self, stop: asyncio.Event | None = None, *, until_applied: bool = False) -> None:
        """Follow until `stop` is set (or, with `until_applied`, until one revision applied)."""
        stop = stop or asyncio.Event()
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                stepping = asyncio.ensure_future(self.step(session))
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({stepping, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    if not stepping.done():
                        stepping.cancel()
                    await asyncio.gather(stepping, stopping, return_exceptions=True)
                if stepping.cancelled():
                    break
                if stepping.result() and until_applied:
                    return
                delay_s = self.backoff_s()
                if delay_s:
                    await pause(stop, delay_s)


async def apply_once(
    follower: DecisionFollower, stop: asyncio.Event, succeeded: Callable[[], bool], timeout_s: float = 60.0
) -> int:
    """Apply the current decision once (`--once`): exit code 0 when `succeeded()` after it."""
    try:
        await asyncio.wait_for(follower.run(stop, until_applied=True), timeout_s)
    except TimeoutError:
        log.error("no decision applied within %g s: %s", timeout_s, follower.last_error or "no answer")
        return 1
    return 0 if follower.applied_revision and succeeded() else 1
