"""The revision feed: one change wakes every waiter; timeouts share one timer per grain."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from controlplane.agent.feed import TIMER_GRAIN_S, RevisionFeed
from controlplane.consensus.base import ControlStore


class FakeStore:
    """Just what the feed reads: a state with a version and a decision, and its changes."""

    def __init__(self) -> None:
        self._state = SimpleNamespace(version=0, decision=None)
        self._changed = asyncio.Event()

    def state(self) -> Any:
        return self._state

    async def wait_for_change(self, after_version: int, timeout_s: float) -> Any:
        if self._state.version <= after_version:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()
            except TimeoutError:
                pass
        return self._state

    def commit(self, revision: int) -> None:
        decision = SimpleNamespace(epoch="e1", revision=revision)
        self._state = SimpleNamespace(version=self._state.version + 1, decision=decision)
        self._changed.set()
        self._changed = asyncio.Event()


def parked(feed: RevisionFeed) -> tuple[int, int]:
    """(waiters for a change, waiters held by the timer wheel)."""
    wheel = feed._wheel._slots
    return len(feed._waiters), sum(len(w) for w in wheel.values())


async def test_a_thousand_timeouts_share_a_few_timers_and_never_end_early() -> None:
    feed = RevisionFeed(cast(ControlStore, FakeStore()), lambda: False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waits = [asyncio.create_task(feed.wait_past(0, 0.2 + i * 0.0001)) for i in range(1000)]
    while parked(feed) != (1000, 1000):  # however long a loaded machine takes to start them
        assert loop.time() - started < 0.19, parked(feed)
        await asyncio.sleep(0.005)
    spread = loop.time() - started
    # 1,000 deadlines within 0.1 s of each other plus the time it took to start them: a
    # handful of timers, one per grain, not 1,000.
    assert len(feed._wheel) <= (0.1 + spread) / TIMER_GRAIN_S + 2
    results = await asyncio.gather(*waits)
    ended = loop.time()
    assert results == [None] * 1000
    assert ended - started >= 0.2 + 999 * 0.0001
    assert parked(feed) == (0, 0) and len(feed._wheel) == 0


async def test_a_new_revision_wakes_every_waiter_at_once_and_leaves_nothing_parked() -> None:
    store = FakeStore()
    feed = RevisionFeed(cast(ControlStore, store), lambda: False)
    follower = asyncio.create_task(feed.run(tick_s=0.05))
    try:
        waits = [asyncio.create_task(feed.wait_past(0, 30.0)) for _ in range(200)]
        await asyncio.sleep(0.05)
        assert parked(feed) == (200, 200)
        store.commit(1)
        async with asyncio.timeout(5):  # long before their 30 s deadline
            results = await asyncio.gather(*waits)
        assert {r.revision for r in results} == {1}
        assert parked(feed) == (0, 0)
        # An old revision is answered at once, without parking.
        assert (await feed.wait_past(0, 30.0)).revision == 1  # type: ignore[union-attr]
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    feed = RevisionFeed(cast(ControlStore, FakeStore()), lambda: False)
    wait = asyncio.create_task(feed.wait_past(0, 30.0))
    await asyncio.sleep(0.01)
    assert parked(feed) == (1, 1)
    wait.cancel()
    await asyncio.gather(wait, return_exceptions=True)
    assert parked(feed) == (0, 0)


async def test_staleness_change_ends_a_wait_that_asked_for_it() -> None:
    stale = [False]
    store = FakeStore()
    feed = RevisionFeed(cast(ControlStore, store), lambda: stale[0])
    follower = asyncio.create_task(feed.run(tick_s=0.02))
    try:
        wait = asyncio.create_task(feed.wait_past(0, 30.0, stale=False))
        await asyncio.sleep(0.05)
        stale[0] = True
        async with asyncio.timeout(5):
            assert await wait is None
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
