"""An agent that loses quorum tells its waiting readers at once (issue 13, item 3).

Before: a blocking query pending on a follower that was cut off returned only at the
end of its 30 s wait, although the agent knew it was stale within 2 s; SSE streams said
nothing; FlagsClient stayed on the stale agent forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio

from controlplane.client import FlagsClient
from controlplane.testing.inprocess import InProcessCluster
from tests.api.conftest import api_settings


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[InProcessCluster]:
    async with InProcessCluster(api_settings()) as c:
        await c.settled(quiet_s=0.5)
        yield c


def follower_of(c: InProcessCluster) -> str:
    leader = c.group.leader
    return next(a for a in c.agents if a != leader)


async def test_a_pending_blocking_query_is_answered_stale_when_its_agent_loses_quorum(
    cluster: InProcessCluster,
) -> None:
    agent = follower_of(cluster)
    index = cluster.revision(agent)
    url = f"{cluster.agents[agent].url}/v1/decision?index={index}&wait=30s"
    timeout = aiohttp.ClientTimeout(total=40)
    pending = asyncio.create_task(cluster.session.get(url, timeout=timeout))
    await asyncio.sleep(0.5)
    assert not pending.done(), "nothing changed yet: the query waits"
    cut_at = time.monotonic()
    cluster.isolate(agent)
    async with await asyncio.wait_for(pending, 10) as r:
        answered_after_s = time.monotonic() - cut_at
        body = await r.json()
    assert r.status == 200
    assert body["stale"] is True and r.headers["X-Controlplane-Stale"]
    assert body["revision"] == index
    assert answered_after_s < 2.0, (
        f"answered {answered_after_s:.1f} s after the cut, not at the end of its wait"
    )


async def test_a_stale_agent_answers_a_blocking_query_at_once(cluster: InProcessCluster) -> None:
    agent = follower_of(cluster)
    cluster.isolate(agent)
    index = cluster.revision(agent)
    started = time.monotonic()
    status, _, body = await cluster.get(agent, f"/v1/decision?index={index}&wait=30s")
    assert status == 200 and body["stale"] is True
    assert time.monotonic() - started < 2.0


async def test_an_sse_stream_says_stale_then_fresh(cluster: InProcessCluster) -> None:
    agent = follower_of(cluster)
    events: list[str] = []

    async def read() -> None:
        async with cluster.session.get(
            f"{cluster.agents[agent].url}/v1/watch", timeout=aiohttp.ClientTimeout(total=60)
        ) as r:
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("event: "):
                    events.append(line[7:])

    reader = asyncio.create_task(read())
    try:
        await cluster.wait_for(lambda: asyncio.sleep(0, events[:1] == ["decision"]), 5, "the first decision")
        cluster.isolate(agent)
        await cluster.wait_for(lambda: asyncio.sleep(0, "stale" in events), 3, "a stale event")
        cluster.heal(agent)
        await cluster.wait_for(lambda: asyncio.sleep(0, "fresh" in events), 3, "a fresh event")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert events.index("stale") < events.index("fresh")


async def test_flags_client_leaves_an_agent_that_lost_quorum(cluster: InProcessCluster) -> None:
    stale_agent = follower_of(cluster)
    others = [a for a in cluster.agents if a != stale_agent]
    urls = [cluster.agents[stale_agent].url] + [cluster.agents[a].url for a in others]
    flags = FlagsClient(urls, wait_s=5, backoff_max_s=0.5)
    # Start on the agent about to be cut off.
    flags._follower.following._current = 0
    async with flags:
        assert await flags.wait_for_revision(0, 5)
        cluster.isolate(stale_agent)
        status, body = await cluster.post(
            others[0], "/v1/intents", {"kind": "feature", "name": "comments", "enabled": False, "reason": "t"}
        )
        assert status == 201, body
        assert await flags.wait_for_revision(body["revision"] - 1, 5), "the client found an agent with quorum"
        assert flags.enabled("comments") is False
        assert not flags.stale
