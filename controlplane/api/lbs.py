"""Load balancer reports: `POST /v1/lbs/{name}` from the adapters, `GET /v1/lbs` for everyone.

An adapter reports to every agent it follows, so each agent holds every report itself
(`Node.lbs`, in memory, not replicated) and a report never waits on consensus. A report
needs a token of scope `lb` (or above); a body that is not exactly the documented shape
is refused with 400 and changes nothing, one past `api.max_body_bytes` with 413, and a
new name past the registry's bound with 429 (see `controlplane.lbreports`).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from controlplane.access import Scope
from controlplane.api.auth import require
from controlplane.api.common import NODE, json_response
from controlplane.api.schemas import LbReportBody
from controlplane.api.write import read_json, validation_problem
from controlplane.errors import Rejected
from controlplane.lbreports import LbReport, valid_name


async def post_lb(request: web.Request) -> web.StreamResponse:
    require(request, Scope.LB)
    node = request.app[NODE]
    name = request.match_info["name"]
    if not valid_name(name):
        raise Rejected(
            "bad load balancer name",
            f"a name is 1-64 characters of letters, digits and ._@- (got {name[:80]!r})",
        )
    data = await read_json(request)
    try:
        body = LbReportBody.model_validate(data)
    except ValidationError as e:
        raise validation_problem(e) from None
    report = LbReport(
        adapter=body.adapter,
        applied_revision=body.applied_revision,
        applied_epoch=body.applied_epoch,
        applied_at=body.applied_at,
        desired_revision=body.desired_revision,
        ok=body.ok,
        error=body.error,
        heartbeat_s=body.heartbeat_s,
    )
    now = node.clock()
    entry = node.lbs.put(name, report, now)
    return json_response(entry.view(node.lb_current(), now).to_json())


async def get_lbs(request: web.Request) -> web.StreamResponse:
    require(request, Scope.READ)
    node = request.app[NODE]
    return json_response(
        {
            "revision": node.lb_current().revision,
            "lbs": [view.to_json() for view in node.lb_views()],
            "limit": node.lbs.limit,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/lbs", get_lbs)
    app.router.add_post("/v1/lbs/{name}", post_lb)
