"""Tokens, limits, metrics and the OpenAPI document, on one in-process agent with a read token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from controlplane.agent.node import Tokens
from controlplane.testing.inprocess import ADMIN_TOKEN, InProcessCluster
from tests.api.conftest import api_config, api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

READ_TOKEN = "read-only-token"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[InProcessCluster]:
    config = api_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    config["api"] = {"max_watchers": 3}
    tokens = Tokens(admin=ADMIN_TOKEN, read=READ_TOKEN)
    async with InProcessCluster(api_settings(config), tokens=tokens) as c:
        await c.settled(quiet_s=0.5)
        yield c


def url(c: InProcessCluster, path: str) -> str:
    return next(iter(c.agents.values())).url + path


async def status_of(c: InProcessCluster, method: str, path: str, token: str | None, body: Any = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {"Authorization": ""}
    async with aiohttp.ClientSession() as s, s.request(method, url(c, path), json=body, headers=headers) as r:
        return r.status


async def test_reads_need_a_token_when_one_is_configured(solo: InProcessCluster) -> None:
    assert await status_of(solo, "GET", "/v1/decision", None) == 401
    assert await status_of(solo, "GET", "/v1/decision", "wrong") == 401
    assert await status_of(solo, "GET", "/v1/decision", READ_TOKEN) == 200
    assert await status_of(solo, "GET", "/v1/decision", solo.admin_token) == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert await status_of(solo, "GET", open_path, None) == 200, open_path


async def test_read_only_token_cannot_write(solo: InProcessCluster) -> None:
    before = (await solo.decision(next(iter(solo.agents))))["revision"]  # type: ignore[index]
    drain = {"kind": "drain", "region": "cn-east", "reason": "x"}
    assert await status_of(solo, "POST", "/v1/intents", READ_TOKEN, drain) == 403
    assert await status_of(solo, "POST", "/v1/intents", None, drain) == 401
    assert await status_of(solo, "DELETE", "/v1/intents/abc", READ_TOKEN) == 403
    await asyncio.sleep(0.3)
    assert (await solo.decision(next(iter(solo.agents))))["revision"] == before  # type: ignore[index]


async def test_watchers_past_the_limit_get_503(solo: InProcessCluster) -> None:
    d = await solo.decision(next(iter(solo.agents)))
    assert d is not None
    blocking = f"/v1/decision?index={d['revision']}&wait=20s"
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        held = [asyncio.create_task(s.get(url(solo, blocking))) for _ in range(3)]
        await asyncio.sleep(1.0)
        async with s.get(url(solo, blocking)) as r:
            body = await r.json()
            assert r.status == 503, body
            assert body["error"] == "too many watchers"
        async with s.get(url(solo, "/metrics")) as r:
            assert "controlplane_watchers 3.0" in await r.text()
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)


async def test_openapi_documents_every_route(solo: InProcessCluster) -> None:
    from controlplane.api.app import create_app

    app = create_app(next(iter(solo.agents.values())).node)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    async with aiohttp.ClientSession() as s, s.get(url(solo, "/openapi.json")) as r:
        spec = await r.json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert routes == documented
