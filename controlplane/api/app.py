"""The agent's HTTP server: aiohttp inside the agent's own event loop.

Every answer is JSON encoded by orjson. Errors are `{"error": code, "detail": text}`
with the status code of the `ControlplaneError` raised (400 bad request, 404 unknown,
409 unsafe or conflict, 503 no quorum). Unexpected exceptions become 500 with the
same shape and are logged; the traceback never reaches the client.
"""

from __future__ import annotations

import logging

from aiohttp import web

from controlplane.agent.node import Node
from controlplane.api import read
from controlplane.api.common import NODE, Handler, error_response, route_name
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
        response = error_response(e.status, e.reason, e.text or "")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = error_response(500, "internal error", "see the agent's log")
    node.metrics.api_requests.labels(route_name(request), request.method, str(response.status)).inc()
    return response


def create_app(node: Node) -> web.Application:
    app = web.Application(
        middlewares=[errors_and_metrics],
        client_max_size=node.settings.model.api.max_body_bytes,
    )
    app[NODE] = node
    read.add_routes(app)
    return app
