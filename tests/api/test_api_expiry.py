"""Intents that end by themselves (`for_s`): the leader removes them at their time, as
an operator would, on every agent; bad durations are refused and change nothing."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.testing.inprocess import InProcessCluster

pytestmark = [pytest.mark.asyncio(loop_scope="module")]


def state_of(decision: dict[str, Any] | None, region: str, service: str) -> str | None:
    if decision is None:
        return None
    return str(decision["services"][service][region]["state"])


async def test_a_drain_given_for_s_ends_by_itself_on_every_agent(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    status, body = await cluster.post(
        agents[0],
        "/v1/intents",
        {"kind": "drain", "region": "cn-east", "service": "order", "reason": "short drain", "for_s": 1.5},
    )
    assert status == 201, body
    intent_id = body["id"]
    status, _, standing = await cluster.get(agents[1], "/v1/intents")
    ours = [i for i in standing["intents"] if i["id"] == intent_id]
    assert ours and ours[0]["expires_at"] > ours[0]["created_at"], standing
    assert ours[0]["expires_at"] - ours[0]["created_at"] == pytest.approx(1.5, abs=0.01)
    decision = await cluster.decision(agents[2])
    assert state_of(decision, "cn-east", "order") == "drained"

    async def ended_everywhere() -> bool:
        decisions = await cluster.decisions()
        return all(state_of(d, "cn-east", "order") not in (None, "drained") for d in decisions.values())

    await cluster.wait_for(ended_everywhere, 15, "cn-east/order no longer drained on every agent")
    _, _, standing = await cluster.get(agents[2], "/v1/intents")
    assert intent_id not in {i["id"] for i in standing["intents"]}
    _, _, history = await cluster.get(agents[1], "/v1/history")
    removed = [
        e for e in history["entries"] if e.get("intent_id") == intent_id and e["kind"] == "intent-removed"
    ]
    assert len(removed) == 1, history["entries"][-5:]
    assert removed[0]["who"] == "expiry" and "time ran out" in removed[0]["summary"]


async def test_an_intent_without_for_s_stands(cluster: InProcessCluster, agents: list[str]) -> None:
    status, body = await cluster.post(
        agents[0], "/v1/intents", {"kind": "feature", "name": "likes", "enabled": False, "reason": "stands"}
    )
    assert status == 201, body
    _, _, standing = await cluster.get(agents[0], "/v1/intents")
    ours = [i for i in standing["intents"] if i["id"] == body["id"]]
    assert ours and ours[0].get("expires_at") is None
    status, _ = await cluster.post(
        agents[0], "/v1/intents", {"kind": "feature", "name": "likes", "enabled": True, "reason": "restore"}
    )
    assert status == 201


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"kind": "drain", "region": "cn-east", "reason": "r", "for_s": 0}, "for_s"),
        ({"kind": "drain", "region": "cn-east", "reason": "r", "for_s": -5}, "for_s"),
        ({"kind": "drain", "region": "cn-east", "reason": "r", "for_s": 31 * 86400}, "for_s"),
        ({"kind": "drain", "region": "cn-east", "reason": "r", "for_s": "soon"}, "for_s"),
        ({"kind": "undrain", "region": "cn-east", "reason": "r", "for_s": 60}, "for_s"),
        ({"kind": "unfreeze", "reason": "r", "for_s": 60}, "for_s"),
    ],
)
async def test_a_bad_duration_is_refused_and_changes_nothing(
    cluster: InProcessCluster, agents: list[str], body: dict[str, Any], problem: str
) -> None:
    before = await cluster.decision(agents[0])
    assert before is not None
    status, answer = await cluster.post(agents[0], "/v1/intents", body)
    assert status == 400, answer
    assert problem in answer["detail"], answer
    after = await cluster.decision(agents[0])
    assert after is not None and after["revision"] == before["revision"]
