"""Read routes every agent serves from its locally applied, committed state.

An agent never serves a decision that was not committed. When it has lost quorum it
keeps serving the last committed decision (static stability) and says so with
`X-Controlplane-Stale: <seconds since quorum was lost>` and `"stale": true`.
"""

from __future__ import annotations

import random
from typing import Any

from aiohttp import web

from controlplane.api.common import NODE, error_response, json_response
from controlplane.decide.verdicts import is_fresh
from controlplane.errors import Rejected
from controlplane.model import Decision, decision_to_json, observation_to_json


def decision_headers(request: web.Request, revision: int) -> dict[str, str]:
    node = request.app[NODE]
    headers = {"X-Controlplane-Revision": str(revision), "ETag": f'"{revision}"'}
    stale = node.stale_for_s()
    if stale is not None:
        headers["X-Controlplane-Stale"] = f"{stale:.1f}"
    return headers


def decision_body(request: web.Request, decision: Decision) -> dict[str, Any]:
    node = request.app[NODE]
    body = decision_to_json(decision)
    stale = node.stale_for_s()
    body["stale"] = stale is not None
    if stale is not None:
        body["stale_s"] = round(stale, 1)
    body["served_by"] = node.agent_id
    return body


def parse_wait(text: str | None, default_s: float, max_s: float) -> float:
    """Consul's `wait`: `30s`, `500ms`, `2m` or plain seconds; capped at `max_s`."""
    if text is None or text == "":
        return min(default_s, max_s)
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = text, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise Rejected("bad wait", f"wait must look like 30s, 500ms or 2m (got {text!r})") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise Rejected("bad wait", f"wait must be a finite duration >= 0 (got {text!r})")
    return min(seconds, max_s)


def parse_index(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        index = int(text)
    except ValueError:
        raise Rejected("bad index", f"index must be a revision number (got {text!r})") from None
    if index < 0:
        raise Rejected("bad index", f"index must be >= 0 (got {index})")
    return index


async def blocking_decision(request: web.Request) -> Decision | None:
    """The served decision; with `?index=N`, wait (bounded) until it passes N.

    Jitter up to 1/16 of the wait, as Consul does, so that many clients with the same
    wait do not all come back in the same instant.
    """
    node = request.app[NODE]
    index = parse_index(request.query.get("index"))
    max_wait = node.settings.model.api.max_wait_s
    wait_s = parse_wait(request.query.get("wait"), 30.0, max_wait)
    decision = node.state().decision
    if index is None or (decision is not None and decision.revision > index):
        return decision
    wait_s = min(max_wait, wait_s + random.uniform(0, wait_s / 16))
    with node.watcher():
        return await node.feed.wait_past(index, wait_s)


async def get_decision(request: web.Request) -> web.StreamResponse:
    decision = await blocking_decision(request)
    if decision is None:
        return error_response(503, "no decision yet", "the cluster has not committed a decision yet")
    headers = decision_headers(request, decision.revision)
    if request.headers.get("If-None-Match") == headers["ETag"] and "index" not in request.query:
        return web.Response(status=304, headers=headers)
    return json_response(decision_body(request, decision), headers=headers)


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
