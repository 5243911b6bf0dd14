"""One waiter on the store, many on the decision: how blocking queries scale.

Every blocking query (`?index=N&wait=30s`) and SSE stream waits for the next decision
revision, or for this agent to lose (or regain) quorum. Rather than each of ten thousand
of them waiting on the store (and waking on every observation refresh), one task
follows the store and, when what readers act on changes (the served decision's epoch
and revision, or whether this agent is stale), sets a single event that every waiter
shares, then replaces it. A waiter costs one coroutine parked on an `asyncio.Event`.

Staleness matters as much as revisions: an agent cut off from the majority cannot know
what the others commit, so a reader blocked on it must be told at once, not at the end
of its wait, to go and ask an agent that has quorum (issue 13, item 3).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from controlplane.consensus.base import ControlStore
from controlplane.model import Decision

# How often the feed looks at the store's quorum status when nothing else wakes it:
# the bound on how late a waiter learns that this agent lost quorum.
STATUS_TICK_S = 0.1


class RevisionFeed:
    def __init__(self, store: ControlStore, is_stale: Callable[[], bool] | None = None) -> None:
        self._store = store
        self._is_stale = is_stale or (lambda: not store.status().has_quorum)
        self._event = asyncio.Event()
        self._key: tuple[str, int, bool] | None = None

    @property
    def decision(self) -> Decision | None:
        return self._store.state().decision

    def stale(self) -> bool:
        return self._is_stale()

    async def run(self, tick_s: float = STATUS_TICK_S) -> None:
        """Follow the store forever; wake waiters when the decision or staleness changes."""
        version = -1
        while True:
            state = await self._store.wait_for_change(version, timeout_s=tick_s)
            version = state.version
            decision = state.decision
            key = (
                decision.epoch if decision else "",
                decision.revision if decision else -1,
                self._is_stale(),
            )
            if key != self._key:
                self._key = key
                event, self._event = self._event, asyncio.Event()
                event.set()

    async def wait_past(
        self, revision: int, timeout_s: float, *, epoch: str | None = None, stale: bool | None = None
    ) -> Decision | None:
        """The served decision once it passes `revision` (or its epoch is not `epoch`).

        Returns early, with whatever is served, when the agent's staleness is no longer
        `stale` (when given), and at the timeout. The caller compares.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            event = self._event
            decision = self.decision
            if decision is not None and (
                decision.revision > revision or (epoch is not None and decision.epoch != epoch)
            ):
                return decision
            if stale is not None and self._is_stale() != stale:
                return decision
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return decision
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for makes a task per call,
                # which with 10,000 waiters was 8 % of the agent's time (bench.watch).
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return self.decision
