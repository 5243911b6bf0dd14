"""Decision safety under compound faults (issue 13), as pure `decide()` scenarios.

Each test is named after the fault it reproduces; the timelines follow the issue
(t is the second after a healthy first decision).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from controlplane.config import load_settings
from controlplane.model import Decision, IntentKind, Policy
from controlplane.probes import ProbeResult, TargetHealth, summarize
from tests.unit.world import World, make_policy

ROOT = Path(__file__).resolve().parents[2]
HOMES = {"agent-east-1": "cn-east", "agent-south-1": "cn-south", "agent-north-1": "cn-north"}
TIMEOUT = "timeout after 800 ms"
PRODUCTION_AGENTS = ("agent-east-1", "agent-east-2", "agent-south-1", "agent-south-2", "agent-north-1")


def default_policy(**knobs: object) -> Policy:
    """Policy's own defaults for hold and ramp, three agents one per region."""
    settings: dict[str, object] = {"recovery_hold_s": 30.0, "ramp_step_s": 10.0, "observers": HOMES}
    settings.update(knobs)
    return make_policy(**settings)


def production_policy() -> Policy:
    return load_settings(ROOT / "config" / "production.yaml").policy


def weights(d: Decision) -> dict[str, dict[str, int]]:
    return {s: {r: p.weight for r, p in ps.items()} for s, ps in d.services.items()}


def see_everything_down(w: World, observers: Iterable[str], *, except_home: bool = False) -> None:
    for observer in observers:
        for region in w.policy.regions:
            if except_home and w.policy.observers.get(observer) == region.name:
                continue
            w.see(region.name, up=False, by=[observer], error=TIMEOUT)


def issue_1_timeline(w: World, overloaded: list[str], *, until: int = 200) -> dict[int, Decision]:
    """cn-east really down at t+1; at t+3 `overloaded` observers time out on every
    probe; at t+8 they recover. Returns the decision of every second."""
    w.step()
    timeline: dict[int, Decision] = {}
    for t in range(1, until + 1):
        if t == 1:
            w.see("cn-east", up=False)
        if t == 3:
            see_everything_down(w, overloaded)
        if t == 8:
            for region in ("cn-south", "cn-north"):
                w.see(region, up=True, by=overloaded)
        timeline[t] = w.step()
    return timeline


# -- item 1: panic plus recovery hold sends traffic to a dead region --------------------


def test_overloaded_observers_do_not_send_traffic_to_a_dead_region_default_policy() -> None:
    w = World(default_policy())
    timeline = issue_1_timeline(w, ["agent-south-1", "agent-north-1"])
    assert weights(timeline[1]) == {"order": {"cn-east": 0, "cn-south": 56, "cn-north": 44}}
    for t, d in timeline.items():
        assert d.services["order"]["cn-east"].weight == 0, (t, d.reasons)
        assert weights(d) == weights(timeline[1]), (t, d.reasons)
        assert not d.panic, (t, d.reasons)
    # Words alone wait a few seconds (REASONS_ONLY_INTERVAL_S) before they are committed.
    reasons = {r for t in range(3, 8) for r in timeline[t].reasons}
    assert "agent-south-1 impaired: reports every pair down, its own region included; not counted" in reasons
    assert "agent-north-1 impaired: reports every pair down, its own region included; not counted" in reasons


def test_overloaded_observers_do_not_send_traffic_to_a_dead_region_production_policy() -> None:
    policy = production_policy()
    w = World(policy, observers=PRODUCTION_AGENTS)
    timeline = issue_1_timeline(w, ["agent-south-1", "agent-south-2", "agent-north-1"])
    first = timeline[1]
    for t, d in timeline.items():
        for service in policy.services:
            assert d.services[service]["cn-east"].weight == 0, (t, service, d.reasons)
        assert weights(d) == weights(first), (t, d.reasons)
        assert (d.features, d.shed_fraction) == (first.features, first.shed_fraction), t


def test_panic_never_serves_a_region_that_was_down_before_the_fault_default_policy() -> None:
    # The same timeline, but nothing tells decide() that the two observers are impaired
    # (no home regions known): south and north go down and the service panics.
    w = World(default_policy(observers={}))
    timeline = issue_1_timeline(w, ["agent-south-1", "agent-north-1"])
    assert timeline[3].panic
    assert "cn-east/order stays out of the panic" in "\n".join(timeline[3].reasons)
    for t, d in timeline.items():
        assert d.services["order"]["cn-east"].weight == 0, (t, d.reasons)
    # t+8: south and north served through the panic: no hold, no ramp.
    assert not timeline[8].panic
    assert weights(timeline[8]) == weights(timeline[1])
    assert all(p.ramp == 1.0 for r, p in timeline[8].services["order"].items() if r != "cn-east")


def test_panic_never_serves_a_region_that_was_down_before_the_fault_production_policy() -> None:
    policy = replace(production_policy(), observers={})  # impairment not detected
    w = World(policy, observers=PRODUCTION_AGENTS)
    timeline = issue_1_timeline(w, ["agent-south-1", "agent-south-2", "agent-north-1"])
    first = timeline[1]
    assert timeline[3].panic
    for t, d in timeline.items():
        for service in policy.services:
            assert d.services[service]["cn-east"].weight == 0, (t, service, d.reasons)
    after = timeline[8]
    assert not after.panic
    assert weights(after) == weights(first)
    assert (after.features, after.shed_fraction) == (first.features, first.shed_fraction)
    for service in policy.services:
        assert after.services[service]["cn-south"].ramp == 1.0


def test_regions_failing_a_few_hundred_ms_apart_all_come_back_in_panic() -> None:
    w = World(default_policy(observers={}))
    w.step()
    for region in ("cn-east", "cn-south", "cn-north"):
        w.see(region, up=False)
        d = w.step(0.4)
    assert d.panic
    assert w.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}


def test_a_region_down_longer_than_the_correlation_window_stays_out_of_the_panic() -> None:
    w = World(default_policy(observers={}, panic_correlation_s=1.0))
    w.step()
    w.see("cn-east", up=False)
    w.step(0.4)
    w.see("cn-south", up=False)
    w.step(0.8)  # cn-east went down 1.2 s before the panic: a fault of its own
    w.see("cn-north", up=False)
    d = w.step(0.4)
    assert d.panic
    assert w.weights() == {"cn-east": 0, "cn-south": 56, "cn-north": 44}
    assert d.panic_regions == {"order": ("cn-south", "cn-north")}


def test_a_region_that_served_through_the_panic_skips_hold_and_ramp() -> None:
    w = World(default_policy(observers={}))
    w.step()
    for region in ("cn-east", "cn-south", "cn-north"):
        w.see(region, up=False)
    assert w.step().panic
    w.settle(20)
    w.see("cn-south", up=True)
    d = w.step()
    assert not d.panic
    assert w.weights() == {"cn-east": 0, "cn-south": 100, "cn-north": 0}
    assert "cn-south/order up again: it served through the panic, so no recovery hold or ramp" in d.reasons


def test_a_region_that_did_not_serve_through_the_panic_still_waits_its_hold() -> None:
    w = World(default_policy(observers={}))
    w.step()
    w.see("cn-east", up=False)
    w.settle(10)
    for region in ("cn-south", "cn-north"):
        w.see(region, up=False)
    assert w.step().panic
    w.see("cn-east", up=True)
    d = w.step()
    assert d.panic, "cn-east was down before the fault: it comes back through its hold"
    assert w.weights()["cn-east"] == 0


def test_an_observer_that_flags_its_probes_late_is_not_a_witness() -> None:
    w = World(default_policy())
    w.step()
    w.impaired["agent-south-1"] = "probe deadlines fired 850 ms late"
    w.see("cn-east", up=False, by=["agent-south-1", "agent-north-1"])
    d = w.step(5)
    assert w.weights()["cn-east"] == 40
    assert "agent-south-1 impaired: probe deadlines fired 850 ms late; not counted" in d.reasons


def test_observers_that_all_see_everything_down_agree_and_the_service_panics() -> None:
    # Nobody sees anything up: a unanimous view is evidence, not impairment.
    w = World(default_policy())
    w.step()
    see_everything_down(w, w.observers)
    d = w.step()
    assert d.panic
    assert not any("impaired" in r for r in d.reasons)
    assert w.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}


def test_an_observer_cut_off_from_the_other_regions_is_still_a_witness() -> None:
    # Seeing every other region down but its own up is what a partition looks like.
    w = World(default_policy())
    w.step()
    see_everything_down(w, ["agent-north-1"], except_home=True)
    w.see("cn-east", up=False, by=["agent-south-1"])
    d = w.step()
    assert w.weights()["cn-east"] == 0
    assert not any("impaired" in r for r in d.reasons)


# -- item 2: panic with min_healthy_regions >= 2 -------------------------------------------


def test_min_healthy_regions_2_never_panics_into_regions_the_quorum_says_are_down() -> None:
    w = World(default_policy(min_healthy_regions=2))
    w.step()
    w.see("cn-east", up=False)
    w.see("cn-south", up=False)
    w.step()
    for _ in range(40):
        d = w.step()
        assert not d.panic
        assert w.weights() == {"cn-east": 0, "cn-south": 0, "cn-north": 100}
        assert w.states() == {"cn-east": "down", "cn-south": "down", "cn-north": "healthy"}


def test_panic_below_2_panics_when_only_one_region_would_serve() -> None:
    w = World(default_policy(observers={}, panic_below=2))
    w.step()
    w.see("cn-east", up=False)
    w.see("cn-south", up=False)
    d = w.step()
    assert d.panic
    assert w.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}
    assert any(r.startswith("panic: verdicts would leave 1 of 3 regions serving order") for r in d.reasons)


# -- item 4 (decide part): the quorum is a majority of the configured agents -------------


def test_one_fresh_observer_cannot_take_a_region_out_when_three_are_configured() -> None:
    w = World(default_policy())
    w.step()
    w.see("cn-east", up=False, by=["agent-east-1"])
    d = w.step(5, silent=["agent-south-1", "agent-north-1"])
    assert w.weights()["cn-east"] == 40
    assert "cn-east/order: 1 of 1 observers report connect timeout, quorum is 2: not down" in d.reasons


def test_down_reasons_name_the_quorum_of_configured_agents() -> None:
    w = World(default_policy())
    w.step()
    w.see("cn-east", up=False, by=["agent-south-1", "agent-north-1"])
    d = w.step()
    assert w.weights()["cn-east"] == 0
    assert (
        "cn-east/order down: 2 of 3 observers report connect timeout (quorum 2 of 3 configured)" in d.reasons
    )


def test_a_down_region_stays_down_while_too_few_observers_can_vote() -> None:
    w = World(default_policy())
    w.step()
    w.see("cn-east", up=False)
    w.step()
    w.see("cn-east", up=True, by=["agent-east-1"])
    for _ in range(40):
        d = w.step(silent=["agent-south-1", "agent-north-1"])
    assert w.weights()["cn-east"] == 0
    assert d.services["order"]["cn-east"].verdict == "down"
    assert "cn-east/order: 1 of 1 observers see it up, quorum 2 of 3 configured: still down" in d.reasons


# -- item 5: the degraded state has no hysteresis --------------------------------------------


def count_revisions(w: World, seconds: int, change: object) -> int:
    assert w.decision is not None
    seen = {w.decision.revision}
    for t in range(seconds):
        change(t)  # type: ignore[operator]
        seen.add(w.step().revision)
    return len(seen) - 1


def test_latency_alternating_around_slow_ms_commits_at_most_the_entry() -> None:
    w = World(default_policy())
    w.step()
    revisions = count_revisions(w, 60, lambda t: w.see("cn-east", latency_ms=1010.0 if t % 2 == 0 else 990.0))
    assert revisions <= 1, revisions
    assert w.states()["cn-east"] == "degraded"
    w.see("cn-east", latency_ms=700.0)
    w.step()
    assert w.states()["cn-east"] == "healthy", "restored below slow_ms x (1 - degraded_margin)"


def test_utilization_alternating_around_utilization_high_commits_at_most_the_entry() -> None:
    w = World(default_policy())
    w.step()
    revisions = count_revisions(w, 60, lambda t: w.see("cn-east", utilization=0.81 if t % 2 == 0 else 0.79))
    assert revisions <= 1, revisions
    w.see("cn-east", utilization=0.5)
    w.step()
    assert w.states()["cn-east"] == "healthy"


def test_probe_latency_alternating_around_slow_ms_commits_nothing() -> None:
    # End to end: probe results through rise/fall into observations into decide().
    w = World(default_policy())
    w.step()
    first = w.decision
    health = {o: TargetHealth(rise=2, fall=3) for o in w.observers}
    for h in health.values():
        for _ in range(2):
            h.record(ProbeResult(ok=True, duration_s=0.02), at=w.now)
    for t in range(60):
        latency_s = 1.010 if t % 2 == 0 else 0.990
        for observer, h in health.items():
            h.record(ProbeResult(ok=True, duration_s=latency_s), at=w.now)
            o = summarize(observer, "cn-east", "order", [h])
            assert o is not None
            w.see("cn-east", by=[observer], latency_ms=o.latency_ms)
        w.step()
    assert w.decision is first


# -- item 9: intents are ignored while a service is in panic --------------------------------


def panic_world(**knobs: object) -> World:
    w = World(default_policy(observers={}, services=("order", "inventory"), **knobs))
    w.step()
    return w


def test_a_drain_committed_in_panic_takes_the_region_out_of_the_panic_set() -> None:
    w = panic_world()
    for region in ("cn-east", "cn-south", "cn-north"):
        w.see(region, up=False, service="inventory")
    assert w.step().panic_services == ("inventory",)
    w.intent(IntentKind.DRAIN, region="cn-north", reason="maintenance", who="alice")
    d = w.step()
    assert w.weights("inventory") == {"cn-east": 55, "cn-south": 45, "cn-north": 0}
    assert w.states("inventory")["cn-north"] == "drained"
    assert "cn-north/inventory drained: drain cn-north by alice (maintenance); taken out of the panic" in (
        d.reasons
    )
    w.intent(IntentKind.UNDRAIN, region="cn-north")
    d = w.step()
    assert w.weights("inventory") == {"cn-east": 40, "cn-south": 33, "cn-north": 27}
    assert w.states("inventory")["cn-north"] == "healthy"
    assert "cn-north/inventory back in the panic: no longer drained" in d.reasons


def test_an_undrain_in_panic_puts_the_region_back() -> None:
    w = panic_world()
    w.intent(IntentKind.DRAIN, region="cn-north", service="order")
    w.step()
    for region in ("cn-east", "cn-south", "cn-north"):
        w.see(region, up=False, service="order")
    w.step()
    assert w.states()["cn-north"] == "drained"
    w.intent(IntentKind.UNDRAIN, region="cn-north", service="order")
    w.step()
    assert w.states()["cn-north"] == "healthy"
    assert w.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}


def test_a_drain_of_the_last_region_serving_in_panic_is_refused_and_says_why() -> None:
    w = panic_world()
    w.see("cn-east", up=False)
    w.see("cn-south", up=False)
    w.settle(30)
    w.see("cn-north", up=False)
    assert w.step().panic
    assert w.weights() == {"cn-east": 0, "cn-south": 0, "cn-north": 100}
    w.intent(IntentKind.DRAIN, region="cn-north", service="order", reason="x", who="bob")
    d = w.step()
    assert w.weights() == {"cn-east": 0, "cn-south": 0, "cn-north": 100}
    assert (
        "drain cn-north/order by bob (x) not applied to order: it would leave 0 regions serving order "
        "in panic, fewer than min_healthy_regions (1)" in d.reasons
    )


def test_a_failover_in_panic_sends_the_share_to_its_target() -> None:
    w = panic_world()
    for region in ("cn-east", "cn-south", "cn-north"):
        w.see(region, up=False, service="order")
    w.step()
    w.intent(IntentKind.FAILOVER, from_region="cn-east", to_region="cn-north", service="order")
    w.step()
    assert w.weights() == {"cn-east": 0, "cn-south": 33, "cn-north": 67}
    assert w.states()["cn-east"] == "drained"
