"""Bearer tokens: an admin token may write, a read token may only read.

Tokens are compared in constant time (`hmac.compare_digest`). Without a token a write
gets 401; with the read token it gets 403. When no read token is configured, reads are
open; when one is, every read needs the read or the admin token. `/healthz`, `/readyz`
and `/metrics` stay open so orchestrators and Prometheus need no secret, and so do the
dashboard's static files (a browser cannot send a bearer token when it loads a page;
the page itself then sends the token to the API).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from controlplane.api.common import NODE
from controlplane.api.ui import is_ui_path
from controlplane.errors import Forbidden, Unauthorized

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def _token(request: web.Request, api_key_header: bool = False) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # OFREP names two ways to send a credential: a bearer token or an X-API-Key.
        api_key = request.headers.get("X-API-Key", "").strip() if api_key_header else ""
        return api_key or None
    return token.strip()


def _matches(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_write(request: web.Request) -> None:
    tokens = request.app[NODE].tokens
    if tokens.admin is None:
        raise Forbidden("writes are disabled", "this agent has no admin token configured (auth.admin_token)")
    token = _token(request)
    if token is None:
        raise Unauthorized("missing bearer token", "send Authorization: Bearer <admin token>")
    if _matches(token, tokens.admin):
        return
    if _matches(token, tokens.read):
        raise Forbidden("read-only token", "this token may read but not change anything")
    raise Unauthorized("bad token", "the bearer token is not valid for this cluster")


def require_read(request: web.Request, *, api_key_header: bool = False) -> None:
    """Reads need the read or admin token when a read token is configured.

    `api_key_header`: an `X-API-Key` header may carry the token too (the OFREP routes).
    """
    tokens = request.app[NODE].tokens
    if tokens.read is None or request.path in OPEN_PATHS or is_ui_path(request.path):
        return
    token = _token(request, api_key_header)
    if token is None:
        raise Unauthorized("missing bearer token", "reads need the read or admin token")
    if not (_matches(token, tokens.read) or _matches(token, tokens.admin)):
        raise Unauthorized("bad token", "the bearer token is not valid for this cluster")
