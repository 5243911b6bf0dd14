"""Test services enforce the decision: the SDK's middleware in an aiohttp app and an ASGI app
(served by uvicorn), following in-process agents, with 10,000 real requests each.

Two regions of three fail, so the decision switches features off and publishes a
shed fraction (0.36 with the demo's demand); an operator then forces a feature back on,
the deficit grows and so does the fraction (0.51). The services must shed that share of
their low-priority requests (within two points), none of their high-priority ones,
refuse the switched-off feature, and keep every user shed at the lower fraction shed at
the higher one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import uvicorn
from aiohttp import web

from controlplane.client import FlagsClient
from controlplane.client.middleware import Classifier, SheddingMiddleware, shedding_middleware
from controlplane.client.shedding import Shedder
from controlplane.testing.inprocess import InProcessCluster
from controlplane.testing.ports import free_port
from tests.api.conftest import api_config, api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

LOW, HIGH = 10_000, 1_000
CONCURRENCY = 64
TOLERANCE = 0.02


def classifier() -> Classifier:
    return Classifier(
        low_priority_paths=["/feed"], high_priority_paths=["/checkout"], features={"/comments": "comments"}
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def flags() -> AsyncIterator[tuple[InProcessCluster, FlagsClient]]:
    async with InProcessCluster(api_settings(api_config())) as c:
        await c.settled(quiet_s=0.5)
        async with FlagsClient([a.url for a in c.agents.values()], wait_s=5) as client:
            assert await client.wait_for_revision(0, 10)
            yield c, client


async def aiohttp_service(shedder: Shedder) -> tuple[str, Callable[[], Awaitable[None]]]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[shedding_middleware(shedder, classifier())])
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner.cleanup


async def asgi_service(shedder: Shedder) -> tuple[str, Callable[[], Awaitable[None]]]:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(
        SheddingMiddleware(ok, shedder, classifier()),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        backlog=1024,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.02)

    async def stop() -> None:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)

    return f"http://127.0.0.1:{port}", stop


Service = Callable[[Shedder], Awaitable[tuple[str, Callable[[], Awaitable[None]]]]]


async def send_all(base: str, requests: list[tuple[str, dict[str, str]]]) -> list[tuple[int, dict[str, str]]]:
    """Every request, `CONCURRENCY` at a time; (status, selected headers) in order."""
    limit = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def one(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
            async with limit, s.get(base + path, headers=headers) as r:
                await r.read()
                keep = ("Retry-After", "X-Controlplane-Shed", "X-Controlplane-Feature-Off")
                return r.status, {k: r.headers[k] for k in keep if k in r.headers}

        return await asyncio.gather(*(one(p, h) for p, h in requests))


def users(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


async def shed_users(base: str, keys: list[str]) -> tuple[set[str], list[dict[str, str]]]:
    answers = await send_all(base, [("/feed", {"X-User-Id": k}) for k in keys])
    assert {status for status, _ in answers} <= {200, 503}
    shed = {k for k, (status, _) in zip(keys, answers, strict=True) if status == 503}
    return shed, [h for status, h in answers if status == 503]


async def wait_fraction(flags: FlagsClient, check: Callable[[float], bool], what: str) -> float:
    deadline = time.monotonic() + 20
    while not check(flags.shed_fraction):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; shed_fraction {flags.shed_fraction}")
        await asyncio.sleep(0.05)
    return flags.shed_fraction


async def set_feature(c: InProcessCluster, name: str, enabled: bool) -> None:
    status, body = await c.post(
        next(iter(c.agents)),
        "/v1/intents",
        {"kind": "feature", "name": name, "enabled": enabled, "reason": "t"},
    )
    assert status in (201, 202), body


async def clear_intents(c: InProcessCluster) -> None:
    agent = next(iter(c.agents.values()))
    _, _, body = await c.get(agent.id, "/v1/intents")
    for intent in body["intents"]:
        url = f"{agent.url}/v1/intents/{intent['id']}?reason=cleanup"
        async with c.session.delete(url, headers={"Authorization": f"Bearer {c.admin_token}"}) as r:
            assert r.status == 200, await r.text()


@pytest.mark.parametrize("service", [aiohttp_service, asgi_service], ids=["aiohttp", "asgi-uvicorn"])
async def test_the_middleware_sheds_the_decided_share_of_low_priority_requests_and_no_high_ones(
    flags: tuple[InProcessCluster, FlagsClient], service: Service
) -> None:
    c, client = flags
    shedder = Shedder.of(client)
    base, stop = await service(shedder)
    try:
        keys = users(LOW)
        nothing, _ = await shed_users(base, keys[:1000])
        assert nothing == set(), "no shedding while every region serves"

        await c.see("cn-east", up=False)
        await c.see("cn-north", up=False)
        low_fraction = await wait_fraction(client, lambda f: f > 0, "a shed fraction")
        started = time.monotonic()
        shed, refusals = await shed_users(base, keys)
        took = time.monotonic() - started
        print(
            f"\n{service.__name__}: {LOW} low-priority requests in {took:.1f} s; fraction {low_fraction}, "
            f"shed {len(shed) / LOW:.4f}"
        )
        assert abs(len(shed) / LOW - low_fraction) < TOLERANCE, (len(shed), low_fraction)
        assert all(h.get("Retry-After") == str(shedder.retry_after_s) for h in refusals)
        assert all(h.get("X-Controlplane-Shed") == "decision" for h in refusals)

        high = await send_all(base, [("/checkout", {"X-User-Id": k}) for k in users(HIGH, "buyer")])
        assert [s for s, _ in high] == [200] * HIGH, "high-priority requests are never shed"
        comments = await send_all(base, [("/comments/1", {"X-User-Id": "user-1", "X-Priority": "high"})])
        assert comments[0][0] == 503 and comments[0][1]["X-Controlplane-Feature-Off"] == "comments"

        again, _ = await shed_users(base, keys[:2000])
        assert again == shed & set(keys[:2000]), "the same users are shed while the fraction holds"

        # The operator forces a feature back on: the deficit grows, and so does the fraction.
        await set_feature(c, "recommendations", True)
        high_fraction = await wait_fraction(client, lambda f: f > low_fraction, "a larger shed fraction")
        more, _ = await shed_users(base, keys)
        assert abs(len(more) / LOW - high_fraction) < TOLERANCE, (len(more), high_fraction)
        assert shed <= more, "nobody shed at the lower fraction is let in at the higher one"
        high = await send_all(base, [("/checkout", {"X-User-Id": k}) for k in users(HIGH, "buyer")])
        assert [s for s, _ in high] == [200] * HIGH
        assert shedder.metrics.shed.get("high/decision", 0) == 0
    finally:
        await stop()
        await clear_intents(c)
        await c.see("cn-east", up=True)
        await c.see("cn-north", up=True)
        await wait_fraction(client, lambda f: f == 0, "no shedding after the test")
