"""The replicated state machine behind `RaftStore`: what one committed command does.

The engine (`controlplane.raft`) applies every committed entry, in log order, on every
member, and again on restart when it replays the journal. Each entry is one command,
encoded here as JSON (never pickle: nothing from a journal or the network is ever
unpickled), and applied through `controlplane.transitions`, the same functions every
backend uses. So a command is a deterministic function of (the state, the command, the
entry's index, term and cluster time): no clock, no randomness, no I/O.

- Times come from the entry: the cluster time the leader stamped on it (`ctime`), which
  no member's wall clock can move. An observation is stamped with it too, so freshness
  is measured in cluster time whatever the observer's clock says (issue 13, item 4).
- A decision is applied only if it was proposed in the term of its entry: a leader
  appends only in its own term, so a decision stamped with another term was proposed by
  a deposed leader and is refused, on every member alike (the term fence).
- A command never raises. A refusal (an undrain with nothing to undrain, a lost
  compare-and-set, a deposed leader's decision, a command this release does not know)
  is returned as the error and changes nothing, not even `version`; the proposer raises
  it. An unexpected exception is returned the same way (and logged): since it is
  deterministic, every member refuses alike and stays identical.
- `version` is the index of the last entry applied, so it only grows, across restarts
  and snapshots too.

Changing the commands: a command keeps its `op` name and arguments forever (journals and
members of the previous release carry them); a new behaviour is a new `op`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from controlplane import transitions
from controlplane.errors import Conflict, ControlplaneError, NotLeader, StoreError
from controlplane.model import (
    Decision,
    Intent,
    Observation,
    decision_from_json,
    decision_to_json,
    intent_from_json,
    intent_to_json,
    observation_from_json,
    observation_to_json,
)
from controlplane.state import (
    ControlState,
    DrillRecord,
    drill_from_json,
    drill_to_json,
    state_from_json,
    state_to_json,
)

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1


# -- commands ------------------------------------------------------------------------------


def observations_command(observer: str, observations: Sequence[Observation]) -> bytes:
    return orjson.dumps(
        {"op": "observations", "observer": observer, "items": [observation_to_json(o) for o in observations]}
    )


def intent_command(intent: Intent) -> bytes:
    return orjson.dumps({"op": "intent", "intent": intent_to_json(intent)})


def delete_command(intent_id: str, who: str, reason: str) -> bytes:
    return orjson.dumps({"op": "delete", "id": intent_id, "who": who, "reason": reason})


def decision_command(decision: Decision) -> bytes:
    return orjson.dumps({"op": "decision", "decision": decision_to_json(decision)})


def epoch_command(epoch: str) -> bytes:
    return orjson.dumps({"op": "epoch", "epoch": epoch})


def drill_command(record: DrillRecord) -> bytes:
    return orjson.dumps({"op": "drill", "drill": drill_to_json(record)})


# -- the machine ---------------------------------------------------------------------------


class ControlMachine:
    """The control state as the engine's state machine; `on_change` gets each new snapshot.

    `apply`, `snapshot` and `restore` run on the engine's thread. `on_change` is called
    there right after every change (and after a restore); it must be quick and must not
    raise.
    """

    def __init__(self, on_change: Callable[[ControlState], None]) -> None:
        self._on_change = on_change
        self.state = ControlState()

    # -- the engine's StateMachine protocol -----------------------------------------------

    def apply(self, index: int, term: int, ctime: float, data: bytes) -> object:
        try:
            command = orjson.loads(data)
            op = command.get("op") if isinstance(command, dict) else None
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                return StoreError(f"unknown replicated command {op!r}", "written by a newer release?")
            change = handler(self.state, command, term, ctime)
        except ControlplaneError as exc:
            return exc
        except Exception as exc:
            log.exception("replicated command at index %d failed; state unchanged", index)
            return StoreError("the command failed on apply", repr(exc))
        if change.state is not self.state:
            self.state = dataclasses.replace(change.state, version=index)
            self._publish()
        return change.result

    def snapshot(self) -> bytes:
        return orjson.dumps({"format": SNAPSHOT_FORMAT, "state": state_to_json(self.state)})

    def restore(self, data: bytes) -> None:
        if not data:
            self.state = ControlState()
        else:
            loaded = orjson.loads(data)
            if not isinstance(loaded, dict) or loaded.get("format") != SNAPSHOT_FORMAT:
                raise StoreError("unreadable snapshot", f"format {loaded.get('format')!r} is not known here")
            self.state = state_from_json(loaded["state"])
        self._publish()

    def _publish(self) -> None:
        try:
            self._on_change(self.state)
        except Exception:
            log.exception("publishing the applied state failed")


# -- what each command does ----------------------------------------------------------------

_Command = Mapping[str, Any]
_Result = transitions.Change[Any]
_Handler = Callable[[ControlState, _Command, int, float], _Result]


def _observations(
    state: ControlState, c: Mapping[str, Any], term: int, ctime: float
) -> transitions.Change[Any]:
    observer = str(c["observer"])
    # Stamped with the entry's cluster time, not the observer's wall clock.
    items = [dataclasses.replace(observation_from_json(o), at=ctime) for o in c["items"]]
    after = transitions.publish_observations(state, observer, items)
    return transitions.Change(after, None, None)


def _intent(state: ControlState, c: _Command, term: int, ctime: float) -> _Result:
    return transitions.submit_intent(state, intent_from_json(c["intent"]), ctime)


def _delete(state: ControlState, c: _Command, term: int, ctime: float) -> _Result:
    return transitions.delete_intent(state, str(c["id"]), str(c["who"]), str(c["reason"]), ctime)


def _decision(state: ControlState, c: _Command, term: int, ctime: float) -> _Result:
    decision = decision_from_json(c["decision"])
    if decision.term != term:
        raise NotLeader(
            f"decision of term {decision.term} refused: it was appended in term {term}",
            leader=None,
        )
    if decision.revision < 1:
        raise Conflict(f"revision {decision.revision} is not the next revision", "revisions start at 1")
    return transitions.commit_decision(state, decision, fence_term=term)


def _epoch(state: ControlState, c: _Command, term: int, ctime: float) -> _Result:
    return transitions.init_epoch(state, str(c["epoch"]), ctime)


def _drill(state: ControlState, c: _Command, term: int, ctime: float) -> _Result:
    # Recorded at the entry's cluster time, like every other time the machine stamps.
    return transitions.record_drill(state, drill_from_json(c["drill"]), ctime)


_HANDLERS: dict[str, _Handler] = {
    "observations": _observations,
    "intent": _intent,
    "delete": _delete,
    "decision": _decision,
    "epoch": _epoch,
    "drill": _drill,
}
