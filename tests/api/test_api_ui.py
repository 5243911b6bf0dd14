"""The dashboard's routes on in-process agents: files, headers, the read token, CORS.

The page itself is tested in a real browser in `tests/ui`; this is what the server
promises whatever the browser does: only the dashboard's own files are served, with a
strict Content-Security-Policy and anti-framing headers, open even when a read token is
configured (the API behind them is not), and `/readyz` is the one route another agent's
page may read across origins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from controlplane.agent.node import Tokens
from controlplane.testing.inprocess import ADMIN_TOKEN, InProcessCluster
from tests.api.conftest import api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

READ_TOKEN = "read-token-for-ui-tests"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded() -> AsyncIterator[InProcessCluster]:
    """Agents whose reads need a token, as a cautious production config has."""
    async with InProcessCluster(api_settings(), tokens=Tokens(admin=ADMIN_TOKEN, read=READ_TOKEN)) as c:
        await c.wait_for_revision(1)
        yield c


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, allow_redirects=False) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def first(cluster: InProcessCluster) -> str:
    return next(iter(cluster.agents.values())).url


async def test_the_page_and_its_files_are_served_with_strict_security_headers(
    guarded: InProcessCluster,
) -> None:
    base = first(guarded)
    for path, content_type in (
        ("/ui/", "text/html"),
        ("/ui/main.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ):
        status, headers, body = await fetch(base + path)  # no token: the files are open
        assert status == 200, (path, status, body[:200])
        assert headers["Content-Type"].startswith(content_type), (path, headers["Content-Type"])
        csp = headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
    html = (await fetch(base + "/ui/"))[2].decode()
    # No inline script or style anywhere in the page: everything comes from files.
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert '<script type="module" src="main.js"></script>' in html


async def test_connect_src_names_the_configured_agents_only(guarded: InProcessCluster) -> None:
    _, headers, _ = await fetch(first(guarded) + "/ui/")
    directives = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
    agents = {f"http://{a.http}" for a in guarded.settings.cluster.agents}
    assert set(directives["connect-src"].split()) == {"'self'", *agents}


async def test_root_redirects_to_the_dashboard(guarded: InProcessCluster) -> None:
    for path in ("/", "/ui"):
        status, headers, _ = await fetch(first(guarded) + path)
        assert status == 302 and headers["Location"] == "/ui/", (path, status, headers)


async def test_only_the_dashboards_own_files_are_served(guarded: InProcessCluster) -> None:
    base = first(guarded)
    for path in ("/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/.hidden.js", "/ui/ui.py", "/ui/README.md"):
        status, _, body = await fetch(base + path)
        assert status == 404, (path, status, body[:200])
    # Dot segments are resolved before routing: they land outside /ui/, on the guarded API.
    for path in ("/ui/%2e%2e/ui.py", "/ui/../api/app.py"):
        status, _, body = await fetch(base + path)
        assert status in (401, 404) and b"import" not in body, (path, status, body[:200])


async def test_the_api_behind_the_page_still_needs_the_read_token(guarded: InProcessCluster) -> None:
    base = first(guarded)
    status, _, _ = await fetch(base + "/v1/decision")
    assert status == 401
    status, _, _ = await fetch(base + "/v1/decision", {"Authorization": f"Bearer {READ_TOKEN}"})
    assert status == 200


async def test_readyz_answers_cors_for_the_configured_agents_origins_only(guarded: InProcessCluster) -> None:
    base = first(guarded)
    agent = f"http://{guarded.settings.cluster.agents[1].http}"
    _, headers, _ = await fetch(base + "/readyz", {"Origin": agent})
    assert headers.get("Access-Control-Allow-Origin") == agent
    assert "Origin" in headers.get("Vary", "")
    for origin in ("http://evil.example", "null", agent + ".evil.example"):
        _, headers, _ = await fetch(base + "/readyz", {"Origin": origin})
        assert "Access-Control-Allow-Origin" not in headers, origin
    # The data routes never answer another origin, even a configured agent's.
    _, headers, _ = await fetch(
        base + "/v1/decision", {"Origin": agent, "Authorization": f"Bearer {READ_TOKEN}"}
    )
    assert "Access-Control-Allow-Origin" not in headers


async def test_history_keeps_each_decisions_weights_for_the_chart(guarded: InProcessCluster) -> None:
    base = first(guarded)
    auth = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.get(base + "/v1/history?limit=50") as r:
            history = await r.json()
        async with session.get(base + "/v1/decision") as r:
            decision = await r.json()
        async with session.get(base + "/v1/regions") as r:
            regions = await r.json()
    entries = {e["revision"]: e for e in history["entries"] if e["kind"] == "decision"}
    latest = entries[decision["revision"]]
    assert latest["weights"] == {
        s: {r: p["weight"] for r, p in placements.items()} for s, placements in decision["services"].items()
    }
    assert regions["demand_rps"] == dict(guarded.settings.policy.demand_rps)
