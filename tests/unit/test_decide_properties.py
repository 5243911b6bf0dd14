"""Properties of decide() over random policies, observations, intents and histories."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.decide import decide
from controlplane.decide.verdicts import is_fresh, judge, quorum_for
from controlplane.errors import Rejected
from controlplane.intents import apply_intent
from controlplane.model import (
    Decision,
    FeatureSpec,
    Intent,
    IntentKind,
    Observation,
    Policy,
    RegionSpec,
    State,
    Verdict,
)

NOW = 10_000.0
REGION_NAMES = ["r0", "r1", "r2", "r3", "r4", "r5"]
SERVICE_NAMES = ["s0", "s1", "s2"]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    regions = REGION_NAMES[: draw(st.integers(2, 6))]
    services = SERVICE_NAMES[: draw(st.integers(1, 3))]
    specs = []
    for r in regions:
        runs = [s for s in services if draw(st.booleans()) or s == services[0] or r == regions[0]]
        cap = {s: float(draw(st.integers(100, 10_000))) for s in runs}
        specs.append(RegionSpec(name=r, capacity_rps=cap, base_weight=dict(cap)))
    demand = {s: float(draw(st.integers(100, 40_000))) for s in services if draw(st.booleans())}
    features = tuple(
        FeatureSpec(
            name=f"f{i}",
            level=draw(st.integers(1, 4)),
            saves=draw(st.floats(0, 0.4)),
            services=tuple(draw(st.lists(st.sampled_from(services), max_size=2, unique=True))),
        )
        for i in range(draw(st.integers(0, 4)))
    )
    agents = draw(st.integers(0, 5))
    return Policy(
        regions=tuple(specs),
        services=tuple(services),
        demand_rps=demand,
        features=features,
        observers={f"a{i}": draw(st.sampled_from(regions)) for i in range(agents)},
        panic_below=draw(st.integers(1, 2)),
        panic_correlation_s=draw(st.sampled_from([0.5, 1.8, 5.0])),
        degraded_margin=draw(st.sampled_from([0.0, 0.2])),
        observer_quorum=draw(st.none() | st.integers(1, 3)),
        observation_ttl_s=10.0,
        min_healthy_regions=draw(st.integers(1, 2)),
        recovery_hold_s=draw(st.sampled_from([0.0, 5.0, 30.0])),
        ramp_steps=draw(st.sampled_from([(1.0,), (0.25, 0.5, 1.0)])),
        ramp_step_s=5.0,
        slow_ms=500.0,
        utilization_high=0.8,
        degraded_factor=draw(st.sampled_from([0.25, 0.5, 1.0])),
        restore_margin=draw(st.sampled_from([0.0, 0.1, 0.3])),
    )


@st.composite
def observations(draw: st.DrawFn, policy: Policy, now: float = NOW) -> list[Observation]:
    observers = [f"a{i}" for i in range(draw(st.integers(1, 5)))]
    out = []
    for service in policy.services:
        for region in policy.regions_of(service):
            for o in observers:
                if draw(st.integers(0, 9)) == 0:
                    continue  # this observer has nothing on this pair
                up = draw(st.integers(0, 3)) > 0
                out.append(
                    Observation(
                        observer=o,
                        region=region.name,
                        service=service,
                        up=up,
                        at=now - draw(st.sampled_from([0.0, 1.0, 9.0, 11.0, 60.0])),
                        latency_ms=draw(st.sampled_from([None, 10.0, 900.0])) if up else None,
                        utilization=draw(st.sampled_from([None, 0.3, 0.95])) if up else None,
                        error=None if up else draw(st.sampled_from(["connect timeout", "HTTP 503"])),
                    )
                )
    return out


@st.composite
def intent_sets(draw: st.DrawFn, policy: Policy) -> dict[str, Intent]:
    regions = [r.name for r in policy.regions]
    standing: dict[str, Intent] = {}
    for n in range(draw(st.integers(0, 4))):
        kind = draw(
            st.sampled_from(
                [
                    IntentKind.DRAIN,
                    IntentKind.FAILOVER,
                    IntentKind.OVERRIDE,
                    IntentKind.FEATURE,
                    IntentKind.FREEZE,
                ]
            )
        )
        service = draw(st.none() | st.sampled_from(policy.services))
        fields: dict[str, object] = {}
        if kind == IntentKind.DRAIN:
            fields = {"region": draw(st.sampled_from(regions)), "service": service}
        elif kind == IntentKind.FAILOVER:
            a, b = draw(st.lists(st.sampled_from(regions), min_size=2, max_size=2, unique=True))
            fields = {"from_region": a, "to_region": b, "service": service}
        elif kind == IntentKind.OVERRIDE:
            s = service or policy.services[0]
            names = [r.name for r in policy.regions_of(s)]
            w = draw(st.lists(st.integers(0, 100), min_size=len(names), max_size=len(names)))
            if sum(w) == 0:
                w[0] = 100
            fields = {"service": s, "weights": dict(zip(names, w, strict=True))}
        elif kind == IntentKind.FEATURE:
            if not policy.features:
                continue
            fields = {
                "feature": draw(st.sampled_from([f.name for f in policy.features])),
                "enabled": draw(st.booleans()),
            }
        intent = Intent(id=f"i{n}", kind=kind, reason="p", seq=n + 1, **fields)  # type: ignore[arg-type]
        with contextlib.suppress(Rejected):
            standing = apply_intent(standing, intent)
    return standing


@st.composite
def situations(draw: st.DrawFn) -> tuple[Policy, list[Observation], dict[str, Intent], Decision | None]:
    policy = draw(policies())
    previous = None
    if draw(st.booleans()):
        earlier = NOW - draw(st.sampled_from([1.0, 7.0, 40.0]))
        previous = decide(
            policy, draw(observations(policy, earlier)), draw(intent_sets(policy)), None, earlier
        )
    return policy, draw(observations(policy)), draw(intent_sets(policy)), previous


# Examples per property in one run. Hypothesis draws new ones every run (and replays any
# failure it saved), so coverage adds up across runs; this keeps the file near 80 s of
# make test's 2-core budget. `HYPOTHESIS_EXAMPLES=2000` for a deeper local run.
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "150"))
COMMON = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _panicked(d: Decision, service: str) -> bool:
    return d.panic and any(r.startswith("panic:") and f"serving {service} " in r for r in d.reasons)


@COMMON
@given(situations())
def test_weights_sum_to_100_whenever_a_region_serves(
    s: tuple[Policy, list[Observation], dict[str, Intent], Decision | None],
) -> None:
    policy, obs, intents, previous = s
    d = decide(policy, obs, intents, previous, NOW)
    for service, placements in d.services.items():
        total = sum(p.weight for p in placements.values())
        serving = any(p.weight > 0 for p in placements.values())
        assert total == (100 if serving else 0), (service, placements)
        assert all(p.weight >= 0 for p in placements.values())


@COMMON
@given(situations())
def test_down_or_drained_regions_never_get_weight(
    s: tuple[Policy, list[Observation], dict[str, Intent], Decision | None],
) -> None:
    policy, obs, intents, previous = s
    d = decide(policy, obs, intents, previous, NOW)
    for service, placements in d.services.items():
        if _panicked(d, service):
            continue
        for region, p in placements.items():
            if p.verdict == Verdict.DOWN or p.state in (State.DOWN, State.DRAINED):
                assert p.weight == 0, (service, region, p, d.reasons)


@COMMON
@given(situations())
def test_no_region_beyond_its_capacity_unless_shedding(
    s: tuple[Policy, list[Observation], dict[str, Intent], Decision | None],
) -> None:
    policy, obs, intents, previous = s
    d = decide(policy, obs, intents, previous, NOW)
    if d.shed_fraction > 0 or d.frozen:
        return
    overridden = {i.service for i in intents.values() if i.kind == IntentKind.OVERRIDE}
    saved_off = {name for name, on in d.features.items() if not on}
    for service, placements in d.services.items():
        demand = policy.demand_rps.get(service)
        if demand is None or service in overridden or _panicked(d, service):
            continue
        saves = min(
            0.95, sum(f.saves for f in policy.features if f.name in saved_off and f.applies_to(service))
        )
        served = demand * (1 - saves)
        for region, p in placements.items():
            if p.weight == 0:
                continue
            capacity = policy.region(region).capacity_rps[service]
            factor = policy.degraded_factor if p.verdict == Verdict.SLOW else 1.0
            headroom = capacity * p.ramp * factor / served
            # Integer weights may round up by at most one point.
            assert p.weight <= headroom * 100 + 1, (service, region, p, headroom, d.reasons)


@COMMON
@given(policies().flatmap(lambda p: st.tuples(st.just(p), observations(p))))
def test_down_needs_a_quorum_of_distinct_fresh_observers(s: tuple[Policy, list[Observation]]) -> None:
    policy, obs = s
    for (service, region), j in judge(policy, obs, NOW).items():
        fresh = {
            o.observer: o
            for o in obs
            if o.service == service and o.region == region and is_fresh(o, policy, NOW)
        }
        down = {name for name, o in fresh.items() if not o.up}
        if j.verdict == Verdict.DOWN:
            assert len(down) >= quorum_for(policy, len(fresh))
            assert len(down) >= (policy.observer_quorum or 1)
        if not fresh:
            assert j.verdict == Verdict.UNKNOWN


@COMMON
@given(situations())
def test_same_input_same_output(
    s: tuple[Policy, list[Observation], dict[str, Intent], Decision | None],
) -> None:
    policy, obs, intents, previous = s
    a = decide(policy, obs, intents, previous, NOW)
    b = decide(policy, list(reversed(obs)), dict(reversed(list(intents.items()))), previous, NOW)
    assert a == b


@COMMON
@given(situations(), st.floats(1.0, 4.0))
def test_more_capacity_never_switches_more_features_off(
    s: tuple[Policy, list[Observation], dict[str, Intent], Decision | None], factor: float
) -> None:
    policy, obs, intents, previous = s
    bigger = replace(
        policy,
        regions=tuple(
            replace(r, capacity_rps={k: v * factor for k, v in r.capacity_rps.items()})
            for r in policy.regions
        ),
    )
    small = decide(policy, obs, intents, previous, NOW)
    large = decide(bigger, obs, intents, previous, NOW)
    off_small = {n for n, on in small.features.items() if not on}
    off_large = {n for n, on in large.features.items() if not on}
    assert off_large <= off_small
    assert large.shed_fraction <= small.shed_fraction


@COMMON
@given(situations())
def test_revision_grows_only_when_something_changed(
    s: tuple[Policy, list[Observation], dict[str, Intent], Decision | None],
) -> None:
    policy, obs, intents, previous = s
    d = decide(policy, obs, intents, previous, NOW)
    if previous is None:
        assert d.revision == 1
    elif d is previous:
        assert d.revision == previous.revision
    else:
        assert d.revision == previous.revision + 1
        assert not d.same_outcome(previous)
    again = decide(policy, obs, intents, d, NOW)
    assert again is d, "deciding again on the same inputs changes nothing"


# -- issue 13: panic, impaired observers, the configured quorum, over histories ------------


@st.composite
def world_views(draw: st.DrawFn, policy: Policy, observers: list[str], now: float) -> list[Observation]:
    """What every observer sees at `now`: whole regions fail, recover, slow down; some
    observers see everything down (impaired) or flag themselves."""
    region_state = {
        r.name: draw(st.sampled_from(["up", "up", "down", "slow", "mixed"])) for r in policy.regions
    }
    broken = {o for o in observers if draw(st.integers(0, 5)) == 0}
    flagged = {o for o in observers if draw(st.integers(0, 7)) == 0}
    out = []
    for service in policy.services:
        for region in policy.regions_of(service):
            state = region_state[region.name]
            for o in observers:
                if draw(st.integers(0, 11)) == 0:
                    continue  # nothing fresh from this observer on this pair
                up = state in ("up", "slow") or (state == "mixed" and draw(st.booleans()))
                if o in broken:
                    up = False
                out.append(
                    Observation(
                        observer=o,
                        region=region.name,
                        service=service,
                        up=up,
                        at=now - draw(st.sampled_from([0.0, 0.0, 2.0, 11.0])),
                        latency_ms=(1500.0 if state == "slow" else 20.0) if up else None,
                        error=None if up else "connect timeout",
                        impaired="probe deadlines fired 900 ms late" if o in flagged else None,
                    )
                )
    return out


@st.composite
def histories(draw: st.DrawFn) -> tuple[Policy, list[tuple[float, list[Observation], Decision]]]:
    policy = draw(policies())
    observers = sorted(policy.observers) or [f"a{i}" for i in range(draw(st.integers(1, 5)))]
    intents = draw(intent_sets(policy))
    previous: Decision | None = None
    now = NOW
    out = []
    for _ in range(draw(st.integers(2, 10))):
        now += draw(st.sampled_from([0.3, 1.0, 2.5, 12.0, 40.0]))
        obs = draw(world_views(policy, observers, now))
        if draw(st.integers(0, 4)) == 0:
            intents = draw(intent_sets(policy))
        previous = decide(policy, obs, intents, previous, now)
        out.append((now, obs, previous))
    return policy, out


HISTORIES = settings(
    max_examples=max(1, EXAMPLES * 2 // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@HISTORIES
@given(histories())
def test_a_region_down_before_the_panic_never_gets_weight_from_it(
    h: tuple[Policy, list[tuple[float, list[Observation], Decision]]],
) -> None:
    policy, steps = h
    for _, _, d in steps:
        for service, placements in d.services.items():
            for region, p in placements.items():
                if p.verdict != Verdict.DOWN or p.weight == 0:
                    continue
                # Weight on a DOWN region only in panic, and only for one the panic's
                # own fault took down (or that served when it began).
                assert service in d.panic_services, (service, region, d.reasons)
                since = d.panic_since[service]
                assert p.verdict_since >= since - policy.panic_correlation_s, (service, region, d.reasons)
                assert region in d.panic_regions[service]


@HISTORIES
@given(histories())
def test_weights_are_integers_summing_to_100_through_any_history(
    h: tuple[Policy, list[tuple[float, list[Observation], Decision]]],
) -> None:
    _, steps = h
    for _, _, d in steps:
        for service, placements in d.services.items():
            weights = [p.weight for p in placements.values()]
            assert all(isinstance(w, int) and w >= 0 for w in weights)
            assert sum(weights) in (0, 100), (service, placements)
            serving = any(p.state in (State.HEALTHY, State.DEGRADED) for p in placements.values())
            if serving:
                assert sum(weights) == 100, (service, placements, d.reasons)


@HISTORIES
@given(histories(), st.data())
def test_impaired_observers_never_change_a_verdict(
    h: tuple[Policy, list[tuple[float, list[Observation], Decision]]], data: st.DataObject
) -> None:
    policy, steps = h
    now, obs, _ = steps[-1]
    observers = sorted({o.observer for o in obs})
    if not observers:
        return
    x = data.draw(st.sampled_from(observers))
    without = [o for o in obs if o.observer != x]
    flagged = [
        *without,
        *(replace(o, impaired="probe deadlines fired 2 s late") for o in obs if o.observer == x),
    ]
    assert judge(policy, flagged, now) == judge(policy, without, now)
    others_see_up = any(o.up and is_fresh(o, policy, now) and not o.impaired for o in without)
    if x in policy.observers and others_see_up:
        everything_down = [
            *without,
            *(
                Observation(observer=x, region=r.name, service=s, up=False, at=now, error="timeout")
                for s in policy.services
                for r in policy.regions_of(s)
            ),
        ]
        assert judge(policy, everything_down, now) == judge(policy, without, now)


@HISTORIES
@given(histories())
def test_fewer_down_reports_than_the_configured_quorum_never_make_a_region_down(
    h: tuple[Policy, list[tuple[float, list[Observation], Decision]]],
) -> None:
    policy, steps = h
    if not policy.observers:
        return
    needed = policy.observer_quorum or len(policy.observers) // 2 + 1
    for now, obs, _ in steps:
        for (service, region), j in judge(policy, obs, now).items():
            down = {
                o.observer
                for o in obs
                if o.service == service and o.region == region and not o.up and is_fresh(o, policy, now)
            }
            if len(down) < needed:
                assert j.verdict != Verdict.DOWN, (service, region, down, needed)
