"""The HTTP API of three in-process agents: blocking reads, SSE, writes, validation."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import pytest

from controlplane.testing.inprocess import InProcessCluster

pytestmark = [pytest.mark.asyncio(loop_scope="module")]


async def revision(cluster: InProcessCluster, agent: str) -> int:
    d = await cluster.decision(agent)
    assert d is not None
    return int(d["revision"])


async def get_json(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    async with session.get(url, **kw) as r:
        return r.status, dict(r.headers), await r.json(content_type=None) if r.status != 304 else None


async def test_blocking_query_returns_after_a_commit_and_not_before(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    reader, writer = agents[0], agents[1]
    before = await revision(cluster, reader)
    url = f"{cluster.agents[reader].url}/v1/decision?index={before}&wait=20s"
    poll = asyncio.create_task(get_json(cluster.session, url, timeout=aiohttp.ClientTimeout(total=30)))
    await asyncio.sleep(1.5)
    assert not poll.done(), "a blocking query must wait while the revision is unchanged"
    status, body = await cluster.post(
        writer,
        "/v1/intents",
        {"kind": "feature", "name": "likes", "enabled": False, "reason": "blocking query test"},
    )
    committed_at = time.monotonic()
    assert status == 201, body
    code, headers, decision = await asyncio.wait_for(poll, 10)
    returned_after_s = time.monotonic() - committed_at
    assert code == 200
    assert decision["revision"] > before
    assert int(headers["X-Controlplane-Revision"]) == decision["revision"]
    assert decision["features"]["likes"] is False
    assert returned_after_s < 5, (
        "the blocking query returns right after the commit, not at the end of its wait"
    )
    await cluster.post(
        writer, "/v1/intents", {"kind": "feature", "name": "likes", "enabled": True, "reason": "restore"}
    )


async def test_blocking_query_ends_at_its_wait_with_the_same_revision(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    current = await revision(cluster, agents[0])
    start = time.monotonic()
    status, _, body = await get_json(
        cluster.session, f"{cluster.agents[agents[0]].url}/v1/decision?index={current + 1000}&wait=1s"
    )
    assert status == 200
    assert time.monotonic() - start >= 0.9
    assert body["revision"] == current


async def test_etag_gives_304(cluster: InProcessCluster, agents: list[str]) -> None:
    url = f"{cluster.agents[agents[0]].url}/v1/decision"
    status, headers, _ = await get_json(cluster.session, url)
    assert status == 200
    status, headers2, _ = await get_json(cluster.session, url, headers={"If-None-Match": headers["Etag"]})
    assert status == 304
    assert headers2["X-Controlplane-Revision"] == headers["X-Controlplane-Revision"]


async def test_sse_watcher_sees_every_revision_in_order(cluster: InProcessCluster, agents: list[str]) -> None:
    url = f"{cluster.agents[agents[2]].url}/v1/watch"
    seen: list[int] = []

    async def read_events(stop_at: int) -> None:
        async with cluster.session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("id: "):
                    seen.append(int(line[4:].rpartition(".")[2]))  # epoch.revision
                    if seen[-1] >= stop_at:
                        return

    start = await revision(cluster, agents[2])
    expected = []
    reader = asyncio.create_task(read_events(stop_at=10**9))
    await asyncio.sleep(0.5)
    for enabled in (False, True, False, True):
        status, body = await cluster.post(
            agents[0],
            "/v1/intents",
            {"kind": "feature", "name": "comments", "enabled": enabled, "reason": "sse"},
        )
        assert status == 201, body
        expected.append(body["revision"])
        await cluster.wait_for(
            lambda r=body["revision"]: asyncio.sleep(0, r if seen and seen[-1] >= r else None),
            10,
            f"revision {body['revision']} on the stream",
        )
    reader.cancel()
    assert seen[0] == start, "the stream starts with the current decision"
    assert seen == sorted(seen) and len(seen) == len(set(seen)), f"in order, no repeats: {seen}"
    for r in expected:
        assert r in seen, f"revision {r} missing from {seen}"


async def test_drain_then_undrain_moves_and_restores_weights(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    base = (await cluster.decision(agents[0]))["services"]["order"]  # type: ignore[index]
    status, body = await cluster.post(
        agents[1],
        "/v1/intents",
        {"kind": "drain", "region": "cn-north", "service": "order", "reason": "maintenance"},
    )
    assert status == 201, body

    async def drained_everywhere() -> bool:
        ds = await cluster.decisions()
        return all(
            d
            and d["services"]["order"]["cn-north"]["weight"] == 0
            and d["services"]["order"]["cn-north"]["state"] == "drained"
            and d["services"]["inventory"]["cn-north"]["weight"] > 0
            for d in ds.values()
        )

    await cluster.wait_for(drained_everywhere, 15, "cn-north/order drained on every agent")
    status, body = await cluster.post(
        agents[2],
        "/v1/intents",
        {"kind": "undrain", "region": "cn-north", "service": "order", "reason": "done"},
    )
    assert status == 201, body

    async def restored() -> bool:
        ds = await cluster.decisions()
        return all(
            d and d["services"]["order"]["cn-north"]["weight"] == base["cn-north"]["weight"]
            for d in ds.values()
        )

    await cluster.wait_for(restored, 20, "cn-north/order weight restored after the ramp")


BAD_WRITES: list[tuple[str, Any, dict[str, str], int]] = [
    ("no token", {"kind": "drain", "region": "cn-east", "reason": "x"}, {}, 401),
    (
        "bad token",
        {"kind": "drain", "region": "cn-east", "reason": "x"},
        {"Authorization": "Bearer nope"},
        401,
    ),
    ("no reason", {"kind": "drain", "region": "cn-east"}, {}, 400),
    ("unknown kind", {"kind": "explode", "reason": "x"}, {}, 400),
    ("unknown key", {"kind": "freeze", "reason": "x", "colour": "red"}, {}, 400),
    ("unknown region", {"kind": "drain", "region": "mars", "reason": "x"}, {}, 404),
    ("unknown service", {"kind": "drain", "region": "cn-east", "service": "nope", "reason": "x"}, {}, 404),
    ("unknown feature", {"kind": "feature", "name": "nope", "enabled": False, "reason": "x"}, {}, 404),
    (
        "override not 100",
        {"kind": "override", "service": "order", "weights": {"cn-east": 50}, "reason": "x"},
        {},
        400,
    ),
    ("failover to itself", {"kind": "failover", "from": "cn-east", "to": "cn-east", "reason": "x"}, {}, 400),
    ("nothing to undrain", {"kind": "undrain", "region": "cn-east", "reason": "x"}, {}, 400),
    ("not an object", [1, 2, 3], {}, 400),
    ("not json", b"{nope", {}, 400),
]


@pytest.mark.parametrize(("case", "body", "headers", "status"), BAD_WRITES, ids=[c[0] for c in BAD_WRITES])
async def test_bad_writes_are_refused_and_change_nothing(
    cluster: InProcessCluster, agents: list[str], case: str, body: Any, headers: dict[str, str], status: int
) -> None:
    before = await revision(cluster, agents[0])
    intents_before = (await cluster.get(agents[0], "/v1/intents"))[2]
    auth = headers or {"Authorization": f"Bearer {cluster.admin_token}"}
    if case == "no token":
        auth = {}
    kwargs: dict[str, Any] = (
        {"data": body, "headers": {**auth, "Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body, "headers": auth}
    )
    async with cluster.session.post(cluster.agents[agents[1]].url + "/v1/intents", **kwargs) as r:
        answer = await r.json(content_type=None)
        assert r.status == status, answer
    assert set(answer) >= {"error", "detail"}, answer
    await asyncio.sleep(0.3)
    assert await revision(cluster, agents[0]) == before
    assert (await cluster.get(agents[0], "/v1/intents"))[2] == intents_before


async def test_draining_the_last_serving_region_is_refused(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    ids = []
    for region in ("cn-east", "cn-south"):
        status, body = await cluster.post(
            agents[0], "/v1/intents", {"kind": "drain", "region": region, "reason": "t"}
        )
        assert status == 201, body
        ids.append(body["id"])
    before = await revision(cluster, agents[0])
    status, body = await cluster.post(
        agents[0], "/v1/intents", {"kind": "drain", "region": "cn-north", "reason": "t"}
    )
    assert status == 409, body
    assert "min_healthy_regions" in body["error"] + body["detail"]
    assert await revision(cluster, agents[0]) == before
    for intent_id in ids:
        async with cluster.session.delete(
            f"{cluster.agents[agents[1]].url}/v1/intents/{intent_id}?reason=cleanup",
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
        ) as r:
            assert r.status == 200, await r.text()
    status, _, listing = await cluster.get(agents[0], "/v1/intents")
    assert all(i["id"] not in ids for i in listing["intents"])


async def test_too_large_body_is_refused(cluster: InProcessCluster, agents: list[str]) -> None:
    before = await revision(cluster, agents[0])
    huge = {"kind": "freeze", "reason": "x" * 200_000}
    async with cluster.session.post(
        cluster.agents[agents[0]].url + "/v1/intents",
        json=huge,
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
    ) as r:
        assert r.status == 413
    assert await revision(cluster, agents[0]) == before


async def test_plan_commits_nothing(cluster: InProcessCluster, agents: list[str]) -> None:
    before = await revision(cluster, agents[0])
    status, body = await cluster.post(agents[0], "/v1/plan", {"fail": ["cn-east"]}, token=None)
    assert status == 200, body
    assert body["committed"] is False
    assert body["services"]["order"]["cn-east"]["weight"] == 0
    assert any(re.fullmatch(r"cn-east/order: \d+ healthy -> 0 down", c) for c in body["changes"]), body[
        "changes"
    ]
    await asyncio.sleep(0.3)
    assert await revision(cluster, agents[0]) == before
    status, body = await cluster.post(agents[0], "/v1/plan", {"fail": ["atlantis"]}, token=None)
    assert status == 400


async def test_weights_json_and_unknown_service(cluster: InProcessCluster, agents: list[str]) -> None:
    status, headers, body = await cluster.get(agents[0], "/v1/weights/order")
    assert status == 200
    assert sum(body["weights"].values()) == 100
    assert body["revision"] == int(headers["X-Controlplane-Revision"])
    status, _, body = await cluster.get(agents[0], "/v1/weights/nope")
    assert status == 404 and "unknown service" in body["error"]
    status, _, body = await cluster.get(agents[0], "/v1/weights/order?format=xml")
    assert status == 400


async def test_history_is_newest_first_and_pages(cluster: InProcessCluster, agents: list[str]) -> None:
    status, _, page = await cluster.get(agents[0], "/v1/history?limit=2")
    assert status == 200 and len(page["entries"]) == 2
    ats = [e["at"] for e in page["entries"]]
    assert ats == sorted(ats, reverse=True)
    status, _, older = await cluster.get(agents[0], f"/v1/history?limit=2&before={page['next_before']}")
    assert status == 200
    assert all(e["at"] < page["entries"][-1]["at"] for e in older["entries"])
    status, _, _ = await cluster.get(agents[0], "/v1/history?limit=0")
    assert status == 400


async def test_regions_and_cluster_describe_the_deployment(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    status, _, body = await cluster.get(agents[0], "/v1/regions")
    assert status == 200
    assert [r["name"] for r in body["regions"]] == ["cn-east", "cn-south", "cn-north"]
    assert body["regions"][0]["agents"] == ["agent-east-1"]
    status, _, c = await cluster.get(agents[0], "/v1/cluster")
    assert status == 200 and c["has_quorum"] and c["leader"] in agents
    assert {m["id"] for m in c["members"]} == set(agents)


async def test_a_retried_intent_with_the_same_id_commits_once(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    body = {"kind": "feature", "name": "likes", "enabled": False, "reason": "retry", "id": "retry-test-0001"}
    status, first = await cluster.post(agents[0], "/v1/intents", body)
    assert status == 201, first
    status, again = await cluster.post(agents[1], "/v1/intents", body)
    assert status in (201, 202), again
    assert again["id"] == first["id"] and again["seq"] == first["seq"]
    undo = {
        "kind": "feature",
        "name": "likes",
        "enabled": True,
        "reason": "retry undo",
        "id": "retry-test-0002",
    }
    assert (await cluster.post(agents[0], "/v1/intents", undo))[0] == 201
    assert (await cluster.post(agents[0], "/v1/intents", undo))[0] in (201, 202)


async def test_delete_answers_with_the_revision_without_the_intent(
    cluster: InProcessCluster, agents: list[str]
) -> None:
    status, body = await cluster.post(agents[0], "/v1/intents", {"kind": "freeze", "reason": "delete test"})
    assert status == 201, body
    async with cluster.session.delete(
        f"{cluster.agents[agents[2]].url}/v1/intents/{body['id']}?reason=done",
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
    ) as r:
        removed = await r.json()
        assert r.status == 200, removed
    assert removed["removed"]["id"] == body["id"]
    assert removed["revision"] > body["revision"]
    d = await cluster.decision(agents[2])
    assert d is not None and d["frozen"] is False

    # The answer was lost and the operator retries, on another agent: same answer.
    async with cluster.session.delete(
        f"{cluster.agents[agents[0]].url}/v1/intents/{body['id']}?reason=done",
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
    ) as r:
        again = await r.json()
        assert r.status == 200, again
    assert again["removed"] == removed["removed"]
    assert again["revision"] >= removed["revision"]


async def test_plan_reports_what_would_be_refused(cluster: InProcessCluster, agents: list[str]) -> None:
    intents = [{"kind": "drain", "region": r, "reason": "plan"} for r in ("cn-east", "cn-south", "cn-north")]
    status, body = await cluster.post(agents[0], "/v1/plan", {"intents": intents}, token=None)
    assert status == 200, body
    assert any("min_healthy_regions" in r for r in body["refusals"]), body["refusals"]


async def test_plan_of_removing_a_standing_intent(cluster: InProcessCluster, agents: list[str]) -> None:
    _, _, before = await cluster.get(agents[0], "/v1/intents")
    status, drained = await cluster.post(
        agents[0], "/v1/intents", {"kind": "drain", "region": "cn-east", "reason": "plan remove test"}
    )
    assert status == 201, drained
    try:
        d = await cluster.decision(agents[0])
        assert d is not None and d["services"]["order"]["cn-east"]["state"] == "drained"
        status, body = await cluster.post(agents[0], "/v1/plan", {"remove": [drained["id"]]}, token=None)
        assert status == 200, body
        assert body["committed"] is False
        # Without the drain cn-east is no longer drained (it waits out its recovery hold).
        assert body["services"]["order"]["cn-east"]["state"] != "drained"
        assert any(c.startswith("cn-east/order: 0 drained -> ") for c in body["changes"]), body["changes"]
        _, _, standing = await cluster.get(agents[0], "/v1/intents")
        # Planning committed nothing: the drain (and whatever stood before) still stands.
        ids = {i["id"] for i in standing["intents"]}
        assert drained["id"] in ids and ids <= {i["id"] for i in before["intents"]} | {drained["id"]}, ids
        status, body = await cluster.post(agents[0], "/v1/plan", {"remove": ["no-such-intent"]}, token=None)
        assert status == 404 and "no-such-intent" in body["detail"], body
    finally:
        async with cluster.session.delete(
            f"{cluster.agents[agents[0]].url}/v1/intents/{drained['id']}?reason=done",
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
        ) as r:
            assert r.status == 200
