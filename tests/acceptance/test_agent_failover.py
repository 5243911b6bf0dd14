"""Given real agents probing real (simulated) backends, when regions fail, then traffic moves.

Scenarios: a whole region goes down and comes back (hold, then ramp); one observer
alone loses its path to a region (no verdict, no change); every region fails at once
(panic: keep the weights in force, never black-hole).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from controlplane.testing.localcluster import LocalCluster
from tests.acceptance.conftest import (
    BASE_WEIGHTS,
    REGIONS,
    SERVICES,
    Recorder,
    StartCluster,
    all_weights,
    region_out,
    wait_all,
    weights,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

BASE = dict.fromkeys(SERVICES, BASE_WEIGHTS)
_LEAVE = "verdicts would leave 0 of 3 regions serving"


async def test_region_down_moves_its_share_then_returns_after_hold_and_ramp(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    ready = (await c.decisions())["agent-east-1"]
    assert ready is not None
    assert all_weights(ready) == BASE, "a healthy cluster serves the base weights"

    async with Recorder(c, mode="watch") as rec:
        fault_at = time.monotonic()
        await c.fail_region("cn-east")
        moved = await wait_all(c, lambda d: region_out(d, "cn-east"), "cn-east weight 0 on every agent")
        measure(f"cn-east down -> weight 0 on all 3 agents in {time.monotonic() - fault_at:.2f} s")
        for agent, d in moved.items():
            for service in SERVICES:
                w = weights(d, service)
                assert d["services"][service]["cn-east"]["state"] == "down", (agent, service)
                assert sum(w.values()) == 100, (agent, service, w)
                assert w["cn-south"] > BASE_WEIGHTS["cn-south"], (agent, service, w)
                assert w["cn-north"] > BASE_WEIGHTS["cn-north"], (agent, service, w)

        # Once every observer has seen it, the reason names all three.
        three = "cn-east/order down: 3 of 3 observers report connect refused (quorum 2 of 3 configured)"
        settled = await wait_all(c, lambda d: three in d["reasons"], f"reason {three!r} on every agent")
        d = settled["agent-south-1"]
        w = weights(d, "order")
        moved_reason = (
            f"order: share moved from cn-east (-40) to cn-south (+{w['cn-south'] - 33}), "
            f"cn-north (+{w['cn-north'] - 27})"
        )
        assert moved_reason in d["reasons"], d["reasons"]
        assert len({x["revision"] for x in settled.values()}) == 1, "every agent serves the same revision"

        healed_at = time.monotonic()
        await c.heal_region("cn-east")
        final = await wait_all(
            c,
            lambda d: all_weights(d) == BASE and not any("ramping" in r for r in d["reasons"]),
            "base weights back on every agent",
        )
        measure(f"cn-east healed -> base weights on all 3 agents in {time.monotonic() - healed_at:.2f} s")
    assert len({d["revision"] for d in final.values()}) == 1, "every agent ends on the same revision"

    after = rec.decisions(since=healed_at)
    held = [d for d in after if any(r.startswith("cn-east/order recovering:") for r in d["reasons"])]
    assert held, f"no decision showed cn-east/order held; reasons seen: {[d['reasons'] for d in after]}"
    for d in held:
        placement = d["services"]["order"]["cn-east"]
        assert placement["verdict"] == "up" and placement["weight"] == 0, placement
        hold_s = placement["serving_since"] - placement["verdict_since"]
        assert hold_s == pytest.approx(c.config["policy"]["recovery_hold_s"]), placement

    east_order = [(d["revision"], d["services"]["order"]["cn-east"]["weight"]) for d in after]
    assert [w for _, w in east_order] == sorted(w for _, w in east_order), f"weights bounced: {east_order}"
    serving_since = held[-1]["services"]["order"]["cn-east"]["serving_since"]
    first = next(d for d in after if d["services"]["order"]["cn-east"]["weight"] > 0)
    assert first["decided_at"] >= serving_since, "cn-east/order got traffic before its hold ended"
    steps = sorted({w for _, w in east_order if 0 < w < BASE_WEIGHTS["cn-east"]})
    assert steps, f"no intermediate ramp weight seen for cn-east/order: {east_order}"
    measure(f"cn-east/order ramp weights seen: {steps} then {BASE_WEIGHTS['cn-east']}")


async def test_one_observer_cut_off_from_a_region_changes_nothing(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster(observer_paths={"agent-south-1": ["cn-east"]})
    interval_s = c.config["probes"]["interval_s"]
    ready = await wait_all(c, lambda d: all_weights(d) == BASE, "base weights")
    revision = next(iter(ready.values()))["revision"]

    async with Recorder(c, mode="poll", interval_s=0.1) as rec:
        await c.cut_observer("agent-south-1", "cn-east")

        async def south_sees_east_down() -> bool:
            status, _, body = await c.get("agent-north-1", "/v1/observations")
            return status == 200 and any(
                o["observer"] == "agent-south-1" and o["region"] == "cn-east" and not o["up"] and o["fresh"]
                for o in body["observations"]
            )

        await c.wait_for(south_sees_east_down, 30, "agent-south-1's view of cn-east down in the store")
        alone = "cn-east/order: 1 of 3 observers report connect refused, quorum is 2: not down"
        await wait_all(c, lambda d: alone in d["reasons"], f"reason {alone!r} on every agent")
        await asyncio.sleep(8 * interval_s)

        status, _, body = await c.get("agent-east-1", "/v1/observations")
        assert status == 200
        east = [o for o in body["observations"] if o["region"] == "cn-east" and o["fresh"]]
        by_observer = {(o["observer"], o["service"]): o["up"] for o in east}
        for service in SERVICES:
            assert by_observer[("agent-south-1", service)] is False, by_observer
            assert by_observer[("agent-east-1", service)] is True, by_observer
            assert by_observer[("agent-north-1", service)] is True, by_observer

    served = [s for s in rec.samples if s.decision is not None]
    assert len({s.agent for s in served}) == 3 and len(served) > 30, "too few samples to judge"
    for s in served:
        assert s.decision is not None
        assert all_weights(s.decision) == BASE, f"{s.agent} served {all_weights(s.decision)}"
        assert not s.decision["panic"]
        for service in SERVICES:
            assert s.decision["services"][service]["cn-east"]["state"] == "healthy", (s.agent, service)
    revisions = sorted({s.revision for s in served if s.revision is not None})
    assert revisions[-1] > revision, "the lone observer's report was never considered"
    measure(f"{len(served)} samples over {len(revisions)} revisions: weights never moved")

    await c.heal_observer("agent-south-1", "cn-east")
    await wait_all(c, lambda d: not any("1 of 3" in r for r in d["reasons"]), "the lone report cleared")


async def test_every_region_failing_at_once_serves_them_all_by_base_weights_in_panic(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    c = await cluster()
    ready = await wait_all(c, lambda d: all_weights(d) == BASE, "base weights")
    before = next(iter(ready.values()))

    async with Recorder(c, mode="watch") as rec:
        fault_at = time.monotonic()
        await asyncio.gather(*(c.fail_region(r) for r in REGIONS))
        panicked = await wait_all(
            c,
            lambda d: d["panic"] and sum(r.startswith("panic:") for r in d["reasons"]) == len(SERVICES),
            "panic for every service on every agent",
        )
        measure(f"every region down -> panic on all 3 agents in {time.monotonic() - fault_at:.2f} s")
        await asyncio.sleep(2.0)  # several more probe rounds: the panic holds
        latest = await c.decisions()

    for agent, d in {**panicked, **latest}.items():
        assert d is not None, agent
        assert d["panic"] is True, agent
        for service in SERVICES:
            w = weights(d, service)
            assert sum(w.values()) == 100, f"{agent} black-holes {service}: {w}"
            reason = next(r for r in d["reasons"] if r.startswith(f"panic: {_LEAVE} {service}"))
            assert "as if healthy" in reason, reason

    # No moment without traffic; in panic every region of the incident serves by its base share.
    seen = rec.decisions()
    by_revision = {d["revision"]: d for d in seen}
    for d in seen:
        for service in SERVICES:
            assert sum(weights(d, service).values()) == 100, f"revision {d['revision']} black-holes {service}"
    final = latest["agent-east-1"]
    assert final is not None
    for service in SERVICES:
        first = next(d for d in seen if any(r.startswith(f"panic: {_LEAVE} {service}") for r in d["reasons"]))
        assert weights(final, service) == weights(first, service), f"{service} weights moved during the panic"
    assert all_weights(final) == all_weights(before), (
        "the panic kept weights that moved after the fault: before it "
        f"{all_weights(before)}, in panic {all_weights(final)}; decisions between: "
        + "; ".join(
            f"revision {r}: {all_weights(d)}"
            for r, d in sorted(by_revision.items())
            if r > before["revision"] and not d["panic"]
        )
    )


async def test_region_down_before_the_agents_start_never_gets_traffic(
    cluster: StartCluster, measure: Callable[[str], None]
) -> None:
    async def east_down(c: LocalCluster) -> None:
        await c.fail_region("cn-east")

    c = await cluster(ready=False, before_agents=east_down)
    async with Recorder(c, mode="watch") as rec:
        out = await wait_all(
            c,
            lambda d: (
                region_out(d, "cn-east") and any(r.startswith("cn-east/order down:") for r in d["reasons"])
            ),
            "cn-east out on every agent",
            timeout_s=90,
        )
        await c.wait_ready(90)
    seen = rec.decisions()
    assert seen and seen[0]["revision"] == 1, f"revision 1 was not seen: {[d['revision'] for d in seen]}"
    for d in seen:
        given = {s: d["services"][s]["cn-east"]["weight"] for s in SERVICES}
        assert set(given.values()) == {0}, (
            f"revision {d['revision']} gives traffic to cn-east, whose backends were down "
            f"before any agent started: {given}; reasons: {d['reasons']}"
        )
    measure(f"first decision after bootstrap: revision {seen[0]['revision']}; {len(out)} agents agree")
