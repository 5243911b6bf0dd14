"""`POST /v1/drills` and `GET /v1/drills`: a drill's result, recorded through consensus.

On one in-process agent with named tokens: who may record (scope operate), who it is
recorded as (the token's name), what a bad body gets (4xx, nothing recorded), retries
(recorded once), the listing (newest first, bounded), and the metrics derived from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from controlplane.access import Scope, Token, Tokens
from controlplane.state import DRILLS_LIMIT
from controlplane.testing.inprocess import InProcessCluster
from tests.api.conftest import api_config, api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

SECRETS = {
    "dashboards": "read-secret-0123456789",
    "alice": "alice-secret-0123456789",
    "root": "admin-secret-0123456789",
}
TOKENS = Tokens(
    named=(
        Token("dashboards", Scope.READ, SECRETS["dashboards"]),
        Token("alice", Scope.OPERATE, SECRETS["alice"]),
        Token("root", Scope.ADMIN, SECRETS["root"]),
    )
)
READ, OPERATE = SECRETS["dashboards"], SECRETS["alice"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[InProcessCluster]:
    config = api_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    async with InProcessCluster(api_settings(config), tokens=TOKENS) as c:
        await c.settled(quiet_s=0.5)
        yield c


def url(c: InProcessCluster, path: str) -> str:
    return next(iter(c.agents.values())).url + path


async def call(
    c: InProcessCluster, method: str, path: str, token: str | None, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, url(c, path), json=None if raw is not None else body, data=raw, headers=headers
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


def result(drill_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": drill_id,
        "region": "cn-east",
        "service": None,
        "started_at": 1_700_000_000.0,
        "ended_at": 1_700_000_120.0,
        "objective_s": 90,
        "rto_s": 41.2,
        "passed": True,
        "stages": {"decision_committed": 2.5, "served": 2.9, "applied": 41.2},
        "late_lbs": [],
        "summary": "cn-east black-holed for 2 minutes",
    }
    body.update(changes)
    return body


def stored(c: InProcessCluster) -> tuple[object, ...]:
    state = next(iter(c.agents.values())).node.state()
    return state.drills, state.history[-1] if state.history else None


async def test_a_read_token_may_list_but_not_record(solo: InProcessCluster) -> None:
    before = stored(solo)
    status, body = await call(solo, "POST", "/v1/drills", READ, result("drill-read-0001"))
    assert status == 403, body
    assert "dashboards" in body["detail"]
    status, body = await call(solo, "POST", "/v1/drills", None, result("drill-anon-0001"))
    assert status == 401, body
    assert stored(solo) == before
    status, body = await call(solo, "GET", "/v1/drills", READ)
    assert status == 200, body


async def test_an_operator_records_once_as_the_token_and_reads_it_back(solo: InProcessCluster) -> None:
    status, first = await call(solo, "POST", "/v1/drills", OPERATE, result("drill-east-0001"))

    assert status == 201, first
    assert first["who"] == "alice"  # the token's name, never the body's
    assert first["recorded_at"] > 0
    assert {k: v for k, v in first.items() if k not in ("who", "recorded_at")} == {
        **result("drill-east-0001"),
        "objective_s": 90.0,
    }
    drills, entry = stored(solo)
    assert entry is not None
    assert entry.summary == "drill of cn-east by alice: RTO 41.2 s, objective 90 s: passed"  # type: ignore[attr-defined]

    # A retry (the answer was lost), even one that says otherwise: the stored one, 200.
    status, again = await call(
        solo, "POST", "/v1/drills", SECRETS["root"], result("drill-east-0001", rto_s=80)
    )
    assert status == 200, again
    assert again == first
    assert stored(solo) == (drills, entry)

    status, history = await call(solo, "GET", "/v1/history?limit=5", READ)
    assert status == 200, history
    assert history["entries"][0]["kind"] == "drill"
    assert history["entries"][0]["intent_id"] == "drill-east-0001"


async def test_what_cpctl_drill_sends_is_recorded(solo: InProcessCluster) -> None:
    """The body `cpctl drill` builds (controlplane/cpctl/drill.py `_record`): stage names of
    its own, load balancers named ADAPTER@HOST, times through estimated clock offsets."""
    body = result(
        "5f3c2a9d1e0b4c7a",  # secrets.token_hex(8), the drill intent's id
        service="order",
        rto_s=None,
        passed=False,
        stages={"committed": -0.003, "served_all": 0.412, "applied_all": None, "back_committed": 1.2},
        late_lbs=["haproxy@lb-east-1.example.com"],
        summary="FAILED: the RTO was not reached (objective 90 s)",
    )
    status, answer = await call(solo, "POST", "/v1/drills", OPERATE, body)
    assert status == 201, answer
    assert answer["stages"]["committed"] == -0.003
    assert answer["late_lbs"] == ["haproxy@lb-east-1.example.com"]


async def test_the_list_is_newest_first_and_limited(solo: InProcessCluster) -> None:
    for i, region in enumerate(("cn-south", "cn-north")):
        body = result(
            f"drill-list-000{i}", region=region, rto_s=None, passed=False, late_lbs=["haproxy-east"]
        )
        status, answer = await call(solo, "POST", "/v1/drills", OPERATE, body)
        assert status == 201, answer

    status, listed = await call(solo, "GET", "/v1/drills", READ)
    assert status == 200, listed
    ids = [d["id"] for d in listed["drills"]]
    assert ids[:2] == ["drill-list-0001", "drill-list-0000"]
    assert (listed["limit"], listed["total"]) == (DRILLS_LIMIT, len(ids))
    status, page = await call(solo, "GET", "/v1/drills?limit=1", READ)
    assert status == 200, page
    assert ([d["id"] for d in page["drills"]], page["limit"]) == (["drill-list-0001"], 1)
    for bad in ("0", "-1", str(DRILLS_LIMIT + 1), "ten"):
        status, body = await call(solo, "GET", f"/v1/drills?limit={bad}", READ)
        assert status == 400, (bad, body)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (result("drill-bad-0001", who="mallory"), 400, "who"),
        (result("drill-bad-0002", recorded_at=1.0), 400, "recorded_at"),
        (result("short"), 400, "id"),
        ({k: v for k, v in result("drill-bad-0003").items() if k != "passed"}, 400, "passed"),
        (result("drill-bad-0004", rto_s=120.0), 400, "objective"),
        (result("drill-bad-0005", rto_s=None), 400, "objective"),
        (result("drill-bad-0006", ended_at=1_699_999_999.0), 400, "ended_at"),
        (result("drill-bad-0007", objective_s=0), 400, "objective_s"),
        (result("drill-bad-0008", rto_s=-1e9, passed=False), 400, "rto_s"),
        (result("drill-bad-0009", stages={f"s{i}": 1.0 for i in range(33)}), 400, "stages"),
        (result("drill-bad-0010", stages={"x" * 65: 1.0}), 400, "stages"),
        (result("drill-bad-0011", late_lbs=[f"lb{i}" for i in range(65)]), 400, "late_lbs"),
        (result("drill-bad-0018", late_lbs=["lb with spaces"]), 400, "late_lbs"),
        (result("drill-bad-0012", summary="x" * 501), 400, "summary"),
        (result("drill-bad-0013", summary="bad\x1b[31m"), 400, "control"),
        (result("drill-bad-0014", passed="yes"), 400, "passed"),
        (result("drill-bad-0015", region="mars"), 404, "mars"),
        (result("drill-bad-0016", service="billing"), 404, "billing"),
        ([result("drill-bad-0017")], 400, "object"),
    ],
)
async def test_a_bad_body_gets_a_4xx_and_records_nothing(
    solo: InProcessCluster, body: Any, status: int, says: str
) -> None:
    before = stored(solo)
    got, answer = await call(solo, "POST", "/v1/drills", OPERATE, body)
    assert got == status, answer
    assert set(answer) >= {"error", "detail"}
    assert says in answer["detail"], answer
    assert stored(solo) == before


async def test_a_body_that_is_not_json_gets_400(solo: InProcessCluster) -> None:
    before = stored(solo)
    status, answer = await call(solo, "POST", "/v1/drills", OPERATE, raw=b"{not json")
    assert status == 400, answer
    assert answer["error"] == "body is not JSON"
    assert stored(solo) == before


async def test_metrics_show_the_last_drill_and_the_last_passing_one(solo: InProcessCluster) -> None:
    passing = result("drill-metric-0001", ended_at=1_800_000_000.0, rto_s=30.5)
    failing = result(
        "drill-metric-0002", started_at=1_800_000_100.0, ended_at=1_800_000_300.0, rto_s=None, passed=False
    )
    for body in (passing, failing):
        status, answer = await call(solo, "POST", "/v1/drills", OPERATE, body)
        assert status == 201, answer

    async with aiohttp.ClientSession() as s, s.get(url(solo, "/metrics")) as r:
        text = await r.text()
    samples = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("controlplane_drill_"))
    assert float(samples["controlplane_drill_last_timestamp_seconds"]) == 1_800_000_300.0
    assert float(samples["controlplane_drill_last_passed_timestamp_seconds"]) == 1_800_000_000.0
    # The last drill measured to the end (the failing one was not).
    assert float(samples["controlplane_drill_last_rto_seconds"]) == 30.5
