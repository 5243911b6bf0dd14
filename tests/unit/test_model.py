"""The model's records survive pickling across releases (the Raft journal pickles them)."""

from __future__ import annotations

import pickle
from dataclasses import replace

from controlplane.model import (
    Decision,
    Intent,
    IntentKind,
    Observation,
    Placement,
    State,
    Verdict,
    _restore,
    decision_from_json,
    decision_to_json,
    intent_from_json,
    intent_to_json,
    observation_from_json,
    observation_to_json,
)
from controlplane.state import HistoryEntry

DECISION = Decision(
    revision=7,
    services={
        "order": {"cn-east": Placement(weight=60, state=State.HEALTHY, verdict=Verdict.UP, verdict_since=1.0)}
    },
    features={"comments": False},
    shed_fraction=0.1,
    reasons=("why",),
    intent_seq=3,
    term=2,
    leader="a1",
    committed_at=5.0,
)


def test_records_round_trip_through_pickle() -> None:
    items = [
        DECISION,
        Observation(observer="a", region="r", service="s", up=False, at=1.0, error="HTTP 503"),
        Intent(id="i1", kind=IntentKind.DRAIN, reason="m", region="r", seq=4),
        HistoryEntry(kind="decision", at=1.0, revision=7, summary="x"),
    ]
    for item in items:
        assert pickle.loads(pickle.dumps(item)) == item


def test_a_field_added_later_takes_its_default_and_a_dropped_one_is_ignored() -> None:
    # What an older release wrote: no `ramp`; what a newer one wrote: an unknown field.
    old = _restore(
        Placement, {"weight": 10, "state": State.DOWN, "verdict": Verdict.DOWN, "verdict_since": 2.0}
    )
    assert old.ramp == 1.0 and old.serving_since is None and old.weight == 10
    newer = _restore(
        Observation, {"observer": "a", "region": "r", "service": "s", "up": True, "at": 1.0, "x": 1}
    )
    assert newer.up and newer.latency_ms is None


def test_json_shapes_round_trip() -> None:
    assert decision_from_json(decision_to_json(DECISION)) == DECISION
    intent = Intent(id="i2", kind=IntentKind.FAILOVER, reason="drill", from_region="a", to_region="b", seq=1)
    assert intent_from_json(intent_to_json(intent)) == intent


def test_panic_memory_and_impaired_flag_survive_json_and_pickle() -> None:
    d = replace(
        DECISION,
        panic=True,
        panic_services=("order",),
        panic_regions={"order": ("cn-south", "cn-north")},
        panic_since={"order": 1234.5},
    )
    assert decision_from_json(decision_to_json(d)) == d
    assert pickle.loads(pickle.dumps(d)) == d
    o = Observation("a", "r", "s", up=False, at=1.0, impaired="probe deadlines fired 850 ms late")
    assert observation_from_json(observation_to_json(o)) == o
    # What an older release wrote has neither: an empty panic memory, no flag.
    old = decision_to_json(DECISION)
    del old["panic_regions"], old["panic_since"]
    assert decision_from_json(old).panic_regions == {}


def test_an_inconclusive_observation_survives_json_and_pickle() -> None:
    o = Observation("a", "r", "s", up=True, at=1.0, inconclusive="prometheus unreachable: inconclusive")
    assert observation_from_json(observation_to_json(o)) == o
    assert pickle.loads(pickle.dumps(o)) == o
    # What an older release wrote has no such field: a conclusive observation.
    old = observation_to_json(o)
    del old["inconclusive"]
    assert observation_from_json(old).inconclusive is None
