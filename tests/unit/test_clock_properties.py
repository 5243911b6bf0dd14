"""No agent's wall clock changes a verdict (issue 13, item 4), as a property of the pipeline.

Observations reach `decide()` through the replicated state machine, which stamps each
with the cluster time of the entry that carried it. So whatever `at` an observer wrote
(its wall clock off by up to 30 s either way, or anything else), the verdicts come out
the same as if every clock were right.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.consensus.raft_machine import ControlMachine, observations_command
from controlplane.decide.verdicts import judge
from controlplane.model import Observation, Policy, RegionSpec

REGIONS = ("r0", "r1", "r2")
OBSERVERS = ("a0", "a1", "a2")
POLICY = Policy(
    regions=tuple(RegionSpec(r, {"s": 100.0}, {"s": 100.0}) for r in REGIONS),
    services=("s",),
    observers=dict(zip(OBSERVERS, REGIONS, strict=True)),
    observation_ttl_s=6.0,
)


def apply_all(batches: list[tuple[str, float, list[Observation]]]) -> ControlMachine:
    machine = ControlMachine(lambda state: None)
    for index, (observer, ctime, items) in enumerate(batches, start=1):
        machine.apply(index, 1, ctime, observations_command(observer, items))
    return machine


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, float, list[Observation]]], dict[str, float]]:
    """Batches of observations published over a minute, and a clock offset per observer."""
    offsets = {a: draw(st.floats(-30.0, 30.0)) for a in OBSERVERS}
    batches = []
    ctime = 1000.0
    for _ in range(draw(st.integers(1, 12))):
        ctime += draw(st.floats(0.1, 5.0))
        observer = draw(st.sampled_from(OBSERVERS))
        items = [
            Observation(observer, r, "s", up=draw(st.booleans()), at=ctime)
            for r in draw(st.lists(st.sampled_from(REGIONS), min_size=1, unique=True))
        ]
        batches.append((observer, ctime, items))
    return batches, offsets


@given(histories(), st.floats(0.0, 10.0))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_one_observers_clock_offset_changes_no_verdict(
    history: tuple[list[tuple[str, float, list[Observation]]], dict[str, float]], after_s: float
) -> None:
    batches, offsets = history
    right = apply_all(batches)
    skewed = apply_all(
        [
            (observer, ctime, [dataclasses.replace(o, at=o.at + offsets[observer]) for o in items])
            for observer, ctime, items in batches
        ]
    )
    now = batches[-1][1] + after_s
    assert judge(POLICY, right.state.observations.values(), now) == judge(
        POLICY, skewed.state.observations.values(), now
    )
