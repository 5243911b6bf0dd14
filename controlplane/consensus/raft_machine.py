"""The replicated state machine behind `RaftStore`: what one committed command does.

pysyncobj applies every committed command, in log order, on every member, and again on
restart when it replays the journal. So each command here is a deterministic function of
(the state, the command's arguments): no clock, no randomness, no I/O, nothing from the
member's own Raft view. Times arrive in the arguments, stamped by the member that wrote
them. `version` counts applied changes, so it is the same on every member for the same
log prefix.

A command never raises. An exception in pysyncobj's apply loop leaves the entry
unapplied and retried on every tick, forever. A command the state refuses (an undrain with
nothing to undrain, a lost compare-and-set, a decision from a deposed leader) returns the
error instead; it changes nothing, not even `version`, and the caller raises it.

Term fencing: every leader commits `claim_term(term)` as soon as it is elected, and every
committed decision raises the fence to its own term. A decision stamped with a term below
the fence is refused. A deposed leader whose write was queued before it stepped down, and
then forwarded to the new leader, is therefore refused on every member alike.

Changing the commands: pysyncobj numbers them by (ver, name) and the journal and the
wire carry those numbers. A new command must therefore get a higher `ver` (with
`replicated(ver=1)`), never just a new name, and an existing command must keep its name
and arguments; otherwise a journal written by the previous release, or a member still
running it, applies the wrong command.

Why a `SyncObjConsumer` and not a `SyncObj` subclass: pysyncobj snapshots exactly the
attributes an object gains after its base `__init__`. A `SyncObj` subclass could only set
its state after `SyncObj.__init__` has started the thread that applies commands; a
consumer is complete before its `SyncObj` exists.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from pysyncobj import SyncObjConsumer, replicated

from controlplane import transitions
from controlplane.errors import Conflict, ControlplaneError, NotLeader, Rejected, StoreError
from controlplane.model import Decision, Intent, Observation
from controlplane.state import ControlState, HistoryEntry, ObservationKey

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

# `replicated(ver=0)` returns the decorator itself. Used this way pysyncobj finds the class
# namespace one frame up, which is where the decorator is applied; the bare `@replicated`
# form looks two frames up and would break under any wrapper. Typed loosely on purpose:
# callers add pysyncobj's `callback=` keyword.
_replicated: Callable[[Callable[..., Any]], Callable[..., Any]] = replicated(ver=0)
_replicated_v1: Callable[[Callable[..., Any]], Callable[..., Any]] = replicated(ver=1)


def _never_raises(apply: _F) -> _F:
    """Turn an unexpected exception in a command into a returned `StoreError`.

    Deterministic code fails the same way on every member, so returning the error (state
    untouched, since commands assign only after computing) keeps members identical and
    keeps pysyncobj's apply loop moving.
    """

    @functools.wraps(apply)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return apply(*args, **kwargs)
        except Exception as exc:
            log.exception("replicated command %s failed; state unchanged", apply.__name__)
            return StoreError(f"{apply.__name__} failed on apply", repr(exc))

    return guarded  # type: ignore[return-value]


class ControlMachine(SyncObjConsumer):  # type: ignore[misc]  # pysyncobj has no type hints
    """The control state as a pysyncobj consumer; `on_change` gets each new snapshot.

    `on_change` runs on pysyncobj's thread right after a change is applied (or a snapshot
    is loaded); it must be quick and must not raise.
    """

    def __init__(self, on_change: Callable[[ControlState], None]) -> None:
        # Attributes set before the base __init__ are local to this member; everything
        # set after it is replicated state, and is what pysyncobj writes into snapshots.
        self._on_change = on_change
        super().__init__()
        # Published mappings are never mutated in place; each command builds new ones, so
        # a snapshot handed out earlier never changes under its reader.
        self.version = 0
        self.decision: Decision | None = None
        self.intents: dict[str, Intent] = {}
        self.intent_seq = 0
        self.observations: dict[ObservationKey, Observation] = {}
        self.history: tuple[HistoryEntry, ...] = ()
        self.recent_intents: dict[str, Intent] = {}
        self.fence_term = 0
        self.epoch = ""

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> ControlState:
        return ControlState(
            epoch=self.epoch,
            version=self.version,
            decision=self.decision,
            intents=MappingProxyType(self.intents),
            intent_seq=self.intent_seq,
            observations=MappingProxyType(self.observations),
            history=self.history,
            recent_intents=MappingProxyType(self.recent_intents),
        )

    def _deserialize(self, data: Any) -> None:
        # Called by pysyncobj when it loads a snapshot (from disk on restart, or sent by
        # the leader to a member that fell behind the compacted log).
        super()._deserialize(data)
        self._publish()

    def _publish(self) -> None:
        try:
            self._on_change(self.snapshot())
        except Exception:
            log.exception("publishing the applied state failed")

    def _changed(self) -> None:
        self.version += 1
        self._publish()

    # -- replicated commands -------------------------------------------------------------

    def _current(self) -> ControlState:
        return ControlState(
            epoch=self.epoch,
            decision=self.decision,
            intents=self.intents,
            intent_seq=self.intent_seq,
            observations=self.observations,
            history=self.history,
            recent_intents=self.recent_intents,
        )

    def _take(self, state: ControlState) -> None:
        self.epoch = state.epoch
        self.decision = state.decision
        self.intents = dict(state.intents)
        self.intent_seq = state.intent_seq
        self.observations = dict(state.observations)
        self.history = state.history
        self.recent_intents = dict(state.recent_intents)
        self._changed()

    @_replicated
    @_never_raises
    def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        self._take(transitions.publish_observations(self._current(), observer, observations))

    @_replicated
    @_never_raises
    def submit_intent(self, intent: Intent, at: float) -> Intent | ControlplaneError:
        try:
            change = transitions.submit_intent(self._current(), intent, at)
        except Rejected as exc:
            return exc
        if change.changed:
            self._take(change.state)
        return change.result

    @_replicated
    @_never_raises
    def delete_intent(self, intent_id: str, who: str, reason: str, at: float) -> Intent | ControlplaneError:
        try:
            change = transitions.delete_intent(self._current(), intent_id, who, reason, at)
        except Rejected as exc:
            return exc
        if change.changed:
            self._take(change.state)
        return change.result

    @_replicated
    @_never_raises
    def commit_decision(self, decision: Decision) -> Decision | ControlplaneError:
        try:
            change = transitions.commit_decision(self._current(), decision, self.fence_term)
        except (NotLeader, Conflict) as exc:
            return exc
        self.fence_term = decision.term
        self._take(change.state)
        return change.result

    @_replicated_v1
    @_never_raises
    def init_epoch(self, epoch: str, at: float) -> str:
        change = transitions.init_epoch(self._current(), epoch, at)
        if change.changed:
            self._take(change.state)
        return change.result

    @_replicated
    @_never_raises
    def claim_term(self, term: int) -> None:
        # Not part of ControlState, so `version` does not move: nothing a reader sees changed.
        self.fence_term = max(self.fence_term, term)
