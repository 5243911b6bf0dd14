"""Read routes every agent serves from its locally applied, committed state.

An agent never serves a decision that was not committed. When it has lost quorum it
keeps serving the last committed decision (static stability) and says so with
`X-Controlplane-Stale: <seconds since quorum was lost>` and `"stale": true`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import formats
from controlplane.agent.node import Node
from controlplane.api.common import NODE, error_response, json_response
from controlplane.decide.verdicts import is_fresh
from controlplane.errors import NotFound, Rejected
from controlplane.model import Decision, decision_to_json, observation_to_json

log = logging.getLogger(__name__)


def position(decision: Decision) -> str:
    """Where a decision stands: `epoch.revision`, or the bare revision before epochs existed.

    The ETag and the SSE event id; a rebuilt cluster (new epoch) never matches an old one.
    """
    return f"{decision.epoch}.{decision.revision}" if decision.epoch else str(decision.revision)


def decision_headers(request: web.Request, decision: Decision) -> dict[str, str]:
    node = request.app[NODE]
    revision = decision.revision
    headers = {"X-Controlplane-Revision": str(revision), "ETag": f'"{position(decision)}"'}
    if decision.epoch:
        headers["X-Controlplane-Epoch"] = decision.epoch
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


def encoded_decision(request: web.Request, decision: Decision) -> tuple[bytes, bytes]:
    """The decision as JSON bytes and as an SSE event, encoded once per revision.

    Ten thousand waiters woken by one revision share the same bytes instead of each
    building and encoding its own copy (bench.watch: that was 10 % of the agent's time
    and most of its peak memory). Only a stale answer, whose age changes by the second,
    is encoded per request.
    """
    node = request.app[NODE]
    fresh = node.stale_for_s() is None
    cached = node.encoded
    if fresh and cached is not None and cached[0] == decision.revision:
        return cached[1], cached[2]
    data = orjson.dumps(decision_body(request, decision))
    event = b"id: %s\nevent: decision\ndata: %s\n\n" % (position(decision).encode(), data)
    if fresh:
        node.encoded = (decision.revision, data, event)
    return data, event


WAIT_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m)?$")
INDEX_RE = re.compile(r"^[0-9]{1,18}$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def parse_wait(text: str | None, default_s: float, max_s: float) -> float:
    """Consul's `wait`: `30s`, `500ms`, `2m` or plain seconds; capped at `max_s`."""
    if text is None:
        return min(default_s, max_s)
    match = WAIT_RE.match(text)
    if match is None:
        raise Rejected("bad wait", f"wait must look like 30s, 500ms or 2m (got {text!r})")
    return min(float(match.group(1)) * UNITS[match.group(2)], max_s)


EPOCH_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_index(text: str | None) -> int | None:
    if text is None:
        return None
    if INDEX_RE.match(text) is None:
        raise Rejected("bad index", f"index must be a revision number >= 0 (got {text!r})")
    return int(text)


def parse_epoch(text: str | None) -> str | None:
    if text is None:
        return None
    if EPOCH_RE.match(text) is None:
        raise Rejected("bad epoch", f"epoch must be the one a decision carries (got {text[:80]!r})")
    return text


def parse_position(text: str | None) -> tuple[str | None, int | None]:
    """An SSE `Last-Event-ID`: `epoch.revision` or a bare revision."""
    if text is None:
        return None, None
    epoch, dot, revision = text.rpartition(".")
    return (parse_epoch(epoch) if dot else None), parse_index(revision)


async def blocking_decision(request: web.Request) -> Decision | None:
    """The served decision; with `?index=N`, wait (bounded) until it passes N.

    With `&epoch=E` (the epoch of the caller's revision N), a decision of another epoch
    is answered at once: the cluster was rebuilt and its revisions started again. An
    agent that has lost quorum answers at once too (stale), and so does a waiting query
    the moment its agent loses quorum, so that the caller moves to an agent with quorum.
    Jitter up to 1/16 of the wait, as Consul does, so that many clients with the same
    wait do not all come back in the same instant.
    """
    node = request.app[NODE]
    index = parse_index(request.query.get("index"))
    epoch = parse_epoch(request.query.get("epoch"))
    max_wait = node.settings.model.api.max_wait_s
    wait_s = parse_wait(request.query.get("wait"), 30.0, max_wait)
    decision = node.state().decision
    if index is None or node.feed.stale():
        return decision
    if decision is not None and (
        decision.revision > index or (epoch is not None and decision.epoch != epoch)
    ):
        return decision
    wait_s = min(max_wait, wait_s + random.uniform(0, wait_s / 16))
    with node.watcher():
        return await node.feed.wait_past(index, wait_s, epoch=epoch, stale=False)


async def get_decision(request: web.Request) -> web.StreamResponse:
    decision = await blocking_decision(request)
    if decision is None:
        return error_response(503, "no decision yet", "the cluster has not committed a decision yet")
    headers = decision_headers(request, decision)
    if request.headers.get("If-None-Match") == headers["ETag"] and "index" not in request.query:
        return web.Response(status=304, headers=headers)
    body, _ = encoded_decision(request, decision)
    return web.Response(body=body, content_type="application/json", headers=headers)


def cluster_body(request: web.Request) -> dict[str, Any]:
    node = request.app[NODE]
    status = node.status()
    state = node.state()
    stale = node.stale_for_s()
    return {
        "cluster": node.settings.cluster.name,
        "agent": node.agent_id,
        "backend": status.backend,
        # Without quorum this agent cannot know who leads now; say what it last knew.
        "leader": status.leader if status.has_quorum else None,
        "last_known_leader": status.leader,
        "is_leader": status.is_leader,
        "term": status.term,
        "commit_index": status.commit_index,
        "has_quorum": status.has_quorum,
        "stale_s": None if stale is None else round(stale, 1),
        "problems": list(status.problems),
        "cluster_time": node.cluster_now(),
        "clock_skew_s": None if status.clock_skew_s is None else round(status.clock_skew_s, 3),
        "epoch": state.epoch,
        "revision": state.decision.revision if state.decision else None,
        # The same on every agent unless a configuration change is half rolled out.
        "config_hash": node.settings.config_hash,
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
        problems.extend(status.problems)
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
    now = node.cluster_now_or_wall()
    policy = node.settings.policy
    out = []
    for o in sorted(node.state().observations.values(), key=lambda o: (o.service, o.region, o.observer)):
        item = observation_to_json(o)
        item["age_s"] = round(now - o.at, 3)
        item["fresh"] = is_fresh(o, policy, now)
        out.append(item)
    return json_response({"observations": out, "ttl_s": policy.observation_ttl_s})


async def get_features(request: web.Request) -> web.StreamResponse:
    """Feature switches for application kill switches; blocking with `?index=` too."""
    decision = await blocking_decision(request)
    if decision is None:
        return error_response(503, "no decision yet", "the cluster has not committed a decision yet")
    node = request.app[NODE]
    body = {
        "revision": decision.revision,
        "features": dict(decision.features),
        "shed_fraction": decision.shed_fraction,
        "stale": node.stale_for_s() is not None,
    }
    return json_response(body, headers=decision_headers(request, decision))


HEARTBEAT_S = 15.0
SSE_WRITE_TIMEOUT_S = 10.0


async def watch(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one `decision` event per new revision, heartbeats between.

    Resumes after `Last-Event-ID` (or `?index=`); without either the current decision
    is sent first. A client that stops reading is dropped after a bounded write wait.
    """
    node = request.app[NODE]
    epoch, last = parse_position(request.headers.get("Last-Event-ID") or request.query.get("index"))
    epoch = parse_epoch(request.query.get("epoch")) or epoch
    after = -1 if last is None else last
    stale = False  # what the stream last said; the current state is sent first
    with node.watcher():
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        while True:
            decision = await node.feed.wait_past(after, HEARTBEAT_S, epoch=epoch, stale=stale)
            now_stale = node.feed.stale()
            if decision is not None and (decision.revision > after or decision.epoch != (epoch or "")):
                _, chunk = encoded_decision(request, decision)
                after, epoch, stale = decision.revision, decision.epoch, now_stale
            elif now_stale != stale:
                # No new revision, but the agent lost (or regained) quorum: say so now.
                chunk = staleness_event(request, decision, now_stale)
                stale = now_stale
            else:
                chunk = b": heartbeat\n\n"
            try:
                async with asyncio.timeout(SSE_WRITE_TIMEOUT_S) as bound:
                    await response.write(chunk)
            except TimeoutError:
                if not bound.expired():
                    raise
                # One line that says what happened, not a failed request's traceback.
                log.warning(
                    "dropped a watch stream from %s: it stopped reading (%.0f s without taking %d bytes)",
                    request.remote,
                    SSE_WRITE_TIMEOUT_S,
                    len(chunk),
                )
                if request.transport is not None:
                    request.transport.abort()
                return response


def staleness_event(request: web.Request, decision: Decision | None, stale: bool) -> bytes:
    """An SSE `stale` (or `fresh`) event: this agent lost (or regained) quorum."""
    node = request.app[NODE]
    stale_s = node.stale_for_s()
    data = orjson.dumps(
        {
            "stale": stale,
            "stale_s": None if stale_s is None else round(stale_s, 1),
            "revision": decision.revision if decision else None,
            "epoch": decision.epoch if decision else None,
            "served_by": node.agent_id,
        }
    )
    return b"event: %s\ndata: %s\n\n" % (b"stale" if stale else b"fresh", data)


FORMATS = ("json", "haproxy", "nginx", "envoy")


async def get_weights(request: web.Request) -> web.StreamResponse:
    """One service's weights, as JSON or rendered for a load balancer."""
    node = request.app[NODE]
    service = request.match_info["service"]
    if service not in node.settings.policy.services:
        known = ", ".join(node.settings.policy.services)
        raise NotFound(f"unknown service {service!r}", f"known services: {known}")
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise Rejected("bad format", f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    decision = await blocking_decision(request)
    if decision is None:
        return error_response(503, "no decision yet", "the cluster has not committed a decision yet")
    headers = decision_headers(request, decision)
    placements = decision.services.get(service, {})
    if fmt == "json":
        body = {
            "service": service,
            "revision": decision.revision,
            "weights": {r: p.weight for r, p in placements.items()},
            "states": {r: str(p.state) for r, p in placements.items()},
            "stale": node.stale_for_s() is not None,
        }
        return json_response(body, headers=headers)
    addresses = service_addresses(node, service)
    if fmt == "envoy":
        return json_response(formats.envoy_cla(decision, service, addresses), headers=headers)
    text = (
        formats.haproxy_commands(decision, service, {r: (service, r) for r in addresses})
        if fmt == "haproxy"
        else formats.nginx_upstream(decision, service, addresses)
    )
    return web.Response(text=text, content_type="text/plain", headers=headers)


def service_addresses(node: Node, service: str) -> dict[str, str]:
    """Data-plane address (host:port) of `service` in each region that runs it."""
    out = {}
    for region, rc in node.settings.regions.items():
        sc = rc.services.get(service)
        if sc is not None:
            out[region] = sc.data_address()
    return out


async def get_regions(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    decision = node.state().decision
    regions = []
    for spec in node.settings.policy.regions:
        rc = node.settings.regions[spec.name]
        services = {}
        for service, sc in rc.services.items():
            p = decision.services.get(service, {}).get(spec.name) if decision else None
            services[service] = {
                "capacity_rps": spec.capacity_rps[service],
                "base_weight": spec.base_weight[service],
                "address": sc.data_address(),
                "targets": [t.describe() for t in sc.targets],
                "weight": p.weight if p else None,
                "state": str(p.state) if p else None,
                "verdict": str(p.verdict) if p else None,
            }
        agents = [a.id for a in node.settings.cluster.agents if a.region == spec.name]
        regions.append({"name": spec.name, "agents": agents, "services": services})
    demand = dict(node.settings.policy.demand_rps)
    return json_response({"regions": regions, "demand_rps": demand})


async def get_history(request: web.Request) -> web.StreamResponse:
    """Decisions and intents, newest first, `limit` at a time; `before` pages back."""
    node = request.app[NODE]
    page_max = node.settings.model.api.history_page_max
    try:
        limit = int(request.query.get("limit", "50"))
        before = float(request.query["before"]) if "before" in request.query else None
    except ValueError:
        raise Rejected("bad paging", "limit must be an integer and before a Unix time") from None
    if not 1 <= limit <= page_max:
        raise Rejected("bad paging", f"limit must be between 1 and {page_max} (got {limit})")
    history = node.state().history
    newest_first = [e for e in reversed(history) if before is None or e.at < before]
    page = newest_first[:limit]
    more = len(newest_first) > limit
    body = {
        "entries": [
            {
                "kind": e.kind,
                "at": e.at,
                "revision": e.revision,
                "summary": e.summary,
                "intent_id": e.intent_id,
                "who": e.who,
                "weights": e.weights,
            }
            for e in page
        ],
        "next_before": page[-1].at if more and page else None,
        "total": len(history),
    }
    return json_response(body)


async def get_metrics(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    node.metrics.observe_status(node.status())
    decision = node.state().decision
    if decision is not None:
        node.metrics.observe_decision(decision)
    payload = generate_latest(node.metrics.registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/features", get_features)
    app.router.add_get("/v1/watch", watch)
    app.router.add_get("/v1/weights/{service}", get_weights)
    app.router.add_get("/v1/regions", get_regions)
    app.router.add_get("/v1/history", get_history)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/v1/observations", get_observations)
    app.router.add_get("/v1/decision", get_decision)
    app.router.add_get("/v1/cluster", get_cluster)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
