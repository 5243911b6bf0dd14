"""Read routes every agent serves from its locally applied, committed state.

An agent never serves a decision that was not committed. When it has lost quorum it
keeps serving the last committed decision (static stability) and says so with
`X-Controlplane-Stale: <seconds since quorum was lost>` and `"stale": true`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controlplane.api.common import NODE, error_response, json_response
from controlplane.decide.verdicts import is_fresh
from controlplane.model import decision_to_json, observation_to_json


def decision_headers(request: web.Request, revision: int) -> dict[str, str]:
    node = request.app[NODE]
    headers = {"X-Controlplane-Revision": str(revision), "ETag": f'"{revision}"'}
    stale = node.stale_for_s()
    if stale is not None:
        headers["X-Controlplane-Stale"] = f"{stale:.1f}"
    return headers


def decision_body(request: web.Request) -> tuple[dict[str, Any], int] | None:
    node = request.app[NODE]
    decision = node.state().decision
    if decision is None:
        return None
    body = decision_to_json(decision)
    stale = node.stale_for_s()
    body["stale"] = stale is not None
    if stale is not None:
        body["stale_s"] = round(stale, 1)
    body["served_by"] = node.agent_id
    return body, decision.revision


async def get_decision(request: web.Request) -> web.StreamResponse:
    found = decision_body(request)
    if found is None:
        return error_response(503, "no decision yet", "the cluster has not committed a decision yet")
    body, revision = found
    return json_response(body, headers=decision_headers(request, revision))


def cluster_body(request: web.Request) -> dict[str, Any]:
    node = request.app[NODE]
    status = node.status()
    state = node.state()
    stale = node.stale_for_s()
    return {
        "cluster": node.settings.cluster.name,
        "agent": node.agent_id,
        "backend": status.backend,
        "leader": status.leader,
        "is_leader": status.is_leader,
        "term": status.term,
        "commit_index": status.commit_index,
        "has_quorum": status.has_quorum,
        "stale_s": None if stale is None else round(stale, 1),
        "revision": state.decision.revision if state.decision else None,
        "members": [
            {
                "id": m.id,
                "address": m.address,
                "http": node.http_address_of(m.id),
                "connected": m.connected,
                "leader": m.id == status.leader,
            }
            for m in status.members
        ],
    }


async def get_cluster(request: web.Request) -> web.StreamResponse:
    return json_response(cluster_body(request))


async def healthz(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    return json_response(
        {"status": "ok", "agent": node.agent_id, "uptime_s": round(node.clock() - node.started_at, 1)}
    )


async def readyz(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    status = node.status()
    decision = node.state().decision
    problems = []
    if not status.has_quorum:
        problems.append("no quorum")
    if decision is None:
        problems.append("no committed decision")
    body = {
        "ready": not problems,
        "agent": node.agent_id,
        "problems": problems,
        "revision": decision.revision if decision else None,
    }
    return json_response(body, status=200 if not problems else 503)


async def get_observations(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    now = node.clock()
    policy = node.settings.policy
    out = []
    for o in sorted(node.state().observations.values(), key=lambda o: (o.service, o.region, o.observer)):
        item = observation_to_json(o)
        item["age_s"] = round(now - o.at, 3)
        item["fresh"] = is_fresh(o, policy, now)
        out.append(item)
    return json_response({"observations": out, "ttl_s": policy.observation_ttl_s})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/observations", get_observations)
    app.router.add_get("/v1/decision", get_decision)
    app.router.add_get("/v1/cluster", get_cluster)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
