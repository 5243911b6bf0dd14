"""A drill: a region judged down on purpose, exactly as a failure would be, and when not to start one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.decide import decide
from controlplane.errors import Unsafe
from controlplane.intents import apply_intent
from controlplane.model import Decision, Intent, IntentKind, Observation, State
from controlplane.plan import check_safe, drill_refusal
from controlplane.state import ControlState
from tests.unit.test_plan import POLICY, seen


def drill(region: str = "cn-east", service: str | None = None, seq: int = 1, until: float = 1000.0) -> Intent:
    return Intent(
        id=f"drill-{region}",
        kind=IntentKind.DRILL,
        reason="game day",
        who="alice",
        region=region,
        service=service,
        seq=seq,
        expires_at=until,
    )


def steady(at: float = 100.0) -> ControlState:
    observations = seen(True, at)
    first = decide(POLICY, observations, {}, None, at)
    return ControlState(
        decision=first, observations={(o.observer, o.region, o.service): o for o in observations}
    )


def failed(region: str, at: float) -> list[Observation]:
    return [replace(o, up=False, error="refused") if o.region == region else o for o in seen(True, at)]


def test_a_drill_takes_the_region_out_with_the_weights_and_degradation_of_a_real_failure() -> None:
    before = decide(POLICY, seen(True, 100.0), {}, None, 100.0)
    real = decide(POLICY, failed("cn-east", 105.0), {}, before, 105.0)
    standing = apply_intent({}, drill())
    drilled = decide(POLICY, seen(True, 105.0), standing, before, 105.0, intent_seq=1)
    for service in POLICY.services:
        assert drilled.services[service]["cn-east"].state == State.DOWN
        assert {r: p.weight for r, p in drilled.services[service].items()} == {
            r: p.weight for r, p in real.services[service].items()
        }
    assert drilled.features == real.features and drilled.shed_fraction == real.shed_fraction
    # Marked as a drill, with who and until when.
    marked = [r for r in drilled.reasons if "cn-east/order down" in r]
    assert marked and "DRILL" in marked[0] and "alice" in marked[0]
    assert not any("DRILL" in r for r in real.reasons)


def test_a_drill_of_one_service_leaves_the_others_alone() -> None:
    before = decide(POLICY, seen(True, 100.0), {}, None, 100.0)
    drilled = decide(POLICY, seen(True, 105.0), apply_intent({}, drill(service="order")), before, 105.0)
    assert drilled.services["order"]["cn-east"].state == State.DOWN
    assert all(drilled.services[s]["cn-east"].state == State.HEALTHY for s in POLICY.services if s != "order")


def test_when_a_drill_ends_the_region_comes_back_through_the_recovery_hold_like_after_a_failure() -> None:
    before = decide(POLICY, seen(True, 100.0), {}, None, 100.0)
    drilled = decide(POLICY, seen(True, 105.0), apply_intent({}, drill()), before, 105.0, intent_seq=1)
    ended = decide(POLICY, seen(True, 110.0), {}, drilled, 110.0, intent_seq=2)
    p = ended.services["order"]["cn-east"]
    assert p.verdict == "up" and p.weight == 0  # held, then ramped: not all at once
    assert any("cn-east/order recovering" in r for r in ended.reasons)


def test_a_healthy_cluster_may_drill_and_the_plan_shows_the_drill() -> None:
    after = check_safe(POLICY, steady(), drill(), 101.0)
    assert after.services["order"]["cn-east"].weight == 0


@pytest.mark.parametrize(
    ("situation", "expected"),
    [
        ("stale", "stale"),
        ("frozen", "frozen"),
        ("panic", "panic"),
        ("down", "already degraded: cn-south/inventory is down"),
        ("feature off", "feature"),
        ("another drill", "another drill is running"),
        ("no decision", "not committed a decision"),
    ],
)
def test_a_drill_is_refused_with_one_line_saying_why(situation: str, expected: str) -> None:
    state = steady()
    stale_s = None
    assert state.decision is not None
    decision: Decision = state.decision
    if situation == "stale":
        stale_s = 4.2
    elif situation == "frozen":
        state = replace(state, decision=replace(decision, frozen=True))
    elif situation == "panic":
        state = replace(state, decision=replace(decision, panic=True, panic_services=("order",)))
    elif situation == "down":
        services = dict(decision.services)
        services["inventory"] = {
            **services["inventory"],
            "cn-south": replace(services["inventory"]["cn-south"], state=State.DOWN, weight=0),
        }
        state = replace(state, decision=replace(decision, services=services))
    elif situation == "feature off":
        name = next(iter(decision.features))
        state = replace(state, decision=replace(decision, features={**decision.features, name: False}))
    elif situation == "another drill":
        state = replace(state, intents=apply_intent({}, drill("cn-south")), intent_seq=1)
    elif situation == "no decision":
        state = replace(state, decision=None)
    why = drill_refusal(POLICY, state, drill(seq=2), 101.0, stale_s)
    assert why is not None and expected in why
    assert "\n" not in why
    with pytest.raises(Unsafe) as refused:
        check_safe(POLICY, state, drill(seq=2), 101.0, stale_s)
    assert refused.value.detail == why


def test_a_drill_that_would_break_min_healthy_regions_is_refused() -> None:
    strict = replace(POLICY, min_healthy_regions=len(POLICY.regions))
    why = drill_refusal(strict, steady(), drill(), 101.0, None)
    assert why is not None and "min_healthy_regions" in why


def test_an_expired_drill_does_not_block_the_next() -> None:
    state = replace(steady(), intents=apply_intent({}, drill("cn-south", until=50.0)), intent_seq=1)
    assert drill_refusal(POLICY, state, drill(seq=2), 101.0, None) is None
