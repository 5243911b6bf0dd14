"""What a write would do, judged before it is committed (`controlplane.plan`)."""

from __future__ import annotations

import pytest

from controlplane.config import load_settings
from controlplane.decide import decide
from controlplane.errors import Unsafe
from controlplane.intents import apply_intent
from controlplane.model import Decision, Intent, IntentKind, Observation
from controlplane.plan import check_safe
from controlplane.state import ControlState
from controlplane.testing.localcluster import DEMO_CONFIG

SETTINGS = load_settings(DEMO_CONFIG)
POLICY = SETTINGS.policy
AGENTS = [a.id for a in SETTINGS.cluster.agents]


def seen(up: bool, at: float) -> list[Observation]:
    return [
        Observation(observer=a, region=r.name, service=s, up=up, at=at, error=None if up else "refused")
        for a in AGENTS
        for s in POLICY.services
        for r in POLICY.regions_of(s)
    ]


def drain(region: str, n: int) -> Intent:
    return Intent(id=f"drain-{region}", kind=IntentKind.DRAIN, reason="t", region=region, seq=n)


def in_panic(standing: dict[str, Intent]) -> ControlState:
    """Every region down at once (a probe problem, most likely): every service in panic."""
    first = decide(POLICY, seen(True, 100.0), standing, None, 100.0, intent_seq=len(standing))
    observations = seen(False, 105.0)
    panic: Decision = decide(POLICY, observations, standing, first, 105.0, intent_seq=len(standing))
    assert panic.panic
    return ControlState(
        decision=panic,
        intents=standing,
        intent_seq=len(standing),
        observations={(o.observer, o.region, o.service): o for o in observations},
    )


def test_a_drain_in_panic_that_leaves_other_regions_serving_is_accepted() -> None:
    after = check_safe(POLICY, in_panic({}), drain("cn-east", 1), 106.0)
    assert after.services["order"]["cn-east"].weight == 0


def test_draining_the_last_region_serving_in_panic_is_refused_before_it_is_committed() -> None:
    standing: dict[str, Intent] = {}
    for n, region in enumerate(("cn-east", "cn-south"), start=1):
        standing = apply_intent(standing, drain(region, n))
    state = in_panic(standing)
    assert {r for r, p in state.decision.services["order"].items() if p.weight} == {"cn-north"}  # type: ignore[union-attr]
    with pytest.raises(Unsafe) as refused:
        check_safe(POLICY, state, drain("cn-north", 3), 106.0)
    assert "not applied" in refused.value.detail
