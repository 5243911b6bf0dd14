"""Pieces every route module shares: the node key, JSON answers, route names."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from controlplane.agent.node import Node
from controlplane.errors import Rejected

NODE: web.AppKey[Node] = web.AppKey("node", Node)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, error: str, detail: str = "", headers: dict[str, str] | None = None, code: str = ""
) -> web.Response:
    body = {"error": error, "detail": detail}
    if code:
        body["code"] = code
    return json_response(body, status=status, headers=headers)


def route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


# Set on a request whose connection must close after the answer.
CLOSE_AFTER = "controlplane.close_after"


async def read_body(request: web.Request) -> bytes:
    """The request body, bounded in size (client_max_size, 413 past it) and in time.

    A body that trickles in must not hold a connection and a handler: past
    `api.body_timeout_s` the request is refused with 400.
    """
    timeout_s = request.app[NODE].settings.model.api.body_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except TimeoutError:
        request[CLOSE_AFTER] = True  # the rest of the body may still come: do not read it
        raise Rejected("body too slow", f"the request body did not arrive within {timeout_s:g} s") from None
