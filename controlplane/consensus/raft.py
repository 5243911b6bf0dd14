"""The embedded backend: the agents themselves replicate the control state with Raft.

`RaftStore` runs one member of the project's own Raft engine (`controlplane.raft`: a
pure core, a checksummed and fsynced journal, an authenticated transport, all on the
engine's own thread) and keeps the promises of `ControlStore` on top of it:

- Nothing blocks the event loop. Starting and stopping the engine run in a worker
  thread; a write hands its command to the engine and awaits the engine's future.
- `state()` is a reference read of the immutable snapshot the engine thread publishes
  after every applied entry. On start the journal is replayed up to the commit index it
  recorded before anything was applied, so a restarted agent never serves less than it
  served before its crash (issue 12, item 8).
- `status().has_quorum` is the engine's `fresh`: this member confirmed, within the last
  second, in the current term, that it has applied everything the leader had committed
  (a ReadIndex round on followers, check-quorum on the leader). A member that restarted,
  rejoined after a partition, lost its disk, or whose engine thread stopped ticking is
  stale until that holds again, and the API says so.
- Every write either completes within `commit_timeout_s` or raises `NoQuorum` (it may
  still commit later; intent ids make retries idempotent); writes the engine refused
  before handing them to a leader raise at once.
- `commit_decision` is fenced twice: locally (this member leads, in exactly
  `decision.term`) and in the state machine (the decision's term is its entry's term).
- Time: `cluster_time()` is the engine's cluster clock (the leader's, carried by every
  message and entry), which no member's wall clock can move.
- The epoch of the state is created by the first leader of a new cluster (a replicated
  command; the first one applied wins).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import TypeVar

from controlplane import transitions
from controlplane.consensus.base import Changes, ControlStore
from controlplane.consensus.raft_machine import (
    ControlMachine,
    decision_command,
    delete_command,
    drill_command,
    epoch_command,
    intent_command,
    observations_command,
)
from controlplane.errors import ConfigError, ControlplaneError, NoQuorum, NotLeader, StoreError
from controlplane.model import Decision, Intent, Observation
from controlplane.raft import (
    CommitTimeoutError,
    DiskFailedError,
    NoLeaderError,
    NotLeaderError,
    ProposalDroppedError,
    QueueFullError,
    RaftConfigError,
    RaftError,
    RaftNode,
    RaftStatus,
    RaftTimings,
    StoppedError,
)
from controlplane.raft.transport import split_host_port
from controlplane.state import ControlState, DrillRecord, MemberStatus, StoreStatus
from controlplane.tasks import spawn

log = logging.getLogger(__name__)

BACKEND = "raft"
MIN_SECRET_BYTES = 16
EPOCH_CHECK_S = 0.25

T = TypeVar("T")

__all__ = ["RaftStore", "RaftTimings"]


def write_failed(exc: RaftError, leader: str | None) -> StoreError:
    """The store error for a write the engine refused or lost."""
    if isinstance(exc, NotLeaderError | NoLeaderError | ProposalDroppedError):
        what = {
            NotLeaderError: "this member is not the leader",
            NoLeaderError: "no leader: an election is running or this member is cut off",
            ProposalDroppedError: "leadership changed before the write was committed",
        }[type(exc)]
        return NoQuorum(what, f"it was not applied; retry ({exc})")
    if isinstance(exc, CommitTimeoutError):
        return NoQuorum(str(exc), "it may still be committed; retry (intents with the same id apply once)")
    if isinstance(exc, DiskFailedError):
        return StoreError("this member's disk is failing; it accepts no writes", str(exc))
    if isinstance(exc, QueueFullError):
        return StoreError("too many writes queued on this member", "retry later")
    if isinstance(exc, StoppedError):
        return StoreError("this member is stopping", str(exc))
    return StoreError(f"write failed: {exc}")


class RaftStore(ControlStore):
    """One agent's member of the embedded Raft group (see the module docstring).

    `members` maps every member id (this one included) to its Raft address `host:port`;
    `dial` optionally maps member ids to another address to connect to (a tunnel, a
    proxy); identity is established by the authenticated handshake, not the address. A
    store is started once and closed once; a restart is a new `RaftStore` on the same
    `data_dir`.
    """

    def __init__(
        self,
        *,
        member_id: str,
        members: Mapping[str, str],
        secret: str,
        data_dir: pathlib.Path,
        timings: RaftTimings | None = None,
        dial: Mapping[str, str] | None = None,
        max_in_flight: int = 1024,
        max_waiters: int = 100_000,
    ) -> None:
        self.member_id = member_id
        self.members: Mapping[str, str] = dict(members)
        self.data_dir = data_dir
        self.timings = timings or RaftTimings()
        problems = settings_problems(member_id, self.members, secret, self.timings, dial)
        if problems:
            raise ConfigError(problems)
        self._machine = ControlMachine(self._publish)
        try:
            self._node = RaftNode(
                member_id,
                self.members,
                secret.encode(),
                data_dir,
                self._machine,
                timings=self.timings,
                dial=dial,
            )
        except RaftConfigError as exc:
            raise ConfigError(str(exc).split("; ")) from None
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        # Written by the engine thread, read by the event loop: plain reference swaps.
        self._state: ControlState = self._machine.state
        # Event-loop side only.
        self._wake_scheduled = False
        self._changes = Changes(max_waiters)
        self._quorum_lost_at: float | None = time.time()
        self._epoch_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise StoreError("this raft store was already started; make a new one to restart")
        self._started = True
        self._loop = asyncio.get_running_loop()
        try:
            # Replays the journal (up to the recorded commit index) before it returns.
            await asyncio.to_thread(self._node.start)
        except RaftError as exc:
            self._closed = True
            raise StoreError(f"raft member {self.member_id} failed to start", str(exc)) from exc
        self._epoch_task = spawn(
            f"raft epoch of {self.member_id}", self._ensure_epoch(), self.on_task_failure
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._epoch_task is not None:
            self._epoch_task.cancel()
            await asyncio.gather(self._epoch_task, return_exceptions=True)
        if self._started:
            await asyncio.to_thread(self._node.stop, True)
        self._changes.notify()

    async def _ensure_epoch(self) -> None:
        """The first leader of a new cluster creates its state's epoch (first one applied wins)."""
        while True:
            await asyncio.sleep(EPOCH_CHECK_S)
            if self._state.epoch:
                continue
            status = self._node.status()
            if status.role != "leader" or not status.fresh:
                continue
            try:
                await self._replicate(epoch_command(transitions.new_epoch()))
            except StoreError as exc:
                log.info("raft member %s: epoch not created yet (%s); will retry", self.member_id, exc)

    # -- reads ---------------------------------------------------------------------------

    def state(self) -> ControlState:
        return self._state

    def status(self) -> StoreStatus:
        return self._status_of(self._node.status())

    def cluster_time(self) -> float | None:
        return self._node.cluster_time()

    def raft_status(self) -> RaftStatus:
        """The engine's own status (counters, damage, recovering), for metrics and debugging."""
        return self._node.status()

    def quorum(self) -> tuple[bool, float | None]:
        has_quorum = self._started and not self._closed and self._node.fresh()
        self._note_quorum(has_quorum)
        return has_quorum, self._quorum_lost_at

    def _note_quorum(self, has_quorum: bool) -> None:
        if has_quorum:
            self._quorum_lost_at = None
        elif self._quorum_lost_at is None:
            self._quorum_lost_at = time.time()

    def _status_of(self, s: RaftStatus) -> StoreStatus:
        running = self._started and not self._closed
        has_quorum = running and s.fresh
        self._note_quorum(has_quorum)
        linked = {m.id for m in s.members if m.connected_out or m.connected_in} | {self.member_id}
        members = tuple(
            MemberStatus(id=mid, address=address, connected=running and mid in linked)
            for mid, address in self.members.items()
        )
        return StoreStatus(
            member_id=self.member_id,
            leader=s.leader if running else None,
            is_leader=running and s.role == "leader",
            term=s.term,
            commit_index=s.commit,
            members=members,
            has_quorum=has_quorum,
            quorum_lost_at=self._quorum_lost_at,
            backend=BACKEND,
            clock_skew_s=s.clock_skew_s,
            problems=_problems(s, running),
        )

    async def wait_for_change(self, after_version: int, timeout_s: float) -> ControlState:
        return await self._changes.wait(lambda: self._state, after_version, timeout_s, lambda: self._closed)

    # -- writes --------------------------------------------------------------------------

    async def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        mine = [o for o in observations if o.observer == observer]
        if mine:
            await self._replicate(observations_command(observer, mine))

    async def submit_intent(self, intent: Intent) -> Intent:
        result = await self._replicate(intent_command(intent))
        if not isinstance(result, Intent):
            raise StoreError("submit_intent returned no intent", repr(result))
        return result

    async def delete_intent(self, intent_id: str, who: str, reason: str) -> Intent:
        result = await self._replicate(delete_command(intent_id, who, reason))
        if not isinstance(result, Intent):
            raise StoreError("delete_intent returned no intent", repr(result))
        return result

    async def record_drill(self, record: DrillRecord) -> DrillRecord:
        result = await self._replicate(drill_command(record))
        if not isinstance(result, DrillRecord):
            raise StoreError("record_drill returned no drill record", repr(result))
        return result

    async def commit_decision(self, decision: Decision) -> Decision:
        # Local fence: only the leader of exactly this term may write. The state machine
        # fences again on apply, for a leader deposed after this check.
        s = self._node.status()
        if s.role != "leader":
            raise NotLeader(f"{self.member_id} is not the leader", leader=s.leader)
        if s.term != decision.term:
            raise NotLeader(
                f"{self.member_id} leads in term {s.term}, not in term {decision.term}", leader=self.member_id
            )
        result = await self._replicate(decision_command(decision))
        if not isinstance(result, Decision):
            raise StoreError("commit_decision returned no decision", repr(result))
        return result

    async def _replicate(self, command: bytes) -> object:
        """Commit one command and return what applying it returned on this member."""
        if not self._started or self._closed:
            raise StoreError(f"raft member {self.member_id} is not running")
        if self._in_flight >= self._max_in_flight:
            raise StoreError("too many writes in flight on this member", f"limit is {self._max_in_flight}")
        self._in_flight += 1
        try:
            try:
                future: concurrent.futures.Future[object] = self._node.propose(command)
                async with asyncio.timeout(self.timings.commit_timeout_s):
                    result = await asyncio.wrap_future(future)
            except TimeoutError:
                raise NoQuorum(
                    f"not committed within {self.timings.commit_timeout_s:g} s",
                    "it may still be committed; retry (intents with the same id apply once)",
                ) from None
            except RaftError as exc:
                raise write_failed(exc, self._node.status().leader) from None
        finally:
            self._in_flight -= 1
        if isinstance(result, ControlplaneError):
            raise result
        return result

    # -- the engine's thread -------------------------------------------------------------

    def _publish(self, state: ControlState) -> None:
        """Swap in a newly applied snapshot and wake waiters (called on the engine thread)."""
        self._state = state
        loop = self._loop
        # One pending wake-up is enough: the woken waiters read the latest state.
        if loop is None or self._wake_scheduled:
            return
        self._wake_scheduled = True
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            self._wake_scheduled = False  # the loop is closed

    def _wake(self) -> None:
        # Clear the flag before waking so a publish racing with us schedules another.
        self._wake_scheduled = False
        self._changes.notify()


def settings_problems(
    member_id: str,
    members: Mapping[str, str],
    secret: str,
    timings: RaftTimings,
    dial: Mapping[str, str] | None,
) -> list[str]:
    """Every problem with these settings as `path.to.field: what (got value)`."""
    out = list(timings.problems())
    if len(secret.encode()) < MIN_SECRET_BYTES:
        out.append(
            f"cluster.secret: must be at least {MIN_SECRET_BYTES} bytes; it authenticates members "
            f"(got {len(secret.encode())} bytes)"
        )
    if member_id not in members:
        out.append(f"cluster.agents: {member_id} is not one of the members (got {sorted(members)})")
    for mid, address in members.items():
        try:
            split_host_port(address)
        except ValueError:
            out.append(f"cluster.agents.{mid}.raft: must be host:port (got {address!r})")
    if len(set(members.values())) != len(members):
        out.append(f"cluster.agents: raft addresses must be distinct (got {sorted(members.values())})")
    for mid, address in (dial or {}).items():
        if mid not in members:
            out.append(f"cluster.dial.{mid}: not a member (got {address!r})")
        else:
            try:
                split_host_port(address)
            except ValueError:
                out.append(f"cluster.dial.{mid}: must be host:port (got {address!r})")
    return out


def _problems(s: RaftStatus, running: bool) -> tuple[str, ...]:
    """Why this member would not call its decision fresh, in words (empty when it would)."""
    out: list[str] = []
    if not running:
        out.append("not running")
    if s.disk_error:
        out.append(f"disk failing: {s.disk_error}")
    if s.recovering:
        out.append("recovering a damaged journal from the leader (not voting)")
    if time.monotonic() - s.ticked_at >= 1.0:
        out.append(f"consensus thread stopped ticking {time.monotonic() - s.ticked_at:.1f} s ago")
    if not s.leader:
        out.append("no leader known")
    elif not s.fresh and not out:
        out.append("not confirmed caught up with the leader in the last second")
    return tuple(out)
