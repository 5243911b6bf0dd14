"""Scenarios an SRE would describe, run through the pure decision engine."""

from __future__ import annotations

import pytest

from controlplane.model import FeatureSpec, IntentKind
from tests.unit.world import World, make_policy

FEATURES = (
    FeatureSpec("recommendations", level=3, saves=0.20),
    FeatureSpec("comments", level=3, saves=0.10),
    FeatureSpec("likes", level=2, saves=0.05),
    FeatureSpec("checkout", level=1, saves=0.0),
)


@pytest.fixture
def world() -> World:
    w = World(make_policy())
    w.step()
    return w


def test_all_healthy_splits_by_capacity(world: World) -> None:
    assert world.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}
    assert set(world.states().values()) == {"healthy"}
    assert world.decision is not None and world.decision.revision == 1


def test_one_region_down_moves_its_share_to_the_others_by_capacity(world: World) -> None:
    world.see("cn-east", up=False)
    d = world.step()
    assert world.weights() == {"cn-east": 0, "cn-south": 56, "cn-north": 44}
    assert world.states()["cn-east"] == "down"
    assert d.revision == 2
    assert "cn-east/order down: 3 of 3 observers report connect timeout" in d.reasons
    assert "order: share moved from cn-east (-40) to cn-south (+23), cn-north (+17)" in d.reasons


def test_a_single_observer_cannot_take_a_region_out(world: World) -> None:
    world.see("cn-east", up=False, by=["agent-north-1"])
    first = world.decision
    d = world.step()
    assert d is first, "words alone do not make a new revision at once"
    assert world.weights()["cn-east"] == 40
    assert world.states()["cn-east"] == "healthy"
    d = world.step(5)
    assert d.revision == 2, "the reasons go out a few seconds later"
    assert world.weights()["cn-east"] == 40
    assert "cn-east/order: 1 of 3 observers report connect timeout, quorum is 2: not down" in d.reasons


def test_two_of_three_observers_are_a_quorum(world: World) -> None:
    world.see("cn-east", up=False, by=["agent-north-1", "agent-south-1"])
    world.step()
    assert world.weights()["cn-east"] == 0


def test_stale_observations_do_not_count(world: World) -> None:
    # Two observers say down but their last word is older than observation_ttl_s.
    world.see("cn-east", up=False, by=["agent-north-1", "agent-south-1"])
    world.step()
    assert world.weights()["cn-east"] == 0
    world.see("cn-east", up=True, by=["agent-east-1"])
    # Only agent-east-1 keeps publishing; the two others fall silent and expire.
    world.now += world.policy.observation_ttl_s + 1
    d = world.step(silent=["agent-north-1", "agent-south-1"])
    assert d.services["order"]["cn-east"].verdict == "up"


def test_configured_observer_quorum_is_respected() -> None:
    w = World(make_policy(observer_quorum=3))
    w.step()
    w.see("cn-east", up=False, by=["agent-north-1", "agent-south-1"])
    w.step()
    assert w.weights()["cn-east"] == 40
    w.see("cn-east", up=False)
    w.step()
    assert w.weights()["cn-east"] == 0


def test_no_change_keeps_the_same_revision(world: World) -> None:
    first = world.decision
    again = world.step()
    assert again is first


def test_recovered_region_waits_recovery_hold_s_then_ramps(world: World) -> None:
    world.see("cn-east", up=False)
    world.step()
    world.see("cn-east", up=True)
    d = world.step()
    recovered_at = world.now
    assert world.weights()["cn-east"] == 0
    assert world.states()["cn-east"] == "down"
    assert any(r.startswith("cn-east/order recovering: up since") for r in d.reasons)
    assert d.next_review_at == recovered_at + 10
    world.settle(8)
    assert world.weights()["cn-east"] == 0, "still inside the hold"
    world.settle(2)  # hold over: first ramp step, 25% of its 40
    assert world.weights()["cn-east"] == 10
    assert world.states()["cn-east"] == "healthy"
    assert any("cn-east/order ramping: 25% of its share" in r for r in world.decision.reasons)  # type: ignore[union-attr]
    world.settle(5)
    assert world.weights()["cn-east"] == 20
    world.settle(5)
    assert world.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}
    assert world.decision is not None and world.decision.next_review_at is None


def test_flapping_region_restarts_the_hold(world: World) -> None:
    world.see("cn-east", up=False)
    world.step()
    world.see("cn-east", up=True)
    world.settle(5)
    world.see("cn-east", up=False)
    world.step()
    world.see("cn-east", up=True)
    world.settle(9)
    assert world.weights()["cn-east"] == 0


def test_all_regions_down_at_once_serves_them_all_by_base_weights(world: World) -> None:
    # Regions fail a few hundred ms apart (one correlated fault): the decisions in
    # between must not pile traffic onto the region judged down last.
    world.see("cn-east", up=False)
    world.step(0.4)
    world.see("cn-south", up=False)
    world.step(0.4)
    assert world.weights() == {"cn-east": 0, "cn-south": 0, "cn-north": 100}
    world.see("cn-north", up=False)
    d = world.step(0.4)
    assert d.panic
    assert world.weights() == {"cn-east": 40, "cn-south": 33, "cn-north": 27}
    assert set(world.states().values()) == {"healthy"}, "LBs must keep sending"
    assert d.services["order"]["cn-south"].verdict == "down"
    assert any(r.startswith("panic: verdicts would leave 0 of 3 regions serving order") for r in d.reasons)
    assert world.step() is d, "stable while in panic"


def test_panic_leaves_out_a_region_that_was_down_before_the_incident(world: World) -> None:
    world.see("cn-east", up=False)
    world.step()
    before = world.settle(30)
    assert before.services["order"]["cn-east"].weight == 0
    world.see("cn-south", up=False)
    world.see("cn-north", up=False)
    d = world.step()
    assert d.panic
    assert world.weights() == {"cn-east": 0, "cn-south": 56, "cn-north": 44}
    assert world.states()["cn-east"] == "down"
    world.see("cn-south", up=True)
    d = world.step()
    assert not d.panic, "cn-south served through the panic: no recovery hold"
    assert world.weights() == {"cn-east": 0, "cn-south": 100, "cn-north": 0}


def test_panic_keeps_drained_regions_out(world: World) -> None:
    world.intent(IntentKind.DRAIN, region="cn-north")
    world.step()
    world.see("cn-east", up=False)
    world.see("cn-south", up=False)
    world.see("cn-north", up=False)
    d = world.step()
    assert d.panic
    assert world.weights() == {"cn-east": 55, "cn-south": 45, "cn-north": 0}
    assert world.states()["cn-north"] == "drained"


def test_min_healthy_regions_does_not_turn_a_second_loss_into_panic() -> None:
    # min_healthy_regions limits operators' drains; panic is for when nothing would serve.
    w = World(make_policy(min_healthy_regions=2))
    w.step()
    w.see("cn-east", up=False)
    w.step()
    w.settle(30)
    assert w.weights()["cn-east"] == 0
    w.see("cn-south", up=False)
    d = w.step()
    assert not d.panic
    assert w.weights() == {"cn-east": 0, "cn-south": 0, "cn-north": 100}
    assert w.states() == {"cn-east": "down", "cn-south": "down", "cn-north": "healthy"}


def test_drain_wins_over_a_healthy_verdict(world: World) -> None:
    world.intent(IntentKind.DRAIN, region="cn-east", reason="maintenance", who="alice")
    d = world.step()
    assert world.weights()["cn-east"] == 0
    assert world.states()["cn-east"] == "drained"
    assert "cn-east/order drained: drain cn-east by alice (maintenance)" in d.reasons


def test_undrain_brings_the_region_back_through_the_ramp(world: World) -> None:
    world.intent(IntentKind.DRAIN, region="cn-east")
    world.step()
    world.intent(IntentKind.UNDRAIN, region="cn-east")
    world.step()
    assert world.weights()["cn-east"] == 10
    world.settle(10)
    assert world.weights()["cn-east"] == 40


def test_drain_of_the_last_serving_region_is_not_applied(world: World) -> None:
    world.see("cn-south", up=False)
    world.see("cn-north", up=False)
    world.step()
    world.intent(IntentKind.DRAIN, region="cn-east")
    d = world.step()
    assert world.weights()["cn-east"] == 100
    assert any("not applied to order" in r for r in d.reasons)


def test_failover_sends_the_share_to_the_chosen_region(world: World) -> None:
    world.intent(IntentKind.FAILOVER, from_region="cn-east", to_region="cn-north", service="order")
    d = world.step()
    assert world.weights() == {"cn-east": 0, "cn-south": 33, "cn-north": 67}
    assert world.states()["cn-east"] == "drained"
    assert any(r.startswith("order failed over from cn-east to cn-north") for r in d.reasons)


def test_failover_of_one_service_leaves_the_others() -> None:
    w = World(make_policy(services=("order", "inventory")))
    w.step()
    w.intent(IntentKind.FAILOVER, from_region="cn-east", to_region="cn-south", service="order")
    w.step()
    assert w.weights("order")["cn-east"] == 0
    assert w.weights("inventory")["cn-east"] == 40


def test_failover_respects_the_target_capacity() -> None:
    w = World(make_policy(demand={"order": 9000}))
    w.step()
    w.intent(IntentKind.FAILOVER, from_region="cn-east", to_region="cn-north")
    w.step()
    # cn-north can carry 4000 of 9000 rps: 44%; the rest goes to cn-south.
    assert w.weights() == {"cn-east": 0, "cn-south": 56, "cn-north": 44}


def test_override_sets_weights_but_never_to_a_down_region(world: World) -> None:
    world.intent(IntentKind.OVERRIDE, service="order", weights={"cn-east": 70, "cn-south": 30})
    world.step()
    assert world.weights() == {"cn-east": 70, "cn-south": 30, "cn-north": 0}
    world.see("cn-east", up=False)
    world.step()
    assert world.weights() == {"cn-east": 0, "cn-south": 100, "cn-north": 0}


def test_freeze_holds_verdicts_until_unfrozen(world: World) -> None:
    world.intent(IntentKind.FREEZE, reason="drill")
    world.see("cn-east", up=False)
    d = world.step()
    assert d.frozen
    assert world.weights()["cn-east"] == 40
    assert any("held at up because automation is frozen" in r for r in d.reasons)
    world.intent(IntentKind.DRAIN, region="cn-south")
    world.step()
    assert world.weights()["cn-south"] == 0, "intents still apply while frozen"
    world.intent(IntentKind.UNFREEZE)
    world.step()
    assert world.weights()["cn-east"] == 0


def test_slow_region_is_degraded_and_keeps_part_of_its_share(world: World) -> None:
    world.see("cn-east", latency_ms=2500.0)
    d = world.step()
    assert world.states()["cn-east"] == "degraded"
    assert world.weights() == {"cn-east": 20, "cn-south": 44, "cn-north": 36}
    assert (
        "cn-east/order degraded: 3 of 3 observers see it slow (above 1000 ms to degrade, "
        "below 800 ms to restore); weight scaled by 0.5" in d.reasons
    )


def test_hot_region_is_degraded_by_utilization(world: World) -> None:
    world.see("cn-south", utilization=0.95)
    d = world.step()
    assert world.states()["cn-south"] == "degraded"
    assert any(
        "median utilization high (above 0.8 to degrade, below 0.64 to restore)" in r for r in d.reasons
    )


def test_capacity_caps_redistribution() -> None:
    w = World(make_policy(demand={"order": 8000}))
    w.step()
    w.see("cn-east", up=False)
    w.step()
    # cn-north can take at most 4000 of 8000 rps.
    assert w.weights()["cn-north"] <= 50
    assert sum(w.weights().values()) == 100


def test_deficit_switches_off_level_3_features_before_level_2() -> None:
    w = World(make_policy(demand={"order": 10000}, features=FEATURES))
    d = w.step()
    assert all(d.features.values())
    w.see("cn-east", up=False)  # 9000 rps left for 10000 demand
    d = w.step()
    assert d.features == {"recommendations": True, "comments": False, "likes": True, "checkout": True}
    assert d.shed_fraction == 0.0
    assert "features off to cover the deficit: comments" in d.reasons
    w.see("cn-south", up=False)  # 4000 rps left: every eligible feature goes, then shed
    d = w.step()
    assert d.features == {"recommendations": False, "comments": False, "likes": False, "checkout": True}
    assert d.shed_fraction == pytest.approx(0.39)  # 1 - 4000 / (10000 * 0.65), rounded up
    assert "shedding 39% of low-priority requests" in d.reasons


def test_level_1_features_are_never_switched_off_by_automation() -> None:
    w = World(make_policy(demand={"order": 100000}, features=FEATURES))
    d = w.step()
    assert d.features["checkout"] is True
    assert d.shed_fraction > 0


def test_features_come_back_only_with_margin() -> None:
    w = World(
        make_policy(demand={"order": 10000}, features=FEATURES, recovery_hold_s=0.0, restore_margin=0.1)
    )
    w.step()
    w.see("cn-north", latency_ms=3000.0)  # 6000 + 5000 + 2000 = 13000: covered
    d = w.step()
    assert all(d.features.values())
    w.see("cn-east", up=False)  # 5000 + 2000 = 7000 for 10000: 30% to save
    d = w.step()
    assert not d.features["recommendations"] and not d.features["comments"]
    w.see("cn-north", latency_ms=20.0)  # 9000 rps: only comments would be needed now,
    d = w.step()  # but restoring recommendations needs 9000 * 1.1 <= 9000: not yet
    assert not d.features["recommendations"] and not d.features["comments"]
    w.see("cn-east", up=True)  # back at 25% of 6000: 10500 rps
    d = w.step()
    assert d.features["recommendations"], "9000 * 1.1 = 9900 <= 10500: restored"
    assert not d.features["comments"], "10000 * 1.1 = 11000 > 10500: kept off"
    d = w.settle(10)  # fully ramped: 15000 rps
    assert all(d.features.values())


def test_feature_intent_wins_over_automation() -> None:
    w = World(make_policy(demand={"order": 10000}, features=FEATURES))
    w.step()
    w.intent(IntentKind.FEATURE, feature="likes", enabled=False)
    d = w.step()
    assert d.features["likes"] is False
    assert "feature likes forced off by operator" in d.reasons
    w.see("cn-east", up=False)
    w.intent(IntentKind.FEATURE, feature="comments", enabled=True)
    d = w.step()
    # likes (5%) is forced off and comments forced on: recommendations (20%) must go.
    assert d.features == {"recommendations": False, "comments": True, "likes": False, "checkout": True}


def test_degradation_applies_in_the_same_decision_as_the_fault() -> None:
    w = World(make_policy(demand={"order": 10000}, features=FEATURES))
    w.step()
    w.see("cn-east", up=False)
    d = w.step()
    assert d.services["order"]["cn-east"].weight == 0
    assert d.features["comments"] is False


def test_unknown_region_state_is_kept_when_observers_fall_silent(world: World) -> None:
    world.see("cn-east", up=False)
    world.step()
    world.now += 60
    d = world.step(silent=world.observers)
    assert world.weights()["cn-east"] == 0
    assert any(r == "cn-east/order: no fresh observations; keeping it down" for r in d.reasons)


def test_an_early_lone_reporter_is_not_a_quorum(world: World) -> None:
    # agent-north-1 is the only one with a word on cn-east so far; the other two are
    # alive (they report other regions) and count towards the quorum.
    for observer in ("agent-east-1", "agent-south-1"):
        del world.seen[(observer, "cn-east", "order")]
    world.see("cn-east", up=False, by=["agent-north-1"])
    d = world.step(5)
    assert world.weights()["cn-east"] == 40
    assert "cn-east/order: 1 of 3 observers report connect timeout, quorum is 2: not down" in d.reasons
