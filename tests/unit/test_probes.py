"""Probes against real servers on loopback: HTTP and TCP checks, rise/fall, the prober."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from controlplane.errors import NoQuorum
from controlplane.model import Observation
from controlplane.probes import (
    MAX_BODY_BYTES,
    Prober,
    ProbeResult,
    ProbeTarget,
    TargetHealth,
    check_http,
    check_tcp,
    is_slow,
    summarize,
)
from controlplane.testing.backend import SimBackend

# -- fixtures ---------------------------------------------------------------------------


@dataclass
class FakeService:
    """A health endpoint whose answer the test sets."""

    status: int = 200
    body: bytes = b'{"utilization": 0.25}'
    content_type: str = "application/json"
    delay_s: float = 0.0
    url: str = ""
    in_flight: int = 0
    peak_in_flight: int = 0
    hits: int = 0
    headers_seen: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.headers_seen.append(request.headers.get("Connection", ""))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if 300 <= self.status < 400:
                return web.Response(status=self.status, headers={"Location": "/elsewhere"})
            return web.Response(status=self.status, body=self.body, content_type=self.content_type)
        finally:
            self.in_flight -= 1


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def service() -> AsyncIterator[FakeService]:
    fake = FakeService()
    app = web.Application()
    app.router.add_get("/healthz", fake.handle)
    runner, port = await _serve(app)
    fake.url = f"http://127.0.0.1:{port}/healthz"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stuck_port() -> Iterator[int]:
    """A listener whose accept queue is full, so a new connect hangs (SYNs are dropped)."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler.connect(("127.0.0.1", port))
        yield port
    finally:
        filler.close()
        listener.close()


@pytest.fixture
async def tcp_listener() -> AsyncIterator[int]:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def http_target(url: str, **kw: object) -> ProbeTarget:
    options: dict[str, object] = {"interval_s": 0.05, "timeout_s": 0.5, "rise": 2, "fall": 3}
    options.update(kw)
    return ProbeTarget(region="cn-east", service="order", kind="http", url=url, **options)  # type: ignore[arg-type]


def tcp_target(port: int, **kw: object) -> ProbeTarget:
    options: dict[str, object] = {"interval_s": 0.05, "timeout_s": 0.5, "rise": 2, "fall": 3}
    options.update(kw)
    return ProbeTarget(
        region="cn-east",
        service="gateway",
        kind="tcp",
        host="127.0.0.1",
        port=port,
        **options,  # type: ignore[arg-type]
    )


class Recorder:
    """An on_change callback that keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[Observation]] = []
        self.queue: asyncio.Queue[list[Observation]] = asyncio.Queue()

    async def __call__(self, observations: list[Observation]) -> None:
        self.calls.append(observations)
        self.queue.put_nowait(observations)

    async def next(self, timeout_s: float = 3.0) -> list[Observation]:
        async with asyncio.timeout(timeout_s):
            return await self.queue.get()


# -- target validation ------------------------------------------------------------------


def test_target_validation_names_every_problem() -> None:
    with pytest.raises(ValueError, match="http probe needs url") as info:
        ProbeTarget(region="r", service="s", kind="http", interval_s=0, rise=0)
    assert "interval_s must be > 0" in str(info.value)
    assert "rise must be >= 1" in str(info.value)
    with pytest.raises(ValueError, match="tcp probe needs host and port"):
        ProbeTarget(region="r", service="s", kind="tcp", host="h")
    with pytest.raises(ValueError, match="kind must be http, tcp or prometheus"):
        ProbeTarget(region="r", service="s", kind="udp", host="h", port=1)  # type: ignore[arg-type]


def test_target_defaults_accept_2xx_and_3xx() -> None:
    target = http_target("http://x/")
    assert 200 in target.expect_status and 399 in target.expect_status
    assert 199 not in target.expect_status and 400 not in target.expect_status
    assert target.key == ("cn-east", "order")
    assert tcp_target(80).address == "tcp://127.0.0.1:80"


# -- rise/fall counting (pure) ------------------------------------------------------------

OK = ProbeResult(ok=True, duration_s=0.01)
FAIL = ProbeResult(ok=False, duration_s=0.01, error="HTTP 503")


def feed(health: TargetHealth, results: list[ProbeResult]) -> list[bool | None]:
    states = []
    for i, result in enumerate(results):
        health.record(result, at=float(i))
        states.append(health.up)
    return states


def test_starts_unknown_and_needs_rise_successes_to_be_up() -> None:
    assert feed(TargetHealth(rise=3, fall=2), [OK, OK, OK]) == [None, None, True]


def test_starts_unknown_and_needs_fall_failures_to_be_down() -> None:
    assert feed(TargetHealth(rise=3, fall=2), [FAIL, FAIL]) == [None, False]


def test_needs_exactly_fall_consecutive_failures_to_go_down() -> None:
    health = TargetHealth(rise=2, fall=3)
    states = feed(health, [OK, OK, FAIL, FAIL, OK, FAIL, FAIL, FAIL])
    # The success in the middle resets the failure streak: only the last three count.
    assert states == [None, True, True, True, True, True, True, False]
    assert health.error == "HTTP 503"


def test_needs_exactly_rise_consecutive_successes_to_come_back() -> None:
    health = TargetHealth(rise=2, fall=1)
    assert feed(health, [FAIL, OK, FAIL, OK, OK]) == [False, False, False, False, True]


def test_alternating_results_never_decide_from_unknown() -> None:
    assert feed(TargetHealth(rise=2, fall=2), [OK, FAIL] * 4) == [None] * 8


def fast_or_slow(health: TargetHealth, latencies_ms: list[float], threshold_ms: float = 1000) -> list[bool]:
    """Whether the target is reported slow after each successful probe of that latency."""
    out = []
    for i, ms in enumerate(latencies_ms):
        health.record(ProbeResult(ok=True, duration_s=ms / 1000), at=float(i))
        out.append(health.latency_ms is not None and health.latency_ms > threshold_ms)
    return out


def test_slow_is_reported_only_after_fall_consecutive_slow_results() -> None:
    health = TargetHealth(rise=2, fall=3)
    slow = fast_or_slow(health, [20, 20, 1500, 1500, 20, 1500, 1500, 1500])
    assert slow == [False] * 7 + [True]


def test_fast_again_only_after_rise_consecutive_fast_results() -> None:
    health = TargetHealth(rise=2, fall=3)
    fast_or_slow(health, [20, 20, 1500, 1500, 1500])
    assert fast_or_slow(health, [20, 1500, 20, 20]) == [True, True, True, False]


def test_latency_alternating_around_the_threshold_is_never_reported_slow() -> None:
    assert not any(fast_or_slow(TargetHealth(rise=2, fall=3), [20, 20] + [1010, 990] * 20))


def test_slow_counting_holds_for_every_threshold_at_once() -> None:
    # The prober does not know the threshold (decide() applies slow_ms): the reported
    # latency must cross any threshold exactly when rise/fall counting at it would.
    rng = random.Random(7)
    latencies = [rng.choice([50.0, 400.0, 700.0, 900.0, 1200.0, 3000.0]) for _ in range(400)]
    for threshold in (100.0, 500.0, 800.0, 1000.0, 2000.0):
        rise, fall = 2, 3
        health = TargetHealth(rise=rise, fall=fall)
        reported = fast_or_slow(health, latencies, threshold)
        slow, streak_slow, streak_fast, expected = False, 0, 0, []
        for i, ms in enumerate(latencies):
            if ms > threshold:
                streak_slow, streak_fast = streak_slow + 1, 0
            else:
                streak_slow, streak_fast = 0, streak_fast + 1
            # While fewer results than rise or fall exist, all of them must agree.
            if slow and streak_fast >= min(rise, i + 1):
                slow = False
            elif not slow and streak_slow >= min(fall, i + 1):
                slow = True
            expected.append(slow)
        assert reported == expected, threshold


def test_utilization_has_the_same_rise_and_fall() -> None:
    health = TargetHealth(rise=2, fall=3)
    hot = []
    for i, u in enumerate([0.5, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9, 0.5, 0.5]):
        health.record(ProbeResult(ok=True, duration_s=0.01, utilization=u), at=float(i))
        hot.append(health.utilization is not None and health.utilization > 0.8)
    assert hot == [False, False, False, False, False, False, True, True, False]


def _health(up: bool | None, latency_ms: float | None = None, utilization: float | None = None,
            error: str | None = None, at: float | None = 1.0) -> TargetHealth:  # fmt: skip
    return TargetHealth(
        rise=1, fall=1, up=up, latency_ms=latency_ms, utilization=utilization, error=error, at=at
    )


def test_service_is_up_when_any_target_is_up_and_reports_the_worst_up_target() -> None:
    targets = [
        _health(True, latency_ms=10, utilization=0.2, at=5.0),
        _health(False, error="connect refused", at=7.0),
        _health(True, latency_ms=40, utilization=0.9, at=6.0),
    ]
    obs = summarize("agent-1", "cn-east", "order", targets)
    assert obs == Observation(
        observer="agent-1", region="cn-east", service="order", up=True, at=7.0, latency_ms=40, utilization=0.9
    )


def test_service_is_down_when_no_target_is_up_and_one_is_down() -> None:
    targets = [_health(None), _health(False, error="HTTP 503"), _health(False, error="connect refused")]
    obs = summarize("agent-1", "cn-east", "order", targets)
    assert obs is not None
    assert (obs.up, obs.error, obs.latency_ms) == (False, "HTTP 503", None)


def test_service_is_unknown_while_every_target_is() -> None:
    assert summarize("a", "r", "s", [_health(None), _health(None, at=None)]) is None


def test_slow_means_up_and_over_the_threshold() -> None:
    up = Observation("a", "r", "s", up=True, at=0, latency_ms=120)
    assert is_slow(up, 100)
    assert not is_slow(up, 150)
    assert not is_slow(up, None)
    assert not is_slow(Observation("a", "r", "s", up=False, at=0, latency_ms=500), 100)


# -- HTTP checks --------------------------------------------------------------------------


async def test_http_ok_parses_status_utilization_and_latency(
    service: FakeService, session: aiohttp.ClientSession
) -> None:
    service.body = b'{"region": "cn-east", "utilization": 0.42}'
    result = await check_http(session, http_target(service.url))
    assert result.ok and result.error is None
    assert result.status == 200
    assert result.utilization == pytest.approx(0.42)
    assert 0 < result.duration_s < 0.5
    # Every probe asks for a fresh connection.
    assert service.headers_seen == ["close"]


async def test_http_latency_is_measured(service: FakeService, session: aiohttp.ClientSession) -> None:
    service.delay_s = 0.1
    result = await check_http(session, http_target(service.url))
    assert result.ok
    assert result.latency_ms >= 100


async def test_http_unexpected_status_fails(service: FakeService, session: aiohttp.ClientSession) -> None:
    service.status = 503
    result = await check_http(session, http_target(service.url))
    assert (result.ok, result.error, result.status) == (False, "HTTP 503", 503)

    service.status = 200
    result = await check_http(session, http_target(service.url, expect_status=(204,)))
    assert (result.ok, result.error) == (False, "HTTP 200")


async def test_http_redirect_counts_as_success_and_is_not_followed(
    service: FakeService, session: aiohttp.ClientSession
) -> None:
    service.status = 302
    result = await check_http(session, http_target(service.url))
    assert (result.ok, result.status) == (True, 302)
    assert service.hits == 1


async def test_http_bad_json_fails(service: FakeService, session: aiohttp.ClientSession) -> None:
    service.body = b"{not json"
    result = await check_http(session, http_target(service.url))
    assert (result.ok, result.error, result.status) == (False, "bad JSON", 200)


async def test_http_bad_utilization_fails_and_out_of_range_is_clamped(
    service: FakeService, session: aiohttp.ClientSession
) -> None:
    service.body = b'{"utilization": "high"}'
    assert (await check_http(session, http_target(service.url))).error == "bad utilization"
    service.body = b'{"utilization": true}'
    assert (await check_http(session, http_target(service.url))).error == "bad utilization"
    service.body = b'{"utilization": 1.7}'
    assert (await check_http(session, http_target(service.url))).utilization == 1.0
    service.body = b'{"status": "ok"}'
    result = await check_http(session, http_target(service.url))
    assert result.ok and result.utilization is None


async def test_http_body_is_read_only_when_json_and_only_up_to_the_limit(
    service: FakeService, session: aiohttp.ClientSession
) -> None:
    service.content_type = "text/plain"
    service.body = b"not json at all"
    result = await check_http(session, http_target(service.url))
    assert result.ok and result.utilization is None

    service.content_type = "application/json"
    service.body = b'{"utilization": 0.5, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    result = await check_http(session, http_target(service.url))
    assert (result.ok, result.error) == (False, "body over 64 KiB")


async def test_http_timeout_is_a_failure_within_the_timeout(
    service: FakeService, session: aiohttp.ClientSession
) -> None:
    service.delay_s = 2.0
    result = await check_http(session, http_target(service.url, timeout_s=0.1))
    assert (result.ok, result.error) == (False, "timeout after 100 ms")
    assert 0.1 <= result.duration_s < 1.0


async def test_http_refused(closed_port: int, session: aiohttp.ClientSession) -> None:
    result = await check_http(session, http_target(f"http://127.0.0.1:{closed_port}/healthz"))
    assert (result.ok, result.error, result.status) == (False, "connect refused", None)


async def test_http_connect_timeout(stuck_port: int, session: aiohttp.ClientSession) -> None:
    result = await check_http(session, http_target(f"http://127.0.0.1:{stuck_port}/", timeout_s=0.1))
    assert (result.ok, result.error) == (False, "connect timeout")


# -- TCP checks ---------------------------------------------------------------------------


async def test_tcp_connect_ok(tcp_listener: int) -> None:
    result = await check_tcp(tcp_target(tcp_listener))
    assert result.ok and result.error is None and result.duration_s < 0.5


async def test_tcp_refused(closed_port: int) -> None:
    result = await check_tcp(tcp_target(closed_port))
    assert (result.ok, result.error) == (False, "connect refused")


async def test_tcp_connect_timeout(stuck_port: int) -> None:
    result = await check_tcp(tcp_target(stuck_port, timeout_s=0.1))
    assert (result.ok, result.error) == (False, "connect timeout")
    assert result.duration_s >= 0.1


# -- the prober, driven one probe at a time ------------------------------------------------


async def test_on_change_is_called_exactly_on_transitions(service: FakeService) -> None:
    recorder = Recorder()
    results: list[tuple[str, bool, str | None]] = []
    target = http_target(service.url, rise=2, fall=3)
    prober = Prober(
        "agent-east-1",
        [target],
        on_change=recorder,
        on_result=lambda t, result: results.append((t.address, result.ok, result.error)),
        wall_clock=lambda: 1000.0,
    )
    try:
        delivered = []
        for status in [200, 200, 200, 503, 503, 503, 503, 200, 200, 200]:
            service.status = status
            await prober.probe_once(target)
            await prober.flush()
            delivered.append([(o.up, o.error) for call in recorder.calls for o in call])
            recorder.calls.clear()
    finally:
        await prober.stop()
    assert delivered == [
        [],
        [(True, None)],  # second success: rise reached
        [],
        [],
        [],
        [(False, "HTTP 503")],  # third failure: fall reached
        [],
        [],
        [(True, None)],
        [],
    ]
    assert len(results) == 10
    assert results[3] == (service.url, False, "HTTP 503")


async def test_observations_carry_observer_clock_latency_and_utilization(service: FakeService) -> None:
    target = http_target(service.url, rise=1)
    prober = Prober("agent-east-1", [target], wall_clock=lambda: 1234.5)
    try:
        assert prober.current() == []  # unknown: nothing to say yet
        await prober.probe_once(target)
        [obs] = prober.current()
    finally:
        await prober.stop()
    assert (obs.observer, obs.region, obs.service, obs.up, obs.at) == (
        "agent-east-1",
        "cn-east",
        "order",
        True,
        1234.5,
    )
    assert obs.utilization == pytest.approx(0.25)
    assert obs.latency_ms is not None and obs.latency_ms > 0
    assert prober.target_up(target) is True


async def test_timeouts_count_as_failures(service: FakeService) -> None:
    recorder = Recorder()
    target = http_target(service.url, timeout_s=0.05, rise=1, fall=2)
    prober = Prober("a", [target], on_change=recorder)
    try:
        await prober.probe_once(target)
        service.delay_s = 1.0
        await prober.probe_once(target)
        assert prober.target_up(target) is True  # one timeout is not enough
        await prober.probe_once(target)
        await prober.flush()
    finally:
        await prober.stop()
    assert [(o.up, o.error) for call in recorder.calls for o in call] == [(False, "timeout after 50 ms")]


async def test_slow_and_fast_again_are_changes(service: FakeService) -> None:
    recorder = Recorder()
    target = http_target(service.url, rise=1, fall=1)
    prober = Prober("a", [target], on_change=recorder, slow_ms=80)
    try:
        seen = []
        for delay_s in [0.0, 0.0, 0.12, 0.12, 0.0]:
            service.delay_s = delay_s
            await prober.probe_once(target)
            await prober.flush()
            seen.append([(o.up, is_slow(o, 80)) for call in recorder.calls for o in call])
            recorder.calls.clear()
    finally:
        await prober.stop()
    assert seen == [[(True, False)], [], [(True, True)], [], [(True, False)]]


async def test_a_service_stays_up_while_one_of_its_targets_is_up(
    service: FakeService, closed_port: int
) -> None:
    recorder = Recorder()
    good = http_target(service.url, rise=1, fall=1)
    bad = http_target(f"http://127.0.0.1:{closed_port}/healthz", rise=1, fall=1)
    prober = Prober("a", [good, bad], on_change=recorder)
    try:
        await prober.probe_once(bad)
        await prober.probe_once(good)
        await prober.flush()
        # One observation per (region, service), not per target.
        assert [o.up for call in recorder.calls for o in call] == [True]
        service.status = 500
        await prober.probe_once(good)
        await prober.flush()
        [obs] = prober.current()
    finally:
        await prober.stop()
    assert (obs.up, obs.error) == (False, "HTTP 500")  # first down target in configured order
    assert len(recorder.calls) == 2


async def test_concurrency_is_bounded_by_the_semaphore(service: FakeService) -> None:
    service.delay_s = 0.05
    targets = [http_target(f"{service.url}?n={i}") for i in range(6)]
    prober = Prober("a", targets, max_concurrency=2)
    try:
        await asyncio.gather(*(prober.probe_once(t) for t in targets))
    finally:
        await prober.stop()
    assert service.hits == 6
    assert service.peak_in_flight == 2


async def test_duplicate_targets_are_rejected() -> None:
    target = http_target("http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="duplicate"):
        Prober("a", [target, target])


# -- the prober, running ---------------------------------------------------------------------


async def test_running_prober_reports_tcp_refused_as_down(closed_port: int, tcp_listener: int) -> None:
    recorder = Recorder()
    down = tcp_target(closed_port, rise=1, fall=2)
    up = ProbeTarget(
        region="cn-south", service="gateway", kind="tcp", host="127.0.0.1", port=tcp_listener,
        interval_s=0.05, timeout_s=0.5, rise=1, fall=2,
    )  # fmt: skip
    prober = Prober("a", [down, up], on_change=recorder)
    await prober.start()
    try:
        seen: dict[tuple[str, str], Observation] = {}
        while len(seen) < 2:
            for obs in await recorder.next():
                seen[(obs.region, obs.service)] = obs
    finally:
        await prober.stop()
    assert (seen[("cn-east", "gateway")].up, seen[("cn-east", "gateway")].error) == (False, "connect refused")
    assert seen[("cn-south", "gateway")].up is True


async def test_running_prober_follows_a_target_down_and_up(service: FakeService) -> None:
    recorder = Recorder()
    prober = Prober("a", [http_target(service.url, rise=2, fall=2)], on_change=recorder)
    await prober.start()
    try:
        assert [o.up for o in await recorder.next()] == [True]
        service.status = 503
        assert [o.up for o in await recorder.next()] == [False]
        service.status = 200
        assert [o.up for o in await recorder.next()] == [True]
    finally:
        await prober.stop()


async def test_a_failing_callback_is_retried(service: FakeService) -> None:
    delivered: list[list[Observation]] = []
    attempts = 0
    done = asyncio.Event()

    async def flaky(observations: list[Observation]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("store unavailable")
        delivered.append(observations)
        done.set()

    target = http_target(service.url, rise=1, interval_s=10.0)
    prober = Prober("a", [target], on_change=flaky, retry_s=0.01)
    await prober.start()
    try:
        await prober.probe_once(target)
        async with asyncio.timeout(3):
            await done.wait()
    finally:
        await prober.stop()
    assert attempts == 2
    assert [o.up for call in delivered for o in call] == [True]


async def test_delivery_retries_back_off_and_log_one_warning_per_outage(
    service: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    # An election makes a few deliveries fail in a row: the first retry must come soon
    # (a down observation waits for it), later ones back off, and the log says it once.
    attempts: list[float] = []
    done = asyncio.Event()

    async def electing(observations: list[Observation]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 5:
            raise NoQuorum("no raft leader is known right now")
        done.set()

    target = http_target(service.url, rise=1, interval_s=10.0)
    prober = Prober("a", [target], on_change=electing, retry_s=0.01, max_retry_s=1.0)
    await prober.start()
    try:
        with caplog.at_level(logging.INFO, logger="controlplane.probes.prober"):
            await prober.probe_once(target)
            async with asyncio.timeout(5):
                await done.wait()
    finally:
        await prober.stop()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 6
    # Backed off: waits of 0.01, 0.02, 0.04, 0.08, 0.16 s (a sleep never ends early).
    assert gaps[-1] >= 0.15 and sum(gaps) >= 0.3, gaps
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "no raft leader" in warnings[0].getMessage()
    assert any("delivered after 6 attempts" in r.getMessage() for r in caplog.records)


async def test_a_new_slow_threshold_is_judged_and_delivered_without_a_new_probe(service: FakeService) -> None:
    # A reloaded policy.slow_ms must reach the prober: whether a pair is slow is part of
    # what makes it deliver (the leader judges slowness from latency_ms either way).
    service.delay_s = 0.05
    target = http_target(service.url, rise=1, interval_s=10.0)
    recorder = Recorder()
    prober = Prober("a", [target], on_change=recorder, slow_ms=None)
    await prober.start()
    try:
        await prober.probe_once(target)
        first = await recorder.next()
        assert first[0].up and first[0].latency_ms is not None and first[0].latency_ms >= 50
        hits = service.hits
        prober.set_slow_ms(10.0)  # now 50 ms is slow
        again = await recorder.next()
        assert again[0].latency_ms == first[0].latency_ms  # the same probe, judged again
        assert service.hits == hits
        prober.set_slow_ms(10.0)  # no change: nothing delivered
        with pytest.raises(TimeoutError):
            await recorder.next(timeout_s=0.3)
    finally:
        await prober.stop()


def prober_tasks(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() - before if t.get_name().startswith("probe")}


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


async def test_stop_leaves_no_tasks_and_closes_its_session(service: FakeService) -> None:
    service.delay_s = 0.5  # stop while probes are in flight
    before = asyncio.all_tasks()
    targets = [http_target(f"{service.url}?n={i}", timeout_s=1.0, interval_s=1.5) for i in range(4)]
    prober = Prober("a", targets, on_change=Recorder(), rng=NoJitter())
    await prober.start()
    await asyncio.sleep(0.1)
    assert service.in_flight == 4
    # Four probe loops, the notifier and the lag monitor (the server's own tasks are not the prober's).
    assert len(prober_tasks(before)) == 6
    await prober.stop()
    assert prober_tasks(before) == set()
    assert prober._own_session is None
    # stop() twice is harmless
    await prober.stop()


# -- against the simulated backend the demo uses ------------------------------------------------


async def test_each_sim_failure_mode_reads_as_an_sre_would_name_it(session: aiohttp.ClientSession) -> None:
    async with SimBackend("cn-east", "order", admin_port=None) as backend:
        http = http_target(f"{backend.url}/healthz", timeout_s=0.1)
        tcp = tcp_target(backend.port, timeout_s=0.1)

        await backend.set_state(utilization=0.7)
        result = await check_http(session, http)
        assert (result.ok, result.utilization) == (True, 0.7)

        await backend.set_state(healthy=False)
        assert (await check_http(session, http)).error == "HTTP 503"

        await backend.set_state(healthy=True, mode="blackhole")
        assert (await check_http(session, http)).error == "timeout after 100 ms"
        # A TCP check cannot see a hung application: the kernel still accepts.
        assert (await check_tcp(tcp)).ok

        await backend.set_state(mode="refuse")
        assert (await check_http(session, http)).error == "connect refused"
        assert (await check_tcp(tcp)).error == "connect refused"

        await backend.set_state(mode="normal", latency_ms=60)
        result = await check_http(session, http)
        assert result.ok and result.latency_ms >= 60
