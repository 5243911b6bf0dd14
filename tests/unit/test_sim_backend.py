"""The simulated region backend really fails the way it is told to."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.testing import backend as sim
from controlplane.testing.backend import SimBackend


@pytest.fixture
async def backend() -> AsyncIterator[SimBackend]:
    b = SimBackend("cn-east", "order")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
        yield s


def port_is_free(port: int) -> bool:
    """True when a server could listen on `port` again (as servers do, with SO_REUSEADDR,
    so connections left in TIME_WAIT by the server closing first do not count)."""
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


async def test_healthz_reports_region_service_and_utilization(
    backend: SimBackend, session: aiohttp.ClientSession
) -> None:
    await backend.set_state(utilization=0.6)
    async with session.get(f"{backend.url}/healthz") as r:
        assert r.status == 200
        assert await r.json() == {"region": "cn-east", "service": "order", "utilization": 0.6}
    assert backend.health_checks == 1
    assert backend.requests == 0  # health checks are not traffic


async def test_traffic_is_answered_and_counted(backend: SimBackend, session: aiohttp.ClientSession) -> None:
    for path in ("/", "/orders/42"):
        async with session.get(f"{backend.url}{path}") as r:
            assert r.status == 200
            assert r.headers["X-Region"] == "cn-east"
            assert await r.text() == "region=cn-east service=order\n"
    async with session.post(f"{backend.url}/orders", data=b"{}") as r:
        assert r.status == 200
    assert (backend.requests, backend.errors) == (3, 0)


async def test_unhealthy_answers_503(backend: SimBackend, session: aiohttp.ClientSession) -> None:
    await backend.set_state(healthy=False)
    async with session.get(f"{backend.url}/healthz") as r:
        assert r.status == 503
    async with session.get(f"{backend.url}/") as r:
        assert r.status == 503
        assert r.headers["X-Region"] == "cn-east"
    assert (backend.requests, backend.errors) == (1, 1)


async def test_added_latency_is_visible(backend: SimBackend, session: aiohttp.ClientSession) -> None:
    await backend.set_state(latency_ms=150)
    started = time.monotonic()
    async with session.get(f"{backend.url}/healthz") as r:
        assert r.status == 200
    assert time.monotonic() - started >= 0.15


async def test_blackhole_accepts_connections_but_never_answers(
    backend: SimBackend, session: aiohttp.ClientSession
) -> None:
    await backend.set_state(mode="blackhole")
    # The TCP handshake still completes: only a timeout can tell.
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", backend.port), 1)
    writer.close()
    with pytest.raises(TimeoutError):
        async with session.get(f"{backend.url}/healthz", timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    await backend.set_state(mode="normal")
    async with session.get(f"{backend.url}/healthz") as r:
        assert r.status == 200


async def test_refuse_closes_the_port_and_recovery_reopens_it(
    backend: SimBackend, session: aiohttp.ClientSession
) -> None:
    port = backend.port
    # A kept-alive connection from before the fault must not keep working.
    keepalive = aiohttp.ClientSession()
    try:
        async with keepalive.get(f"{backend.url}/") as r:
            assert r.status == 200
        await backend.set_state(mode="refuse")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with keepalive.get(f"{backend.url}/"):
                pass
    finally:
        await keepalive.close()
    await backend.set_state(mode="normal")
    assert backend.port == port
    async with session.get(f"{backend.url}/healthz") as r:
        assert r.status == 200


async def test_flapping_toggles_health_and_stops_healthy(
    backend: SimBackend, session: aiohttp.ClientSession
) -> None:
    await backend.set_state(flap_period_s=0.03)
    statuses = set()
    async with asyncio.timeout(3):
        while statuses != {200, 503}:
            async with session.get(f"{backend.url}/healthz") as r:
                statuses.add(r.status)
            await asyncio.sleep(0.01)
    await backend.set_state(flap_period_s=0)
    assert backend.healthy and backend.flap_period_s is None
    for _ in range(3):
        async with session.get(f"{backend.url}/healthz") as r:
            assert r.status == 200
        await asyncio.sleep(0.03)


async def test_admin_api_drives_state_and_reports_stats(
    backend: SimBackend, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{backend.url}/") as r:
        assert r.status == 200
    state = {"healthy": False, "latency_ms": 5, "utilization": 0.9, "mode": "normal"}
    async with session.post(f"{backend.admin_url}/admin/state", json=state) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["healthy"] is False and answer["utilization"] == 0.9
    assert backend.healthy is False and backend.latency_ms == 5
    async with session.get(f"{backend.url}/healthz") as r:
        assert r.status == 503

    async with session.post(f"{backend.admin_url}/admin/state", json={"mode": "refuse"}) as r:
        assert r.status == 200
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", backend.port), 1)
    # The admin port is not affected by the fault it controls.
    async with session.get(f"{backend.admin_url}/admin/stats") as r:
        stats = await r.json()
    assert stats["mode"] == "refuse"
    assert (stats["requests"], stats["errors"], stats["health_checks"]) == (1, 0, 1)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"[1]", "body must be a JSON object"),
        (b"{oops", "body is not JSON"),
        (b'{"healthy": "yes"}', "healthy must be true or false"),
        (b'{"mode": "sideways"}', "mode must be one of"),
        (b'{"latency_ms": -1}', "latency_ms must be a number"),
        (b'{"colour": "red"}', "unknown keys"),
    ],
)
async def test_admin_api_rejects_bad_state_and_changes_nothing(
    backend: SimBackend, session: aiohttp.ClientSession, body: bytes, detail: str
) -> None:
    async with session.post(f"{backend.admin_url}/admin/state", data=body) as r:
        assert r.status == 400
        answer = await r.json()
    assert answer["error"] == "bad_request"
    assert detail in answer["detail"]
    assert backend.stats()["healthy"] is True and backend.mode == "normal"


async def test_stop_frees_both_ports_and_releases_held_requests() -> None:
    b = SimBackend("cn-east", "order")
    await b.start()
    port, admin_port = b.port, b.admin_port
    assert not port_is_free(port) and not port_is_free(admin_port)
    await b.set_state(mode="blackhole")
    async with aiohttp.ClientSession() as s:
        held = asyncio.create_task(s.get(f"{b.url}/healthz", timeout=aiohttp.ClientTimeout(total=5)))
        await asyncio.sleep(0.1)
        assert not held.done()
        started = time.monotonic()
        await b.stop()
        assert time.monotonic() - started < 2
        with contextlib.suppress(aiohttp.ClientError):
            (await held).release()
    assert port_is_free(port)
    assert port_is_free(admin_port)


async def test_stop_in_refuse_mode_frees_everything() -> None:
    b = SimBackend("cn-east", "order", admin_port=None)
    await b.start()
    port = b.port
    await b.set_state(mode="refuse")
    await b.stop()
    assert port_is_free(port)
    with pytest.raises(RuntimeError):
        _ = b.admin_port


class ReadyLine(io.StringIO):
    """Stands in for stdout; `ready` is set once a whole line has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if "\n" in s:
            self.ready.set()
        return n


async def test_serve_runs_several_backends_and_stops_them(monkeypatch: pytest.MonkeyPatch) -> None:
    out = ReadyLine()
    monkeypatch.setattr(sys, "stdout", out)
    specs = sim.load_specs({"backends": [{"region": "cn-east", "service": "order"},
                                         {"region": "cn-south", "service": "order"}]})  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(sim.serve(specs, stop))
    try:
        await asyncio.wait_for(out.ready.wait(), 3)
        ready = json.loads(out.getvalue())["backends"]
        async with aiohttp.ClientSession() as s:
            for entry in ready:
                async with s.get(f"http://127.0.0.1:{entry['port']}/") as r:
                    assert r.headers["X-Region"] == entry["region"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 3)
    assert all(port_is_free(e["port"]) and port_is_free(e["admin_port"]) for e in ready)


def test_load_specs_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        sim.load_specs([])
    with pytest.raises(ValueError, match=r"backends\[1\]"):
        sim.load_specs([{"region": "a", "service": "b"}, {"region": "a", "servce": "b"}])


async def test_runs_as_a_separate_process(tmp_path: Path) -> None:
    spec = tmp_path / "backends.yaml"
    spec.write_text("- {region: cn-north, service: inventory}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.testing.backend", "--spec", str(spec),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        [entry] = json.loads(line)["backends"]
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{entry['admin_port']}/admin/state"
            async with s.post(url, json={"healthy": False}) as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{entry['port']}/healthz") as r:
                assert r.status == 503
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
