"""One waiter on the store, many on the decision: how blocking queries scale.

Every blocking query (`?index=N&wait=30s`) and SSE stream waits for the next decision
revision, or for this agent to lose (or regain) quorum. Rather than each of ten thousand
of them waiting on the store (and waking on every observation refresh), one task
follows the store and, when what readers act on changes (the served decision's epoch
and revision, or whether this agent is stale), sets a single event that every waiter
shares, then replaces it. A waiter costs one coroutine parked on a future.

Timeouts share timers too (issue 15, item 2): a timer per waiter was one of the costs
of a fan-out to ten thousand watchers. Deadlines are rounded up to `TIMER_GRAIN_S` and
every waiter of one grain is released by the same loop timer (`_TimerWheel`), so there
are at most `wait / TIMER_GRAIN_S` timers however many waiters there are. A wait ends
at most one grain after its deadline.

Staleness matters as much as revisions: an agent cut off from the majority cannot know
what the others commit, so a reader blocked on it must be told at once, not at the end
of its wait, to go and ask an agent that has quorum (issue 13, item 3).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from controlplane.consensus.base import ControlStore
from controlplane.model import Decision

# How often the feed looks at the store's quorum status when nothing else wakes it:
# the bound on how late a waiter learns that this agent lost quorum.
STATUS_TICK_S = 0.1
# Waiters' deadlines are rounded up to this; one timer per grain.
TIMER_GRAIN_S = 0.05


class _TimerWheel:
    """One loop timer per grain of deadline; each releases every waiter of its grain."""

    def __init__(self, grain_s: float = TIMER_GRAIN_S) -> None:
        self._grain_s = grain_s
        self._slots: dict[int, set[asyncio.Future[bool]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, deadline: float, waiter: asyncio.Future[bool]) -> int:
        """Resolve `waiter` with False at `deadline` (loop time) or up to one grain later."""
        slot = math.ceil(deadline / self._grain_s)
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = set()
            loop.call_at(slot * self._grain_s, self._fire, slot)
        waiters.add(waiter)
        return slot

    def discard(self, slot: int, waiter: asyncio.Future[bool]) -> None:
        waiters = self._slots.get(slot)
        if waiters is not None:
            waiters.discard(waiter)

    def _fire(self, slot: int) -> None:
        for waiter in self._slots.pop(slot, ()):
            if not waiter.done():
                waiter.set_result(False)

    def __len__(self) -> int:
        return len(self._slots)


class RevisionFeed:
    def __init__(self, store: ControlStore, is_stale: Callable[[], bool] | None = None) -> None:
        self._store = store
        self._is_stale = is_stale or (lambda: not store.status().has_quorum)
        # Waiters for the next change: resolved with True by `run()`, False by the wheel.
        self._waiters: set[asyncio.Future[bool]] = set()
        self._wheel = _TimerWheel()
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
                waiters, self._waiters = self._waiters, set()
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(True)

    async def wait_past(
        self, revision: int, timeout_s: float, *, epoch: str | None = None, stale: bool | None = None
    ) -> Decision | None:
        """The served decision once it passes `revision` (or its epoch is not `epoch`).

        Returns early, with whatever is served, when the agent's staleness is no longer
        `stale` (when given), and at the timeout. The caller compares.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            decision = self.decision
            if decision is not None and (
                decision.revision > revision or (epoch is not None and decision.epoch != epoch)
            ):
                return decision
            if stale is not None and self._is_stale() != stale:
                return decision
            if loop.time() >= deadline:
                return decision
            waiter: asyncio.Future[bool] = loop.create_future()
            self._waiters.add(waiter)
            slot = self._wheel.add(loop, deadline, waiter)
            try:
                changed = await waiter
            finally:
                self._waiters.discard(waiter)
                self._wheel.discard(slot, waiter)
            if not changed:
                return self.decision
