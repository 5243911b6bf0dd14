"""The in-memory backend: a consensus group that lives in one process.

For tests that need agents without processes (the in-process API tier, scenario tests
of the agent's loops) and for trying the API without a cluster. It keeps every promise
of `ControlStore` with real behaviour, through the same state transitions as the other
backends (`controlplane.transitions`), so the shared behaviour suite runs on it too.

A `MemoryGroup` is the replicated state and the group's membership; a `MemoryStore` is
one member's handle on it. The first member to reach quorum leads, for as long as it
is running and in quorum; then the first of the others in the configured order leads in
a new term. A member is in quorum while a
majority of the configured members is running and it is not isolated. `isolate()` cuts
one member off: it keeps serving the state it had (marked stale by its status), its
writes fail with `NoQuorum`, and `heal()` brings it back up to date at once. State
survives stopping every member (as a journal would), for as long as the group object
lives. Single event loop: the group is not thread-safe.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from controlplane import transitions
from controlplane.consensus.base import Changes, ControlStore
from controlplane.errors import NoQuorum, NotLeader, StoreError
from controlplane.model import Decision, Intent, Observation
from controlplane.state import ControlState, DrillRecord, MemberStatus, StoreStatus

BACKEND = "memory"

T = TypeVar("T")


class MemoryGroup:
    """The shared state and membership of one in-memory group."""

    def __init__(self, members: Sequence[str] = ("memory",)) -> None:
        if not members or len(set(members)) != len(members):
            raise ValueError(f"members must be distinct and at least one (got {list(members)})")
        self.members = tuple(members)
        # The group's state is created with the group: its epoch is chosen now.
        self.state = transitions.init_epoch(ControlState(), transitions.new_epoch(), time.time()).state
        self.term = 0
        self.leader: str | None = None
        self.fence_term = 0
        self._running: dict[str, MemoryStore] = {}
        self._isolated: set[str] = set()

    # -- membership ----------------------------------------------------------------------

    def join(self, store: MemoryStore) -> None:
        if store.member_id not in self.members:
            raise StoreError(f"{store.member_id} is not a member of this group", f"members: {self.members}")
        if store.member_id in self._running:
            raise StoreError(f"{store.member_id} is already running")
        self._running[store.member_id] = store
        store.adopt(self.state)
        self._elect()

    def leave(self, store: MemoryStore) -> None:
        if self._running.get(store.member_id) is store:
            del self._running[store.member_id]
            self._isolated.discard(store.member_id)
            self._elect()

    def isolate(self, member_id: str) -> None:
        """Cut `member_id` off from the others (a partition); see the module docstring."""
        self._isolated.add(member_id)
        store = self._running.get(member_id)
        if store is not None:
            store.lost_quorum()
        self._elect()

    def heal(self, member_id: str | None = None) -> None:
        """End the partition of `member_id` (every member when None)."""
        healed = set(self._isolated) if member_id is None else {member_id}
        self._isolated -= healed
        for mid in healed:
            store = self._running.get(mid)
            if store is not None:
                store.adopt(self.state)
        self._elect()

    def connected(self, member_id: str) -> bool:
        return member_id in self._running and member_id not in self._isolated

    def in_quorum(self, member_id: str) -> bool:
        reachable = [m for m in self._running if m not in self._isolated]
        return member_id in reachable and 2 * len(reachable) > len(self.members)

    def _elect(self) -> None:
        # Leadership is sticky, as in Raft: a returning member does not take it back.
        candidates = [m for m in self.members if self.in_quorum(m)]
        leader = self.leader if self.leader in candidates else (candidates[0] if candidates else None)
        if leader != self.leader:
            self.leader = leader
            if leader is not None:
                self.term += 1
                self.fence_term = self.term
        for store in self._running.values():
            store.refresh_status()

    # -- writes --------------------------------------------------------------------------

    def commit(self, member_id: str, apply: Callable[[ControlState], transitions.Change[T]]) -> T:
        """Apply one command for `member_id` and publish the new state to every connected member."""
        if not self.in_quorum(member_id):
            raise NoQuorum(f"{member_id} is not in contact with a majority of the group")
        change = apply(self.state)
        if change.changed or change.state is not self.state:
            self.state = dataclasses.replace(change.state, version=self.state.version + 1)
            for mid, store in self._running.items():
                if mid not in self._isolated:
                    store.adopt(self.state)
        return change.result


class MemoryStore(ControlStore):
    """One member of a `MemoryGroup` (a group of its own when none is given)."""

    def __init__(
        self, member_id: str = "memory", group: MemoryGroup | None = None, max_waiters: int = 100_000
    ) -> None:
        self.member_id = member_id
        self.group = group or MemoryGroup((member_id,))
        self._state = ControlState()
        self._changes = Changes(max_waiters)
        self._started = False
        self._closed = False
        self._quorum_lost_at: float | None = time.time()
        self._status = self._compute_status()

    async def start(self) -> None:
        if self._started:
            raise StoreError("this store was already started; make a new one to restart")
        self._started = True
        self.group.join(self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.group.leave(self)
        self.refresh_status()
        self._changes.notify()

    # -- reads ---------------------------------------------------------------------------

    def state(self) -> ControlState:
        return self._state

    def status(self) -> StoreStatus:
        return self._status

    def cluster_time(self) -> float:
        return time.time()  # one process, one clock

    async def wait_for_change(self, after_version: int, timeout_s: float) -> ControlState:
        return await self._changes.wait(lambda: self._state, after_version, timeout_s, lambda: self._closed)

    # -- called by the group -------------------------------------------------------------

    def adopt(self, state: ControlState) -> None:
        if state is not self._state:
            self._state = state
            self.refresh_status()
            self._changes.notify()

    def lost_quorum(self) -> None:
        self.refresh_status()

    def refresh_status(self) -> None:
        self._status = self._compute_status()

    def _compute_status(self) -> StoreStatus:
        running = self._started and not self._closed
        has_quorum = running and self.group.in_quorum(self.member_id)
        if has_quorum:
            self._quorum_lost_at = None
        elif self._quorum_lost_at is None:
            self._quorum_lost_at = time.time()
        leader = self.group.leader if has_quorum else None
        return StoreStatus(
            member_id=self.member_id,
            leader=leader,
            is_leader=leader == self.member_id,
            term=self.group.term,
            commit_index=self._state.version,
            members=tuple(
                MemberStatus(id=m, address=f"memory:{m}", connected=self.group.connected(m))
                for m in self.group.members
            ),
            has_quorum=has_quorum,
            quorum_lost_at=self._quorum_lost_at,
            backend=BACKEND,
        )

    # -- writes --------------------------------------------------------------------------

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise StoreError(f"member {self.member_id} is not running")

    async def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        self._require_running()

        at = self.cluster_time()
        stamped = [dataclasses.replace(o, at=at) for o in observations]

        def apply(state: ControlState) -> transitions.Change[None]:
            after = transitions.publish_observations(state, observer, stamped)
            return transitions.Change(after, None, None)

        self.group.commit(self.member_id, apply)

    async def submit_intent(self, intent: Intent) -> Intent:
        self._require_running()
        at = time.time()
        return self.group.commit(self.member_id, lambda s: transitions.submit_intent(s, intent, at))

    async def delete_intent(self, intent_id: str, who: str, reason: str) -> Intent:
        self._require_running()
        at = time.time()
        return self.group.commit(
            self.member_id, lambda s: transitions.delete_intent(s, intent_id, who, reason, at)
        )

    async def record_drill(self, record: DrillRecord) -> DrillRecord:
        self._require_running()
        at = self.cluster_time()
        return self.group.commit(self.member_id, lambda s: transitions.record_drill(s, record, at))

    async def commit_decision(self, decision: Decision) -> Decision:
        self._require_running()
        if self.group.leader != self.member_id or not self.group.in_quorum(self.member_id):
            raise NotLeader(f"{self.member_id} is not the leader", leader=self.group.leader)
        if decision.term != self.group.term:
            raise NotLeader(
                f"{self.member_id} leads in term {self.group.term}, not in term {decision.term}",
                leader=self.member_id,
            )
        committed = self.group.commit(
            self.member_id, lambda s: transitions.commit_decision(s, decision, self.group.fence_term)
        )
        self.refresh_status()
        return committed
