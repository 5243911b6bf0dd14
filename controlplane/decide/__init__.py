"""The decision: a pure function of (policy, observations, intents, previous, now).

`decide()` reads no clock, opens no socket and keeps no state between calls: what it
needs to remember (when a region came back, which features it switched off) travels in
the previous decision. The same inputs always give the same decision, so every agent
can compute a what-if plan and tests can replay any situation.

The order of the rules (DESIGN.md, "How a decision is made"):

1. verdicts from a quorum of fresh observers; a region that comes back waits
   `recovery_hold_s`, then ramps through `ramp_steps`;
2. gray failure: slow or hot regions are `degraded` and keep `degraded_factor` of
   their share;
3. operator intents win over automation: drain, failover, override, feature, freeze;
4. safety: never fewer than `min_healthy_regions` serving, and if the verdicts would
   leave too few, flag panic and serve the regions that failed in this incident as if
   healthy (the probes are more likely wrong than every region at once);
5. degradation ladder and shed fraction when capacity is short of demand;
6. weights: lost shares move to the others by base share, within capacity caps.

Every change is explained in `reasons`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from controlplane.decide.ladder import degrade, ladder_of, saved_fraction
from controlplane.decide.verdicts import Judgement, judge
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


@dataclass(slots=True)
class _Pair:
    """Working state of one (service, region) while the decision is built."""

    region: str
    verdict: Verdict
    verdict_since: float
    serving_since: float | None
    ramp: float
    held_until: float | None = None
    drained_by: Intent | None = None
    failover_to: str | None = None

    @property
    def by_verdict(self) -> bool:
        """Serving as far as observers and the recovery hold are concerned."""
        return self.verdict != Verdict.DOWN and self.held_until is None

    @property
    def serving(self) -> bool:
        return self.by_verdict and self.drained_by is None

    def multiplier(self, policy: Policy) -> float:
        if not self.serving:
            return 0.0
        factor = policy.degraded_factor if self.verdict == Verdict.SLOW else 1.0
        return self.ramp * factor

    def state(self) -> State:
        if self.drained_by is not None:
            return State.DRAINED
        if not self.by_verdict:
            return State.DOWN
        return State.DEGRADED if self.verdict == Verdict.SLOW else State.HEALTHY


@dataclass(slots=True)
class _Build:
    reasons: list[str] = field(default_factory=list)
    review_at: list[float] = field(default_factory=list)


def _pct(x: float) -> str:
    return f"{round(x * 100)}%"


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%SZ")


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
    frozen: bool,
    now: float,
    b: _Build,
) -> _Pair:
    """Verdict with hysteresis: recovery hold and slow-start ramp."""
    name = f"{region}/{service}"
    verdict = j.verdict
    if frozen and prev is not None and verdict not in (Verdict.UNKNOWN, prev.verdict):
        b.reasons.append(
            f"{name}: observers say {verdict}, held at {prev.verdict} because automation is frozen"
        )
        verdict = prev.verdict
    if verdict == Verdict.UNKNOWN:
        verdict = prev.verdict if prev is not None else Verdict.UP
        b.reasons.append(f"{name}: no fresh observations; keeping it {verdict}")

    was_down = prev is not None and prev.verdict == Verdict.DOWN
    is_down = verdict == Verdict.DOWN
    if prev is None:
        since, serving_since = now, None
    elif was_down != is_down:
        since = now
        serving_since = None if is_down else now + policy.recovery_hold_s
    else:
        since, serving_since = prev.verdict_since, prev.serving_since
    pair = _Pair(region=region, verdict=verdict, verdict_since=since, serving_since=serving_since, ramp=1.0)
    if is_down:
        pair.serving_since = None
        pair.ramp = 0.0
        if j.fresh:
            b.reasons.append(f"{name} down: {j.down_sentence()}")
        return pair
    if j.down and j.fresh:
        b.reasons.append(f"{name}: {j.down_sentence()}, quorum is {j.quorum}: not down")
    if serving_since is not None and now < serving_since:
        pair.held_until = serving_since
        pair.ramp = 0.0
        b.review_at.append(serving_since)
        b.reasons.append(f"{name} recovering: up since {_ts(since)}, held until {_ts(serving_since)}")
        return pair
    if verdict == Verdict.SLOW:
        why = []
        if j.slow >= j.quorum and j.latency_ms is not None:
            why.append(f"{j.slow} of {j.fresh} observers see latency above {policy.slow_ms:g} ms")
        if j.utilization is not None and j.utilization > policy.utilization_high:
            why.append(f"utilization {j.utilization:.2f} above {policy.utilization_high:g}")
        detail = "; ".join(why) or "slow (last known)"
        b.reasons.append(f"{name} degraded: {detail}; weight scaled by {policy.degraded_factor:g}")
    return pair


def _ramp(policy: Policy, service: str, pair: _Pair, prev: Placement | None, now: float, b: _Build) -> None:
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
            f"{pair.region}/{service} ramping: {_pct(pair.ramp)} of its share until {_ts(next_step)}"
        )


def _apply_drains(
    policy: Policy, service: str, pairs: dict[str, _Pair], intents: list[Intent], b: _Build
) -> dict[str, float]:
    """Drains and failovers, oldest first, never below `min_healthy_regions` serving.

    Returns the failover targets' preferred amounts, filled in by the caller.
    """
    targets: dict[str, float] = {}
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
                f"{i.describe()} not applied to {service}: it would leave {serving - 1} serving region(s), "
                f"fewer than min_healthy_regions ({policy.min_healthy_regions})"
            )
            continue
        pair.drained_by = i
        if target is None:
            b.reasons.append(f"{source}/{service} drained: {i.describe()}")
        else:
            pair.failover_to = target
            b.reasons.append(f"{service} failed over from {source} to {target}: {i.describe()}")
            if target in pairs and pairs[target].serving:
                targets[target] = targets.get(target, 0.0)
            else:
                b.reasons.append(
                    f"{service}: failover target {target} is not serving; share spread to the others"
                )
    return targets


def _panic_placements(
    policy: Policy,
    service: str,
    pairs: dict[str, _Pair],
    prev: Mapping[str, Placement] | None,
    was_in_panic: bool,
    drained: set[str],
    alive: int,
    now: float,
    b: _Build,
) -> dict[str, Placement]:
    """Where traffic goes when the verdicts would leave too few regions serving.

    Entering panic, every region that went down within the last `observation_ttl_s`
    (the same incident: usually the probes, not the regions) serves again with its base
    share, as Envoy's panic mode does; regions that were already down before the
    incident, and drained ones, stay out. While in panic the weights stay as they are.
    Doing this instead of keeping the last decision matters when regions fail a few
    hundred milliseconds apart: the decisions in between would otherwise have piled every
    service onto whichever region was judged down last.
    """
    why = (
        f"panic: verdicts would leave {alive} of {len(pairs)} regions serving {service} "
        f"(min_healthy_regions={policy.min_healthy_regions})"
    )
    if prev is not None and was_in_panic:
        serving = [r for r in pairs if r in prev and prev[r].weight > 0]
        b.reasons.append(why + f"; serving {', '.join(serving)} as if healthy")
        return {
            region: replace(
                prev.get(region, Placement(weight=0, state=State.DOWN)),
                verdict=pair.verdict,
                verdict_since=pair.verdict_since,
                serving_since=pair.serving_since,
            )
            for region, pair in pairs.items()
        }
    recent = now - policy.observation_ttl_s
    keep = [
        r
        for r, pair in pairs.items()
        if r not in drained and (pair.verdict != Verdict.DOWN or pair.verdict_since >= recent)
    ]
    keep = keep or [r for r in pairs if r not in drained] or list(pairs)
    base = {r.name: r.base_weight[service] for r in policy.regions_of(service) if r.name in keep}
    total = sum(base.values()) or 1.0
    weights = to_weights({r: base.get(r, 0.0) / total for r in pairs}, {})
    serving_now = ", ".join(r for r in keep if weights[r] > 0)
    b.reasons.append(why + f"; serving {serving_now} as if healthy")
    out = {}
    for region, pair in pairs.items():
        if region in drained:
            state = State.DRAINED
        elif region not in keep:
            state = State.DOWN
        else:
            state = State.DEGRADED if pair.verdict == Verdict.SLOW else State.HEALTHY
        out[region] = Placement(
            weight=weights[region],
            state=state,
            verdict=pair.verdict,
            verdict_since=pair.verdict_since,
            serving_since=pair.serving_since,
            ramp=1.0,
        )
    return out


def _drained_by_intents(standing: list[Intent], service: str) -> set[str]:
    """Regions an operator took out of `service` (drains and failovers' sources)."""
    out = set()
    for i in standing:
        if i.service not in (None, service):
            continue
        if i.kind == IntentKind.DRAIN and i.region:
            out.add(i.region)
        elif i.kind == IntentKind.FAILOVER and i.from_region:
            out.add(i.from_region)
    return out


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
    b = _Build()
    standing = ordered(intents)
    freezes = [i for i in standing if i.kind == IntentKind.FREEZE]
    frozen = bool(freezes) and previous is not None
    if freezes:
        b.reasons.append(f"automation frozen: {freezes[-1].describe()}")
    forced = {i.feature: bool(i.enabled) for i in standing if i.kind == IntentKind.FEATURE and i.feature}
    overrides = {i.service: i for i in standing if i.kind == IntentKind.OVERRIDE and i.service}
    judgements = judge(policy, observations, now)
    prev_services = previous.services if previous is not None else {}

    # 1-3: verdicts with hysteresis, then drains and failovers.
    tracked: dict[str, dict[str, _Pair]] = {}
    preferred: dict[str, dict[str, float]] = {}
    panic: list[str] = []
    alive_in_panic: dict[str, int] = {}
    for service in policy.services:
        prev_s = prev_services.get(service, {})
        pairs = {
            r.name: _track(
                policy,
                service,
                r.name,
                judgements[(service, r.name)],
                prev_s.get(r.name),
                frozen,
                now,
                b,
            )
            for r in policy.regions_of(service)
        }
        tracked[service] = pairs
        alive = sum(1 for p in pairs.values() if p.by_verdict)
        if alive < min(policy.min_healthy_regions, len(pairs)):
            panic.append(service)
            alive_in_panic[service] = alive
            continue
        preferred[service] = _apply_drains(policy, service, pairs, standing, b)
        for region, pair in pairs.items():
            _ramp(policy, service, pair, prev_s.get(region), now, b)

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
        b.reasons.append(f"shedding {_pct(degradation.shed_fraction)} of low-priority requests")

    # 6: weights.
    services_out: dict[str, dict[str, Placement]] = {}
    for service in policy.services:
        pairs = tracked[service]
        if service in panic:
            drained = _drained_by_intents(standing, service)
            services_out[service] = _panic_placements(
                policy,
                service,
                pairs,
                prev_services.get(service),
                previous is not None and service in previous.panic_services,
                drained,
                alive_in_panic[service],
                now,
                b,
            )
            continue
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
        if demand is not None and override is None:
            served = demand * (1 - saved_fraction(policy.features, service, (*forced_off, *degradation.off)))
            served *= 1 - degradation.shed_fraction
        slots = []
        for r in regions:
            p = pairs[r.name]
            cap = math.inf if not served else r.capacity_rps[service] * p.multiplier(policy) / served
            slots.append(Slot(region=r.name, base=base[r.name], multiplier=p.multiplier(policy), cap=cap))
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
                ramp=p.ramp,
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
