"""Load balancer reports on one in-process agent: who may report, what is refused, what is shown.

`POST /v1/lbs/{name}` takes an adapter's report (scope `lb`); `GET /v1/lbs` lists the
reports with each LB's state against the served decision; `/metrics` shows them per LB
and forgets an LB once its report expired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from controlplane.access import Scope, Token, Tokens
from controlplane.testing.inprocess import InProcessCluster
from tests.api.conftest import api_config, api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

SECRETS = {
    "dashboards": "read-secret-0123456789",
    "haproxy-east": "lb-secret-0123456789",
    "alice": "alice-secret-0123456789",
}
TOKENS = Tokens(
    named=(
        Token("dashboards", Scope.READ, SECRETS["dashboards"]),
        Token("haproxy-east", Scope.LB, SECRETS["haproxy-east"]),
        Token("alice", Scope.OPERATE, SECRETS["alice"]),
    )
)
LB = SECRETS["haproxy-east"]
READ = SECRETS["dashboards"]
MIN_EXPIRY_S = 1.0


def report(**change: Any) -> dict[str, Any]:
    body = {
        "adapter": "haproxy",
        "applied_revision": 3,
        "applied_epoch": None,
        "applied_at": time.time(),
        "desired_revision": 3,
        "ok": True,
        "error": None,
        "heartbeat_s": 5.0,
    }
    body.update(change)
    return body


def solo_config(**api: Any) -> dict[str, Any]:
    config = api_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    config["api"] = {"lb_report_min_expiry_s": MIN_EXPIRY_S, **api}
    return config


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[InProcessCluster]:
    async with InProcessCluster(api_settings(solo_config(max_body_bytes=2048)), tokens=TOKENS) as c:
        await c.settled(quiet_s=0.5)
        yield c


def url(c: InProcessCluster, path: str) -> str:
    return next(iter(c.agents.values())).url + path


async def call(
    c: InProcessCluster, method: str, path: str, token: str | None, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}" if token else ""}
    kwargs: dict[str, Any] = {"json": body} if raw is None else {"data": raw}
    if raw is not None:
        headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url(c, path), headers=headers, **kwargs) as r,
    ):
        return r.status, await r.json(content_type=None)


async def lbs(c: InProcessCluster) -> dict[str, Any]:
    status, body = await call(c, "GET", "/v1/lbs", READ)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def by_name(c: InProcessCluster) -> dict[str, dict[str, Any]]:
    return {lb["name"]: lb for lb in (await lbs(c))["lbs"]}


async def served(c: InProcessCluster) -> tuple[int, str | None]:
    """The served revision and its epoch (None when it has none, as an adapter sends it)."""
    d = await c.decision(next(iter(c.agents)))
    assert d is not None
    return int(d["revision"]), d.get("epoch") or None


async def served_revision(c: InProcessCluster) -> int:
    return (await served(c))[0]


async def test_an_lb_token_reports_and_every_reader_sees_it(solo: InProcessCluster) -> None:
    revision, epoch = await served(solo)
    sent = report(applied_revision=revision, applied_epoch=epoch, desired_revision=revision, adapter="nginx")
    status, entry = await call(solo, "POST", "/v1/lbs/nginx@host-1", LB, sent)
    assert status == 200, entry
    assert entry["name"] == "nginx@host-1"
    for key in ("adapter", "applied_revision", "applied_epoch", "applied_at", "desired_revision", "ok"):
        assert entry[key] == sent[key], key
    assert entry["state"] == "in-sync" and entry["lag_revisions"] == 0, entry

    body = await lbs(solo)
    assert set(body) == {"revision", "lbs", "limit"}
    assert body["limit"] == 1024
    assert body["revision"] == await served_revision(solo)
    (shown,) = [lb for lb in body["lbs"] if lb["name"] == "nginx@host-1"]
    assert set(shown) == {
        "name",
        "adapter",
        "applied_revision",
        "applied_epoch",
        "applied_at",
        "desired_revision",
        "reported_at",
        "age_s",
        "ok",
        "error",
        "heartbeat_s",
        "lag_revisions",
        "state",
    }
    assert shown["reported_at"] == pytest.approx(time.time(), abs=5)
    assert 0 <= shown["age_s"] < 5


async def test_an_operate_token_may_report_too(solo: InProcessCluster) -> None:
    status, entry = await call(solo, "POST", "/v1/lbs/by-operator", SECRETS["alice"], report())
    assert status == 200, entry


async def test_a_read_token_may_not_report_and_nothing_is_stored(solo: InProcessCluster) -> None:
    status, body = await call(solo, "POST", "/v1/lbs/sneaky", READ, report())
    assert status == 403, body
    assert "dashboards" in body["detail"] and "lb" in body["detail"], body
    status, body = await call(solo, "POST", "/v1/lbs/sneaky", None, report())
    assert status == 401, body
    status, body = await call(solo, "POST", "/v1/lbs/sneaky", "not-a-known-token-at-all", report())
    assert status == 401, body
    assert "sneaky" not in await by_name(solo)


async def test_reports_need_a_token_to_read_when_reads_are_closed(solo: InProcessCluster) -> None:
    status, body = await call(solo, "GET", "/v1/lbs", None)
    assert status == 401, body
    status, body = await call(solo, "GET", "/v1/lbs", LB)
    assert status == 200, body


BAD_BODIES: list[tuple[str, Any]] = [
    ("a list", [report()]),
    ("a string", "haproxy"),
    ("missing adapter", {k: v for k, v in report().items() if k != "adapter"}),
    ("missing heartbeat", {k: v for k, v in report().items() if k != "heartbeat_s"}),
    ("an unknown field", report(weight=3)),
    ("a negative revision", report(applied_revision=-1)),
    ("a revision as text", report(applied_revision="3")),
    ("a revision as float", report(applied_revision=3.5)),
    ("a huge revision", report(desired_revision=2**70)),
    ("ok as a number", report(ok=1)),
    ("ok as text", report(ok="true")),
    ("a long error", report(ok=False, error="x" * 501)),
    ("an error with control characters", report(ok=False, error="bad\x1b[2J")),
    ("an empty error", report(ok=False, error="")),
    ("a zero heartbeat", report(heartbeat_s=0)),
    ("a negative heartbeat", report(heartbeat_s=-5)),
    ("a heartbeat of a day", report(heartbeat_s=86400.0)),
    ("applied in the far future", report(applied_at=1e12)),
    ("applied before 1970", report(applied_at=-1.0)),
    ("an adapter with spaces", report(adapter="ha proxy")),
    ("an empty adapter", report(adapter="")),
    ("a long adapter", report(adapter="a" * 33)),
    ("a bad epoch", report(applied_epoch="not an epoch!")),
    ("an empty epoch", report(applied_epoch="")),
]


@pytest.mark.parametrize(("what", "body"), BAD_BODIES, ids=[w for w, _ in BAD_BODIES])
async def test_a_bad_body_is_400_and_changes_nothing(solo: InProcessCluster, what: str, body: Any) -> None:
    status, first = await call(solo, "POST", "/v1/lbs/steady", LB, report(applied_revision=1))
    assert status == 200, first
    status, answer = await call(solo, "POST", "/v1/lbs/steady", LB, body)
    assert status == 400, (what, answer)
    assert answer["error"] == "invalid request" and answer["detail"], answer
    assert (await by_name(solo))["steady"]["applied_revision"] == 1
    status, answer = await call(solo, "POST", "/v1/lbs/fresh-name", LB, body)
    assert status == 400, (what, answer)
    assert "fresh-name" not in await by_name(solo)


@pytest.mark.parametrize(("raw", "error"), [(b"{not json", "body is not JSON"), (b"", "body is not JSON")])
async def test_a_body_that_is_not_json_is_400(solo: InProcessCluster, raw: bytes, error: str) -> None:
    status, answer = await call(solo, "POST", "/v1/lbs/garbled", LB, raw=raw)
    assert status == 400, answer
    assert answer["error"] == error, answer
    assert "garbled" not in await by_name(solo)


@pytest.mark.parametrize("name", ["has%20space", "x" * 65, "semi;colon", "%C3%BC", "a%0Ab"])
async def test_a_bad_name_is_400(solo: InProcessCluster, name: str) -> None:
    before = set(await by_name(solo))
    status, answer = await call(solo, "POST", f"/v1/lbs/{name}", LB, report())
    assert status == 400, answer
    assert answer["error"] == "bad load balancer name", answer
    assert set(await by_name(solo)) == before


async def test_a_body_past_the_size_limit_is_413(solo: InProcessCluster) -> None:
    status, answer = await call(solo, "POST", "/v1/lbs/big", LB, raw=b'{"adapter": "' + b"a" * 4096 + b'"}')
    assert status == 413, answer
    assert "big" not in await by_name(solo)


async def test_a_failing_lb_is_shown_failing_with_its_error(solo: InProcessCluster) -> None:
    error = "HAProxy runtime API unreachable: /run/haproxy.sock: No such file or directory"
    status, entry = await call(solo, "POST", "/v1/lbs/broken", LB, report(ok=False, error=error))
    assert status == 200, entry
    shown = (await by_name(solo))["broken"]
    assert (shown["state"], shown["ok"], shown["error"]) == ("failing", False, error)


async def test_lbs_are_listed_by_name(solo: InProcessCluster) -> None:
    for name in ("zz-last", "aa-first", "mm-middle"):
        status, body = await call(solo, "POST", f"/v1/lbs/{name}", LB, report())
        assert status == 200, body
    names = [lb["name"] for lb in (await lbs(solo))["lbs"]]
    assert names == sorted(names)


def lb_samples(text: str, lb: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("controlplane_lb_") and f'lb="{lb}"' in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            out[name] = float(value)
    return out


async def metrics(c: InProcessCluster) -> str:
    async with aiohttp.ClientSession() as s, s.get(url(c, "/metrics")) as r:
        assert r.status == 200
        return await r.text()


async def test_metrics_show_each_lb_and_forget_it_when_its_report_expires(solo: InProcessCluster) -> None:
    revision, epoch = await served(solo)
    # Heartbeat 0.1 s: silent after 0.3 s, expired after MIN_EXPIRY_S.
    behind = report(applied_revision=revision - 1, applied_epoch=epoch, heartbeat_s=0.1)
    status, body = await call(solo, "POST", "/v1/lbs/short-lived", LB, behind)
    assert status == 200, body
    samples = lb_samples(await metrics(solo), "short-lived")
    current = await served_revision(solo)
    assert samples["controlplane_lb_applied_revision_lag"] == current - (revision - 1)
    assert samples["controlplane_lb_ok"] == 1.0
    assert 0 <= samples["controlplane_lb_report_age_seconds"] < 5
    await asyncio.sleep(0.5)
    assert (await by_name(solo))["short-lived"]["state"] == "silent"  # 3 heartbeats without a report
    await asyncio.sleep(MIN_EXPIRY_S)
    assert lb_samples(await metrics(solo), "short-lived") == {}
    assert "short-lived" not in await by_name(solo)


async def test_a_new_lb_past_1024_is_429_and_known_ones_still_report() -> None:
    async with InProcessCluster(api_settings(solo_config(lb_report_min_expiry_s=600.0)), tokens=TOKENS) as c:
        headers = {"Authorization": f"Bearer {LB}"}
        async with aiohttp.ClientSession(headers=headers) as s:

            async def post(name: str, **change: Any) -> tuple[int, Any]:
                async with s.post(url(c, f"/v1/lbs/{name}"), json=report(**change)) as r:
                    return r.status, await r.json()

            for start in range(0, 1024, 64):
                answers = await asyncio.gather(*(post(f"lb-{i:04d}") for i in range(start, start + 64)))
                assert all(status == 200 for status, _ in answers), answers
            status, body = await post("one-too-many")
            assert status == 429, body
            assert body["error"] == "too many load balancers" and "1024" in body["detail"], body
            status, body = await post("lb-0007", applied_revision=9)
            assert status == 200 and body["applied_revision"] == 9, body
            async with s.get(url(c, "/v1/lbs")) as r:
                listed = await r.json()
        assert len(listed["lbs"]) == 1024
        assert "one-too-many" not in {lb["name"] for lb in listed["lbs"]}
