"""Strict types in request bodies: a string is not a boolean, a boolean is not a number.

`"enabled": "false"` (or `0`) and a weight of `"50"` (or `true`) were accepted and
coerced; now they are refused with 400 naming the field, and nothing changes.
"""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.testing.inprocess import InProcessCluster

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

BAD = [
    {"kind": "feature", "name": "comments", "enabled": "false", "reason": "r"},
    {"kind": "feature", "name": "comments", "enabled": 0, "reason": "r"},
    {"kind": "feature", "name": "comments", "enabled": None, "reason": "r"},
    {"kind": "override", "service": "order", "weights": {"cn-east": "50", "cn-south": 50}, "reason": "r"},
    {"kind": "override", "service": "order", "weights": {"cn-east": True, "cn-south": 99}, "reason": "r"},
    {"kind": "override", "service": "order", "weights": {"cn-east": 50.0, "cn-south": 50}, "reason": "r"},
    {"kind": "drain", "region": "cn-east", "reason": 5},
    {"kind": "drain", "region": ["cn-east"], "reason": "r"},
]


@pytest.mark.parametrize("body", BAD, ids=[str(i) for i in range(len(BAD))])
async def test_a_body_with_a_wrong_type_is_400_and_changes_nothing(
    cluster: InProcessCluster, body: dict[str, Any]
) -> None:
    agent = next(iter(cluster.agents))
    before = await cluster.decision(agent)
    assert before is not None
    status, answer = await cluster.post(agent, "/v1/intents", body)
    assert status == 400, answer
    assert answer["error"] == "invalid request", answer
    status, plan = await cluster.post(agent, "/v1/plan", {"intents": [body]})
    assert status == 400, plan
    after = await cluster.decision(agent)
    assert after is not None and after["revision"] == before["revision"]
    assert after["intent_seq"] == before["intent_seq"]


async def test_the_right_types_are_still_accepted(cluster: InProcessCluster) -> None:
    agent = next(iter(cluster.agents))
    body = {"kind": "feature", "name": "comments", "enabled": False, "reason": "strict types"}
    status, answer = await cluster.post(agent, "/v1/plan", {"intents": [body]})
    assert status == 200, answer
