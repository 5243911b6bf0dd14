"""Drill results: `POST /v1/drills` records one through consensus, `GET /v1/drills` lists them.

When a drill ends, `cpctl drill` measures its stages and the RTO and records the result
here, so that it is kept in the replicated state (the newest `DRILLS_LIMIT`) by every
agent: `cpctl drill history` reads it back from any of them, and `/metrics` derives the
last drill's RTO and time from it.

Recording needs scope `operate` (whoever may run a drill may record its result). The
record's `who` is the name of the token that sent it, `recorded_at` the store's stamp:
neither is taken from the body. A bad body is refused (400, or 404 for a region or
service that is not configured) and records nothing. The id is the drill intent's id: a
retry with the same id records nothing new and is answered 200 with the stored record;
a new record is answered 201. Committing goes through the store from any agent (a Raft
follower forwards it to the leader; without quorum it fails with 503).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from controlplane.access import Scope
from controlplane.api.auth import audit, require
from controlplane.api.common import NODE, json_response
from controlplane.api.schemas import DrillRecordBody
from controlplane.api.write import read_json, validation_problem
from controlplane.errors import NotFound, Rejected
from controlplane.model import Policy
from controlplane.state import DRILLS_LIMIT, DrillRecord, drill_to_json
from controlplane.transitions import drill_summary, known_drill


def parse_drill(data: Any, who: str) -> DrillRecord:
    """The record a body asks for, on behalf of `who` (the token's name); `Rejected` if bad."""
    if not isinstance(data, dict):
        raise Rejected("invalid request", "body must be a JSON object: a drill's result")
    try:
        body = DrillRecordBody.model_validate(data)
    except ValidationError as e:
        raise validation_problem(e) from None
    return DrillRecord(
        id=body.id,
        region=body.region,
        service=body.service,
        who=who,
        started_at=body.started_at,
        ended_at=body.ended_at,
        objective_s=body.objective_s,
        rto_s=body.rto_s,
        passed=body.passed,
        stages=dict(body.stages),
        late_lbs=tuple(body.late_lbs),
        summary=body.summary,
    )


def check_drill_names(policy: Policy, record: DrillRecord) -> None:
    """`NotFound` for a region or service that is not configured; `Rejected` for a pair not run."""
    regions = {r.name for r in policy.regions}
    problems = []
    if record.region not in regions:
        problems.append(f"region: unknown region {record.region!r} (known: {', '.join(sorted(regions))})")
    if record.service is not None and record.service not in policy.services:
        problems.append(f"service: unknown service {record.service!r} (known: {', '.join(policy.services)})")
    if problems:
        raise NotFound("unknown name", "; ".join(problems))
    if record.service is not None and record.region not in {
        r.name for r in policy.regions_of(record.service)
    }:
        raise Rejected("invalid request", f"region: {record.region} does not run {record.service}")


async def post_drill(request: web.Request) -> web.StreamResponse:
    principal = require(request, Scope.OPERATE)
    node = request.app[NODE]
    record = parse_drill(await read_json(request), principal.name)
    check_drill_names(node.settings.policy, record)
    # Already shown here: a retry; the committed record is the answer, nothing is written.
    known = known_drill(node.state(), record.id)
    if known is not None:
        return json_response(drill_to_json(known), status=200)
    stored = await node.store.record_drill(record)
    audit(
        request,
        principal,
        f"record {drill_summary(stored)}",
        stored.summary or "drill ended",
        None,
        drill=stored.id,
    )
    return json_response(drill_to_json(stored), status=201)


async def list_drills(request: web.Request) -> web.StreamResponse:
    """The drills this cluster keeps, newest (by end time) first, `limit` of them."""
    require(request, Scope.READ)
    text = request.query.get("limit", str(DRILLS_LIMIT))
    limit = int(text) if text.isdigit() and len(text) <= 4 else 0
    if not 1 <= limit <= DRILLS_LIMIT:
        raise Rejected("bad limit", f"limit must be between 1 and {DRILLS_LIMIT} (got {text[:20]!r})")
    drills = request.app[NODE].state().drills
    # By end time; drills that ended at the same time, the last recorded first.
    newest_first = [
        d for _, d in sorted(enumerate(drills), key=lambda p: (p[1].ended_at, p[0]), reverse=True)
    ]
    body = {
        "drills": [drill_to_json(d) for d in newest_first[:limit]],
        "limit": limit,
        "total": len(drills),
    }
    return json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/drills", list_drills)
    app.router.add_post("/v1/drills", post_drill)
