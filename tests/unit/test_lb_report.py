"""The adapters' reports to the agents: the body, `applied_at`, and a bounded sender.

The `Reporter` runs against fake agents (small aiohttp servers) that can be slow,
refuse, or answer 403; what is checked is what reaches them and what is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from controlplane.lb.report import Reporter, default_name, one_line, report_body, reporter_for
from controlplane.lb.status import StatusFile


def test_the_body_says_what_was_applied_and_what_is_wrong() -> None:
    status = {
        "adapter": "haproxy",
        "ok": False,
        "revision": 9,
        "applied_revision": 8,
        "applied_epoch": "ep1",
        "applied_at": 1000.5,
        "errors": ["be/east: no such server", "be/west: no such server"],
    }
    assert report_body("haproxy", status, 5.0) == {
        "adapter": "haproxy",
        "applied_revision": 8,
        "applied_epoch": "ep1",
        "applied_at": 1000.5,
        "desired_revision": 9,
        "ok": False,
        "error": "be/east: no such server; be/west: no such server",
        "heartbeat_s": 5.0,
    }


def test_before_anything_is_applied_the_body_is_all_null() -> None:
    body = report_body("nginx", {"adapter": "nginx", "ok": None, "applied_revision": 0, "error": None}, 2.0)
    assert body == {
        "adapter": "nginx",
        "applied_revision": None,
        "applied_epoch": None,
        "applied_at": None,
        "desired_revision": None,
        "ok": None,
        "error": None,
        "heartbeat_s": 2.0,
    }


def test_an_error_is_sent_on_one_line_without_control_characters_and_bounded() -> None:
    nginx_t = (
        'config test failed:\nnginx: [emerg] unknown directive \x1b[31m"x"\x1b[0m\tin /etc/nginx.conf:3\n'
    )
    body = report_body("nginx", {"ok": False, "error": nginx_t * 40}, 5.0)
    assert len(body["error"]) <= 500
    assert body["error"].endswith("...")
    assert all(c.isprintable() for c in body["error"])
    assert body["error"].startswith('config test failed: nginx: [emerg] unknown directive [31m"x" [0m in')
    assert one_line("a\r\nb\u202ec") == "a b c"


def test_the_default_name_is_adapter_at_host_and_always_a_valid_name() -> None:
    assert default_name("haproxy", "lb-1.example.com") == "haproxy@lb-1.example.com"
    assert default_name("nginx", "weird host/ü") == "nginx@weird-host--"
    assert len(default_name("nginx", "h" * 100)) == 64
    assert default_name("nginx", "") == "nginx@localhost"


def test_applied_at_is_set_when_the_applied_revision_changes_and_only_then() -> None:
    status = StatusFile(None, "haproxy")
    status.update(revision=3)
    assert "applied_at" not in status.data
    status.update(ok=True, applied_revision=3, applied_epoch="e")
    first = status.data["applied_at"]
    assert first == pytest.approx(time.time(), abs=5)
    status.update(ok=True, applied_revision=3, applied_epoch="e", reconciled_at=time.time())
    assert status.data["applied_at"] == first, "a reconciliation of the same revision is no new apply"
    status.update(ok=False, errors=["socket gone"])
    assert status.data["applied_at"] == first
    time.sleep(0.01)
    status.update(ok=True, applied_revision=4, applied_epoch="e")
    assert status.data["applied_at"] > first
    second = status.data["applied_at"]
    time.sleep(0.01)
    status.update(ok=True, applied_revision=4, applied_epoch="rebuilt")
    assert status.data["applied_at"] > second, "the same number in a new epoch is another revision"


def test_nothing_applied_sets_no_applied_at() -> None:
    status = StatusFile(None, "nginx")
    status.update(ok=False, revision=5, applied_revision=0, applied_epoch=None, error="render failed")
    assert "applied_at" not in status.data


def test_reporting_off_makes_no_reporter() -> None:
    assert reporter_for(StatusFile(None, "nginx"), ["http://127.0.0.1:1"], heartbeat_s=0) is None


def test_a_bad_name_is_refused() -> None:
    with pytest.raises(ValueError, match="bad load balancer name"):
        Reporter(["http://127.0.0.1:1"], "no spaces please", "nginx")


# -- the reporter against fake agents --------------------------------------------------


class FakeAgent:
    """Takes `POST /v1/lbs/{name}`, records each body, optionally slowly or with a status."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any], str]] = []  # (name, body, Authorization)
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0
        self.status = 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/lbs/{name}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            await asyncio.sleep(self.delay_s)
            self.bodies.append((request.match_info["name"], body, request.headers.get("Authorization", "")))
            if self.status != 200:
                return web.json_response(
                    {"error": "read-only token", "detail": "needs lb"}, status=self.status
                )
            return web.json_response({"name": request.match_info["name"]})
        finally:
            self.in_flight -= 1


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeAgent]]:
    made: list[FakeAgent] = []
    yield made
    for a in made:
        await a.stop()


async def start(made: list[FakeAgent], n: int) -> list[FakeAgent]:
    for _ in range(n):
        a = FakeAgent()
        await a.start()
        made.append(a)
    return made


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(reporter: Reporter) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(reporter.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_every_agent_hears_at_once_on_change_and_on_every_heartbeat(fakes: list[FakeAgent]) -> None:
    a, b = await start(fakes, 2)
    status = StatusFile(None, "haproxy")
    reporter = reporter_for(status, [a.url, b.url + "/"], name="hap@t", heartbeat_s=0.3, token="s3cret")
    assert reporter is not None
    async with running(reporter):
        await eventually(lambda: len(a.bodies) >= 1 and len(b.bodies) >= 1, "the first report")
        assert a.bodies[0][0] == "hap@t" and a.bodies[0][2] == "Bearer s3cret"
        assert a.bodies[0][1]["applied_revision"] is None
        status.update(ok=True, revision=7, applied_revision=7, applied_epoch="e")
        for agent in (a, b):
            await eventually(lambda agent=agent: agent.bodies[-1][1]["applied_revision"] == 7, "revision 7")
        applied_at = a.bodies[-1][1]["applied_at"]
        assert applied_at == status.data["applied_at"]
        count = len(a.bodies)
        await asyncio.sleep(1.0)
        assert 2 <= len(a.bodies) - count <= 5, "about one heartbeat every 0.3 s"
        assert a.bodies[-1][1]["applied_at"] == applied_at, "a heartbeat repeats the state, not a new apply"


async def test_a_slow_agent_gets_one_report_at_a_time_the_latest_and_delays_no_other(
    fakes: list[FakeAgent],
) -> None:
    slow, quick = await start(fakes, 2)
    slow.delay_s = 1.0
    status = StatusFile(None, "nginx")
    reporter = Reporter([slow.url, quick.url], "ngx", "nginx", heartbeat_s=30.0, timeout_s=5.0)
    status.listen(reporter.update)
    async with running(reporter):
        await eventually(lambda: slow.in_flight == 1, "the first report in flight to the slow agent")
        for revision in range(1, 51):
            status.update(ok=True, revision=revision, applied_revision=revision, applied_epoch=None)
            await asyncio.sleep(0)
        await eventually(lambda: quick.bodies[-1][1]["applied_revision"] == 50, "the quick agent at 50")
        await eventually(lambda: bool(slow.bodies) and slow.bodies[-1][1]["applied_revision"] == 50, "50")
    assert slow.max_in_flight == 1
    # The first report, then the latest state: nothing in between was queued for it.
    assert [b["applied_revision"] for _, b, _ in slow.bodies] == [None, 50]


async def test_a_failing_agent_is_logged_once_until_it_takes_reports_again(
    fakes: list[FakeAgent], caplog: pytest.LogCaptureFixture
) -> None:
    (agent,) = await start(fakes, 1)
    agent.status = 403
    reporter = Reporter([agent.url], "ngx", "nginx", heartbeat_s=0.1)
    with caplog.at_level(logging.INFO, logger="controlplane.lb.report"):
        async with running(reporter):
            await eventually(lambda: len(agent.bodies) >= 5, "five refused reports")
            agent.status = 200
            await eventually(lambda: reporter.sent >= 2, "reports taken again")
    lines = [r.getMessage() for r in caplog.records if r.name == "controlplane.lb.report"]
    refused = [line for line in lines if "cannot report" in line]
    assert len(refused) == 1, lines
    assert "403" in refused[0] and "read-only token" in refused[0] and "scope lb" in refused[0]
    assert sum("reporting to" in line and "again" in line for line in lines) == 1, lines


async def test_an_agent_that_is_gone_costs_a_bounded_wait_and_the_others_still_hear(
    fakes: list[FakeAgent],
) -> None:
    (agent,) = await start(fakes, 1)
    gone = "http://127.0.0.1:9"  # discard: nothing listens
    reporter = Reporter([gone, agent.url], "hap", "haproxy", heartbeat_s=0.2, timeout_s=0.5)
    async with running(reporter):
        await eventually(lambda: len(agent.bodies) >= 3, "reports to the live agent")
    assert reporter.failed >= 1


async def test_stop_ends_the_reporter_even_with_a_report_in_flight(fakes: list[FakeAgent]) -> None:
    (agent,) = await start(fakes, 1)
    agent.delay_s = 10.0
    reporter = Reporter([agent.url], "hap", "haproxy", heartbeat_s=1.0, timeout_s=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(reporter.run(stop))
    await eventually(lambda: agent.in_flight == 1, "a report in flight")
    stop.set()
    await asyncio.wait_for(task, 2)


async def test_flush_tells_every_agent_once(fakes: list[FakeAgent]) -> None:
    a, b = await start(fakes, 2)
    status = StatusFile(None, "nginx")
    reporter = reporter_for(status, [a.url, b.url], name="ngx@once", heartbeat_s=5.0)
    assert reporter is not None
    status.update(ok=True, revision=4, applied_revision=4, applied_epoch="e")
    await reporter.flush()
    for agent in (a, b):
        ((name, body, _),) = agent.bodies
        assert name == "ngx@once" and body["applied_revision"] == 4 and body["ok"] is True
