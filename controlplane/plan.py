"""What an operator's request would do, before anything is committed.

Pure functions on top of `decide()`: check that an intent names things that exist,
compute the decision that would follow from an intent or from regions failing (the
what-if plan behind `POST /v1/plan` and `cpctl plan`), and refuse an intent that would
break a safety rule (draining the last serving region). The API calls these on the
agent that receives the request; `decide()` itself is the backstop on the leader, so a
race between two operators still cannot black-hole a service.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from controlplane.decide import decide
from controlplane.decide.verdicts import is_fresh
from controlplane.errors import NotFound, Rejected, Unsafe
from controlplane.intents import active, apply_intent
from controlplane.model import Decision, Intent, IntentKind, Observation, Policy, State
from controlplane.state import ControlState


def check_names(policy: Policy, intent: Intent) -> None:
    """`NotFound` when the intent names a region, service or feature that is not configured."""
    regions = {r.name for r in policy.regions}
    features = {f.name for f in policy.features}
    problems = []
    for field_name, value in (
        ("region", intent.region),
        ("from", intent.from_region),
        ("to", intent.to_region),
    ):
        if value is not None and value not in regions:
            problems.append(f"{field_name}: unknown region {value!r} (known: {', '.join(sorted(regions))})")
    if intent.service is not None and intent.service not in policy.services:
        problems.append(f"service: unknown service {intent.service!r} (known: {', '.join(policy.services)})")
    if intent.feature is not None and intent.feature not in features:
        problems.append(
            f"name: unknown feature {intent.feature!r} (known: {', '.join(sorted(features)) or 'none'})"
        )
    if problems:
        raise NotFound("unknown name", "; ".join(problems))
    if intent.kind == IntentKind.FAILOVER:
        if intent.from_region == intent.to_region:
            raise Rejected("bad failover", "from and to must be different regions")
        services = [intent.service] if intent.service else list(policy.services)
        for service in services:
            running = {r.name for r in policy.regions_of(service)}
            for region in (intent.from_region, intent.to_region):
                if region not in running and intent.service is not None:
                    raise Rejected("bad failover", f"{region} does not run {service}")
    if intent.kind == IntentKind.OVERRIDE:
        assert intent.service is not None
        running = {r.name for r in policy.regions_of(intent.service)}
        weights = intent.weights or {}
        extra = sorted(set(weights) - running)
        if extra:
            raise Rejected("bad override", f"{', '.join(extra)} do(es) not run {intent.service}")
        if sum(weights.values()) != 100:
            raise Rejected("bad override", f"weights must sum to 100 (got {sum(weights.values())})")


def failed_observations(
    policy: Policy, state: ControlState, fail: Iterable[str], now: float
) -> list[Observation]:
    """The current fresh observations, with every live observer seeing `fail` regions down."""
    failing = set(fail)
    fresh = [o for o in state.observations.values() if is_fresh(o, policy, now)]
    observers = sorted({o.observer for o in fresh}) or ["plan"]
    kept = [replace(o, at=now) for o in fresh if o.region not in failing]
    for region in policy.regions:
        if region.name not in failing:
            continue
        for service in region.capacity_rps:
            kept.extend(
                Observation(
                    observer=o, region=region.name, service=service, up=False, at=now, error="planned failure"
                )
                for o in observers
            )
    return kept


def plan(
    policy: Policy,
    state: ControlState,
    now: float,
    *,
    fail: Iterable[str] = (),
    intents: Iterable[Intent] = (),
) -> Decision:
    """The decision that would follow if `fail` regions went down and `intents` were committed.

    Raises `Rejected` when an intent could not be applied (for example an undrain of a
    region that is not drained). Commits nothing.
    """
    standing: Mapping[str, Intent] = active(state.intents, now)
    seq = state.intent_seq
    for intent in intents:
        seq += 1
        standing = apply_intent(standing, replace(intent, seq=seq))
    observations = failed_observations(policy, state, fail, now)
    return decide(policy, observations, standing, state.decision, now, intent_seq=seq)


def drill_refusal(
    policy: Policy, state: ControlState, intent: Intent, now: float, stale_s: float | None
) -> str | None:
    """Why a drill may not start now, in one line; None when it may.

    A drill proves recovery from a healthy steady state; it must never become the
    second failure of a real outage. So it is refused while this agent's view is stale,
    while automation is frozen or a service is in panic, while anything is already
    down, degraded, drained, switched off or shed, while another drill runs, and when
    the drilled region's loss would leave a service below `min_healthy_regions`.
    """
    decision = state.decision
    if decision is None:
        return "the cluster has not committed a decision yet"
    if stale_s is not None:
        return f"this agent's decision is stale ({stale_s:.1f} s): it cannot tell the drill from an outage"
    if decision.frozen:
        return "automation is frozen: a drill measures automation"
    if decision.panic:
        return f"in panic for {', '.join(decision.panic_services)}"
    for other in active(state.intents, now).values():
        if other.kind == IntentKind.DRILL:
            return f"another drill is running: {other.describe()}"
    problems = [
        f"{region}/{service} is {p.state}"
        for service, placements in sorted(decision.services.items())
        for region, p in sorted(placements.items())
        if p.state != State.HEALTHY or p.ramp < 1.0
    ]
    problems += [f"feature {name} is off" for name, on in sorted(decision.features.items()) if not on]
    if decision.shed_fraction > 0:
        problems.append(f"{decision.shed_fraction:.0%} of low-priority traffic is shed")
    if problems:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        return f"the cluster is already degraded: {shown}"
    after = plan(policy, state, now, intents=[intent])
    for service, placements in sorted(after.services.items()):
        serving = sum(1 for p in placements.values() if p.weight > 0)
        if intent.service in (None, service) and serving < policy.min_healthy_regions:
            return (
                f"{service} would be left with {serving} serving region(s), "
                f"below min_healthy_regions ({policy.min_healthy_regions})"
            )
    return None


def check_safe(
    policy: Policy, state: ControlState, intent: Intent, now: float, stale_s: float | None = None
) -> Decision:
    """The planned decision with `intent`; `Unsafe` when a safety rule would refuse it.

    `stale_s` is how stale the asking agent's view is (None when fresh); it matters to drills.
    """
    if intent.kind == IntentKind.DRILL:
        refusal = drill_refusal(policy, state, intent, now, stale_s)
        if refusal is not None:
            raise Unsafe(f"refused: no drill of {intent.region} now", refusal)
    after = plan(policy, state, now, intents=[intent])
    if intent.kind in (IntentKind.DRAIN, IntentKind.FAILOVER):
        region = intent.region if intent.kind == IntentKind.DRAIN else intent.from_region
        services = [intent.service] if intent.service else list(policy.services)
        for service in services:
            placement = after.services.get(service, {}).get(region or "")
            if placement is not None and placement.state != State.DRAINED:
                why = [r for r in after.reasons if "not applied" in r and service in r]
                raise Unsafe(
                    f"refused: {intent.kind} of {region} would break min_healthy_regions",
                    why[0] if why else f"{region} must keep serving {service}",
                )
    before_panic = state.decision.panic if state.decision else False
    if after.panic and not before_panic:
        raise Unsafe(
            "refused: the change would leave a service with no serving region", "; ".join(after.reasons)
        )
    return after


def changes(before: Decision | None, after: Decision) -> list[str]:
    """What differs between two decisions, in words (for plans and dry runs)."""
    out: list[str] = []
    for service, placements in after.services.items():
        old = before.services.get(service, {}) if before else {}
        for region, p in placements.items():
            q = old.get(region)
            if q is None or q.weight != p.weight or q.state != p.state:
                was = f"{q.weight} {q.state}" if q else "new"
                out.append(f"{region}/{service}: {was} -> {p.weight} {p.state}")
    old_features = before.features if before else {}
    for name, on in after.features.items():
        if old_features.get(name, True) != on:
            out.append(f"feature {name}: {'on' if on else 'off'}")
    old_shed = before.shed_fraction if before else 0.0
    if old_shed != after.shed_fraction:
        out.append(f"shed fraction: {old_shed:.0%} -> {after.shed_fraction:.0%}")
    if (before.frozen if before else False) != after.frozen:
        out.append(f"automation {'frozen' if after.frozen else 'unfrozen'}")
    return out
