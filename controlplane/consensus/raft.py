"""The embedded Raft backend: the agents themselves replicate the control state.

`RaftStore` runs one pysyncobj node per agent. The replicated state machine is in
`raft_machine`, the network details in `raft_transport`; this module bridges
pysyncobj's own thread to asyncio and keeps the promises of `ControlStore`:

- Nothing blocks the event loop. Starting and stopping the node (which binds, derives
  the cluster key, spawns and joins a thread) run in `asyncio.to_thread`. A write hands
  its command to pysyncobj's queue and awaits a future that pysyncobj's callback resolves
  through `loop.call_soon_threadsafe`.
- `state()` is a reference read of an immutable snapshot that the apply thread replaces
  after every change. `status()` is the same for cluster status, recomputed on every
  pysyncobj tick (at least every `heartbeat_s`), because pysyncobj's status is only safe
  to read on its own thread.
- Every write either completes within `commit_timeout_s` or raises `NoQuorum` (it may
  still commit later; intent ids make retries idempotent). Writes fail fast when this
  member knows no leader, and at most `max_in_flight` writes wait at once.
- `commit_decision` is fenced twice: locally (this member leads, in exactly
  `decision.term`) before the command is sent, and in the state machine (the term is not
  older than one already begun, the revision is the next one) when it applies.
- The cluster secret is required: pysyncobj's messages are pickles, so an unauthenticated
  peer could run code in the agent. With the secret every message is encrypted and
  authenticated, and a peer with another secret is disconnected.
- The journal and snapshots live in `data_dir`. Snapshots are written in pysyncobj's
  thread (`useFork=False`): forking a process that runs other threads (asyncio's
  executor, the HTTP server) can deadlock the child on a lock another thread held. The
  state is small (observations, intents, a bounded history), so the pause is short.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.node import TCPNode

from controlplane import transitions
from controlplane.consensus.base import Changes, ControlStore
from controlplane.consensus.raft_machine import ControlMachine
from controlplane.consensus.raft_transport import DialNode, HeardTransport, split_address
from controlplane.errors import ConfigError, ControlplaneError, NoQuorum, NotLeader, StoreError
from controlplane.model import Decision, Intent, Observation
from controlplane.state import ControlState, MemberStatus, StoreStatus

log = logging.getLogger(__name__)

BACKEND = "raft"
JOURNAL_FILE = "raft.journal"
SNAPSHOT_FILE = "raft.snapshot"

# pysyncobj's `_RAFT_STATE.LEADER`, passed to `onStateChanged`; the class is private.
_RAFT_LEADER = 2

# Commands pysyncobj may hold before it refuses more with QUEUE_FULL (its default is
# 100 000; a full queue means the node is far behind, and memory must stay bounded).
_COMMAND_QUEUE_SIZE = 4096

# How long `start()` waits for the journal to replay up to the persisted commit index
# when replay stops making progress (a journal cut short by a crash never gets there).
_REPLAY_STALL_S = 0.5
_REPLAY_MAX_S = 30.0

_BIND_RETRY_S = 0.2
_BIND_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class RaftTimings:
    """Raft tuning; the defaults are measured on loopback (see the team's FACTS.md).

    `election_timeout_*_s` bound the randomised wait before a follower that stopped
    hearing from its leader stands for election (re-election takes about the minimum plus
    one round trip). `heartbeat_s` is the leader's append-entries period and must stay
    below a third of the minimum election timeout. `leader_fallback_s` is how long a
    leader that hears from no majority keeps believing it leads (pysyncobj's default is
    30 s), and the window `status().has_quorum` uses. `commit_timeout_s` bounds every
    write. `connection_timeout_s` drops a silent connection, `reconnect_s` is the pause
    between dial attempts. A snapshot is taken (and the journal truncated) once the
    journal holds `compaction_min_entries` entries or `compaction_interval_s` after the
    last one.
    """

    election_timeout_min_s: float = 0.4
    election_timeout_max_s: float = 0.8
    heartbeat_s: float = 0.05
    leader_fallback_s: float = 1.5
    commit_timeout_s: float = 3.0
    connection_timeout_s: float = 2.0
    reconnect_s: float = 0.5
    compaction_min_entries: int = 5000
    compaction_interval_s: float = 300.0

    def problems(self) -> list[str]:
        """Every broken rule as `backend.raft.<field>: what (got value)`; empty when usable.

        pysyncobj checks some of these with `assert`, which `python -O` strips.
        """
        out: list[str] = []
        path = "backend.raft"
        for name in (
            "election_timeout_min_s",
            "election_timeout_max_s",
            "heartbeat_s",
            "leader_fallback_s",
            "commit_timeout_s",
            "connection_timeout_s",
            "compaction_interval_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                out.append(f"{path}.{name}: must be positive (got {value})")
        if self.reconnect_s < 0:
            out.append(f"{path}.reconnect_s: must not be negative (got {self.reconnect_s})")
        if self.election_timeout_max_s <= self.election_timeout_min_s:
            out.append(
                f"{path}.election_timeout_max_s: must exceed election_timeout_min_s "
                f"(got {self.election_timeout_max_s})"
            )
        if self.election_timeout_min_s <= 3 * self.heartbeat_s:
            out.append(
                f"{path}.heartbeat_s: must be below election_timeout_min_s / 3 (got {self.heartbeat_s})"
            )
        if self.leader_fallback_s <= self.heartbeat_s:
            out.append(f"{path}.leader_fallback_s: must exceed heartbeat_s (got {self.leader_fallback_s})")
        if self.connection_timeout_s < self.election_timeout_max_s:
            out.append(
                f"{path}.connection_timeout_s: must be at least election_timeout_max_s "
                f"(got {self.connection_timeout_s})"
            )
        if self.compaction_min_entries < 2:
            out.append(
                f"{path}.compaction_min_entries: must be at least 2 (got {self.compaction_min_entries})"
            )
        return out


def write_failed(reason: int, leader: str | None) -> StoreError:
    """The error for a write pysyncobj reports as failed with `reason` (a FAIL_REASON)."""
    if reason in (FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED):
        # The entry was refused by a non-leader, or overwritten by a new leader's log:
        # it was not applied anywhere.
        return NotLeader(
            "leadership changed before the write was committed; it was not applied", leader=leader
        )
    if reason in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
        # The leader that took the write went away before answering: it may still commit.
        return NoQuorum(
            "leadership changed while the write was in flight",
            "it may still be committed; retry (intents with the same id apply once)",
        )
    if reason == FAIL_REASON.MISSING_LEADER:
        return NoQuorum("no leader: an election is running or this member is cut off")
    if reason == FAIL_REASON.QUEUE_FULL:
        return StoreError("too many writes queued on this member", "retry later")
    if reason == FAIL_REASON.REQUEST_DENIED:
        return StoreError("the leader denied the write")
    return StoreError(f"write failed (pysyncobj reason {reason})")


class RaftStore(ControlStore):
    """One agent's member of the embedded Raft group (see the module docstring).

    `members` maps every member id (this one included) to its Raft address `host:port`;
    the address is the member's identity on the wire. `dial` optionally maps member ids
    to another address to connect to instead (a proxy); identity is unchanged. A store
    is started once and closed once; a restart is a new `RaftStore` on the same
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
        timings = timings or RaftTimings()
        problems = timings.problems()
        if not secret:
            problems.append(
                "cluster.secret: required for the raft backend; it authenticates members (got nothing)"
            )
        if member_id not in members:
            problems.append(f"cluster.agents: {member_id} is not one of the members (got {sorted(members)})")
        for mid, address in members.items():
            try:
                split_address(address)
            except ValueError:
                problems.append(f"cluster.agents.{mid}.raft: must be host:port (got {address!r})")
        if len(set(members.values())) != len(members):
            problems.append(
                f"cluster.agents: raft addresses must be distinct (got {sorted(members.values())})"
            )
        for mid, address in (dial or {}).items():
            if mid not in members:
                problems.append(f"dial.{mid}: not a member (got {address!r})")
            try:
                split_address(address)
            except ValueError:
                problems.append(f"dial.{mid}: must be host:port (got {address!r})")
        if problems:
            raise ConfigError(problems)

        self.member_id = member_id
        self.members: Mapping[str, str] = dict(members)
        self.data_dir = data_dir
        self.timings = timings
        self._secret = secret
        self._dial = dict(dial or {})
        self._member_by_address = {address: mid for mid, address in self.members.items()}
        self._max_in_flight = max_in_flight

        self._obj: Any = None  # the pysyncobj.SyncObj, once started
        self._machine = ControlMachine(self._publish)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False

        # Written by pysyncobj's thread, read by the event loop: plain reference swaps.
        self._state: ControlState = self._machine.snapshot()
        self._status = self._idle_status(time.time())
        # Read and written only on pysyncobj's thread.
        self._heard: dict[str, float] = {}
        self._peers: list[tuple[str, Any]] = []  # (member id, pysyncobj node), set by _open
        self._quorum_lost_at: float | None = self._status.quorum_lost_at

        # Event-loop side only.
        self._wake_scheduled = False
        self._changes = Changes(max_waiters)
        self._in_flight: set[asyncio.Future[tuple[Any, int]]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise StoreError("this raft store was already started; make a new one to restart")
        self._started = True
        self._loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(asyncio.to_thread(self._open))
        try:
            # Shielded: if start() is cancelled, the node still comes up in the worker
            # thread, and must then be taken down rather than left running.
            self._obj = await asyncio.shield(opening)
        except asyncio.CancelledError:
            self._closed = True
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._destroy, await opening)
            raise
        except StoreError:
            self._closed = True
            raise
        except Exception as exc:
            self._closed = True
            raise StoreError(f"raft member {self.member_id} failed to start", repr(exc)) from exc
        try:
            await self._await_replay()
        except BaseException:
            await self.close()
            raise

    def _open(self) -> Any:
        """Build and bind the pysyncobj node (worker thread: binds, derives the key)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        t = self.timings
        own_address = self.members[self.member_id]
        conf = SyncObjConf(
            password=self._secret,
            autoTick=True,
            appendEntriesUseBatch=False,
            raftMinTimeout=t.election_timeout_min_s,
            raftMaxTimeout=t.election_timeout_max_s,
            appendEntriesPeriod=t.heartbeat_s,
            leaderFallbackTimeout=t.leader_fallback_s,
            connectionTimeout=t.connection_timeout_s,
            connectionRetryTime=t.reconnect_s,
            # Fail fast when there is no leader instead of parking writes in a queue
            # that outlives their caller's timeout.
            commandsWaitLeader=False,
            commandsQueueSize=_COMMAND_QUEUE_SIZE,
            journalFile=str(self.data_dir / JOURNAL_FILE),
            fullDumpFile=str(self.data_dir / SNAPSHOT_FILE),
            useFork=False,
            logCompactionMinEntries=t.compaction_min_entries,
            logCompactionMinTime=t.compaction_interval_s,
            # pysyncobj binds 0.0.0.0 by default; listen only where members reach us.
            bindAddress=own_address,
            bindRetryTime=_BIND_RETRY_S,
            maxBindRetries=_BIND_ATTEMPTS,
            dynamicMembershipChange=False,
            onStateChanged=self._on_raft_state_changed,
        )
        others = [
            DialNode(address, self._dial[mid]) if mid in self._dial else TCPNode(address)
            for mid, address in self.members.items()
            if mid != self.member_id
        ]
        self._peers = [(self._member_by_address[node.id], node) for node in others]
        # pysyncobj's tick thread stops when the thread that built it ends; this worker
        # thread lives as long as the event loop's default executor.
        obj = SyncObj(
            own_address,
            others,
            conf=conf,
            consumers=[self._machine],
            transportClass=functools.partial(HeardTransport, heard=self._heard),
        )
        try:
            obj.waitBinded()
        except Exception as exc:
            self._destroy(obj)
            raise StoreError(
                f"raft member {self.member_id} cannot listen on {own_address}", repr(exc)
            ) from exc
        obj.addOnTickCallback(functools.partial(self._on_tick, obj))
        return obj

    async def _await_replay(self) -> None:
        """Wait until the journal on disk is applied, so `state()` is the recovered state.

        pysyncobj replays committed entries on its thread after start; without this a
        restarted agent would serve an empty state until then.
        """
        obj = self._obj
        target = obj.raftCommitIndex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _REPLAY_MAX_S
        last, last_progress = obj.raftLastApplied, loop.time()
        while obj.raftLastApplied < target and loop.time() < deadline:
            await asyncio.sleep(0.01)
            applied = obj.raftLastApplied
            if applied != last:
                last, last_progress = applied, loop.time()
            elif loop.time() - last_progress > _REPLAY_STALL_S:
                log.warning(
                    "raft member %s: journal replay stopped at %d of %d; the rest comes from the leader",
                    self.member_id,
                    applied,
                    target,
                )
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        obj, self._obj = self._obj, None
        if obj is not None:
            await asyncio.to_thread(self._destroy, obj)
        for fut in self._in_flight:
            if not fut.done():
                fut.set_exception(StoreError(f"raft member {self.member_id} closed"))
        self._status = self._idle_status(self._status.quorum_lost_at or time.time())
        self._wake()

    def _destroy(self, obj: Any) -> None:
        """Stop the node (worker thread: joins pysyncobj's thread)."""
        obj.destroy_synchronous()
        # pysyncobj persists the commit index only once a second and not on destroy;
        # persist it now (its thread is gone, so nothing races) so that a restart
        # recovers every entry this member applied without waiting for a leader.
        journal = getattr(obj, "_SyncObj__raftLog", None)
        if journal is not None and hasattr(journal, "onOneSecondTimer"):
            try:
                journal.onOneSecondTimer()
            except OSError:
                log.exception("raft member %s: could not persist the commit index", self.member_id)
        # pysyncobj never closes the pipe that wakes its thread (two descriptors per node).
        notifier = getattr(obj, "_SyncObj__pipeNotifier", None)
        for name in ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW"):
            fd = getattr(notifier, name, None)
            if isinstance(fd, int):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- reads ---------------------------------------------------------------------------

    def state(self) -> ControlState:
        return self._state

    def status(self) -> StoreStatus:
        return self._status

    async def wait_for_change(self, after_version: int, timeout_s: float) -> ControlState:
        return await self._changes.wait(lambda: self._state, after_version, timeout_s, lambda: self._closed)

    # -- writes --------------------------------------------------------------------------

    async def publish_observations(self, observer: str, observations: Sequence[Observation]) -> None:
        await self._replicate(self._machine.publish_observations, observer, tuple(observations))

    async def submit_intent(self, intent: Intent) -> Intent:
        result = await self._replicate(self._machine.submit_intent, intent, time.time())
        if not isinstance(result, Intent):
            raise StoreError("submit_intent returned no intent", repr(result))
        return result

    async def delete_intent(self, intent_id: str, who: str, reason: str) -> Intent:
        result = await self._replicate(self._machine.delete_intent, intent_id, who, reason, time.time())
        if not isinstance(result, Intent):
            raise StoreError("delete_intent returned no intent", repr(result))
        return result

    async def commit_decision(self, decision: Decision) -> Decision:
        obj = self._require_running()
        # Local fence: only the leader of exactly this term may write. The state machine
        # fences again on apply, for a leader deposed after this check.
        if not obj._isLeader():
            raise NotLeader(f"{self.member_id} is not the leader", leader=self._status.leader)
        term = obj.raftCurrentTerm
        if term != decision.term:
            raise NotLeader(
                f"{self.member_id} leads in term {term}, not in term {decision.term}",
                leader=self.member_id,
            )
        result = await self._replicate(self._machine.commit_decision, decision)
        if not isinstance(result, Decision):
            raise StoreError("commit_decision returned no decision", repr(result))
        return result

    async def _replicate(self, command: Callable[..., Any], *args: Any) -> Any:
        """Commit one command and return what its apply returned on this member."""
        obj = self._require_running()
        loop = self._loop
        if loop is None:
            raise StoreError(f"raft member {self.member_id} is not started")
        if obj._getLeader() is None:
            raise NoQuorum("no leader: an election is running or this member is cut off")
        if len(self._in_flight) >= self._max_in_flight:
            raise StoreError("too many writes in flight on this member", f"limit is {self._max_in_flight}")

        fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def settle(result: Any, reason: int) -> None:
            if not fut.done():
                fut.set_result((result, reason))

        def on_result(result: Any, reason: int) -> None:
            # pysyncobj's thread. Must not raise: an exception here would make pysyncobj
            # apply the same entry again.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, result, reason)

        self._in_flight.add(fut)
        try:
            try:
                command(*args, callback=on_result)
            except Exception as exc:  # e.g. the wake-up pipe is full: pysyncobj is stuck
                raise StoreError("could not queue the write", repr(exc)) from exc
            try:
                async with asyncio.timeout(self.timings.commit_timeout_s):
                    result, reason = await fut
            except TimeoutError:
                raise NoQuorum(
                    f"not committed within {self.timings.commit_timeout_s:g} s",
                    "it may still be committed; retry (intents with the same id apply once)",
                ) from None
        finally:
            self._in_flight.discard(fut)
        if reason != FAIL_REASON.SUCCESS:
            raise write_failed(reason, self._status.leader)
        if isinstance(result, ControlplaneError):
            raise result
        return result

    def _require_running(self) -> Any:
        if self._obj is None or self._closed:
            raise StoreError(f"raft member {self.member_id} is not running")
        return self._obj

    # -- pysyncobj's thread ----------------------------------------------------------------

    def _publish(self, state: ControlState) -> None:
        """Swap in a newly applied snapshot and wake waiters (called on pysyncobj's thread)."""
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

    def _on_raft_state_changed(self, old: int, new: int) -> None:
        if new != _RAFT_LEADER:
            return
        try:
            # Queued behind nothing a deposed leader could have forwarded: see raft_machine.
            self._machine.claim_term(self._machine._syncObj.raftCurrentTerm)
            if not self._machine.epoch:
                # The first leader of a new cluster creates its state's epoch (first wins).
                self._machine.init_epoch(transitions.new_epoch(), time.time())
        except Exception:
            log.exception("raft member %s: could not claim its term", self.member_id)

    def _on_tick(self, obj: Any) -> None:
        try:
            self._status = self._read_status(obj)
        except Exception:
            log.exception("raft member %s: status refresh failed", self.member_id)

    def _read_status(self, obj: Any) -> StoreStatus:
        now = time.monotonic()
        window = self.timings.leader_fallback_s
        own_address = self.members[self.member_id]
        leader_node = obj._getLeader()
        leader_address: str | None = leader_node.id if leader_node is not None else None
        is_leader = bool(obj._isLeader())
        connected = {mid: bool(obj.isNodeConnected(node)) for mid, node in self._peers}
        members = tuple(
            MemberStatus(id=mid, address=address, connected=connected.get(mid, mid == self.member_id))
            for mid, address in self.members.items()
        )

        def heard_recently(address: str) -> bool:
            return now - self._heard.get(address, float("-inf")) <= window

        if is_leader:
            acked = 1 + sum(
                1 for address in self.members.values() if address != own_address and heard_recently(address)
            )
            has_quorum = 2 * acked > len(self.members)
        else:
            has_quorum = (
                leader_address is not None
                and leader_address != own_address
                and heard_recently(leader_address)
            )

        if has_quorum:
            self._quorum_lost_at = None
        elif self._quorum_lost_at is None:
            self._quorum_lost_at = time.time()
        return StoreStatus(
            member_id=self.member_id,
            leader=self._member_by_address.get(leader_address) if leader_address is not None else None,
            is_leader=is_leader,
            term=int(obj.raftCurrentTerm),
            commit_index=int(obj.raftCommitIndex),
            members=members,
            has_quorum=has_quorum,
            quorum_lost_at=self._quorum_lost_at,
            backend=BACKEND,
        )

    def _idle_status(self, quorum_lost_at: float) -> StoreStatus:
        """Status while not running: no leader, no quorum, nobody connected."""
        previous: StoreStatus | None = getattr(self, "_status", None)
        members = tuple(
            MemberStatus(id=mid, address=address, connected=False) for mid, address in self.members.items()
        )
        if previous is not None:
            return replace(
                previous,
                leader=None,
                is_leader=False,
                members=members,
                has_quorum=False,
                quorum_lost_at=quorum_lost_at,
            )
        return StoreStatus(
            member_id=self.member_id,
            leader=None,
            is_leader=False,
            term=0,
            commit_index=0,
            members=members,
            has_quorum=False,
            quorum_lost_at=quorum_lost_at,
            backend=BACKEND,
        )
