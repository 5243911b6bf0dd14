"""The Prometheus probe, fed recorded Prometheus answers by a tiny fake server on loopback.

The fake is this test's world: it answers `/api/v1/query` with what a real Prometheus
2.42 answered for the same kind of query (shapes recorded from one), and can refuse,
hang or fail. The probe is real: real HTTP, real timeouts, real failover.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import web

from controlplane.decide import decide
from controlplane.model import Observation, Policy, RegionSpec, Verdict
from controlplane.probes import Prober, ProbeResult, ProbeTarget, TargetHealth, summarize
from controlplane.probes.prometheus import (
    EMPTY,
    MAX_ANSWER_BYTES,
    UNREACHABLE,
    PrometheusCheck,
    parse_answer,
)
from controlplane.probes.target import PrometheusProbe
from controlplane.promql import parse_condition

DOWN_Q = 'up{job="order",region="cn-east"}'
SLOW_Q = (
    'histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{region="cn-east"}[5s])))'
)
UTIL_Q = 'max(process_resident_memory_bytes{region="cn-east"} / process_memory_limit_bytes{region="cn-east"})'


def vector(*values: str) -> bytes:
    """A `/api/v1/query` answer as Prometheus 2.42 writes it for an instant vector."""
    result = [
        {
            "metric": {"__name__": "up", "instance": f"127.0.0.1:91{i:02d}", "job": "order"},
            "value": [1.7e9, v],
        }
        for i, v in enumerate(values)
    ]
    return orjson.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def scalar(value: str) -> bytes:
    return orjson.dumps({"status": "success", "data": {"resultType": "scalar", "result": [1.7e9, value]}})


def error(kind: str, text: str) -> bytes:
    return orjson.dumps({"status": "error", "errorType": kind, "error": text})


@dataclass
class FakePrometheus:
    """Answers per query text; `delay_s` holds every answer (a stuck server)."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    delay_s: float = 0.0
    hits: list[str] = field(default_factory=list)
    timeouts_asked: list[str] = field(default_factory=list)
    url: str = ""

    def answer(self, query: str, body: bytes, status: int = 200) -> None:
        self.answers[query] = (status, body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        query = str(form.get("query", ""))
        self.hits.append(query)
        timeout = str(form.get("timeout", ""))
        self.timeouts_asked.append(timeout)
        if timeout and not re.fullmatch(r"([0-9]+(ms|s|m|h))+", timeout):
            # What Prometheus 2.42 answers to a duration such as "0.400s".
            detail = f'invalid parameter "timeout": cannot parse "{timeout}" to a valid duration'
            return web.Response(status=400, body=error("bad_data", detail), content_type="application/json")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, body = self.answers.get(query, (200, vector()))
        return web.Response(status=status, body=body, content_type="application/json")


async def _serve(fake: FakePrometheus) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/api/v1/query", fake.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner


@pytest.fixture
async def prom() -> AsyncIterator[FakePrometheus]:
    fake = FakePrometheus()
    runner = await _serve(fake)
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def prom2() -> AsyncIterator[FakePrometheus]:
    fake = FakePrometheus()
    runner = await _serve(fake)
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def refused_url() -> str:
    """A loopback URL where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def target(
    *servers: str,
    when: str = "== 0",
    for_s: float = 0.0,
    slow: str | None = None,
    util: str | None = None,
    timeout_s: float = 0.5,
    rise: int = 1,
    fall: int = 1,
) -> ProbeTarget:
    return ProbeTarget(
        region="cn-east",
        service="order",
        kind="prometheus",
        timeout_s=timeout_s,
        rise=rise,
        fall=fall,
        prometheus=PrometheusProbe(
            servers=servers,
            down_query=DOWN_Q,
            down_when=parse_condition(when),
            down_for_s=for_s,
            slow_query=slow,
            utilization_query=util,
        ),
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- reading answers --------------------------------------------------------------------


def test_answers_give_their_sample_values() -> None:
    assert parse_answer(vector("1", "0")).values == (1.0, 0.0)
    assert parse_answer(scalar("0.25")).values == (0.25,)
    assert parse_answer(vector()).values == ()
    # NaN samples (0/0 with no traffic) are dropped, infinities kept.
    assert parse_answer(vector("NaN", "+Inf")).values == (float("inf"),)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (error("bad_data", 'invalid parameter "query": 1:5: parse error'), "_Rejected"),
        (error("execution", "many-to-many matching not allowed"), "_Rejected"),
        (error("timeout", "query timed out in expression evaluation"), "_Unreachable"),
        (orjson.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}), "_Rejected"),
        (b"<html>bad gateway</html>", "_Unreachable"),
        (
            orjson.dumps({"status": "success", "data": {"resultType": "vector", "result": [{}]}}),
            "_Unreachable",
        ),
    ],
)
def test_answers_that_are_not_values_are_told_apart(body: bytes, kind: str) -> None:
    with pytest.raises(Exception) as info:
        parse_answer(body)
    assert type(info.value).__name__ == kind


# -- one probe --------------------------------------------------------------------------


async def test_a_healthy_region_is_up_with_latency_and_utilization_from_metrics(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector("1", "1"))
    prom.answer(SLOW_Q, vector("0.250"))
    prom.answer(UTIL_Q, vector("0.5", "0.93"))
    result = await PrometheusCheck(target(prom.url, slow=SLOW_Q, util=UTIL_Q)).check(session)
    assert result.ok and not result.inconclusive
    assert result.latency_ms == pytest.approx(250.0)  # seconds from Prometheus, ms for the policy
    assert result.utilization == pytest.approx(0.93)  # the worst series
    assert sorted(prom.hits) == sorted([DOWN_Q, SLOW_Q, UTIL_Q])
    # Prometheus is told the time limit too, so it stops working when we stop waiting.
    assert all(t.endswith("ms") and 0 < int(t[:-2]) <= 500 for t in prom.timeouts_asked), prom.timeouts_asked


async def test_without_a_slow_query_there_is_no_latency(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector("1"))
    result = await PrometheusCheck(target(prom.url)).check(session)
    assert result.ok
    assert result.latency_ms is None, "the query's own duration is not the service's latency"
    assert result.utilization is None


async def test_utilization_is_clamped_to_the_model_scale(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector("1"))
    prom.answer(UTIL_Q, scalar("1.7"))
    assert (await PrometheusCheck(target(prom.url, util=UTIL_Q)).check(session)).utilization == 1.0


async def test_down_when_any_series_meets_the_condition(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector("1", "0"))
    result = await PrometheusCheck(target(prom.url)).check(session)
    assert not result.ok and not result.inconclusive
    assert result.error == 'prometheus: up{job="order",region="cn-east"} == 0'


async def test_the_condition_must_hold_for_for_s_like_an_alert_rule(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    check = PrometheusCheck(target(prom.url, for_s=15.0), clock=clock)
    prom.answer(DOWN_Q, vector("0"))
    seen = []
    for _ in range(4):  # at 0, 5, 10 s: pending; at 15 s: down
        seen.append((await check.check(session)).ok)
        clock.now += 5.0
    assert seen == [True, True, True, False]
    assert (await check.check(session)).error == 'prometheus: up{job="order",region="cn-east"} == 0 for 15 s'
    prom.answer(DOWN_Q, vector("1"))  # one good answer resets the pending rule
    assert (await check.check(session)).ok
    prom.answer(DOWN_Q, vector("0"))
    assert (await check.check(session)).ok, "held again only from now"


async def test_an_unreachable_prometheus_keeps_a_pending_rule_pending(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    check = PrometheusCheck(target(prom.url, for_s=10.0), clock=clock)
    prom.answer(DOWN_Q, vector("0"))
    assert (await check.check(session)).ok
    prom.answer(DOWN_Q, b"{}", status=503)
    clock.now += 6.0
    assert (await check.check(session)).inconclusive
    prom.answer(DOWN_Q, vector("0"))
    clock.now += 6.0
    assert not (await check.check(session)).ok, "held 12 s across the gap"


async def test_an_empty_answer_is_inconclusive_never_down(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector())
    result = await PrometheusCheck(target(prom.url)).check(session)
    assert result.inconclusive and not result.ok
    assert result.error == EMPTY == "prometheus: empty answer: inconclusive"


async def test_an_unreachable_prometheus_is_inconclusive(session: aiohttp.ClientSession) -> None:
    result = await PrometheusCheck(target(refused_url(), refused_url())).check(session)
    assert result.inconclusive
    assert result.error == UNREACHABLE == "prometheus unreachable: inconclusive"


async def test_a_rejected_query_is_inconclusive_and_says_why(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, error("bad_data", "1:5: parse error: unexpected"), status=400)
    result = await PrometheusCheck(target(prom.url)).check(session)
    assert result.inconclusive
    assert result.error is not None
    assert result.error.startswith("prometheus rejected the query (bad_data: 1:5: parse error")
    assert result.error.endswith(": inconclusive")


async def test_an_answer_past_the_size_cap_is_inconclusive(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector(*(["1"] * (MAX_ANSWER_BYTES // 50))))
    assert len(prom.answers[DOWN_Q][1]) > MAX_ANSWER_BYTES
    result = await PrometheusCheck(target(prom.url)).check(session)
    assert result.inconclusive


async def test_a_failing_secondary_query_only_leaves_its_value_out(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector("1"))
    prom.answer(SLOW_Q, error("bad_data", "nope"), status=400)
    prom.answer(UTIL_Q, vector())
    result = await PrometheusCheck(target(prom.url, slow=SLOW_Q, util=UTIL_Q)).check(session)
    assert result.ok
    assert result.latency_ms is None and result.utilization is None


async def test_fails_over_to_the_next_server_and_stays_there(
    prom: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.answer(DOWN_Q, vector("1"))
    dead = refused_url()
    check = PrometheusCheck(target(dead, prom.url))
    assert (await check.check(session)).ok
    assert check.server == prom.url
    assert (await check.check(session)).ok
    assert len(prom.hits) == 2


async def test_a_stuck_server_costs_its_share_of_the_timeout_then_the_next_answers(
    prom: FakePrometheus, prom2: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.delay_s = 5.0
    prom2.answer(DOWN_Q, vector("1"))
    check = PrometheusCheck(target(prom.url, prom2.url, timeout_s=0.6))
    started = time.monotonic()
    result = await check.check(session)
    elapsed = time.monotonic() - started
    assert result.ok
    assert check.server == prom2.url
    assert elapsed < 0.6 + 0.3, f"bounded by the probe's timeout (took {elapsed:.2f} s)"


async def test_every_server_stuck_is_inconclusive_within_the_timeout(
    prom: FakePrometheus, prom2: FakePrometheus, session: aiohttp.ClientSession
) -> None:
    prom.delay_s = prom2.delay_s = 5.0
    started = time.monotonic()
    result = await PrometheusCheck(target(prom.url, prom2.url, timeout_s=0.4)).check(session)
    elapsed = time.monotonic() - started
    assert result.inconclusive and result.error == UNREACHABLE
    assert elapsed < 0.4 + 0.3, f"bounded by the probe's timeout (took {elapsed:.2f} s)"


# -- rise/fall and what reaches the store -------------------------------------------------

INCONCLUSIVE = ProbeResult(False, 0.01, UNREACHABLE, inconclusive=True)
OK = ProbeResult(True, 0.01)
FAILED = ProbeResult(False, 0.01, "prometheus: up == 0")


def test_inconclusive_probes_count_neither_way() -> None:
    health = TargetHealth(rise=2, fall=2)
    for result in (OK, OK, FAILED, INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE):
        health.record(result, at=1.0)
    assert health.up is True, "one failure, then nothing conclusive: still up"
    assert health.failures == 1, "the streak is kept, not reset"
    assert health.inconclusive
    health.record(FAILED, at=2.0)
    assert health.up is False, "the streak resumed where it was"
    assert not health.inconclusive


def test_a_target_is_inconclusive_only_after_fall_inconclusive_probes() -> None:
    health = TargetHealth(rise=1, fall=3)
    health.record(OK, at=1.0)
    health.record(INCONCLUSIVE, at=2.0)
    health.record(INCONCLUSIVE, at=3.0)
    assert not health.inconclusive
    health.record(INCONCLUSIVE, at=4.0)
    assert health.inconclusive


def test_an_inconclusive_target_reports_its_last_state_marked_as_no_evidence() -> None:
    down = TargetHealth(rise=1, fall=1)
    down.record(FAILED, at=1.0)
    down.record(INCONCLUSIVE, at=2.0)
    o = summarize("a", "cn-east", "order", [down])
    assert o is not None
    assert (o.up, o.error, o.inconclusive, o.at) == (False, "prometheus: up == 0", UNREACHABLE, 2.0)

    never = TargetHealth(rise=1, fall=1)
    never.record(INCONCLUSIVE, at=3.0)
    o = summarize("a", "cn-east", "order", [never])
    assert o is not None and o.up is True and o.inconclusive == UNREACHABLE


def test_a_conclusive_target_decides_for_the_pair_over_an_inconclusive_one() -> None:
    metrics, http = TargetHealth(rise=1, fall=1), TargetHealth(rise=1, fall=1)
    metrics.record(OK, at=1.0)
    metrics.record(INCONCLUSIVE, at=2.0)
    http.record(ProbeResult(False, 0.01, "connect refused"), at=2.0)
    o = summarize("a", "cn-east", "order", [metrics, http])
    assert o is not None
    assert (o.up, o.error, o.inconclusive) == (False, "connect refused", None)


async def test_the_prober_delivers_the_change_to_inconclusive_and_back(
    prom: FakePrometheus,
) -> None:
    delivered: list[Observation] = []

    async def on_change(observations: list[Observation]) -> None:
        delivered.extend(observations)

    t = target(prom.url, rise=1, fall=2)
    results: list[ProbeResult] = []
    prober = Prober("agent-east-1", [t], on_change=on_change, on_result=lambda _, r: results.append(r))
    try:
        prom.answer(DOWN_Q, vector("1"))
        await prober.probe_once(t)
        await prober.flush()
        prom.answer(DOWN_Q, b"{}", status=503)
        for _ in range(2):
            await prober.probe_once(t)
            await prober.flush()
        prom.answer(DOWN_Q, vector("1"))
        await prober.probe_once(t)
        await prober.flush()
    finally:
        await prober.stop()
    assert [(o.up, o.inconclusive) for o in delivered] == [(True, None), (True, UNREACHABLE), (True, None)]
    assert [r.inconclusive for r in results] == [False, True, True, False]


# -- what decide() makes of it ------------------------------------------------------------

POLICY = Policy(
    regions=(
        RegionSpec("cn-east", {"order": 100.0}, {"order": 50.0}),
        RegionSpec("cn-south", {"order": 100.0}, {"order": 50.0}),
    ),
    services=("order",),
    observers={"a1": "cn-east", "a2": "cn-south", "a3": "cn-south"},
)


def observe(observer: str, region: str, up: bool, inconclusive: str | None = None) -> Observation:
    return Observation(observer, region, "order", up, at=1000.0, inconclusive=inconclusive)


def healthy_south() -> list[Observation]:
    return [observe(a, "cn-south", True) for a in ("a1", "a2", "a3")]


def test_every_observer_inconclusive_moves_no_traffic_and_says_why() -> None:
    first = decide(
        POLICY,
        [*healthy_south(), *(observe(a, "cn-east", True) for a in ("a1", "a2", "a3"))],
        {},
        None,
        1000.0,
    )
    unsure = [observe(a, "cn-east", True, UNREACHABLE) for a in ("a1", "a2", "a3")]
    later = decide(POLICY, [*healthy_south(), *unsure], {}, first, 1005.0)
    assert later.services["order"] == first.services["order"]
    assert (
        "cn-east/order: 3 of 3 observers' probes are inconclusive (prometheus unreachable: inconclusive), "
        "0 up and 0 down, quorum 2 of 3 configured: keeping it up"
    ) in later.reasons


def test_inconclusive_observations_are_never_down_witnesses() -> None:
    first = decide(
        POLICY,
        [*healthy_south(), *(observe(a, "cn-east", True) for a in ("a1", "a2", "a3"))],
        {},
        None,
        1000.0,
    )
    # One observer sees it down; the two others' last state was down too, but they can no
    # longer tell: only one witness, below the quorum of 2.
    views = [
        observe("a1", "cn-east", False),
        observe("a2", "cn-east", False, UNREACHABLE),
        observe("a3", "cn-east", False, UNREACHABLE),
    ]
    later = decide(POLICY, [*healthy_south(), *views], {}, first, 1005.0)
    assert later.services["order"]["cn-east"].verdict == Verdict.UP
    assert later.services["order"]["cn-east"].weight == 50
    # Two conclusive witnesses are a quorum, whatever the third says.
    views[1] = observe("a2", "cn-east", False)
    taken_out = decide(POLICY, [*healthy_south(), *views], {}, later, 1006.0)
    assert taken_out.services["order"]["cn-east"].verdict == Verdict.DOWN


def test_a_down_region_stays_down_while_its_observers_cannot_tell() -> None:
    down = [observe(a, "cn-east", False) for a in ("a1", "a2", "a3")]
    first = decide(POLICY, [*healthy_south(), *down], {}, None, 1000.0)
    assert first.services["order"]["cn-east"].weight == 0
    unsure = [observe(a, "cn-east", False, UNREACHABLE) for a in ("a1", "a2", "a3")]
    later = decide(POLICY, [*healthy_south(), *unsure], {}, first, 1005.0)
    assert later.services["order"]["cn-east"].weight == 0
    assert any("inconclusive" in r and "keeping it down" in r for r in later.reasons)


def test_an_observer_that_cannot_tell_anything_is_not_found_impaired() -> None:
    # a1 is inconclusive about everything, last state down everywhere: that is not an
    # observer that sees every pair down, so it is not impaired (it is just no witness).
    views = [
        observe("a1", "cn-east", False, UNREACHABLE),
        observe("a1", "cn-south", False, UNREACHABLE),
        observe("a2", "cn-east", True),
        observe("a2", "cn-south", True),
        observe("a3", "cn-east", True),
        observe("a3", "cn-south", True),
    ]
    d = decide(POLICY, views, {}, None, 1000.0)
    assert not any("impaired" in r for r in d.reasons)
