"""The Raft state machine: pure, deterministic, single-threaded (etcd-io/raft is the model).

No I/O, no clock, no threads: time is `tick()`, randomness comes from the injected
`random.Random`, input is `step(message)` and the local calls (`propose`, `read_index`,
`transfer_leadership`, `compact`). Output is a `Ready` batch the shell persists, sends
and applies, then acknowledges with `advance()`. So every interleaving can be replayed
from a seed, and the tests are scripts of messages.

Guarantees (the numbers refer to issue 12):

- Election safety with pre-vote and check-quorum: a node that heard from a live leader
  within the (minimum) election timeout ignores (pre-)vote requests, so a returning
  partitioned node cannot disrupt the cluster; a leader that has not heard from a
  majority within an election timeout steps down (item 9).
- Commit only what matches (item 1): a follower's commit index only ever advances to
  min(leader commit, the last index it has VERIFIED matches the current leader's log in
  this term). Verified means: acknowledged through the log-matching check of an append,
  or a snapshot index. Heartbeats never verify anything by themselves. An installed
  snapshot keeps the log suffix only if the log holds the snapshot's (index, term).
- Applied entries are never truncated (item 2): `RaftLog` refuses (raises) any change
  at or below the commit index, and the handlers below never ask for one: appends
  below the commit index are answered with the commit index, snapshots at or below it
  are ignored.
- A damaged node (`Restored.recovering`) neither votes nor campaigns until it has
  matched the leader's log up to the leader's commit index in a term at least its
  stored term. A node whose vote record was lost (`Restored.vote_unknown`) also never
  grants a vote in a term at or below the highest term it has seen since start
  (reasoning in controlplane/raft/storage.py).
- ReadIndex is etcd's ReadOnlySafe: the leader answers with its commit index only
  after a quorum acknowledged a heartbeat sent after the request, and only once it has
  committed an entry in its own term.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from controlplane.errors import ControlplaneError
from controlplane.raft.log import RaftLog
from controlplane.raft.messages import (
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgType,
    NodeId,
    ReadState,
    Ready,
    Role,
    Snapshot,
)
from controlplane.raft.progress import Progress, ProgressState
from controlplane.raft.quorum import VoteResult, committed_index, has_quorum, vote_result


class ProposalRefused(ControlplaneError):
    """The core cannot take a proposal now (`reason` says why: not leader, transferring)."""

    def __init__(self, reason: str, leader: NodeId | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.leader = leader


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Core parameters in ticks and counts (the shell converts seconds into ticks)."""

    election_ticks_min: int = 10
    election_ticks_max: int = 20
    heartbeat_ticks: int = 1
    max_append_entries: int = 256
    max_append_bytes: int = 1 << 20
    max_inflight: int = 64
    max_apply_entries: int = 1024
    max_pending_reads: int = 4096
    check_quorum: bool = True
    pre_vote: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.heartbeat_ticks < 1:
            out.append(f"heartbeat_ticks: must be at least 1 (got {self.heartbeat_ticks})")
        if self.election_ticks_min <= self.heartbeat_ticks:
            out.append(f"election_ticks_min: must exceed heartbeat_ticks (got {self.election_ticks_min})")
        if self.election_ticks_max <= self.election_ticks_min:
            out.append(f"election_ticks_max: must exceed election_ticks_min (got {self.election_ticks_max})")
        for name in ("max_append_entries", "max_append_bytes", "max_inflight", "max_apply_entries"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be at least 1 (got {getattr(self, name)})")
        return out


@dataclass(frozen=True, slots=True)
class Restored:
    """The state a node starts from, as loaded from its storage by the shell.

    `applied` is what the shell has already replayed into the state machine (normally
    the commit index: a restarted node must not serve less than it applied before).
    """

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot = field(default_factory=Snapshot)
    entries: tuple[Entry, ...] = ()
    applied: int = 0
    recovering: bool = False
    vote_unknown: bool = False


@dataclass(slots=True)
class _ReadRequest:
    index: int
    src: NodeId
    context: bytes
    acks: set[NodeId] = field(default_factory=set)


class RaftCore:
    def __init__(
        self,
        node_id: NodeId,
        members: Collection[NodeId],
        config: CoreConfig,
        rng: random.Random,
        restored: Restored | None = None,
    ) -> None:
        if node_id not in members:
            raise ValueError(f"{node_id!r} is not one of the members {sorted(members)}")
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        restored = restored or Restored()
        self.id = node_id
        self.voters: tuple[NodeId, ...] = tuple(sorted(members))
        self.peers: tuple[NodeId, ...] = tuple(m for m in self.voters if m != node_id)
        self.config = config
        self._rng = rng
        hs = restored.hard_state
        self.log = RaftLog(
            restored.snapshot,
            restored.entries,
            min(hs.commit, restored.snapshot.index + len(restored.entries)),
            restored.applied,
        )
        self.term = max(hs.term, self.log.last_term())
        self.vote: NodeId | None = hs.vote if hs.term == self.term else None
        self.leader: NodeId | None = None
        self.role = Role.FOLLOWER
        self.recovering = restored.recovering or restored.vote_unknown
        self.vote_unknown = restored.vote_unknown
        # recovering ends once caught up with a leader of at least this term.
        self._recover_min_term = self.term
        # vote_unknown: never grant a vote in a term at or below this.
        self._vote_floor = self.term
        self._verified = 0  # last index verified to match the current leader's log (this term)
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = 0
        self._reset_randomized_timeout()
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, Progress] = {}
        self._transferee: NodeId | None = None
        # Why this node last stopped leading in its own term, for the shell to log (then clear).
        self.step_down_reason: str | None = None
        self._term_start = 0  # index of this leader's first entry in its term
        self._reads: deque[_ReadRequest] = deque()
        self._reads_waiting_commit: list[Message] = []
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._prev_hard = HardState(self.term, self.vote, self.log.committed)
        self._outstanding: Ready | None = None
        self._ctime = 0.0  # latest cluster time the shell told us (tick/propose)

    # -- the local API ------------------------------------------------------------------

    def tick(self, ctime: float | None = None) -> None:
        """One unit of time. `ctime` is the shell's current cluster time, for the entry a
        newly elected leader appends (the core never reads a clock)."""
        if ctime is not None:
            self._ctime = max(self._ctime, ctime)
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (as an election timeout would), if this node may."""
        if self.role is not Role.LEADER and self._promotable():
            self._campaign(transfer=False)

    def propose(self, data: Sequence[bytes], ctime: float) -> tuple[int, int]:
        """Append entries (leader only). Returns (first index, term); raises ProposalRefused."""
        if self.role is not Role.LEADER:
            raise ProposalRefused("not the leader", self.leader)
        if self._transferee is not None:
            raise ProposalRefused(f"leadership is being transferred to {self._transferee}", self.leader)
        self._ctime = max(self._ctime, ctime)
        first = self.log.last_index() + 1
        entries = [
            Entry(first + n, self.term, self._ctime, bytes(d), EntryKind.NORMAL) for n, d in enumerate(data)
        ]
        self._append_as_leader(entries)
        return first, self.term

    def read_index(self, context: bytes) -> bool:
        """Ask for a ReadIndex; the answer comes as a ReadState in a later Ready.
        False when no leader is known (the request went nowhere)."""
        msg = Message(MsgType.READ_INDEX, self.id, self.id, 0, context=context)
        if self.role is Role.LEADER:
            self._leader_read_index(msg)
            return True
        if self.leader is None:
            return False
        self._send(Message(MsgType.READ_INDEX, self.id, self.leader, self.term, context=context))
        return True

    def transfer_leadership(self, target: NodeId) -> bool:
        """Hand leadership to `target` (MsgTimeoutNow once its log is up to date)."""
        if self.role is not Role.LEADER or target not in self.peers:
            return False
        self._transferee = target
        self._election_elapsed = 0
        pr = self._progress[target]
        if pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, self.id, target, self.term))
        else:
            self._send_append(target)
        return True

    def step_down(self) -> None:
        """Stop leading (same term), e.g. because this node's disk fails."""
        if self.role is not Role.FOLLOWER:
            self.step_down_reason = "asked to step down"
            self._become_follower(self.term, None)

    def compact(self, index: int, snapshot: Snapshot) -> None:
        """The application snapshotted its state at `index` (<= applied): drop the log up to it."""
        self.log.compact(index, snapshot)

    @property
    def committed(self) -> int:
        return self.log.committed

    @property
    def applied(self) -> int:
        return self.log.applied

    @property
    def transferee(self) -> NodeId | None:
        return self._transferee

    def progress_of(self, peer: NodeId) -> Progress | None:
        return self._progress.get(peer) if self.role is Role.LEADER else None

    def committed_in_term(self) -> bool:
        return self.role is Role.LEADER and self.log.committed >= self._term_start > 0

    # -- Ready ----------------------------------------------------------------------------

    def has_ready(self) -> bool:
        return bool(
            self._msgs
            or self._read_states
            or self.log.pending_snapshot is not None
            or self.log.stable < self.log.last_index()
            or self.log.committed > self.log.applied
            or self._hard_state() != self._prev_hard
        )

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance()")
        hard = self._hard_state()
        unstable = self.log.unstable()
        snap = self.log.pending_snapshot
        if snap is not None:
            committed: list[Entry] = []
        else:
            committed = self.log.next_committed(self.config.max_apply_entries)
        rd = Ready(
            hard_state=hard if hard != self._prev_hard else None,
            entries=tuple(unstable),
            snapshot=snap,
            committed=tuple(committed),
            messages=tuple(self._msgs),
            read_states=tuple(self._read_states),
            role=self.role,
            leader=self.leader,
            term=self.term,
            commit=self.log.committed,
        )
        self._msgs = []
        self._read_states = []
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The shell has persisted, sent and applied `rd`."""
        if rd is not self._outstanding:
            raise RuntimeError("advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            if self.log.pending_snapshot is rd.snapshot:
                self.log.pending_snapshot = None
            self.log.applied = max(self.log.applied, rd.snapshot.index)
        if rd.entries:
            last = rd.entries[-1]
            # Entries may have been replaced meanwhile; only what still matches is stable.
            if self.log.match_term(last.index, last.term):
                self.log.stable = max(self.log.stable, last.index)
        if rd.committed:
            self.log.applied = max(self.log.applied, rd.committed[-1].index)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    # -- step ------------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        """Handle a message from a peer."""
        if m.dst != self.id or m.src not in self.peers:
            return
        if self.vote_unknown and m.type not in (MsgType.PRE_VOTE, MsgType.PRE_VOTE_RESP):
            vote_request = m.type is MsgType.VOTE
            floor_before = self._vote_floor
            self._vote_floor = max(self._vote_floor, m.term)
            if vote_request and m.term <= floor_before:
                self._send_vote_reply(m, granted=False)
                return
        if m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE) and not m.force and self._in_lease():
                return  # a live leader exists: ignore a disruptive candidate
            if m.type is MsgType.PRE_VOTE or (m.type is MsgType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change terms
            elif m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if m.type in (MsgType.APP, MsgType.HEARTBEAT):
                # A stale leader (e.g. back from a partition): tell it our term so it steps down.
                self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term))
            elif m.type is MsgType.PRE_VOTE:
                self._send(Message(MsgType.PRE_VOTE_RESP, self.id, m.src, self.term, reject=True))
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is MsgType.PRE_VOTE
        can_vote = (
            self.vote == m.src or (self.vote is None and self.leader is None) or (pre and m.term > self.term)
        )
        granted = can_vote and not self.recovering and self.log.is_up_to_date(m.index, m.log_term)
        if granted and not pre:
            self._election_elapsed = 0
            self.vote = m.src
        self._send_vote_reply(m, granted)

    def _send_vote_reply(self, m: Message, granted: bool) -> None:
        kind = MsgType.PRE_VOTE_RESP if m.type is MsgType.PRE_VOTE else MsgType.VOTE_RESP
        # A granted pre-vote answers in the candidate's future term; a rejection in ours.
        term = m.term if granted else self.term
        self._send(Message(kind, self.id, m.src, term, reject=not granted))

    def _in_lease(self) -> bool:
        return (
            self.config.check_quorum
            and self.leader is not None
            and self._election_elapsed < self.config.election_ticks_min
        )

    # -- follower ------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        if m.type is MsgType.APP:
            self._election_elapsed = 0
            self.leader = m.src
            self._handle_append(m)
        elif m.type is MsgType.HEARTBEAT:
            self._election_elapsed = 0
            self.leader = m.src
            self._commit_verified(m.commit)
            # A log shorter than the leader's commit index lost entries it had acknowledged
            # (a damaged journal): say so, or the leader would never resend them.
            lost = self.log.last_index() < m.commit
            self._send(
                Message(
                    MsgType.HEARTBEAT_RESP,
                    self.id,
                    m.src,
                    self.term,
                    context=m.context,
                    reject=lost,
                    reject_hint=self.log.last_index(),
                )
            )
        elif m.type is MsgType.SNAP:
            self._election_elapsed = 0
            self.leader = m.src
            self._handle_snapshot(m)
        elif m.type is MsgType.TIMEOUT_NOW:
            if self._promotable():
                self._campaign(transfer=True)
        elif m.type is MsgType.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            # Everything up to our commit index matches any leader's log (Leader
            # Completeness); say where we are instead of looking at older entries.
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.log.committed))
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.entries)
        if last_new is None:
            hint, hint_term = self.log.find_conflict_by_term(min(m.index, self.log.last_index()), m.log_term)
            self._send(
                Message(
                    MsgType.APP_RESP,
                    self.id,
                    m.src,
                    self.term,
                    index=m.index,
                    reject=True,
                    reject_hint=hint,
                    log_term=hint_term,
                )
            )
            return
        self._verified = max(self._verified, last_new)
        self._commit_verified(m.commit)
        self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=last_new))

    def _commit_verified(self, leader_commit: int) -> None:
        self.log.commit_to(min(leader_commit, self._verified))
        if (
            self.recovering
            and self.term >= self._recover_min_term
            and self._verified >= leader_commit
            and self.log.committed >= leader_commit
        ):
            self.recovering = False

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is None:
            return
        if snap.index <= self.log.committed:
            self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.log.committed))
            return
        if self.log.match_term(snap.index, snap.term):
            # Our log holds the snapshot's last entry: keep the suffix, commit up to it.
            self._verified = max(self._verified, snap.index)
            self.log.commit_to(snap.index)
        else:
            self.log.restore(snap)
            self._verified = max(self._verified, snap.index)
        self._commit_verified(m.commit)
        self._send(Message(MsgType.APP_RESP, self.id, m.src, self.term, index=self.log.committed))

    # -- candidates ----------------------------------------------------------------------

    def _step_candidate(self, m: Message) -> None:
        if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            # A leader of our term exists (we lost this election).
            self._become_follower(m.term, m.src)
            self._step_follower(m)
        elif m.type in (MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP):
            expected = MsgType.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MsgType.VOTE_RESP
            if m.type is not expected:
                return
            self._votes[m.src] = not m.reject
            result = vote_result(self.voters, self._votes)
            if result is VoteResult.WON:
                if self.role is Role.PRE_CANDIDATE:
                    self._campaign_real(force=False)
                else:
                    self._become_leader()
            elif result is VoteResult.LOST:
                self._become_follower(self.term, None)

    def _promotable(self) -> bool:
        return not self.recovering

    def _campaign(self, transfer: bool) -> None:
        if self.config.pre_vote and not transfer:
            self.role = Role.PRE_CANDIDATE
            self.leader = None
            self._votes = {self.id: True}
            self._election_elapsed = 0
            self._reset_randomized_timeout()
            if vote_result(self.voters, self._votes) is VoteResult.WON:
                self._campaign_real(force=False)
                return
            for p in self.peers:
                self._send(
                    Message(
                        MsgType.PRE_VOTE,
                        self.id,
                        p,
                        self.term + 1,
                        index=self.log.last_index(),
                        log_term=self.log.last_term(),
                    )
                )
        else:
            self._campaign_real(force=transfer)

    def _campaign_real(self, force: bool) -> None:
        term = self.term + 1
        if self.vote_unknown:
            term = max(term, self._vote_floor + 1)
        self._reset(term)
        self.role = Role.CANDIDATE
        self.vote = self.id
        self._votes = {self.id: True}
        if vote_result(self.voters, self._votes) is VoteResult.WON:
            self._become_leader()
            return
        for p in self.peers:
            self._send(
                Message(
                    MsgType.VOTE,
                    self.id,
                    p,
                    self.term,
                    index=self.log.last_index(),
                    log_term=self.log.last_term(),
                    force=force,
                )
            )

    # -- leader --------------------------------------------------------------------------

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.log.last_index()
        self._progress = {p: Progress(last + 1, self.config.max_inflight) for p in self.peers}
        ctime = max(self._ctime, self._last_ctime())
        self._term_start = last + 1
        self._append_as_leader([Entry(last + 1, self.term, ctime, b"", EntryKind.NOOP)])

    def _last_ctime(self) -> float:
        last = self.log.last_index()
        return self.log.entry(last).ctime if last > self.log.offset else self.log.snapshot.ctime

    def _append_as_leader(self, entries: list[Entry]) -> None:
        self.log.append(entries)
        if not self._maybe_commit():
            self._bcast_append()

    def _maybe_commit(self) -> bool:
        match = {p: pr.match for p, pr in self._progress.items()}
        match[self.id] = self.log.last_index()
        ci = committed_index(self.voters, match)
        # Only entries of the current term are committed by counting (Raft section 5.4.2).
        if ci > self.log.committed and self.log.term(ci) == self.term:
            self.log.commit_to(ci)
            self._bcast_append()
            self._release_reads_waiting_commit()
            return True
        return False

    def _bcast_append(self) -> None:
        for p in self.peers:
            self._send_append(p)

    def _send_append(self, to: NodeId, send_if_empty: bool = True) -> bool:
        pr = self._progress[to]
        if pr.is_paused():
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        entries = self.log.slice(pr.next, self.config.max_append_entries, self.config.max_append_bytes)
        if prev_term is None or entries is None:
            snap = self.log.snapshot
            self._send(
                Message(MsgType.SNAP, self.id, to, self.term, snapshot=snap, commit=self.log.committed)
            )
            pr.become_snapshot(snap.index)
            return True
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                MsgType.APP,
                self.id,
                to,
                self.term,
                index=prev,
                log_term=prev_term,
                entries=tuple(entries),
                commit=self.log.committed,
            )
        )
        pr.sent(prev + len(entries), len(entries))
        return True

    def _bcast_heartbeat(self, context: bytes = b"") -> None:
        for p in self.peers:
            self._send(
                Message(MsgType.HEARTBEAT, self.id, p, self.term, commit=self.log.committed, context=context)
            )

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for pr in self._progress.values():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snapshot_ticks += 1
                if pr.snapshot_ticks > 2 * self.config.election_ticks_max:
                    pr.become_probe()  # the snapshot (or its answer) was lost: try again
        if self._election_elapsed >= self.config.election_ticks_min:
            self._election_elapsed = 0
            if self.config.check_quorum:
                active = {p for p, pr in self._progress.items() if pr.recent_active} | {self.id}
                for pr in self._progress.values():
                    pr.recent_active = False
                if not has_quorum(self.voters, active):
                    silent = sorted(set(self.voters) - active)
                    self.step_down_reason = (
                        f"check-quorum: no answer from {', '.join(silent)} within "
                        f"{self.config.election_ticks_min} ticks"
                    )
                    self._become_follower(self.term, None)
                    return
            self._transferee = None  # a transfer that did not finish in time is abandoned
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat(self._reads[-1].context if self._reads else b"")

    def _step_leader(self, m: Message) -> None:
        if m.type is MsgType.READ_INDEX:
            self._leader_read_index(m)
            return
        pr = self._progress.get(m.src)
        if pr is None:
            return
        if m.type is MsgType.APP_RESP:
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif m.type is MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if m.reject and m.reject_hint < pr.match:
                self._lost_entries(pr, m.reject_hint)
            if pr.state is ProgressState.REPLICATE and len(pr.inflight) >= pr.max_inflight:
                pr.inflight.popleft()  # an append may have been lost: let one more through
            if pr.match < self.log.last_index():
                self._send_append(m.src)
            if m.context:
                self._ack_read(m.context, m.src)

    def _lost_entries(self, pr: Progress, last_index: int) -> None:
        """The follower's log ends before what it acknowledged: start over from there."""
        pr.match = min(pr.match, last_index)
        pr.become_probe()
        pr.next = last_index + 1

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decrease_to(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.src)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.free_up_to(m.index)
        if self._maybe_commit():
            pass
        elif was_paused:
            self._send_append(m.src)
        while self._send_append(m.src, send_if_empty=False):
            pass
        if m.src == self._transferee and pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, self.id, m.src, self.term))

    # -- ReadIndex (leader side) -----------------------------------------------------------

    def _leader_read_index(self, m: Message) -> None:
        src = m.src
        if len(self.voters) == 1:
            self._answer_read(src, self.log.committed, m.context)
            return
        if not self.committed_in_term():
            if len(self._reads_waiting_commit) < self.config.max_pending_reads:
                self._reads_waiting_commit.append(m)
            return
        if len(self._reads) >= self.config.max_pending_reads:
            return  # dropped: the asker times out and retries
        self._reads.append(_ReadRequest(self.log.committed, src, m.context, {self.id}))
        self._bcast_heartbeat(m.context)

    def _release_reads_waiting_commit(self) -> None:
        if self._reads_waiting_commit and self.committed_in_term():
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for m in waiting:
                self._leader_read_index(m)

    def _ack_read(self, context: bytes, src: NodeId) -> None:
        position = next((n for n, r in enumerate(self._reads) if r.context == context), None)
        if position is None:
            return
        req = self._reads[position]
        req.acks.add(src)
        if not has_quorum(self.voters, req.acks):
            return
        # A quorum heard from us after this request was made, hence after every earlier one.
        for _ in range(position + 1):
            done = self._reads.popleft()
            self._answer_read(done.src, done.index, done.context)

    def _answer_read(self, src: NodeId, index: int, context: bytes) -> None:
        if src == self.id:
            self._read_states.append(ReadState(index, context))
        else:
            self._send(
                Message(MsgType.READ_INDEX_RESP, self.id, src, self.term, index=index, context=context)
            )

    # -- role changes ----------------------------------------------------------------------

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._election_elapsed >= self._randomized_timeout:
            self._election_elapsed = 0
            if self._promotable():
                self._campaign(transfer=False)

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
            self._verified = 0
        self.leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._progress = {}
        self._transferee = None
        self._reads.clear()
        self._reads_waiting_commit = []
        self._term_start = 0

    def _reset_randomized_timeout(self) -> None:
        self._randomized_timeout = self._rng.randrange(
            self.config.election_ticks_min, self.config.election_ticks_max
        )

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
