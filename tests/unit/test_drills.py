"""Drill results in the replicated state: the record, its JSON codecs, and `record_drill`.

A drill's result is written once, by id, into a bounded list every member holds; the
history says what happened in one sentence. Nothing here touches a store: the backends
apply exactly this transition (`tests/consensus/test_behaviour.py` checks they do).
"""

from __future__ import annotations

import dataclasses
import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from controlplane import transitions
from controlplane.api.drills import parse_drill
from controlplane.client.drills import drill_body
from controlplane.errors import Rejected
from controlplane.metrics import Metrics
from controlplane.state import (
    DRILL_LATE_LBS_MAX,
    DRILL_SECONDS_MAX,
    DRILL_STAGE_NAME_MAX,
    DRILL_STAGES_MAX,
    DRILL_SUMMARY_MAX,
    DRILLS_LIMIT,
    HISTORY_LIMIT,
    ControlState,
    DrillRecord,
    drill_from_json,
    drill_to_json,
    state_from_json,
    state_to_json,
)


def drill(
    drill_id: str = "drill-0001",
    *,
    region: str = "cn-east",
    service: str | None = None,
    rto_s: float | None = 41.2,
    passed: bool = True,
    ended_at: float = 1_000_120.0,
) -> DrillRecord:
    return DrillRecord(
        id=drill_id,
        region=region,
        service=service,
        who="alice",
        started_at=1_000_000.0,
        ended_at=ended_at,
        objective_s=90.0,
        rto_s=rto_s,
        passed=passed,
        stages={"decision_committed": 3.1, "served": 3.4, "applied": rto_s},
        late_lbs=(),
        summary="cn-east black-holed for 2 minutes",
    )


# -- codecs ----------------------------------------------------------------------------------


def test_a_record_round_trips_through_json_bytes() -> None:
    record = dataclasses.replace(
        drill(rto_s=None, passed=False), late_lbs=("haproxy-east",), recorded_at=1_000_121.5
    )
    data = orjson.loads(orjson.dumps(drill_to_json(record)))
    assert drill_from_json(data) == record
    assert data["stages"] == {"decision_committed": 3.1, "served": 3.4, "applied": None}
    assert data["late_lbs"] == ["haproxy-east"]


names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(
    service=st.none() | names,
    rto_s=st.none() | seconds,
    stages=st.dictionaries(names, st.none() | seconds, max_size=DRILL_STAGES_MAX),
    late=st.lists(names, max_size=DRILL_LATE_LBS_MAX).map(tuple),
    summary=st.text(max_size=DRILL_SUMMARY_MAX),
)
def test_any_record_round_trips(
    service: str | None,
    rto_s: float | None,
    stages: dict[str, float | None],
    late: tuple[str, ...],
    summary: str,
) -> None:
    record = dataclasses.replace(
        drill(service=service, rto_s=rto_s), stages=stages, late_lbs=late, summary=summary
    )
    assert drill_from_json(orjson.loads(orjson.dumps(drill_to_json(record)))) == record


def test_snapshots_carry_the_drills_and_older_snapshots_load_without_them() -> None:
    state = transitions.record_drill(ControlState(epoch="e1"), drill(), at=5.0).state
    copy = state_from_json(orjson.loads(orjson.dumps(state_to_json(state))))
    assert copy == state
    assert copy.drills[0].recorded_at == 5.0

    older = state_to_json(ControlState(epoch="e1"))
    del older["drills"]  # written by a release before drills
    assert state_from_json(older).drills == ()


# -- the transition --------------------------------------------------------------------------


def test_recording_appends_stamps_and_writes_one_history_line() -> None:
    state = ControlState(epoch="e1")

    change = transitions.record_drill(state, drill(), at=1_000_130.0)

    assert change.changed
    stored = change.result
    assert stored == dataclasses.replace(drill(), recorded_at=1_000_130.0)
    assert change.state.drills == (stored,)
    assert change.entry is not None
    assert change.state.history == (change.entry,)
    entry = change.entry
    assert (entry.kind, entry.at, entry.intent_id, entry.who) == ("drill", 1_000_130.0, "drill-0001", "alice")
    assert entry.summary == "drill of cn-east by alice: RTO 41.2 s, objective 90 s: passed"
    assert state.drills == ()  # the input is left alone


@pytest.mark.parametrize(
    ("record", "summary"),
    [
        (
            drill(service="order", rto_s=120.0, passed=False),
            "drill of cn-east/order by alice: RTO 120 s, objective 90 s: failed",
        ),
        (
            drill(rto_s=None, passed=False),
            "drill of cn-east by alice: RTO not measured, objective 90 s: failed",
        ),
    ],
)
def test_the_history_says_what_happened(record: DrillRecord, summary: str) -> None:
    change = transitions.record_drill(ControlState(), record, at=1.0)
    assert change.entry is not None
    assert change.entry.summary == summary


def test_times_measured_through_other_clocks_may_come_out_before_the_start() -> None:
    # cpctl measures stages with its clock, the cluster's and the load balancers' (their
    # offsets estimated): a stage, even the RTO, can come out a little negative. It is
    # recorded as measured, not refused (which would lose the whole drill).
    record = bad(
        rto_s=-0.004, stages={"committed": -0.012, "applied_all": -0.004}, late_lbs=("haproxy@lb-1",)
    )
    assert transitions.record_drill(ControlState(), record, at=1.0).changed


def test_the_same_id_again_returns_the_stored_record_and_changes_nothing() -> None:
    first = transitions.record_drill(ControlState(), drill(), at=10.0)

    again = transitions.record_drill(first.state, drill(rto_s=99.0, passed=False), at=20.0)

    assert not again.changed
    assert again.state is first.state
    assert again.result == first.result
    assert again.result.recorded_at == 10.0


def test_drills_are_bounded_to_the_newest_and_history_stays_bounded() -> None:
    state = ControlState()
    extra = 7
    for i in range(DRILLS_LIMIT + extra):
        state = transitions.record_drill(state, drill(f"drill-{i:04}"), at=float(i)).state

    assert len(state.drills) == DRILLS_LIMIT
    assert [d.id for d in state.drills] == [f"drill-{i:04}" for i in range(extra, DRILLS_LIMIT + extra)]
    assert len(state.history) == DRILLS_LIMIT + extra <= HISTORY_LIMIT
    # An id dropped from the bounded list is no longer known: it would be recorded again.
    assert transitions.record_drill(state, drill("drill-0000"), at=1e6).changed


def bad(**changes: object) -> DrillRecord:
    return dataclasses.replace(drill(), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (bad(id=""), "id"),
        (bad(id="x" * 65), "id"),
        (bad(region=""), "region"),
        (bad(who=""), "who"),
        (bad(ended_at=999_999.0), "ended_at"),
        (bad(started_at=math.nan), "started_at"),
        (bad(objective_s=0.0), "objective_s"),
        (bad(rto_s=-2 * DRILL_SECONDS_MAX, passed=False), "rto_s"),
        (bad(rto_s=math.inf), "rto_s"),
        (bad(rto_s=None, passed=True), "passed"),
        (bad(rto_s=91.0, passed=True), "passed"),
        (bad(stages={f"s{i}": 1.0 for i in range(DRILL_STAGES_MAX + 1)}), "stages"),
        (bad(stages={"x" * (DRILL_STAGE_NAME_MAX + 1): 1.0}), "stages"),
        (bad(stages={"served": math.nan}), "stages"),
        (bad(stages={"served": DRILL_SECONDS_MAX + 1}), "stages"),
        (bad(late_lbs=tuple(f"lb{i}" for i in range(DRILL_LATE_LBS_MAX + 1))), "late_lbs"),
        (bad(late_lbs=("x" * 65,)), "late_lbs"),
        (bad(summary="x" * (DRILL_SUMMARY_MAX + 1)), "summary"),
    ],
)
def test_a_record_out_of_bounds_is_rejected_and_changes_nothing(record: DrillRecord, problem: str) -> None:
    state = ControlState()
    with pytest.raises(Rejected) as refused:
        transitions.record_drill(state, record, at=1.0)
    assert problem in refused.value.detail
    assert state.drills == ()


# -- metrics -----------------------------------------------------------------------------------


def scrape(drills: tuple[DrillRecord, ...]) -> dict[str, float]:
    metrics = Metrics("m0")
    metrics.drills.follow(lambda: drills)
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE controlplane_drill_last_passed_timestamp_seconds gauge" in text  # always described
    return {
        name: float(value)
        for name, value in (line.split(" ", 1) for line in text.splitlines())
        if name.startswith("controlplane_drill_")
    }


def test_no_drill_yet_shows_no_samples() -> None:
    assert scrape(()) == {}


def test_the_last_drill_is_the_last_to_end_whatever_the_order_recorded() -> None:
    old_pass = drill("d-old", ended_at=1000.0, rto_s=30.0)
    new_fail = drill("d-new", ended_at=3000.0, rto_s=None, passed=False)
    mid_fail = drill("d-mid", ended_at=2000.0, rto_s=95.0, passed=False)
    assert scrape((new_fail, old_pass, mid_fail)) == {
        "controlplane_drill_last_timestamp_seconds": 3000.0,
        "controlplane_drill_last_rto_seconds": 95.0,  # the last one measured to the end
        "controlplane_drill_last_passed_timestamp_seconds": 1000.0,
    }


def test_without_a_passing_drill_its_series_is_absent() -> None:
    assert scrape((drill("d1", rto_s=None, passed=False),)) == {
        "controlplane_drill_last_timestamp_seconds": 1_000_120.0,
    }


# -- the client helper -----------------------------------------------------------------------


def test_the_helper_derives_the_rto_and_the_verdict_from_the_stages() -> None:
    body = drill_body(
        drill_id="drill-0001",
        region="cn-east",
        service=None,
        started_at=1000.0,
        ended_at=1120.0,
        objective_s=90.0,
        stages={"decision_committed": 2.5004, "served": 2.9, "applied": 41.2},
        rto_stage="applied",
    )
    assert (body["rto_s"], body["passed"], body["stages"]["decision_committed"]) == (41.2, True, 2.5)
    late = drill_body(**{**HELPER_ARGS, "stages": {"served": 2.9, "applied": None}, "late_lbs": ["lb-1"]})
    assert (late["rto_s"], late["passed"], late["late_lbs"]) == (None, False, ["lb-1"])
    with pytest.raises(ValueError, match="rto_stage"):
        drill_body(**{**HELPER_ARGS, "rto_stage": "nope"})
    with pytest.raises(ValueError, match="ends before"):
        drill_body(**{**HELPER_ARGS, "ended_at": 999.0})
    with pytest.raises(ValueError, match="load balancer names"):
        drill_body(**{**HELPER_ARGS, "late_lbs": ["not a name"]})
    early = drill_body(
        **{**HELPER_ARGS, "stages": {"committed": -0.0123, "applied": math.inf}, "rto_stage": "applied"}
    )
    assert early["stages"] == {"committed": -0.012, "applied": None}


def test_the_helper_names_load_balancers_as_they_report_themselves() -> None:
    from controlplane.client.drills import LB_NAME_PATTERN
    from controlplane.lbreports import NAME_PATTERN

    assert LB_NAME_PATTERN == NAME_PATTERN


HELPER_ARGS: dict[str, object] = {
    "drill_id": "drill-0002",
    "region": "cn-south",
    "service": "order",
    "started_at": 1000.0,
    "ended_at": 1120.0,
    "objective_s": 90.0,
    "stages": {"applied": 12.0},
    "rto_stage": "applied",
}


@given(
    stages=st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,20}", fullmatch=True),
        st.none() | st.floats(allow_nan=True, allow_infinity=True),
        min_size=1,
        max_size=32,
    ),
    late=st.lists(st.from_regex(r"[a-z][a-z0-9@.-]{0,30}", fullmatch=True), max_size=100),
    summary=st.text(max_size=800),
)
def test_whatever_a_drill_measured_the_helpers_body_is_accepted(
    stages: dict[str, float | None], late: list[str], summary: str
) -> None:
    body = drill_body(
        **{
            **HELPER_ARGS,
            "stages": stages,
            "rto_stage": next(iter(stages)),
            "late_lbs": late,
            "summary": summary,
        }
    )
    # What an agent does with it: the body's checks, then the state machine's.
    record = parse_drill(orjson.loads(orjson.dumps(body)), who="alice")
    assert transitions.drill_problems(record) == []
