"""The decision: a pure function of (policy, observations, intents, previous, now).

`decide()` reads no clock, opens no socket and keeps no state between calls: what it
needs to remember (when a region came back, which features it switched off) travels in
the previous decision. The same inputs always give the same decision, so every agent
can compute a what-if plan and tests can replay any situation.

The order of the rules (DESIGN.md, "How a decision is made"):

1. verdicts from a quorum of fresh, unimpaired observers (`verdicts.py`); a region that
   comes back waits `recovery_hold_s`, then ramps through `ramp_steps`;
2. gray failure: slow or hot regions are `degraded` and keep `degraded_factor` of
   their share, until they are clearly better (`degraded_margin` below the threshold);
3. panic (`panic.py`): when fewer than `panic_below` regions would serve a service,
   serve the regions that served before the fault plus those the same fault took down,
   never one that was down before it; a region that served through a panic skips the
   hold and ramp when it comes back;
4. operator intents win over automation, in panic too: drain, failover, override,
   feature, freeze; a drain or failover never leaves fewer than `min_healthy_regions`
   serving;
5. degradation ladder and shed fraction when capacity is short of demand;
6. weights: lost shares move to the others by base share, within capacity caps.

Every change is explained in `reasons`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

from controlplane.decide import panic as panic_rules
from controlplane.decide.ladder import degrade, ladder_of, saved_fraction
from controlplane.decide.pairs import Build, Pair, pct, ts
from controlplane.decide.verdicts import Judgement, assess, judge, still_degraded
from controlplane.decide.weights import Slot, split, to_weights
from controlplane.intents import ordered
from controlplane.model import (
    Decision,
    Intent,
    IntentKind,
    Observation,
    Placement,
    Policy,
    State,
    Verdict,
)

__all__ = ["REASONS_ONLY_INTERVAL_S", "decide", "judge"]

# A change to the reasons alone commits at most this often.
REASONS_ONLY_INTERVAL_S = 5.0


def _ramp_at(policy: Policy, serving_since: float, now: float) -> tuple[float, float | None]:
    """Ramp fraction at `now` and when it next changes (None once fully ramped)."""
    step = math.floor((now - serving_since) / policy.ramp_step_s + 1e-9)
    if step >= len(policy.ramp_steps) or policy.ramp_steps[step] >= 1.0:
        return 1.0, None
    return policy.ramp_steps[step], serving_since + (step + 1) * policy.ramp_step_s


def _track(
    policy: Policy,
    service: str,
    region: str,
    j: Judgement,
    prev: Placement | None,
    prev_panic: bool,
    frozen: bool,
    now: float,
    b: Build,
) -> Pair:
    """Verdict with hysteresis: degraded margin, recovery hold and slow-start ramp."""
    name = f"{region}/{service}"
    verdict = j.verdict
    if (
        verdict == Verdict.UP
        and prev is not None
        and prev.verdict == Verdict.SLOW
        and still_degraded(policy, j)
    ):
        verdict = Verdict.SLOW
    if frozen and prev is not None and verdict not in (Verdict.UNKNOWN, prev.verdict):
        b.reasons.append(
            f"{name}: observers say {verdict}, held at {prev.verdict} because automation is frozen"
        )
        verdict = prev.verdict
    if verdict == Verdict.UNKNOWN:
        verdict = prev.verdict if prev is not None else Verdict.UP
        if j.inconclusive:
            b.reasons.append(
                f"{name}: {j.inconclusive} of {j.fresh} observers' probes are inconclusive "
                f"({j.inconclusive_why}), {j.up} up and {j.down} down, {j.quorum_words()}: "
                f"keeping it {verdict}"
            )
        elif not j.fresh:
            b.reasons.append(f"{name}: no fresh observations; keeping it {verdict}")
        elif verdict == Verdict.DOWN:
            b.reasons.append(
                f"{name}: {j.up} of {j.fresh} observers see it up, {j.quorum_words()}: still down"
            )

    was_down = prev is not None and prev.verdict == Verdict.DOWN
    is_down = verdict == Verdict.DOWN
    if prev is None:
        since, serving_since = now, None
    elif was_down != is_down:
        since = now
        serving_since = None if is_down else now + policy.recovery_hold_s
        if not is_down and prev_panic and prev.weight > 0:
            # It carried traffic through the panic: holding it back now would only
            # move that traffic onto regions that have not been carrying it.
            serving_since = None
            b.reasons.append(f"{name} up again: it served through the panic, so no recovery hold or ramp")
    else:
        since, serving_since = prev.verdict_since, prev.serving_since
    pair = Pair(region=region, verdict=verdict, verdict_since=since, serving_since=serving_since, ramp=1.0)
    if is_down:
        pair.serving_since = None
        pair.ramp = 0.0
        if (j.fresh or j.drill) and j.verdict == Verdict.DOWN:
            b.reasons.append(f"{name} down: {j.down_sentence()}")
        return pair
    if j.down and j.fresh:
        b.reasons.append(f"{name}: {j.not_down_sentence()}")
    if serving_since is not None and now < serving_since:
        pair.held_until = serving_since
        pair.ramp = 0.0
        b.review_at.append(serving_since)
        b.reasons.append(f"{name} recovering: up since {ts(since)}, held until {ts(serving_since)}")
        return pair
    if verdict == Verdict.SLOW:
        b.reasons.append(
            f"{name} degraded: {_degraded_why(policy, j)}; weight scaled by {policy.degraded_factor:g}"
        )
    return pair


def _degraded_why(policy: Policy, j: Judgement) -> str:
    """The same words on the way in and while it stays, so a hovering signal is quiet.

    The count is of observers above the restore level, which a region entering
    (above `slow_ms`) passes too; numbers that wobble (medians) are left out.
    """
    keep = 1.0 - policy.degraded_margin
    why = []
    if j.slow_hold >= j.quorum and j.latency_ms is not None:
        why.append(
            f"{j.slow_hold} of {j.fresh} observers see it slow (above {policy.slow_ms:g} ms to degrade, "
            f"below {policy.slow_ms * keep:g} ms to restore)"
        )
    if j.utilization is not None and j.utilization > policy.utilization_high * keep:
        why.append(
            f"median utilization high (above {policy.utilization_high:g} to degrade, "
            f"below {policy.utilization_high * keep:g} to restore)"
        )
    return "; ".join(why) or "slow (last known)"


def _ramp(policy: Policy, service: str, pair: Pair, prev: Placement | None, now: float, b: Build) -> None:
    """Slow start after the hold, or after an operator's drain is lifted."""
    if pair.drained_by is not None or not pair.by_verdict:
        return
    if prev is not None and prev.state == State.DRAINED and pair.serving_since is None:
        pair.serving_since = now
    if pair.serving_since is None:
        return
    pair.ramp, next_step = _ramp_at(policy, pair.serving_since, now)
    if next_step is None:
        pair.serving_since = None
    else:
        b.review_at.append(next_step)
        b.reasons.append(
            f"{pair.region}/{service} ramping: {pct(pair.ramp)} of its share until {ts(next_step)}"
        )


def _drilled(
    policy: Policy, judgements: Mapping[tuple[str, str], Judgement], standing: list[Intent]
) -> Mapping[tuple[str, str], Judgement]:
    """Judgements with the pairs a standing drill names judged down, as a failure would be.

    A drill is a rehearsed failure: everything after the verdict (panic, degradation,
    shedding, weights, the recovery hold and ramp when it ends) runs exactly as it would
    for a real one; only the reasons say it is a drill.
    """
    drills = [i for i in standing if i.kind == IntentKind.DRILL and i.region is not None]
    if not drills:
        return judgements
    out = dict(judgements)
    for drill in drills:
        for service in [drill.service] if drill.service else policy.services:
            key = (service, drill.region or "")
            if key in out:
                out[key] = replace(out[key], verdict=Verdict.DOWN, drill=drill.describe())
    return out


def _apply_drains(
    policy: Policy,
    service: str,
    pairs: dict[str, Pair],
    intents: list[Intent],
    in_panic: bool,
    b: Build,
) -> dict[str, float]:
    """Drains and failovers, oldest first, never below `min_healthy_regions` serving.

    In panic "serving" means serving in the panic, so a drain takes its region out of
    the panic set but never the last one (that would black-hole the service, which is
    what the panic is there to prevent). Returns the failover targets' preferred
    amounts, filled in by the caller.
    """
    targets: dict[str, float] = {}
    where = " in panic" if in_panic else ""
    for i in intents:
        if i.kind == IntentKind.DRAIN and i.region in pairs and i.service in (None, service):
            source, target = i.region, None
        elif i.kind == IntentKind.FAILOVER and i.from_region in pairs and i.service in (None, service):
            source, target = i.from_region, i.to_region
        else:
            continue
        pair = pairs[source]
        if pair.drained_by is not None:
            continue
        serving = sum(1 for p in pairs.values() if p.serving)
        if pair.serving and serving - 1 < policy.min_healthy_regions:
            b.reasons.append(
                f"{i.describe()} not applied to {service}: it would leave {serving - 1} regions serving "
                f"{service}{where}, fewer than min_healthy_regions ({policy.min_healthy_regions})"
            )
            continue
        pair.drained_by = i
        out_of_panic = "; taken out of the panic" if in_panic and pair.panic_member else ""
        if target is None:
            b.reasons.append(f"{source}/{service} drained: {i.describe()}{out_of_panic}")
        else:
            pair.failover_to = target
            b.reasons.append(f"{service} failed over from {source} to {target}: {i.describe()}{out_of_panic}")
            if target in pairs and pairs[target].serving:
                targets[target] = targets.get(target, 0.0)
            else:
                b.reasons.append(
                    f"{service}: failover target {target} is not serving; share spread to the others"
                )
    return targets


def _shares_reason(service: str, weights: Mapping[str, int], base: Mapping[str, int]) -> str | None:
    losers = [f"{r} (-{base[r] - w})" for r, w in weights.items() if w < base[r]]
    gainers = [f"{r} (+{w - base[r]})" for r, w in weights.items() if w > base[r]]
    if not losers:
        return None
    return f"{service}: share moved from {', '.join(losers)} to {', '.join(gainers) or 'nobody'}"


def decide(
    policy: Policy,
    observations: Iterable[Observation],
    intents: Mapping[str, Intent],
    previous: Decision | None,
    now: float,
    *,
    intent_seq: int | None = None,
) -> Decision:
    """The next decision; `previous` itself (same revision) when nothing changed.

    `intents` are the standing intents by id; `intent_seq` the store's intent counter
    (defaults to the highest standing seq).
    """
    b = Build()
    standing = ordered(intents)
    freezes = [i for i in standing if i.kind == IntentKind.FREEZE]
    frozen = bool(freezes) and previous is not None
    if freezes:
        b.reasons.append(f"automation frozen: {freezes[-1].describe()}")
    forced = {i.feature: bool(i.enabled) for i in standing if i.kind == IntentKind.FEATURE and i.feature}
    overrides = {i.service: i for i in standing if i.kind == IntentKind.OVERRIDE and i.service}
    assessment = assess(policy, observations, now)
    b.reasons.extend(
        f"{observer} impaired: {why}; not counted" for observer, why in assessment.impaired.items()
    )
    judgements = _drilled(policy, assessment.judgements, standing)
    prev_services = previous.services if previous is not None else {}
    prev_panic = set(previous.panic_services) if previous is not None else set()

    # 1-4: verdicts with hysteresis, panic, then drains and failovers.
    tracked: dict[str, dict[str, Pair]] = {}
    preferred: dict[str, dict[str, float]] = {}
    panic_regions: dict[str, tuple[str, ...]] = {}
    panic_since: dict[str, float] = {}
    for service in policy.services:
        prev_s = prev_services.get(service, {})
        pairs = {
            r.name: _track(
                policy,
                service,
                r.name,
                judgements[(service, r.name)],
                prev_s.get(r.name),
                service in prev_panic,
                frozen,
                now,
                b,
            )
            for r in policy.regions_of(service)
        }
        tracked[service] = pairs
        alive = sum(1 for p in pairs.values() if p.by_verdict)
        in_panic = alive < min(policy.panic_below, len(pairs))
        if in_panic:
            members, since = panic_rules.panic_set(policy, service, pairs, previous, now)
            panic_regions[service], panic_since[service] = members, since
            for region in members:
                pairs[region].panic_member = True
        at = len(b.reasons)
        preferred[service] = _apply_drains(policy, service, pairs, standing, in_panic, b)
        if in_panic:
            b.reasons[at:at] = panic_rules.explain(policy, service, pairs, panic_regions[service], alive)
            if service in prev_panic:
                panic_rules.back_from_drain(service, pairs, prev_s, b)
            continue
        for region, pair in pairs.items():
            _ramp(policy, service, pair, prev_s.get(region), now, b)
    panic = [s for s in policy.services if s in panic_regions]

    # 5: degradation, from the capacity that actually serves (panic services abstain).
    capacity: dict[str, float] = {}
    for service in policy.services:
        if service in panic or service not in policy.demand_rps:
            continue
        capacity[service] = sum(
            policy.region(r).capacity_rps[service] * p.multiplier(policy) for r, p in tracked[service].items()
        )
    prev_features = previous.features if previous is not None else {}
    degradation = degrade(policy, capacity, forced, prev_features)
    if frozen and previous is not None:
        # Frozen: the ladder stays where it was; the shortfall is still reported.
        degradation = replace(
            degradation,
            off=tuple(f.name for f in ladder_of(policy, forced) if not prev_features.get(f.name, True)),
            shed_fraction=previous.shed_fraction,
        )
    forced_off = [n for n, on in forced.items() if not on]
    features = {f.name: f.name not in degradation.off and forced.get(f.name, True) for f in policy.features}
    for name, enabled in forced.items():
        if name in features:
            b.reasons.append(f"feature {name} forced {'on' if enabled else 'off'} by operator")
    if degradation.short:
        gaps = ", ".join(
            f"{s} needs {d:.0f} rps with {c:.0f} rps serving"
            for s, (d, c) in sorted(degradation.short.items())
        )
        b.reasons.append(f"capacity short of demand: {gaps}")
    if degradation.off:
        b.reasons.append(f"features off to cover the deficit: {', '.join(degradation.off)}")
    if degradation.shed_fraction > 0:
        b.reasons.append(f"shedding {pct(degradation.shed_fraction)} of low-priority requests")

    # 6: weights.
    services_out: dict[str, dict[str, Placement]] = {}
    for service in policy.services:
        pairs = tracked[service]
        in_panic = service in panic_regions
        override = overrides.get(service)
        regions = policy.regions_of(service)
        if override is not None and override.weights:
            raw = {r.name: float(override.weights.get(r.name, 0)) for r in regions}
            b.reasons.append(f"{service} weights set by operator: {override.describe()}")
        else:
            raw = {r.name: r.base_weight[service] for r in regions}
        total = sum(raw.values()) or 1.0
        base = {r: w / total for r, w in raw.items()}
        demand = policy.demand_rps.get(service)
        served = None
        if demand is not None and override is None and not in_panic:
            served = demand * (1 - saved_fraction(policy.features, service, (*forced_off, *degradation.off)))
            served *= 1 - degradation.shed_fraction
        slots = []
        for r in regions:
            multiplier = pairs[r.name].multiplier(policy, in_panic)
            cap = math.inf if not served else r.capacity_rps[service] * multiplier / served
            slots.append(Slot(region=r.name, base=base[r.name], multiplier=multiplier, cap=cap))
        pref = {
            t: sum(base[s] for s, p in pairs.items() if p.failover_to == t)
            for t in preferred.get(service, {})
        }
        shares = split(slots, pref)
        caps = {s.region: s.cap for s in slots}
        weights = to_weights(shares, caps)
        base_weights = to_weights(base, {})
        moved = _shares_reason(service, weights, base_weights)
        if moved:
            b.reasons.append(moved)
        services_out[service] = {
            r: Placement(
                weight=weights[r],
                state=p.state(),
                verdict=p.verdict,
                verdict_since=p.verdict_since,
                serving_since=p.serving_since,
                ramp=1.0 if in_panic else p.ramp,
            )
            for r, p in pairs.items()
        }

    seq = intent_seq if intent_seq is not None else max((i.seq for i in standing), default=0)
    candidate = Decision(
        revision=(previous.revision + 1) if previous is not None else 1,
        services=services_out,
        features=features,
        shed_fraction=degradation.shed_fraction,
        panic=bool(panic),
        panic_services=tuple(panic),
        panic_regions=panic_regions,
        panic_since=panic_since,
        frozen=bool(freezes),
        reasons=tuple(b.reasons),
        intent_seq=seq,
        decided_at=now,
        next_review_at=min(b.review_at) if b.review_at else None,
    )
    if previous is not None and candidate.same_outcome(previous):
        return previous
    if (
        previous is not None
        and candidate.differs_only_in_reasons(previous)
        and now - previous.decided_at < REASONS_ONLY_INTERVAL_S
    ):
        # Nobody acts on reasons alone; a new revision for each (an observer's count
        # flickering) would wake every watcher again and again (bench.watch saw that
        # loop under load). Such changes wait a few seconds and go out together.
        return previous
    if previous is not None:
        candidate = replace(
            candidate,
            term=previous.term,
            leader=previous.leader,
            committed_at=previous.committed_at,
        )
    return candidate
