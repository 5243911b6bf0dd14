"""A probe whose deadline fired late because the agent lagged is inconclusive, never a DOWN.

The lag is real (the test's own event loop is blocked with `time.sleep`, or its thread
kept busy), not mocked; what is asserted is the verdict of the rules, not a timing.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from controlplane.model import Observation
from controlplane.probes import Prober, ProbeResult, ProbeTarget
from controlplane.probes.isolated import ProberThread
from controlplane.probes.timing import LATE_TOLERANCE_S, LagMonitor, deadline_s, judge_timing


def target(url: str = "http://127.0.0.1:1/healthz", **kw: object) -> ProbeTarget:
    options: dict[str, object] = {"interval_s": 0.05, "timeout_s": 0.1, "rise": 1, "fall": 1}
    options.update(kw)
    return ProbeTarget(region="cn-east", service="order", kind="http", url=url, **options)  # type: ignore[arg-type]


class SlowService:
    """A health endpoint that answers after `delay_s`."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(text="ok")


@pytest.fixture
async def service() -> AsyncIterator[SlowService]:
    svc = SlowService()
    app = web.Application()
    app.router.add_get("/healthz", svc.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    svc.url = f"http://127.0.0.1:{port}/healthz"
    try:
        yield svc
    finally:
        await runner.cleanup()


# -- the rule -------------------------------------------------------------------------------


def test_a_timeout_measured_long_after_its_deadline_is_inconclusive() -> None:
    t = target(timeout_s=0.4)
    late = ProbeResult(False, deadline_s(t) + 0.85, "timeout after 400 ms", timed_out=True)
    judged, lateness = judge_timing(t, late, lag_s=0.0)
    assert judged.inconclusive and not judged.ok
    assert judged.error is not None and "850 ms late" in judged.error
    assert lateness == pytest.approx(0.85)


def test_a_timeout_on_time_is_a_failure() -> None:
    t = target(timeout_s=0.4)
    on_time = ProbeResult(False, deadline_s(t) + LATE_TOLERANCE_S / 2, "timeout after 400 ms", timed_out=True)
    judged, _ = judge_timing(t, on_time, lag_s=0.0)
    assert judged == on_time


def test_a_timeout_while_the_loop_lagged_is_inconclusive_even_if_its_duration_looks_right() -> None:
    t = target(timeout_s=0.4)
    result = ProbeResult(False, 0.41, "timeout after 400 ms", timed_out=True)
    judged, lateness = judge_timing(t, result, lag_s=0.3)
    assert judged.inconclusive and lateness == pytest.approx(0.3)


def test_an_answer_read_late_is_still_an_answer() -> None:
    t = target(timeout_s=0.4)
    refused = ProbeResult(False, 2.0, "connect refused")
    assert judge_timing(t, refused, lag_s=1.5)[0] == refused
    http_503 = ProbeResult(False, 2.0, "HTTP 503", status=503)
    assert judge_timing(t, http_503, lag_s=1.5)[0] == http_503


def test_lag_monitor_counts_an_overdue_wake_up() -> None:
    now = [100.0]
    monitor = LagMonitor(clock=lambda: now[0])
    monitor.record(100.0, 0.002)
    monitor.record(100.5, 0.3)
    assert monitor.lag_since(100.1) == pytest.approx(0.3)
    assert monitor.lag_since(101.0) == 0.0


# -- the prober, on a loop that really lags ----------------------------------------------------


async def test_late_deadline_gives_an_inconclusive_impaired_observation_not_a_down(
    service: SlowService,
) -> None:
    t = target(service.url, timeout_s=0.1, rise=1, fall=1)
    prober = Prober("agent-east-1", [t])
    try:
        await prober.probe_once(t)
        [before] = prober.current()
        assert before.up and before.impaired is None

        # The target is now slower than the timeout, and this agent's loop stalls for
        # 0.6 s right after the probe starts: the deadline fires ~0.5 s late.
        service.delay_s = 1.0
        asyncio.get_running_loop().call_later(0.01, time.sleep, 0.6)
        result = await prober.probe_once(t)
    finally:
        await prober.stop()
    assert result.inconclusive and not result.ok
    assert result.error is not None and "late" in result.error
    # fall is 1: a real failure would have taken it down at once.
    assert prober.target_up(t) is True
    [after] = prober.current()
    assert after.up is True
    assert after.impaired is not None and "ms late" in after.impaired


async def test_impaired_ends_after_the_hold_and_a_timely_probe(service: SlowService) -> None:
    now = [1000.0]
    t = target(service.url, timeout_s=0.1, rise=1, fall=1)
    prober = Prober("agent-east-1", [t], clock=lambda: now[0], impaired_hold_s=5.0)
    seen: list[list[Observation]] = []

    async def record(observations: list[Observation]) -> None:
        seen.append(observations)

    prober._on_change = record
    try:
        await prober.probe_once(t)
        service.delay_s = 1.0
        asyncio.get_running_loop().call_later(0.01, time.sleep, 0.6)
        await prober.probe_once(t)
        await prober.flush()
        assert seen[-1][0].impaired is not None
        service.delay_s = 0.0
        now[0] += 4.0  # still within the hold
        await prober.probe_once(t)
        await prober.flush()
        assert prober.current()[0].impaired is not None
        now[0] += 2.0  # past it
        await prober.probe_once(t)
        await prober.flush()
    finally:
        await prober.stop()
    assert seen[-1][0].impaired is None and seen[-1][0].up is True


# -- isolation: a busy main loop does not reach the prober's thread ----------------------------


class ThreadedHealth:
    """A health endpoint served on a thread of its own, so a busy test loop cannot delay it."""

    def __enter__(self) -> str:
        class Ok(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/healthz"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


async def test_prober_thread_keeps_probing_while_the_main_loop_is_busy() -> None:
    delivered: list[Observation] = []
    results: list[ProbeResult] = []
    first = asyncio.Event()

    async def deliver(observations: list[Observation]) -> None:
        delivered.extend(observations)
        first.set()

    with ThreadedHealth() as url:
        t = target(url, timeout_s=0.2, interval_s=0.05, rise=1, fall=1)
        prober = ProberThread(
            "agent-east-1", [t], deliver=deliver, refresh_s=0.5, on_result=lambda _t, r: results.append(r)
        )
        await prober.start()
        try:
            async with asyncio.timeout(5):
                await first.wait()
            probed_before = len(results)
            # Hog this loop (and hold the GIL as much as Python lets one thread) for 1 s.
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                sum(range(1000))
            probed_during = len(results) - probed_before
            await asyncio.sleep(0.2)  # deliveries queued on this loop now run
        finally:
            await prober.stop()
        assert prober._thread is None
    assert probed_during > 0, "the prober's thread stopped probing while the main loop was busy"
    assert all(r.ok or r.inconclusive for r in results), [r for r in results if not r.ok]
    assert all(o.up for o in delivered)
