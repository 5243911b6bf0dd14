"""The replicated control state as plain immutable values.

What every member of the consensus group holds (observations, standing intents, the
committed decision, a bounded history) and what a member knows about the group
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

ObservationKey = tuple[str, str, str]  # (observer, region, service)


@dataclass(frozen=True, slots=True)
class HistoryEntry(Record):
    """One line of the audit trail: a committed decision, intent or intent removal.

    A decision's entry keeps its weights (service -> region -> weight), so that the
    dashboard can draw the weights of the last hour from history alone.
    """

    kind: str  # "decision" | "intent" | "intent-removed" | "epoch"
    at: float
    revision: int
    summary: str
    intent_id: str | None = None
    who: str | None = None
    weights: Mapping[str, Mapping[str, int]] | None = None


@dataclass(frozen=True, slots=True)
class ControlState:
    """An immutable snapshot of the replicated state as one member has applied it.

    `version` grows with every applied change (a Raft log position, an etcd revision)
    and is what `ControlStore.wait_for_change` compares against; only the backend sets
    it. `recent_intents` are intents applied lately (standing or not), by id, so that a
    resubmitted id applies once; it is bounded by `HISTORY_LIMIT`. `epoch` is chosen
    once, when the cluster's state is first created, and never changes afterwards:
    revisions count within it, so a cluster rebuilt from nothing (new data, a new etcd
    prefix) is told apart from the one before, whose revisions were higher.
    """

    epoch: str = ""
    version: int = 0
    decision: Decision | None = None
    intents: Mapping[str, Intent] = field(default_factory=dict)
    intent_seq: int = 0
    observations: Mapping[ObservationKey, Observation] = field(default_factory=dict)
    history: tuple[HistoryEntry, ...] = ()
    recent_intents: Mapping[str, Intent] = field(default_factory=dict)

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
    )
