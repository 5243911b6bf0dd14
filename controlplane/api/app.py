"""The agent's HTTP server: aiohttp inside the agent's own event loop.

Every answer is JSON encoded by orjson. Errors are `{"error": code, "detail": text}`
with the status code of the `ControlplaneError` raised (400 bad request, 404 unknown,
409 unsafe or conflict, 503 no quorum). Unexpected exceptions become 500 with the
same shape and are logged; the traceback never reaches the client.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from aiohttp import web

from controlplane.access import Scope
from controlplane.agent.node import Node
from controlplane.api import drills, lbs, ofrep, read, ui, write
from controlplane.api.auth import require
from controlplane.api.common import CLOSE_AFTER, NODE, Handler, error_response, json_response, route_name
from controlplane.errors import ControlplaneError

log = logging.getLogger(__name__)


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    try:
        response = await handler(request)
    except ControlplaneError as e:
        response = error_response(e.http_status, e.message, e.detail, code=e.code)
        if e.http_status >= 500:
            log.warning("%s %s: %s", request.method, request.path, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        response = error_response(e.status, e.reason, e.text or "", headers=allow)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = error_response(500, "internal error", "see the agent's log")
    if request.get(CLOSE_AFTER):
        response.force_close()
    node.metrics.api_requests.labels(route_name(request), request.method, str(response.status)).inc()
    return response


@web.middleware
async def read_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in ("GET", "HEAD"):
        require(request, Scope.READ)
    return await handler(request)


async def get_openapi(request: web.Request) -> web.StreamResponse:
    return json_response(openapi_document())


@functools.cache
def openapi_document() -> dict[str, Any]:
    """Built on first request, not at start: nothing but this route needs it, and the
    response models' JSON schemas cost an idle agent memory it would hold for nothing."""
    from controlplane.api import openapi

    return openapi.build()


def create_app(node: Node) -> web.Application:
    app = web.Application(
        middlewares=[errors_and_metrics, read_auth],
        client_max_size=node.settings.model.api.max_body_bytes,
    )
    app[NODE] = node
    read.add_routes(app)
    write.add_routes(app)
    lbs.add_routes(app)
    drills.add_routes(app)
    ui.add_routes(app)
    ofrep.add_routes(app)
    app.router.add_get("/openapi.json", get_openapi)
    return app
