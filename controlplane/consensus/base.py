"""The replicated control state, and the contract every backend keeps.

The agent talks to one `ControlStore`; it never asks which backend it is. A backend
(embedded Raft with pysyncobj, or an external etcd) keeps, replicated across the
cluster:

- the latest observation of every (observer, region, service);
- the standing operator intents, each with a commit sequence number;
- the latest committed decision (one per revision, revisions only grow);
- a bounded history of decisions and intents;
- the results of past drills, the newest `DRILLS_LIMIT`.

Guarantees every backend gives (the shared behaviour suite in
`tests/consensus/` checks them):

- `state()` returns what this member has applied locally, never a value that was not
  committed by a quorum. It may lag the leader; it never blocks and never raises.
- `commit_decision` is a compare-and-set: it succeeds only if `decision.revision` is
  exactly one past the committed decision's revision and the caller is still the
  leader in `decision.term`. So no two decisions are ever committed under the same
  revision, and a deposed leader's late write is refused.
- `submit_intent`, `delete_intent`, `record_drill` and `publish_observations` are
  atomic: either the whole command is committed and applied on every member, or nothing
  is. They may be called on any member (a Raft follower forwards to the leader).
- Every write raises `NoQuorum` (or another `StoreError`) when it cannot be committed
  within its timeout; the caller may retry. When a write times out it may still be
  committed later: callers make writes idempotent (intents carry a client-chosen id).
- `Rejected` means the command was refused by the state machine (an undrain with
  nothing to undrain); nothing changed.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable, Sequence

from controlplane.errors import StoreError
from controlplane.model import Decision, Intent, Observation
from controlplane.state import ControlState, DrillRecord, StoreStatus
from controlplane.tasks import FailureHandler, log_failure


class ControlStore(abc.ABC):
    """One member's handle on the replicated control state.

    A backend that runs tasks of its own starts them with `tasks.spawn` and hands a task
    that dies to `on_task_failure` (the daemon sets it to stop the agent; by default the
    failure is logged at CRITICAL).
    """

    on_task_failure: FailureHandler = log_failure

    @abc.abstractmethod
    async def start(self) -> None:
        """Join the group and begin applying committed state. Raises `StoreError`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave cleanly: stop background threads and tasks, flush what can be flushed."""

    @abc.abstractmethod
    def state(self) -> ControlState:
        """The latest locally applied snapshot. Never blocks, never raises."""

    @abc.abstractmethod
    def status(self) -> StoreStatus:
        """Leader, term, commit index, members and quorum as this member sees them."""

    def quorum(self) -> tuple[bool, float | None]:
        """(has quorum, when it was lost): the part of `status()` every read asks.

        A backend whose `status()` is costly to build answers this without it: every
        answered decision asks whether it is stale.
        """
        status = self.status()
        return status.has_quorum, status.quorum_lost_at

    def cluster_time(self) -> float | None:
        """The cluster's clock as this member knows it (Unix-like seconds), None if unknown.

        What freshness, holds and ramps are measured in. A backend with a leader keeps one
        clock for the whole cluster, carried from the leader, so that no member's wall
        clock being off changes a verdict or shortens a hold; this default, for a
        backend that lives in one process, is that process's clock.
        """
        return time.time()

    @abc.abstractmethod
    async def wait_for_change(self, after_version: int, timeout_s: float) -> ControlState:
        """Return as soon as `state().version > after_version`, or at the timeout.

        Returns the state either way; the caller compares versions.
        """

    @abc.abstractmethod
    async def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        """Replace `observer`'s observations of the given (region, service) pairs.

        Each is stamped (`at`) with the cluster's time when it is committed (or the
        publisher's reading of it), whatever `at` it came with: freshness is judged in
        the cluster's time, so an observer whose wall clock is off changes nothing.
        """

    @abc.abstractmethod
    async def submit_intent(self, intent: Intent) -> Intent:
        """Commit an operator intent; returns it with `seq` assigned.

        Applied with `controlplane.intents.apply_intent`. Submitting the same `id`
        twice applies it once and returns the committed one.
        """

    @abc.abstractmethod
    async def delete_intent(self, intent_id: str, who: str, reason: str) -> Intent:
        """Remove one standing intent; returns it. `NotFound` when it does not stand."""

    @abc.abstractmethod
    async def record_drill(self, record: DrillRecord) -> DrillRecord:
        """Record a drill's result; returns it as stored, `recorded_at` stamped by the store.

        Applied with `controlplane.transitions.record_drill`, with its history entry, in
        one atomic command; it survives restarts like everything else in the state.
        Recording the same `id` twice keeps the first and returns it (among the
        `DRILLS_LIMIT` kept). `Rejected` when the record is out of bounds.
        """

    @abc.abstractmethod
    async def commit_decision(self, decision: Decision) -> Decision:
        """Compare-and-set the decision (see the module docstring); returns it as committed.

        The caller stamps `term`, `leader` and `committed_at` before calling.
        Raises `NotLeader` when this member does not lead in `decision.term`,
        `Conflict` when the revision is not the next one, `NoQuorum` on timeout.
        """


class Changes:
    """Wakes everyone waiting for the control state to change; a bounded number of them.

    A backend publishes each new immutable `ControlState` and then calls `notify()` on
    the event loop's thread; `wait()` implements `ControlStore.wait_for_change`. The
    waiter takes the current event before reading the state, so a change published in
    between still wakes it.
    """

    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self._event = asyncio.Event()
        self._waiters = 0

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(
        self,
        current: Callable[[], ControlState],
        after_version: int,
        timeout_s: float,
        closed: Callable[[], bool],
    ) -> ControlState:
        state = current()
        if state.version > after_version or timeout_s <= 0 or closed():
            return state
        if self._waiters >= self.max_waiters:
            raise StoreError("too many waiters on the control state", f"limit is {self.max_waiters}")
        self._waiters += 1
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    event = self._event
                    state = current()
                    if state.version > after_version or closed():
                        return state
                    await event.wait()
        except TimeoutError:
            return current()
        finally:
            self._waiters -= 1
