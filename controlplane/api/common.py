"""Pieces every route module shares: the node key, JSON answers, route names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from controlplane.agent.node import Node

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
