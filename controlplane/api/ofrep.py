"""OFREP: the decision's feature switches for any OpenFeature SDK, without custom code.

The OpenFeature Remote Evaluation Protocol (github.com/open-feature/protocol,
`service/openapi.yaml`) has two core endpoints, both served here from the committed
decision this agent serves:

- `POST /ofrep/v1/evaluate/flags/{key}`: one flag (what server-side providers call,
  such as Python's `openfeature-provider-ofrep`);
- `POST /ofrep/v1/evaluate/flags`: every flag at once, with `ETag` and
  `If-None-Match` (304 when nothing changed), for client-side providers that poll.

Flags: every configured feature is a boolean flag (its name is the key; `true` while it
is on), and `shed_fraction` is a float flag, the fraction of low-priority requests to
shed. Nothing depends on the evaluation context (these are fleet-wide switches), so it
is checked for shape and otherwise ignored, and the reason is always `STATIC`; the
metadata says which revision the value comes from and whether this agent has lost
quorum (`stale`: the value is the last committed one, kept on purpose).

Errors are in OFREP's shape: `{"key", "errorCode": "FLAG_NOT_FOUND", "errorDetails"}`
(404) for an unknown key, `INVALID_CONTEXT` or `PARSE_ERROR` (400) for a body that is
not an object with an object `context`, and `{"errorDetails"}` (503) before the first
decision. The read token is honoured as for every read: `Authorization: Bearer` or, as
OFREP also allows, `X-API-Key`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from controlplane.access import Scope
from controlplane.api.auth import require
from controlplane.api.common import NODE, json_response, read_body
from controlplane.api.read import position
from controlplane.errors import Rejected
from controlplane.model import Decision, flags_of


class _BadRequest(Rejected):
    """A request OFREP answers 400 with its own error code (`PARSE_ERROR`, `INVALID_CONTEXT`)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail, detail)
        self.code = code


def _context_of(body: bytes) -> dict[str, Any]:
    """The evaluation context from a request body (empty body: no context)."""
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _BadRequest("PARSE_ERROR", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise _BadRequest("PARSE_ERROR", 'the body must be a JSON object such as {"context": {}}')
    context = data.get("context")
    if context is None:
        return {}
    if not isinstance(context, dict):
        raise _BadRequest("INVALID_CONTEXT", "context must be a JSON object")
    return context


def _evaluation(key: str, value: bool | float, decision: Decision, stale: bool, agent: str) -> dict[str, Any]:
    variant = ("on" if value else "off") if isinstance(value, bool) else ("shedding" if value > 0 else "none")
    return {
        "key": key,
        "value": value,
        "reason": "STATIC",
        "variant": variant,
        "metadata": {
            "revision": decision.revision,
            "epoch": decision.epoch,
            "stale": stale,
            "served_by": agent,
        },
    }


def _no_decision() -> web.Response:
    return json_response(
        {"errorDetails": "the cluster has not committed a decision yet; retry shortly"},
        status=503,
        headers={"Retry-After": "1"},
    )


async def evaluate_flag(request: web.Request) -> web.StreamResponse:
    require(request, Scope.READ, api_key_header=True)
    node = request.app[NODE]
    key = request.match_info["key"]
    try:
        _context_of(await read_body(request))
    except _BadRequest as e:
        return json_response({"key": key, "errorCode": e.code, "errorDetails": e.detail}, status=400)
    decision = node.state().decision
    if decision is None:
        return _no_decision()
    flags = flags_of(decision)
    if key not in flags:
        known = ", ".join(sorted(flags))
        return json_response(
            {"key": key, "errorCode": "FLAG_NOT_FOUND", "errorDetails": f"no flag {key!r}; flags: {known}"},
            status=404,
        )
    stale = node.stale_for_s() is not None
    return json_response(_evaluation(key, flags[key], decision, stale, node.agent_id))


def _etag(decision: Decision, stale: bool) -> str:
    # The answer changes with the revision and with staleness (in the metadata).
    return f'"{position(decision)}{"-stale" if stale else ""}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


async def evaluate_flags(request: web.Request) -> web.StreamResponse:
    require(request, Scope.READ, api_key_header=True)
    node = request.app[NODE]
    try:
        _context_of(await read_body(request))
    except _BadRequest as e:
        return json_response({"errorCode": e.code, "errorDetails": e.detail}, status=400)
    decision = node.state().decision
    if decision is None:
        return _no_decision()
    stale = node.stale_for_s() is not None
    etag = _etag(decision, stale)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers=headers)
    flags = [
        _evaluation(key, value, decision, stale, node.agent_id) for key, value in flags_of(decision).items()
    ]
    return json_response({"flags": flags}, headers=headers)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/ofrep/v1/evaluate/flags", evaluate_flags)
    app.router.add_post("/ofrep/v1/evaluate/flags/{key}", evaluate_flag)
