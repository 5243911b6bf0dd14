"""What each replicated command does to the control state: one pure function per command.

Every backend applies commands through these functions, so that an intent, a removal, a
decision or a drill's result changes the state, and writes the history, in exactly the same words
whichever backend holds it (the in-memory store, the embedded Raft, etcd). Each takes a
`ControlState` and the command's arguments, and returns a `Change`: the state after the
command, the history entry it adds (None when nothing changed), and what the caller is
answered. A command the state refuses raises (`Rejected`, `NotFound`, `NotLeader`,
`Conflict`) and changes nothing. No clock is read: times arrive as arguments, stamped by
whoever wrote the command, so replaying a log gives the same state on every member.

`version` is left as it is: what counts as one change is the backend's business.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from controlplane.errors import Conflict, NotLeader, Rejected
from controlplane.intents import apply_intent, remove_intent
from controlplane.model import Decision, Intent, Observation
from controlplane.state import (
    DRILL_ID_MAX,
    DRILL_LATE_LBS_MAX,
    DRILL_LB_NAME_MAX,
    DRILL_NAME_MAX,
    DRILL_SECONDS_MAX,
    DRILL_STAGE_NAME_MAX,
    DRILL_STAGES_MAX,
    DRILL_SUMMARY_MAX,
    HISTORY_LIMIT,
    ControlState,
    DrillRecord,
    HistoryEntry,
    drills_add,
    history_add,
    observations_replace,
)

SUMMARY_MAX_CHARS = 400

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """A command's effect. `entry` is None when the command changed nothing."""

    state: ControlState
    entry: HistoryEntry | None
    result: T

    @property
    def changed(self) -> bool:
        return self.entry is not None


def new_epoch() -> str:
    """A fresh epoch: 12 random hex digits (URL- and header-safe)."""
    return secrets.token_hex(6)


def init_epoch(state: ControlState, epoch: str, at: float) -> Change[str]:
    """Set the epoch of a state that has none; a state that has one keeps it (first wins)."""
    if state.epoch:
        return Change(state, None, state.epoch)
    entry = epoch_entry(epoch, at)
    after = dataclasses.replace(state, epoch=epoch, history=history_add(state.history, entry))
    return Change(after, entry, epoch)


def epoch_entry(epoch: str, at: float) -> HistoryEntry:
    """The history entry that records when the cluster's state was created."""
    return HistoryEntry(kind="epoch", at=at, revision=0, summary=f"cluster state created (epoch {epoch})")


def publish_observations(
    state: ControlState, observer: str, observations: Sequence[Observation]
) -> ControlState:
    """`observer`'s latest view of the given pairs replaces its older one (others' are kept)."""
    return dataclasses.replace(
        state, observations=observations_replace(state.observations, observer, observations)
    )


def known_intent(state: ControlState, intent_id: str) -> Intent | None:
    """The committed intent with this id, if it stands or was applied lately."""
    return state.intents.get(intent_id) or state.recent_intents.get(intent_id)


def submit_intent(state: ControlState, intent: Intent, at: float) -> Change[Intent]:
    """Commit an operator intent with the next sequence number.

    An id that was applied before (a retry) returns the committed intent and changes
    nothing. Raises `Rejected` when the intent cannot apply (nothing to undrain).
    """
    known = known_intent(state, intent.id)
    if known is not None:
        return Change(state, None, known)
    seq = state.intent_seq + 1
    committed = dataclasses.replace(intent, seq=seq)
    intents = apply_intent(state.intents, committed)
    entry = HistoryEntry(
        kind="intent",
        at=at,
        revision=state.revision,
        summary=committed.describe(),
        intent_id=committed.id,
        who=committed.who,
    )
    after = dataclasses.replace(
        state,
        intents=intents,
        intent_seq=seq,
        history=history_add(state.history, entry),
        recent_intents=remember(state.recent_intents, committed),
    )
    return Change(after, entry, committed)


def delete_intent(state: ControlState, intent_id: str, who: str, reason: str, at: float) -> Change[Intent]:
    """Remove one standing intent; `NotFound` when it does not stand.

    A removal takes a sequence number too: the next decision carries it, so a writer can
    see that the removal took effect. A removal retried after it was applied (its answer
    was lost) returns the removed intent again and changes nothing, as a resubmitted
    intent id does; an intent replaced by a newer one, or never committed, is not found.
    """
    if intent_id not in state.intents:
        removed = state.recent_intents.get(intent_id)
        if removed is not None and was_removed(state, intent_id):
            return Change(state, None, removed)
    intents = remove_intent(state.intents, intent_id)
    removed = state.intents[intent_id]
    entry = HistoryEntry(
        kind="intent-removed",
        at=at,
        revision=state.revision,
        summary=f"{removed.describe()} removed by {who} ({reason})",
        intent_id=intent_id,
        who=who,
    )
    after = dataclasses.replace(
        state,
        intents=intents,
        intent_seq=state.intent_seq + 1,
        history=history_add(state.history, entry),
    )
    return Change(after, entry, removed)


def was_removed(state: ControlState, intent_id: str) -> bool:
    """Whether the history (bounded) records that `intent_id` was removed by request."""
    return any(e.kind == "intent-removed" and e.intent_id == intent_id for e in reversed(state.history))


def commit_decision(state: ControlState, decision: Decision, fence_term: int = 0) -> Change[Decision]:
    """Compare-and-set the decision: exactly the next revision, from a leader not yet deposed.

    `fence_term` is the highest term known to have begun; a decision stamped with an
    older term comes from a deposed leader and is refused (`NotLeader`). The first
    decision may start at any revision >= 1; after it, only the next one (`Conflict`).
    """
    if decision.term < fence_term:
        raise NotLeader(f"decision of term {decision.term} refused: term {fence_term} has begun")
    if decision.epoch != state.epoch:
        raise Conflict(
            f"decision of epoch {decision.epoch or '(none)'} refused",
            f"the cluster state is epoch {state.epoch or '(none)'}",
        )
    current = state.decision
    acceptable = decision.revision >= 1 if current is None else decision.revision == current.revision + 1
    if not acceptable:
        raise Conflict(
            f"revision {decision.revision} is not the next revision",
            f"committed revision is {state.revision}",
        )
    entry = decision_entry(decision)
    after = dataclasses.replace(state, decision=decision, history=history_add(state.history, entry))
    return Change(after, entry, decision)


def decision_entry(decision: Decision) -> HistoryEntry:
    """The history entry a committed decision adds (for backends that check revisions themselves)."""
    return HistoryEntry(
        kind="decision",
        at=decision.committed_at,
        revision=decision.revision,
        summary=decision_summary(decision),
        who=decision.leader or None,
        weights={
            s: {r: p.weight for r, p in placements.items()} for s, placements in decision.services.items()
        },
    )


def decision_summary(decision: Decision) -> str:
    """The history line of a decision: its reasons, bounded."""
    text = "; ".join(decision.reasons) if decision.reasons else f"revision {decision.revision}"
    if len(text) > SUMMARY_MAX_CHARS:
        text = text[: SUMMARY_MAX_CHARS - 3] + "..."
    return text


def known_drill(state: ControlState, drill_id: str) -> DrillRecord | None:
    """The recorded drill with this id, if it is among the ones kept."""
    return next((d for d in state.drills if d.id == drill_id), None)


def record_drill(state: ControlState, record: DrillRecord, at: float) -> Change[DrillRecord]:
    """Record a drill's result, stamped `recorded_at=at`, with a line in the history.

    An id that is recorded already (a retry) returns the stored record and changes
    nothing, whatever the new one says. Only the newest `DRILLS_LIMIT` are kept, so an id
    recorded long ago may be recorded again. `Rejected` when the record is out of bounds
    or contradicts itself (see `drill_problems`).
    """
    problems = drill_problems(record)
    if problems:
        raise Rejected("invalid drill record", "; ".join(problems))
    known = known_drill(state, record.id)
    if known is not None:
        return Change(state, None, known)
    stored = dataclasses.replace(record, recorded_at=at)
    entry = HistoryEntry(
        kind="drill",
        at=at,
        revision=state.revision,
        summary=drill_summary(stored),
        intent_id=stored.id,
        who=stored.who,
    )
    after = dataclasses.replace(
        state, drills=drills_add(state.drills, stored), history=history_add(state.history, entry)
    )
    return Change(after, entry, stored)


def drill_summary(record: DrillRecord) -> str:
    """The history line of a drill: "drill of cn-east by alice: RTO 41.2 s, objective 90 s: passed"."""
    target = f"{record.region}/{record.service}" if record.service else record.region
    rto = "RTO not measured" if record.rto_s is None else f"RTO {_seconds(record.rto_s)} s"
    verdict = "passed" if record.passed else "failed"
    text = f"drill of {target} by {record.who}: {rto}, objective {_seconds(record.objective_s)} s: {verdict}"
    if len(text) > SUMMARY_MAX_CHARS:
        text = text[: SUMMARY_MAX_CHARS - 3] + "..."
    return text


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def drill_problems(record: DrillRecord) -> list[str]:
    """Everything wrong with a drill record, as `field: what (got value)`; empty when none.

    Checked again by the state machine, whoever wrote the command: every part of a record
    is bounded (it is kept by every member), every time is a finite number, the drill
    ends after it starts, and a drill that passed was measured to the end within its
    objective. A stage (or the RTO) a little before the start is accepted as measured:
    see `DRILL_SECONDS_MAX`.
    """
    out: list[str] = []

    def name(field: str, value: str | None, limit: int, *, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not value or len(value) > limit:
            out.append(f"{field}: must be 1 to {limit} characters (got {str(value)[:80]!r})")

    name("id", record.id, DRILL_ID_MAX)
    name("region", record.region, DRILL_NAME_MAX)
    name("service", record.service, DRILL_NAME_MAX, optional=True)
    name("who", record.who, DRILL_NAME_MAX)
    for field, value in (("started_at", record.started_at), ("ended_at", record.ended_at)):
        if not math.isfinite(value) or value < 0:
            out.append(f"{field}: must be a Unix time (got {value})")
    if record.ended_at < record.started_at:
        out.append(f"ended_at: must not be before started_at (got {record.ended_at} < {record.started_at})")
    if not (math.isfinite(record.objective_s) and record.objective_s > 0):
        out.append(f"objective_s: must be a positive number of seconds (got {record.objective_s})")
    if record.rto_s is not None and not _sane_seconds(record.rto_s):
        out.append(f"rto_s: must be seconds within +-{DRILL_SECONDS_MAX:g} or null (got {record.rto_s})")
    if record.passed and (record.rto_s is None or record.rto_s > record.objective_s):
        out.append(
            f"passed: a drill passes only with an RTO measured within its objective "
            f"(got rto_s {record.rto_s}, objective_s {record.objective_s})"
        )
    if len(record.stages) > DRILL_STAGES_MAX:
        out.append(f"stages: at most {DRILL_STAGES_MAX} (got {len(record.stages)})")
    for stage, seconds in list(record.stages.items())[: DRILL_STAGES_MAX + 1]:
        if not stage or len(stage) > DRILL_STAGE_NAME_MAX:
            out.append(f"stages: a name must be 1 to {DRILL_STAGE_NAME_MAX} characters (got {stage[:80]!r})")
        if seconds is not None and not _sane_seconds(seconds):
            out.append(
                f"stages.{stage[:80]}: must be seconds within +-{DRILL_SECONDS_MAX:g} or null (got {seconds})"
            )
    if len(record.late_lbs) > DRILL_LATE_LBS_MAX:
        out.append(f"late_lbs: at most {DRILL_LATE_LBS_MAX} (got {len(record.late_lbs)})")
    for lb in record.late_lbs[: DRILL_LATE_LBS_MAX + 1]:
        if not lb or len(lb) > DRILL_LB_NAME_MAX:
            out.append(f"late_lbs: a name must be 1 to {DRILL_LB_NAME_MAX} characters (got {lb[:80]!r})")
    if len(record.summary) > DRILL_SUMMARY_MAX:
        out.append(f"summary: at most {DRILL_SUMMARY_MAX} characters (got {len(record.summary)})")
    return out


def _sane_seconds(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= DRILL_SECONDS_MAX


def remember(recent: Mapping[str, Intent], intent: Intent) -> dict[str, Intent]:
    """`recent` with `intent` added, the oldest dropped past `HISTORY_LIMIT`.

    Insertion order is deterministic, so every member evicts the same ids.
    """
    out = dict(recent)
    out[intent.id] = intent
    while len(out) > HISTORY_LIMIT:
        del out[next(iter(out))]
    return out
