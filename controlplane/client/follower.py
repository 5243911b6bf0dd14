"""Follow the committed decision from the agents over aiohttp, handing each new one to a callback.

`DecisionFollower` is the asyncio driver of `following.Following` (which holds the
rules: fencing, stale agents, rotation, backoff). It sends the blocking query the rules
name, with a timeout on every call (the wait plus a margin), and calls `apply` with each
newer decision. The load balancer adapters, `FlagsClient` and the demo's load balancer
all follow the decision through it.

- A callback that raises is retried with the same (or a newer) decision after a pause;
  the revision counts as applied only once the callback returned.
- When no agent answers, nothing is applied: the reader keeps the last applied state.
  That is logged once per round of agents, and the move away from a stale agent once
  per agent, so a long outage does not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from ssl import SSLContext

import aiohttp

from controlplane.client.following import Following, Served, parse_answer
from controlplane.model import Decision

log = logging.getLogger(__name__)

ApplyFn = Callable[[Decision], Awaitable[None]]


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


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
        rng: random.Random | None = None,
        on_served: Callable[[Served], None] | None = None,
        start_at_random: bool = False,
        ssl: SSLContext | None = None,
    ) -> None:
        """`ssl`: the TLS context for https agents (`controlplane.client.tls.client_context`:
        a private CA, a client certificate for mutual TLS); None: the system's CAs."""
        self.following = Following(
            list(agents),
            wait_s=wait_s,
            retry_s=retry_s,
            max_backoff_s=max_backoff_s,
            rng=rng,
            start_at_random=start_at_random,
        )
        self.agents = self.following.agents
        self._apply = apply
        self._on_served = on_served
        self.wait_s = wait_s
        self.retry_s = retry_s
        self.timeout = aiohttp.ClientTimeout(
            total=wait_s + wait_s / 16 + 5.0, connect=connect_timeout_s, sock_connect=connect_timeout_s
        )
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ssl = ssl
        self.applied_at: float | None = None  # time.time() of the last successful apply
        self.apply_error: str | None = None
        self._warned_stale: set[str] = set()

    # -- what readers look at ------------------------------------------------------------

    @property
    def agent(self) -> str:
        """The agent queried next."""
        return self.following.agent

    @property
    def applied(self) -> Decision | None:
        last = self.following.last
        return last.decision if last is not None else None

    @property
    def applied_revision(self) -> int:
        return self.following.revision

    @property
    def stale(self) -> bool:
        return self.following.stale

    @property
    def last_error(self) -> str | None:
        return self.apply_error or self.following.last_error

    # -- one query -----------------------------------------------------------------------

    async def query(self, session: aiohttp.ClientSession) -> Served | str:
        """One blocking query to the current agent: a served decision or an error in words."""
        request = self.following.request()
        url = f"{request.agent}/v1/decision"
        try:
            async with session.get(
                url, params=request.params, headers=self._headers, timeout=self.timeout
            ) as r:
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = (await r.text())[:200]
                return parse_answer(request.agent, r.status, r.headers, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return f"{type(e).__name__}: {e}".rstrip(": ")

    async def step(self, session: aiohttp.ClientSession) -> bool:
        """Query once and apply what is new; True when a new revision was applied."""
        agent = self.following.agent
        started = time.monotonic()
        answer = await self.query(session)
        if isinstance(answer, str):
            self.following.on_error(agent, answer)
            log.warning("agent %s did not answer: %s", agent, answer)
            if self.following.round_failed:
                log.warning(
                    "no agent answered with a fresh decision (%d misses in a row); keeping revision %d",
                    self.following.misses,
                    self.applied_revision,
                )
            return False
        if answer.stale and agent not in self._warned_stale:
            self._warned_stale.add(agent)
            log.warning("%s has lost quorum (stale decision); moving to the next agent", agent)
        elif not answer.stale:
            self._warned_stale.discard(agent)
        if self._on_served is not None:
            self._on_served(answer)
        new = self.following.on_served(answer)
        if new is None:
            if not answer.stale and time.monotonic() - started < self.wait_s / 2:
                # Nothing new, yet the blocking query did not block (a proxy or an agent
                # that ignores `index`): never spin.
                await asyncio.sleep(min(0.1, self.wait_s / 10))
            return False
        try:
            await self._apply(new.decision)
        except Exception as e:
            self.apply_error = f"applying revision {new.revision} failed: {e!r}"
            log.exception("applying revision %d failed; will retry", new.revision)
            await asyncio.sleep(self.retry_s)
            return False
        self.following.on_applied(new)
        self.applied_at = time.time()
        self.apply_error = None
        return True

    # -- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, *, until_applied: bool = False) -> None:
        """Follow until `stop` is set (or, with `until_applied`, until one revision applied)."""
        stop = stop or asyncio.Event()
        connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
        async with aiohttp.ClientSession(connector=connector) as session:
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
                delay_s = self.following.pause_s()
                if delay_s:
                    await pause(stop, delay_s)


async def apply_once(
    follower: DecisionFollower, stop: asyncio.Event, succeeded: Callable[[], bool], timeout_s: float = 60.0
) -> int:
    """Apply the current decision once (`--once`): exit code 0 when `succeeded()` after it."""
    try:
        async with asyncio.timeout(timeout_s):
            await follower.run(stop, until_applied=True)
    except TimeoutError:
        log.error(
            "no decision applied within %g s (--once-timeout): %s",
            timeout_s,
            follower.last_error or "no answer",
        )
        return 1
    return 0 if follower.applied_revision and succeeded() else 1
