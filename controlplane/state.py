"""The replicated control state as plain immutable values.

What every member of the consensus group holds (observations, standing intents, the
committed decision, a bounded history) and what a member knows about the group
(`StoreStatus`). No asyncio, no I/O: the pure planner, the state transitions, every
backend and the HTTP API share these types, and tests build them by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.model import Decision, Intent, Observation, Record

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

    kind: str  # "decision" | "intent" | "intent-removed"
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
    resubmitted id applies once; it is bounded by `HISTORY_LIMIT`.
    """

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

    `has_quorum` is this member's own belief that it is in contact with a majority
    (a leader: a majority acknowledged it recently; a follower: it heard from a
    leader recently). `quorum_lost_at` is the wall time it last lost that belief, or
    None while it has it; the API reports staleness from it.
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
