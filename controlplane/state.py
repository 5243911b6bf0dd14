"""The replicated control state as plain immutable values.

What every member of the consensus group holds (observations, standing intents, the
committed decision, a bounded history, the results of past drills) and what a member
knows about the group
(`StoreStatus`). No asyncio, no I/O: the pure planner, the state transitions, every
backend and the HTTP API share these types, and tests build them by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.model import (
    Decision,
    Intent,
    Observation,
    Record,
    decision_from_json,
    decision_to_json,
    intent_from_json,
    intent_to_json,
    observation_from_json,
    observation_to_json,
)

# How much history every member keeps; older entries are dropped. The same bound caps
# how many applied intent ids are remembered for idempotent resubmission.
HISTORY_LIMIT = 1000

# How many drill results every member keeps (the newest), and how big one may be: a
# record is written by a client (`POST /v1/drills`), so every part of it is bounded.
DRILLS_LIMIT = 100
DRILL_ID_MAX = 64
DRILL_NAME_MAX = 100  # region, service, who
DRILL_STAGES_MAX = 32
DRILL_STAGE_NAME_MAX = 64
DRILL_LATE_LBS_MAX = 64
DRILL_LB_NAME_MAX = 64
DRILL_SUMMARY_MAX = 500
# Seconds a stage or the RTO may be, either way of the start: a stage is measured with
# more than one clock (the operator's, the cluster's, a load balancer's), so one may come
# out a little before the start; it is kept as measured. The bound only keeps it sane.
DRILL_SECONDS_MAX = 10_000_000.0

ObservationKey = tuple[str, str, str]  # (observer, region, service)


@dataclass(frozen=True, slots=True)
class HistoryEntry(Record):
    """One line of the audit trail: a committed decision, intent or intent removal, the
    cluster state's creation, or a drill's recorded result (its `intent_id` is the drill
    intent's id).

    A decision's entry keeps its weights (service -> region -> weight), so that the
    dashboard can draw the weights of the last hour from history alone.
    """

    kind: str  # "decision" | "intent" | "intent-removed" | "epoch" | "drill"
    at: float
    revision: int
    summary: str
    intent_id: str | None = None
    who: str | None = None
    weights: Mapping[str, Mapping[str, int]] | None = None


@dataclass(frozen=True, slots=True)
class DrillRecord(Record):
    """The measured result of one drill: a region black-holed on purpose, then restored.

    `id` is the drill intent's id (one record per drill). Times are Unix seconds;
    `stages` maps a stage's name (decision committed, served by every agent, applied by
    every load balancer...) to its seconds from `started_at`, None for a stage that was
    not reached. `rto_s` is the recovery time measured to the end (None when it was not),
    `passed` whether it met `objective_s`, `late_lbs` the load balancers that had not
    applied the decision in time. `who` is the name of the token that recorded it and
    `recorded_at` when the store committed it (the store sets both, never the client).
    """

    id: str
    region: str
    service: str | None
    who: str
    started_at: float
    ended_at: float
    objective_s: float
    rto_s: float | None
    passed: bool
    stages: Mapping[str, float | None] = field(default_factory=dict)
    late_lbs: tuple[str, ...] = ()
    summary: str = ""
    recorded_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ControlState:
    """An immutable snapshot of the replicated state as one member has applied it.

    `version` grows with every applied change (a Raft log position, an etcd revision)
    and is what `ControlStore.wait_for_change` compares against; only the backend sets
    it. `recent_intents` are intents applied lately (standing or not), by id, so that a
    resubmitted id applies once; it is bounded by `HISTORY_LIMIT`. `epoch` is chosen
    once, when the cluster's state is first created, and never changes afterwards:
    revisions count within it, so a cluster rebuilt from nothing (new data, a new etcd
    prefix) is told apart from the one before, whose revisions were higher. `drills`
    are the results of past drills in the order they were recorded, the newest
    `DRILLS_LIMIT` of them.
    """

    epoch: str = ""
    version: int = 0
    decision: Decision | None = None
    intents: Mapping[str, Intent] = field(default_factory=dict)
    intent_seq: int = 0
    observations: Mapping[ObservationKey, Observation] = field(default_factory=dict)
    history: tuple[HistoryEntry, ...] = ()
    recent_intents: Mapping[str, Intent] = field(default_factory=dict)
    drills: tuple[DrillRecord, ...] = ()

    @property
    def revision(self) -> int:
        """The committed decision's revision; 0 before the first decision."""
        return self.decision.revision if self.decision is not None else 0


@dataclass(frozen=True, slots=True)
class MemberStatus:
    id: str
    address: str
    connected: bool


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What this member knows about the consensus group right now.

    `has_quorum` is this member's own belief that it is in contact with a majority and
    serves what the majority committed (a leader: a majority acknowledged it recently; a
    follower: it confirmed recently that it has applied all the leader had committed).
    `quorum_lost_at` is the wall time it last lost that belief, or None while it has it;
    the API reports staleness from it.
    """

    member_id: str
    leader: str | None
    is_leader: bool
    term: int
    commit_index: int
    members: tuple[MemberStatus, ...]
    has_quorum: bool
    quorum_lost_at: float | None = None
    backend: str = ""
    # This member's wall clock against the leader's (leader minus ours); None when unknown.
    clock_skew_s: float | None = None
    # Why this member does not have quorum (or is not caught up), in words.
    problems: tuple[str, ...] = ()


def history_add(history: tuple[HistoryEntry, ...], entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
    """Append to a history tuple, keeping only the newest `HISTORY_LIMIT` entries."""
    if len(history) >= HISTORY_LIMIT:
        history = history[len(history) - HISTORY_LIMIT + 1 :]
    return (*history, entry)


def observations_replace(
    current: Mapping[ObservationKey, Observation],
    observer: str,
    observations: Sequence[Observation],
) -> dict[ObservationKey, Observation]:
    """The observation map after `observer` published `observations`."""
    out = dict(current)
    for o in observations:
        if o.observer != observer:
            continue
        out[(o.observer, o.region, o.service)] = o
    return out


# ---------------------------------------------------------------------------
# JSON shapes, for the stores that write the state down (journals, etcd keys) and the API.


def history_to_json(entry: HistoryEntry) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": entry.kind,
        "at": entry.at,
        "revision": entry.revision,
        "summary": entry.summary,
        "intent_id": entry.intent_id,
        "who": entry.who,
    }
    if entry.weights is not None:
        data["weights"] = {s: dict(ws) for s, ws in entry.weights.items()}
    return data


def history_from_json(data: Mapping[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        kind=str(data["kind"]),
        at=float(data["at"]),
        revision=int(data["revision"]),
        summary=str(data["summary"]),
        intent_id=None if data.get("intent_id") is None else str(data["intent_id"]),
        who=None if data.get("who") is None else str(data["who"]),
        weights=None
        if data.get("weights") is None
        else {str(s): {str(r): int(w) for r, w in ws.items()} for s, ws in data["weights"].items()},
    )


def drill_to_json(record: DrillRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "region": record.region,
        "service": record.service,
        "who": record.who,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "objective_s": record.objective_s,
        "rto_s": record.rto_s,
        "passed": record.passed,
        "stages": dict(record.stages),
        "late_lbs": list(record.late_lbs),
        "summary": record.summary,
        "recorded_at": record.recorded_at,
    }


def drill_from_json(data: Mapping[str, Any]) -> DrillRecord:
    return DrillRecord(
        id=str(data["id"]),
        region=str(data["region"]),
        service=None if data.get("service") is None else str(data["service"]),
        who=str(data["who"]),
        started_at=float(data["started_at"]),
        ended_at=float(data["ended_at"]),
        objective_s=float(data["objective_s"]),
        rto_s=None if data.get("rto_s") is None else float(data["rto_s"]),
        passed=bool(data["passed"]),
        stages={str(k): None if v is None else float(v) for k, v in data.get("stages", {}).items()},
        late_lbs=tuple(str(lb) for lb in data.get("late_lbs", ())),
        summary=str(data.get("summary", "")),
        recorded_at=float(data.get("recorded_at", 0.0)),
    )


def drills_add(drills: tuple[DrillRecord, ...], record: DrillRecord) -> tuple[DrillRecord, ...]:
    """Append to the drills, keeping only the newest `DRILLS_LIMIT` (the oldest recorded go)."""
    if len(drills) >= DRILLS_LIMIT:
        drills = drills[len(drills) - DRILLS_LIMIT + 1 :]
    return (*drills, record)


def state_to_json(state: ControlState) -> dict[str, Any]:
    """The whole state (its `version` too) as JSON-ready data; `state_from_json` reads it back."""
    return {
        "epoch": state.epoch,
        "version": state.version,
        "decision": None if state.decision is None else decision_to_json(state.decision),
        "intents": [intent_to_json(i) for i in state.intents.values()],
        "intent_seq": state.intent_seq,
        "observations": [observation_to_json(o) for o in state.observations.values()],
        "history": [history_to_json(e) for e in state.history],
        "recent_intents": [intent_to_json(i) for i in state.recent_intents.values()],
        "drills": [drill_to_json(d) for d in state.drills],
    }


def state_from_json(data: Mapping[str, Any]) -> ControlState:
    intents = [intent_from_json(i) for i in data.get("intents", ())]
    observations = [observation_from_json(o) for o in data.get("observations", ())]
    recent = [intent_from_json(i) for i in data.get("recent_intents", ())]
    decision = data.get("decision")
    return ControlState(
        epoch=str(data.get("epoch", "")),
        version=int(data.get("version", 0)),
        decision=None if decision is None else decision_from_json(decision),
        intents={i.id: i for i in intents},
        intent_seq=int(data.get("intent_seq", 0)),
        observations={(o.observer, o.region, o.service): o for o in observations},
        history=tuple(history_from_json(e) for e in data.get("history", ())),
        recent_intents={i.id: i for i in recent},
        # Snapshots written before drills were recorded have none.
        drills=tuple(drill_from_json(d) for d in data.get("drills", ()))[-DRILLS_LIMIT:],
    )
