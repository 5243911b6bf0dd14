"""Given three agents in one Raft group, when members die, stall or are cut off, then
decisions stay committed, ordered and single-valued.

Scenarios: the leader is SIGKILLed; a minority is partitioned (it serves its last
decision, stale, and nothing else); the leader is SIGSTOPped past the election timeout
while decisions keep coming (never two bodies under one revision); a member restarted
with the wrong cluster secret can neither join nor change anything.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from tests.acceptance.conftest import (
    READY_TIMEOUT_S,
    Recorder,
    StartCluster,
    cluster_view,
    leader_of,
    outcome,
    region_out,
    same_revision,
    wait_all,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]


async def test_leader_killed_new_leader_decides_and_old_one_catches_up(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    old = await leader_of(c)
    before = (await c.decisions())[old]
    assert before is not None
    survivors = [a for a in c.agents if a != old]

    killed_at = time.monotonic()
    c.kill_agent(old, signal.SIGKILL)
    new = await c.wait_leader(READY_TIMEOUT_S, exclude=[old])
    measure(f"leader {old} SIGKILLed -> {new} leads with quorum after {time.monotonic() - killed_at:.2f} s")
    assert new in survivors

    fault_at = time.monotonic()
    await c.fail_region("cn-north")
    moved = await wait_all(
        c, lambda d: region_out(d, "cn-north"), "cn-north weight 0 on the survivors", survivors
    )
    measure(f"cn-north down -> weight 0 on both survivors in {time.monotonic() - fault_at:.2f} s")
    for agent, d in moved.items():
        assert d["leader"] == new, f"{agent} serves a decision by {d['leader']}, not the new leader {new}"
        assert d["revision"] > before["revision"], (agent, d["revision"], before["revision"])
        assert d["term"] > before["term"], (agent, d["term"], before["term"])

    c.start_agent(old)
    await c.wait_ready(READY_TIMEOUT_S)
    final = await same_revision(c, c.agents)
    assert final[old]["revision"] >= max(d["revision"] for d in moved.values())
    assert region_out(final[old], "cn-north"), "the restarted agent serves the new leader's decision"
    assert len({outcome(d) for d in final.values()}) == 1, "every agent serves the same decision"


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_partitioned_minority_serves_its_last_decision_stale(
    cluster: StartCluster, measure: Callable[[str], None], role: str
) -> None:
    c = await cluster(with_proxies=True)
    assert c.mesh is not None
    leader = await leader_of(c)
    isolated = leader if role == "leader" else next(a for a in c.agents if a != leader)
    majority = [a for a in c.agents if a != isolated]

    cut_at = time.monotonic()
    c.mesh.isolate(isolated)

    async def stale_decision() -> dict[str, object] | None:
        status, headers, body = await c.get(isolated, "/v1/decision")
        ok = status == 200 and "X-Controlplane-Stale" in headers and body.get("stale") is True
        return body if ok else None

    last = await c.wait_for(stale_decision, READY_TIMEOUT_S, f"{isolated} to mark its decision stale")
    measure(f"{role} isolated -> its decision marked stale after {time.monotonic() - cut_at:.2f} s")
    status, _, body = await c.get(isolated, "/readyz")
    assert status == 503, f"isolated agent says ready: {body}"
    assert "no quorum" in body["problems"], body
    await c.wait_ready(READY_TIMEOUT_S, agent_ids=majority)

    async with Recorder(c, [isolated], mode="poll", interval_s=0.05) as rec:
        await c.fail_region("cn-east")
        moved = await wait_all(
            c, lambda d: region_out(d, "cn-east"), "cn-east weight 0 on the majority", majority
        )
        await asyncio.sleep(2.0)  # give the isolated agent every chance to show something new
        status, _, body = await c.get(isolated, "/readyz")
        assert status == 503, f"isolated agent says ready: {body}"
    majority_revision = max(d["revision"] for d in moved.values())
    assert majority_revision > last["revision"], "the majority went on deciding"

    samples = [s for s in rec.of(isolated) if s.status == 200]
    assert len(samples) > 20, f"too few answers from the isolated agent: {len(rec.of(isolated))} tries"
    for s in samples:
        assert s.decision is not None
        assert s.stale and s.decision["stale"] is True, "the isolated agent stopped marking it stale"
        assert s.revision == last["revision"], "the isolated agent served a decision it cannot have"
        assert outcome(s.decision) == outcome(last)
        assert not region_out(s.decision, "cn-east")

    healed_at = time.monotonic()
    c.mesh.heal_all()
    await c.wait_ready(READY_TIMEOUT_S)
    final = await same_revision(c, c.agents)
    measure(
        f"partition healed -> all 3 agents ready on one revision after {time.monotonic() - healed_at:.2f} s"
    )
    assert final[isolated]["revision"] >= majority_revision
    assert final[isolated]["stale"] is False
    assert region_out(final[isolated], "cn-east")
    assert len({outcome(d) for d in final.values()}) == 1


async def test_leader_paused_past_election_timeout_never_splits_a_revision(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    raft = c.config.get("backend", {}).get("raft", {})
    pause_s = 4 * float(raft.get("election_timeout_max_s", 0.8)) + 1.5
    old = await leader_of(c)
    term_before = (await cluster_view(c, old))["term"]
    others = [a for a in c.agents if a != old]

    async with Recorder(c, mode="poll", interval_s=0.02, timeout_s=0.5) as rec:
        await asyncio.sleep(0.5)
        paused_at = time.monotonic()
        c.pause_agent(old)
        try:
            await c.fail_region("cn-east")
            new = await c.wait_leader(READY_TIMEOUT_S, exclude=[old])
            measure(f"leader {old} SIGSTOPped -> {new} leads after {time.monotonic() - paused_at:.2f} s")
            await wait_all(c, lambda d: region_out(d, "cn-east"), "cn-east weight 0 on the others", others)
            await asyncio.sleep(max(0.0, pause_s - (time.monotonic() - paused_at)))
            # Decisions keep coming while the old leader wakes up.
            await c.heal_region("cn-east")
        finally:
            c.resume_agent(old)
        await c.wait_ready(READY_TIMEOUT_S)
        final = await same_revision(c, c.agents)
        await asyncio.sleep(1.0)

    assert (await cluster_view(c, new))["term"] > term_before, "no new term: the pause did not bite"
    by_revision: dict[int, dict[str, set[str]]] = {}
    for s in rec.samples:
        if s.decision is not None and s.revision is not None:
            by_revision.setdefault(s.revision, {}).setdefault(outcome(s.decision), set()).add(s.agent)
    split = {rev: agents for rev, agents in by_revision.items() if len(agents) > 1}
    assert not split, f"revisions served with different bodies: {split}"
    assert len(by_revision) >= 3, f"too few revisions seen to judge: {sorted(by_revision)}"
    old_revisions = {s.revision for s in rec.of(old) if s.revision is not None}
    assert max(old_revisions) >= final[old]["revision"], "the resumed agent was not sampled after catching up"
    served = {s.agent for s in rec.samples if s.decision is not None}
    assert served == set(c.agents)
    measure(f"{len(rec.samples)} samples, {len(by_revision)} revisions, one body per revision")


async def test_member_with_wrong_secret_cannot_join_or_change_anything(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    leader = await leader_of(c)
    outsider = next(a for a in c.agents if a != leader)
    majority = [a for a in c.agents if a != outsider]
    had = (await c.decisions([outsider]))[outsider]
    assert had is not None
    term_before = (await cluster_view(c, leader))["term"]

    assert await c.stop_agent(outsider) == 0
    stopped_at = time.time()
    c.start_agent(outsider, extra_env={"CONTROLPLANE_CLUSTER_SECRET": "not-" + c.cluster_secret})

    async def serving() -> bool:
        status, _, _ = await c.get(outsider, "/healthz")
        c.check_alive([outsider])
        return status == 200

    await c.wait_for(serving, READY_TIMEOUT_S, f"{outsider} (wrong secret) to serve HTTP")
    readiness: list[int] = []

    async def poll_readiness() -> None:
        while True:
            status, _, _ = await c.get(outsider, "/readyz")
            readiness.append(status)
            await asyncio.sleep(0.1)

    poller = asyncio.create_task(poll_readiness())
    try:
        async with Recorder(c, [outsider], mode="poll", interval_s=0.1) as rec:
            await c.fail_region("cn-east")
            moved = await wait_all(
                c, lambda d: region_out(d, "cn-east"), "cn-east weight 0 on the majority", majority
            )
            await asyncio.sleep(3.0)  # time enough to join, if it could
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    assert readiness and set(readiness) == {503}, f"/readyz of the outsider answered {sorted(set(readiness))}"
    assert max(d["revision"] for d in moved.values()) > had["revision"]

    answers = [s for s in rec.of(outsider) if s.status == 200]
    assert answers, "the agent with the wrong secret never answered"
    for s in answers:
        assert s.revision is not None and s.revision <= had["revision"], "it served a decision it cannot have"
        assert s.stale, "it claims quorum"
        assert s.decision is not None and not region_out(s.decision, "cn-east")

    for agent in majority:
        view = await cluster_view(c, agent)
        assert view["leader"] == leader, f"{agent}: leader changed to {view['leader']}"
        assert view["term"] == term_before, f"{agent}: term moved from {term_before} to {view['term']}"
        assert view["has_quorum"] is True
        connected = {m["id"]: m["connected"] for m in view["members"]}
        assert connected[outsider] is False, f"{agent} is connected to the outsider: {connected}"
        assert all(connected[m] for m in majority), f"{agent}: majority members disconnected: {connected}"
    status, _, body = await c.get(leader, "/v1/observations")
    assert status == 200
    written = [o for o in body["observations"] if o["observer"] == outsider and o["at"] > stopped_at]
    assert not written, f"observations from the outsider got in: {written}"

    # Refused on both sides, and said so on both sides (issue 12, item 9).
    assert "rejected our cluster secret" in c.log_of(outsider)
    assert any("failed authentication: wrong cluster secret" in c.log_of(a) for a in majority)

    assert await c.stop_agent(outsider) == 0
    c.start_agent(outsider)
    await c.wait_ready(READY_TIMEOUT_S)
    final = await same_revision(c, c.agents)
    assert region_out(final[outsider], "cn-east")
    assert len({outcome(d) for d in final.values()}) == 1
