"""Write routes: operator intents and what-if plans (and `whoami`, which a client asks first).

A write is checked on the agent that receives it, against its view of the committed
state: the body (shape, kinds, sizes), the names (regions, services, features), and the
safety rules (a plan is computed with the intent; draining the last serving region is
refused with 409). Only then is it submitted to the store, which commits it through
consensus from any member (a Raft follower forwards it to the leader; without quorum it
fails with 503 and nothing changes). The answer waits, bounded, for the decision
revision that carries the intent, so the caller knows when the change is in force.

A plan may also suppose standing intents removed (`remove`), so that a removal can be
shown before it is confirmed, like any other change.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from controlplane.access import Principal, Scope
from controlplane.agent.node import Node
from controlplane.api.auth import audit, require
from controlplane.api.common import NODE, json_response, read_body
from controlplane.api.read import decision_body
from controlplane.api.schemas import (
    DeleteIntentBody,
    DrainBody,
    DrillBody,
    FailoverBody,
    FeatureBody,
    IntentRequest,
    OverrideBody,
    PlanBody,
    UndrainBody,
)
from controlplane.errors import NotFound, Rejected, Unsafe
from controlplane.intents import apply_intent
from controlplane.model import Intent, IntentKind, intent_to_json
from controlplane.plan import changes, check_names, check_safe, plan
from controlplane.state import ControlState

COMMIT_WAIT_S = 5.0


async def read_json(request: web.Request) -> Any:
    if request.content_length is None and request.body_exists is False:
        raise Rejected("missing body", "send a JSON object")
    raw = await read_body(request)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Rejected("body is not JSON", str(e)) from None


def validation_problem(e: ValidationError, drop: int = 0) -> Rejected:
    problems = []
    for err in e.errors(include_url=False):
        loc = [
            str(p)
            for p in err["loc"][drop:]
            if not (
                isinstance(p, str)
                and p
                in {"drain", "undrain", "failover", "override", "feature", "freeze", "unfreeze", "drill"}
            )
        ]
        where = ".".join(loc) or "body"
        problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return Rejected("invalid request", "; ".join(problems))


def to_intent(body: Any, who: str, now: float) -> Intent:
    """The intent a body asks for, on behalf of `who` (the token's name, never the body's)."""
    fields: dict[str, Any] = {}
    if isinstance(body, DrainBody | UndrainBody | DrillBody):
        fields = {"region": body.region, "service": body.service}
    elif isinstance(body, FailoverBody):
        fields = {"from_region": body.from_region, "to_region": body.to_region, "service": body.service}
    elif isinstance(body, OverrideBody):
        fields = {"service": body.service, "weights": dict(body.weights)}
    elif isinstance(body, FeatureBody):
        fields = {"feature": body.name, "enabled": body.enabled}
    return Intent(
        id=getattr(body, "id", None) or uuid.uuid4().hex[:16],
        kind=IntentKind(body.kind),
        reason=body.reason,
        who=who,
        created_at=now,
        expires_at=None if getattr(body, "for_s", None) is None else now + body.for_s,
        **fields,
    )


# Intents that stop or restart automation need scope admin; the rest scope operate.
ADMIN_KINDS = frozenset({IntentKind.FREEZE, IntentKind.UNFREEZE})


def needed_scope(kind: IntentKind) -> Scope:
    return Scope.ADMIN if kind in ADMIN_KINDS else Scope.OPERATE


def parse_intent(data: Any, who: str, now: float) -> Intent:
    if not isinstance(data, dict):
        raise Rejected("invalid request", "body must be a JSON object with a kind")
    try:
        parsed = IntentRequest.model_validate({"body": data})
    except ValidationError as e:
        raise validation_problem(e, drop=1) from None
    return to_intent(parsed.body, who, now)


async def post_intent(request: web.Request) -> web.StreamResponse:
    principal = require(request, Scope.OPERATE)
    node = request.app[NODE]
    now = node.cluster_now_or_wall()
    data = await read_json(request)
    intent = parse_intent(data, principal.name, now)
    require(request, needed_scope(intent.kind))
    policy = node.settings.policy
    check_names(policy, intent)
    state = node.state()
    if not already_applied(state, intent.id):
        apply_intent(state.intents, intent)  # Rejected (nothing to undrain, ...) changes nothing
        check_safe(policy, state, intent, now, node.stale_for_s())
    committed = await node.store.submit_intent(intent)
    revision = await revision_carrying(node, committed.seq)
    audit(
        request,
        principal,
        f"intent {intent.describe()}",
        intent.reason,
        revision,
        intent=committed.id,
        claimed=_claimed(data),
    )
    body: dict[str, Any] = {
        "id": committed.id,
        "seq": committed.seq,
        "revision": revision,
        "who": principal.name,
        "created_at": committed.created_at,
    }
    if revision is None:
        body["detail"] = "committed; the decision carrying it is not served here yet"
    return json_response(body, status=201 if revision is not None else 202)


def already_applied(state: ControlState, intent_id: str) -> bool:
    """A retry of an intent that was committed: the store returns the committed one."""
    return intent_id in state.intents or any(e.intent_id == intent_id for e in state.history)


async def revision_carrying(node: Node, seq: int) -> int | None:
    """The first served revision that took intent `seq` into account (bounded wait)."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    while True:
        decision = node.state().decision
        if decision is not None and decision.intent_seq >= seq:
            return decision.revision
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        await node.feed.wait_past(decision.revision if decision else -1, remaining)


def _claimed(data: Any) -> str | None:
    """A `who` the body claims: noted in the audit line, never recorded as who."""
    claimed = data.get("who") if isinstance(data, dict) else None
    return claimed if isinstance(claimed, str) else None


async def delete_intent(request: web.Request) -> web.StreamResponse:
    principal = require(request, Scope.OPERATE)
    node = request.app[NODE]
    intent_id = request.match_info["intent_id"]
    data: Any = {}
    if request.can_read_body:
        data = await read_json(request)
    data = {**dict(request.query), **(data if isinstance(data, dict) else {})}
    data.setdefault("reason", "removed via API")
    try:
        parsed = DeleteIntentBody.model_validate(data)
    except ValidationError as e:
        raise validation_problem(e) from None
    standing = node.state().intents.get(intent_id)
    if standing is not None:
        require(request, needed_scope(standing.kind))
    removed = await node.store.delete_intent(intent_id, principal.name, parsed.reason)
    revision = await revision_carrying(node, node.state().intent_seq)
    audit(
        request,
        principal,
        f"remove intent {removed.describe()}",
        parsed.reason,
        revision,
        intent=intent_id,
        claimed=parsed.who,
    )
    return json_response({"removed": intent_to_json(removed), "revision": revision})


async def whoami(request: web.Request) -> web.StreamResponse:
    """Read-only: lets a client check a token's scope before it asks a person to confirm a write."""
    principal = require(request, Scope.READ)
    return json_response({"name": principal.name, "scope": str(principal.scope)})


async def list_intents(request: web.Request) -> web.StreamResponse:
    require(request, Scope.READ)
    state = request.app[NODE].state()
    ordered = sorted(state.intents.values(), key=lambda i: i.seq)
    return json_response({"intents": [intent_to_json(i) for i in ordered], "intent_seq": state.intent_seq})


async def post_plan(request: web.Request) -> web.StreamResponse:
    principal: Principal = require(request, Scope.READ)
    node = request.app[NODE]
    data = await read_json(request)
    try:
        parsed = PlanBody.model_validate(data)
    except ValidationError as e:
        raise validation_problem(e) from None
    now = node.cluster_now_or_wall()
    policy = node.settings.policy
    unknown = sorted(set(parsed.fail) - {r.name for r in policy.regions})
    if unknown:
        raise Rejected("unknown region", f"fail names {', '.join(unknown)}, which are not configured")
    intents = [to_intent(b, principal.name, now) for b in parsed.intents]
    for intent in intents:
        check_names(policy, intent)
    state = node.state()
    missing = sorted(set(parsed.remove) - set(state.intents))
    if missing:
        raise NotFound("no such standing intent", f"remove names {', '.join(missing)}, which do not stand")
    if parsed.remove:
        # Planned as if `DELETE /v1/intents/{id}` had removed them first.
        kept = {k: v for k, v in state.intents.items() if k not in parsed.remove}
        state = replace(state, intents=kept)
    refusals = []
    so_far = state
    for intent in intents:
        # Each intent is judged as if the ones before it were committed.
        try:
            check_safe(policy, so_far, intent, now, node.stale_for_s())
        except Unsafe as e:
            refusals.append(f"{intent.describe()}: {e.message}: {e.detail}")
        seq = so_far.intent_seq + 1
        so_far = replace(
            so_far, intents=apply_intent(so_far.intents, replace(intent, seq=seq)), intent_seq=seq
        )
    result = plan(policy, state, now, fail=parsed.fail, intents=intents)
    body = decision_body(request, result)
    body["changes"] = changes(state.decision, result)
    body["refusals"] = refusals
    body["committed"] = False
    return json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/intents", list_intents)
    app.router.add_post("/v1/intents", post_intent)
    app.router.add_delete("/v1/intents/{intent_id}", delete_intent)
    app.router.add_post("/v1/plan", post_plan)
    app.router.add_get("/v1/whoami", whoami)
