"""Drills through the API: a region taken out as a failure would take it, ending by itself;
refused (409, one line, nothing committed) when the cluster is not in a state to drill."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.testing.inprocess import InProcessCluster

pytestmark = [pytest.mark.asyncio(loop_scope="module")]


def placement(decision: dict[str, Any] | None, region: str, service: str) -> dict[str, Any]:
    assert decision is not None
    return dict(decision["services"][service][region])


async def healthy_everywhere(cluster: InProcessCluster) -> bool:
    decisions = await cluster.decisions()
    return all(
        d is not None
        and all(
            p["state"] == "healthy" and p["ramp"] == 1.0 for s in d["services"].values() for p in s.values()
        )
        for d in decisions.values()
    )


async def test_a_drill_takes_the_region_out_marked_as_a_drill_and_ends_by_itself(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    await cluster.wait_for(lambda: healthy_everywhere(cluster), 30, "a healthy cluster")
    status, body = await cluster.post(
        agents[0], "/v1/intents", {"kind": "drill", "region": "cn-east", "reason": "game day", "for_s": 2.0}
    )
    assert status == 201, body
    decision = await cluster.decision(agents[1])
    for service in decision["services"] if decision else ():
        assert placement(decision, "cn-east", service) | {"weight": 0, "state": "down"} == placement(
            decision, "cn-east", service
        )
    assert decision is not None and any("DRILL" in r and "cn-east" in r for r in decision["reasons"])
    # A second drill while this one runs is refused, in one line, and commits nothing.
    status, refused = await cluster.post(
        agents[2], "/v1/intents", {"kind": "drill", "region": "cn-south", "reason": "two", "for_s": 60}
    )
    assert status == 409, refused
    assert "another drill is running" in refused["detail"] and "\n" not in refused["detail"]

    async def back_everywhere() -> bool:
        decisions = await cluster.decisions()
        return all(
            d is not None and placement(d, "cn-east", "order")["state"] != "down" for d in decisions.values()
        )

    await cluster.wait_for(back_everywhere, 15, "cn-east back after the drill's time ran out")
    _, _, history = await cluster.get(agents[1], "/v1/history")
    removed = [
        e for e in history["entries"] if e.get("intent_id") == body["id"] and e["kind"] == "intent-removed"
    ]
    assert len(removed) == 1 and removed[0]["who"] == "expiry"
    await cluster.wait_for(lambda: healthy_everywhere(cluster), 30, "healthy again after the ramp")


async def test_a_drill_while_automation_is_frozen_is_refused_and_changes_nothing(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    await cluster.wait_for(lambda: healthy_everywhere(cluster), 30, "a healthy cluster")
    status, frozen = await cluster.post(
        agents[0], "/v1/intents", {"kind": "freeze", "reason": "change window"}
    )
    assert status == 201, frozen
    try:
        before = await cluster.decision(agents[1])
        status, refused = await cluster.post(
            agents[1], "/v1/intents", {"kind": "drill", "region": "cn-east", "reason": "r", "for_s": 60}
        )
        assert status == 409, refused
        assert "frozen" in refused["detail"]
        after = await cluster.decision(agents[1])
        assert before is not None and after is not None and after["revision"] == before["revision"]
        _, _, standing = await cluster.get(agents[1], "/v1/intents")
        assert not [i for i in standing["intents"] if i["kind"] == "drill"]
    finally:
        status, _ = await cluster.post(agents[0], "/v1/intents", {"kind": "unfreeze", "reason": "done"})
        assert status == 201


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"kind": "drill", "region": "cn-east", "reason": "no end"}, "for_s"),
        ({"kind": "drill", "region": "cn-east", "reason": "r", "for_s": 2 * 86400}, "for_s"),
        ({"kind": "drill", "region": "mars", "reason": "r", "for_s": 60}, "mars"),
        ({"kind": "drill", "region": "cn-east", "service": "nope", "reason": "r", "for_s": 60}, "nope"),
    ],
)
async def test_a_bad_drill_is_refused_and_changes_nothing(
    cluster: InProcessCluster, agents: list[str], body: dict[str, Any], problem: str
) -> None:
    before = await cluster.decision(agents[0])
    status, answer = await cluster.post(agents[0], "/v1/intents", body)
    assert status in (400, 404), answer
    assert problem in answer["detail"], answer
    after = await cluster.decision(agents[0])
    assert before is not None and after is not None and after["revision"] == before["revision"]


async def test_the_plan_shows_a_drill_and_its_refusals(cluster: InProcessCluster, agents: list[str]) -> None:
    await cluster.wait_for(lambda: healthy_everywhere(cluster), 30, "a healthy cluster")
    drill = {"kind": "drill", "region": "cn-east", "reason": "what if", "for_s": 60}
    status, planned = await cluster.post(agents[0], "/v1/plan", {"intents": [drill]})
    assert status == 200, planned
    assert planned["refusals"] == [] and planned["committed"] is False
    assert any(c.startswith("cn-east/order:") and c.endswith("0 down") for c in planned["changes"])
    status, twice = await cluster.post(
        agents[0], "/v1/plan", {"intents": [drill, {**drill, "region": "cn-south"}]}
    )
    assert status == 200 and len(twice["refusals"]) == 1 and "another drill" in twice["refusals"][0]
