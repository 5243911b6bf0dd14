"""Readers of the decision against real agents: told at once when their agent is cut off
(issue 13, item 3), and never frozen by a cluster rebuilt from scratch (item 6)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from typing import Any

import aiohttp
import pytest

from controlplane.client import DecisionFollower
from controlplane.model import Decision

from .conftest import FAULT_TIMEOUT_S, READY_TIMEOUT_S, StartCluster, leader_of

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]


async def test_a_blocking_query_on_an_agent_that_is_cut_off_is_answered_stale_at_once(
    cluster: StartCluster, measure: Any
) -> None:
    c = await cluster(with_proxies=True)
    assert c.mesh is not None
    leader = await leader_of(c)
    victim = next(a for a in c.agents if a != leader)
    d = await c.decision(victim)
    assert d is not None
    url = f"{c.agents[victim].url}/v1/decision?index={d['revision']}&wait=30s"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
        pending = asyncio.create_task(session.get(url))
        await asyncio.sleep(0.5)
        assert not pending.done()
        cut = time.monotonic()
        c.mesh.isolate(victim, "blackhole")
        async with await asyncio.wait_for(pending, 35) as r:
            body = await r.json()
        answered = time.monotonic() - cut
    assert body["stale"] is True and body["revision"] == d["revision"]
    measure(
        f"blocking query on a cut-off agent answered stale {answered:.2f} s after the cut (wait was 30 s)"
    )
    assert answered < 10, f"answered {answered:.1f} s after the cut"


async def test_a_load_balancer_follower_leaves_a_cut_off_agent_for_one_with_quorum(
    cluster: StartCluster, measure: Any
) -> None:
    c = await cluster(with_proxies=True)
    assert c.mesh is not None
    leader = await leader_of(c)
    victim = next(a for a in c.agents if a != leader)
    applied: list[Decision] = []

    async def apply(decision: Decision) -> None:
        applied.append(decision)

    urls = [c.agents[victim].url] + [c.agents[a].url for a in c.agents if a != victim]
    follower = DecisionFollower(urls, apply, wait_s=30.0, retry_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await c.wait_for(lambda: asyncio.sleep(0, bool(applied)), 10, "the first decision")
        c.mesh.isolate(victim, "blackhole")
        await asyncio.sleep(2.0)  # the victim knows it is cut off
        started = time.monotonic()
        status, body = await c.post(
            leader, "/v1/intents", {"kind": "feature", "name": "likes", "enabled": False, "reason": "moved"}
        )
        assert status == 201, body
        revision = body["revision"]
        await c.wait_for(
            lambda: asyncio.sleep(0, follower.applied_revision >= revision),
            FAULT_TIMEOUT_S,
            f"the follower to apply revision {revision} from an agent with quorum",
        )
        measure(
            f"follower on a cut-off agent got the new revision {time.monotonic() - started:.2f} s after it"
        )
    finally:
        stop.set()
        await task
        c.mesh.heal_all()


async def test_followers_follow_a_cluster_rebuilt_from_scratch(cluster: StartCluster, measure: Any) -> None:
    c = await cluster()
    leader = await leader_of(c)
    for i in range(4):  # push the revision well past where a new cluster starts
        await c.post(
            leader, "/v1/intents", {"kind": "feature", "name": "likes", "enabled": i % 2 == 0, "reason": "r"}
        )
    before = await c.decision(leader)
    assert before is not None and before["revision"] > 3
    applied: list[Decision] = []

    async def apply(decision: Decision) -> None:
        applied.append(decision)

    follower = DecisionFollower([a.url for a in c.agents.values()], apply, wait_s=2.0, retry_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await c.wait_for(
            lambda: asyncio.sleep(0, follower.applied_revision == before["revision"]),
            10,
            "the current decision",
        )
        # Rebuild: every agent stopped, its data gone, started again on the same addresses.
        for agent_id in c.agents:
            c.kill_agent(agent_id, signal.SIGKILL)
        for agent in c.agents.values():
            shutil.rmtree(agent.data_dir, ignore_errors=True)
        rebuilt = time.monotonic()
        for agent_id in c.agents:
            c.start_agent(agent_id)
        await c.wait_ready(READY_TIMEOUT_S)
        fresh = await c.decision(leader)
        assert fresh is not None and fresh["epoch"] != before["epoch"]
        assert fresh["revision"] < before["revision"], "a new cluster counts from 1 again"
        await c.wait_for(
            lambda: asyncio.sleep(0, bool(applied) and applied[-1].epoch == fresh["epoch"]),
            FAULT_TIMEOUT_S,
            "the follower to take the new cluster's decision",
        )
        measure(
            f"cluster rebuilt: follower moved from epoch {before['epoch']} revision {before['revision']} to "
            f"epoch {fresh['epoch']} revision {applied[-1].revision} {time.monotonic() - rebuilt:.1f} s after"
        )
    finally:
        stop.set()
        await task
