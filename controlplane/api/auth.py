"""Bearer tokens with scopes: every route asks `require(request, scope)` who is calling.

`require` answers the `Principal` (the token's name and scope) or raises: 401 without a
credential or with one this agent does not know (including one that is not ASCII: a
bearer token never is), 403 with a known token whose scope is too small. Reads are open
when no `read` token is configured (see `access.Tokens.reads_open`); `/healthz`,
`/readyz`, `/metrics` and `/openapi.json` always are, so orchestrators and Prometheus
need no secret, and so are the dashboard's static files (a browser cannot send a bearer
token when it loads a page; the page itself then sends the token to the API).

"Who" in the history and the audit log is the principal's name, never something the
client says about itself: `X-Controlplane-User` (which cpctl sends) is only noted in the
audit line, next to the authenticated name.

`audit` writes the one structured line every accepted write leaves in the log
(logger `controlplane.audit`): who, scope, what, reason, revision.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from controlplane.access import ANONYMOUS, Principal, Scope
from controlplane.api.common import NODE
from controlplane.api.ui import is_ui_path
from controlplane.errors import Forbidden, Unauthorized

__all__ = ["OPEN_PATHS", "Principal", "Scope", "audit", "require"]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
# A claimed user name is noted in the audit line, at most this long.
CLAIMED_MAX = 100

audit_log = logging.getLogger("controlplane.audit")


def _credential(request: web.Request, api_key_header: bool) -> str | None:
    """The presented secret, or None; `Unauthorized` for one that cannot be a token."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        # OFREP names two ways to send a credential: a bearer token or an X-API-Key.
        token = request.headers.get("X-API-Key", "").strip() if api_key_header else ""
        if not token:
            return None
    if not token.isascii() or not token.isprintable():
        raise Unauthorized("bad token", "a bearer token is printable ASCII; this one is not")
    return token


def require(request: web.Request, scope: Scope | str, *, api_key_header: bool = False) -> Principal:
    """Who this request acts as, when it may do what needs `scope`; else 401 or 403.

    `api_key_header`: an `X-API-Key` header may carry the token too (the OFREP routes).
    """
    needed = Scope(scope)
    tokens = request.app[NODE].tokens
    if needed is Scope.READ and (request.path in OPEN_PATHS or is_ui_path(request.path)):
        return ANONYMOUS
    given = _credential(request, api_key_header)
    if given is None:
        if needed is Scope.READ and tokens.reads_open:
            return ANONYMOUS
        if not tokens.can_grant(needed):
            raise Forbidden(
                f"no token may {_verb(needed)} on this agent",
                f"configure a token of scope {needed} or above in auth.tokens (or auth.admin_token)",
            )
        raise Unauthorized("missing bearer token", f"send Authorization: Bearer <a token of scope {needed}>")
    token = tokens.match(given.encode("ascii"))
    if token is None:
        raise Unauthorized("bad token", "the bearer token is not valid for this cluster")
    if not token.scope.allows(needed):
        detail = f"token {token.name} has scope {token.scope}; this needs {needed} or above"
        if token.scope is Scope.READ:
            raise Forbidden("read-only token", f"{detail} (it may read but not {_verb(needed)})")
        raise Forbidden(f"token {token.name} may not {_verb(needed)}", detail)
    return Principal(token.name, token.scope)


def _verb(scope: Scope) -> str:
    return {
        Scope.READ: "read",
        Scope.LB: "report load balancer status",
        Scope.OPERATE: "change traffic",
        Scope.ADMIN: "do this (admin only)",
    }[scope]


def audit(
    request: web.Request,
    principal: Principal,
    what: str,
    reason: str,
    revision: int | None,
    *,
    claimed: str | None = None,
    **more: Any,
) -> None:
    """One structured line for an accepted write: who, scope, what, reason, revision.

    `claimed`: a user name the client gave (the body's `who`, else the
    `X-Controlplane-User` header), noted beside the authenticated name when it differs.
    """
    claimed = claimed or request.headers.get("X-Controlplane-User", "")
    fields: dict[str, Any] = {
        "who": principal.name,
        "scope": str(principal.scope),
        "what": what,
        "reason": reason,
        "revision": revision,
        **more,
    }
    if claimed and claimed != principal.name:
        fields["claimed_user"] = "".join(c for c in claimed[:CLAIMED_MAX] if c.isprintable())
    peer = request.remote
    if peer:
        fields["peer"] = peer
    text = " ".join(f"{k}={_quoted(v)}" for k, v in fields.items() if v is not None)
    audit_log.info("audit %s", text, extra={"audit": fields})


def _quoted(value: Any) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/@" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
