"""The dashboard: static files under `/ui/`, served by every agent.

The page is plain HTML, CSS and JavaScript modules shipped as package data
(`controlplane/api/ui/`): no build chain, nothing fetched from elsewhere, so it works in
an air-gapped data centre. The files are read once, when the app is built, and only
those files are served: a request can never name a path outside that directory.

The page reads the API of the agent that served it (same origin). Every answer under
`/ui/` carries a strict Content-Security-Policy: scripts, styles and images from this
agent only, no inline script or style, no framing. `connect-src` also names the other
configured agents, for one purpose: when this agent has lost quorum or is gone, the page
asks the others' `/readyz` (open, no token, nothing secret) which of them has quorum,
and then *navigates* there, so the page, its data and its token all belong to one agent
at a time and the address bar says which. `/readyz` therefore answers CORS requests from
the configured agents' own origins, and nothing else does.

The static files are open even when a read token is configured (a browser cannot send a
bearer token when it loads a page); they hold no data. The page asks for the token when
the API answers 401, keeps it in session storage and sends it as a bearer header.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from controlplane.agent.node import Node
from controlplane.api.common import NODE

UI_PREFIX = "/ui/"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")
TYPES = {"js": "text/javascript", "css": "text/css", "html": "text/html", "svg": "image/svg+xml"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


ASSETS: web.AppKey[dict[str, Asset]] = web.AppKey("ui_assets", dict)
CSP: web.AppKey[str] = web.AppKey("ui_csp", str)
AGENT_ORIGINS: web.AppKey[frozenset[str]] = web.AppKey("ui_agent_origins", frozenset)


def load_assets() -> dict[str, Asset]:
    """Every file of the dashboard, by name, read once (a few tens of kB)."""
    assets = {}
    for item in (resources.files("controlplane.api") / "ui").iterdir():
        match = NAME_RE.match(item.name)
        if match is None or not item.is_file():
            continue
        body = item.read_bytes()
        assets[item.name] = Asset(
            body, TYPES[match.group(1)], '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        )
    return assets


def agent_origins(node: Node) -> frozenset[str]:
    """`http(s)://host:port` of every configured agent: the only origins the page moves between.

    https when the agents serve TLS (`api.tls`): an origin includes its scheme.
    """
    return frozenset(node.settings.agent_url(a) for a in node.settings.cluster.agents)


def content_security_policy(origins: frozenset[str]) -> str:
    connect = " ".join(["'self'", *sorted(origins)])
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def security_headers(request: web.Request) -> dict[str, str]:
    return {
        "Content-Security-Policy": request.app[CSP],
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        # Revalidate every time (cheap, with the ETag): after an upgrade the page and its
        # modules must not mix versions from the browser's cache.
        "Cache-Control": "no-cache",
    }


def serve(request: web.Request, name: str) -> web.StreamResponse:
    asset = request.app[ASSETS].get(name)
    headers = security_headers(request)
    if asset is None:
        return web.Response(status=404, text="not found", headers=headers)
    headers["ETag"] = asset.etag
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, headers=headers)


async def index(request: web.Request) -> web.StreamResponse:
    return serve(request, "index.html")


async def asset(request: web.Request) -> web.StreamResponse:
    return serve(request, request.match_info["name"])


async def to_ui(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(UI_PREFIX, headers=security_headers(request))


async def readyz_cors(request: web.Request, response: web.StreamResponse) -> None:
    """Let the dashboard served by another configured agent read this agent's `/readyz`."""
    origin = request.headers.get("Origin")
    if request.path == "/readyz" and origin is not None and origin in request.app[AGENT_ORIGINS]:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


def is_ui_path(path: str) -> bool:
    """Paths the dashboard's static files live at: open, like `/healthz` (see the module doc)."""
    return path in ("/", "/ui") or path.startswith(UI_PREFIX)


def openapi_paths() -> dict[str, Any]:
    """The dashboard's routes in `/openapi.json` (which documents every route)."""
    redirect = {
        "get": {
            "summary": "Redirects to the dashboard",
            "responses": {
                "302": {"description": "To /ui/"},
                "200": {"description": "The dashboard (after the redirect)", "content": {"text/html": {}}},
            },
        }
    }
    return {
        "/": redirect,
        "/ui": redirect,
        "/ui/": {
            "get": {
                "summary": "The live dashboard (open even with a read token; the page asks for it)",
                "responses": {"200": {"description": "The page", "content": {"text/html": {}}}},
            }
        },
        "/ui/{name}": {
            "get": {
                "summary": "One of the dashboard's static files",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The file",
                        "content": {
                            t: {} for t in ("text/javascript", "text/css", "text/html", "image/svg+xml")
                        },
                    },
                    "404": {"description": "Not one of the dashboard's files", "content": {"text/plain": {}}},
                },
            }
        },
    }


def add_routes(app: web.Application) -> None:
    origins = agent_origins(app[NODE])
    app[ASSETS] = load_assets()
    app[AGENT_ORIGINS] = origins
    app[CSP] = content_security_policy(origins)
    app.on_response_prepare.append(readyz_cors)
    app.router.add_get("/", to_ui)
    app.router.add_get("/ui", to_ui)
    app.router.add_get(UI_PREFIX, index)
    app.router.add_get(UI_PREFIX + "{name}", asset)
